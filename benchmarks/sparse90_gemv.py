"""int8_perm (work per kept weight and window) against int8 + bitmask (work per 64-column block) and a dense
Q4_0-like kernel, at LLaMA-7B linear shapes and 70/80/90/95% sparsity, batch 1 (issue 13, very sparse groups).

Three times per (shape, sparsity, kernel), the kernels taking turns within every repeat (the order reversed
every other repeat) so a drift in the machine's speed hits all of them alike:
  cold   the stored arrays copied until the copies hold >= --working-set-mib, walked in turn (nothing stays in
         the last-level cache), --threads threads, wall time per product;
  hot    one copy called repeatedly (cache-resident where it fits), --threads threads, wall time;
  cpu1   the serial build on one thread, *CPU time of that thread* (time.thread_time) on one hot copy: what the
         kernel costs a core, nearly blind to other processes sharing the machine (wall times are not).
Medians over --repeats. The int8 kernels quantise the activations per 256 columns (`quantize_act`, once per
input vector in a model, not included). Also: the assembly of int8_perm's window loop (fresh compile).

    .venv/bin/python benchmarks/sparse90_gemv.py [--threads 2] [--sparsities 0.7,0.8,0.9,0.95] [--repeats 7]
    (about 3-4 minutes on a 2-core Zen 4; writes results/sparse90_gemv_<cpu>.{json,md})
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

from sparsedeploy.engine.cpuinfo import cpu_tag  # noqa: E402
from lowbit_gemv import asm_in_fresh_process, idle_text, lscpu_model, machine_state, pruned  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]


def kernels():
    """name -> (sparse?, encode(W) -> arrays, call(fn, arrays, act, out), parallel fn, serial fn)."""
    from sparsedeploy.engine.native import lowbit as LB
    from sparsedeploy.engine.native.kernels import _serial_build

    e = np.zeros(0, np.float32)
    ks = {
        "int8 perm": (True, LB.encode_int8_perm,
                      lambda f, a, x, o: f(a["vecptr"], a["base"], a["packed"], a["window"], a["wscale"], x["q"],
                                           x["corr"], x["s"], e, o, False), LB.int8_perm_gemv),
        "int8 bitmask": (True, LB.encode_int8_bitmask,
                         lambda f, a, x, o: f(a["rowptr"], a["masks"], a["vals"], a["wscale"], x["q"], x["corr"],
                                              x["s"], e, o, False), LB.int8_bitmask_gemv),
        "Q4_0-like dense": (False, LB.encode_q4,
                            lambda f, a, x, o: f(a["w4"], a["ws"], x["q"], x["corr"], x["s"], e, o, False), LB.q4_gemv),
    }
    return {k: (sp, enc, call, fn, _serial_build(fn)) for k, (sp, enc, call, fn) in ks.items()}


def asm_worker():
    """Child with a fresh numba cache: compile int8_perm's VNNI kernel, report its window loop."""
    from native_asm_check import loops
    from sparsedeploy.engine.native import lowbit as LB

    if not (LB.has_vnni() and LB.has_vbmi()):
        print(json.dumps({"error": "this CPU has no AVX-512 VNNI + VBMI: int8_perm runs its portable loop"}))
        return
    W = pruned((64, 1024), 0.9)
    x = np.random.default_rng(0).standard_normal(1024).astype(np.float32)
    q, corr, s = LB.act_buffers(1024)
    LB.quantize_act(x, q, corr, s)
    a = LB.encode_int8_perm(W)
    out = np.zeros(64, np.float32)
    LB.int8_perm_gemv_vnni(a["vecptr"], a["base"], a["packed"], a["window"], a["wscale"], q, corr, s,
                           np.zeros(0, np.float32), out, False)
    asm = "\n".join(LB.int8_perm_gemv_vnni.inspect_asm().values())
    perm = re.compile(r"^\s*(vpermi2b|vpermt2b|vpermb)\b")
    cands = [b for b in loops(asm) if any(perm.match(l) for l in b)]
    body = max(cands, key=lambda b: sum(1 for l in b if perm.match(l)) / len(b)) if cands else []
    ins = [l.strip().split()[0] for l in body if l.strip() and not l.strip().endswith(":")]
    count = lambda pre: sum(1 for i in ins if i.startswith(pre))  # noqa: E731
    print(json.dumps({"function": {k: len(re.findall(rf"\b{k}\b", asm)) for k in
                                   ("vpermi2b", "vpermt2b", "vpermb", "vpermps", "vpermd", "vpdpbusd", "vpcmpeqb", "vfmadd231ps")},
                      "window_loop": {"instructions": len(ins), "vpermi2b/vpermt2b": count("vpermi2b") + count("vpermt2b"),
                                      "vpcmpeqb": count("vpcmpeqb"), "zmm": any("%zmm" in l for l in body),
                                      "loop": [l.rstrip() for l in body[:64]]}}))


def run_asm():
    return asm_in_fresh_process(__file__, "sparse90")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sparsities", default="0.7,0.8,0.9,0.95")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--working-set-mib", type=int, default=256)
    ap.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES))
    ap.add_argument("--out", default=None)
    ap.add_argument("--asm-worker", action="store_true")
    args = ap.parse_args()
    if args.asm_worker:
        return asm_worker()
    from sparsedeploy.engine.native import kernels as K
    from sparsedeploy.engine.native import lowbit as LB

    out_base = args.out or str(ROOT / "benchmarks" / "results" / f"sparse90_gemv_{cpu_tag()}")
    t_start = time.time()
    before = machine_state()
    asm = run_asm()
    threads = K.set_threads(args.threads)
    ks = kernels()
    sparsities = [float(s) for s in args.sparsities.split(",") if s]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ws = args.working_set_mib << 20
    rows = []
    for shape in shapes:
        out_f, in_f = shape
        xv = np.random.default_rng(1).standard_normal(in_f, dtype=np.float32)
        q, corr, s = LB.act_buffers(in_f)
        LB.quantize_act(xv, q, corr, s)
        x = {"q": q, "corr": corr, "s": s}
        out = np.zeros(out_f, np.float32)
        q4 = None
        for p in sparsities:
            W = pruned(shape, p)
            ref = LB.dequantized(W) @ LB.dequantized_act(xv)
            cells = {}
            for name, (sparse, enc, call, fn, ser) in ks.items():
                if not sparse and q4 is not None:
                    a = q4
                else:
                    a = enc(pruned(shape, 0.0) if not sparse else W)
                    if not sparse:
                        q4 = a
                nbytes = sum(v.nbytes for v in a.values())
                n = max(2, -(-ws // nbytes))
                mats = [a] + [{k: v.copy() for k, v in a.items()} for _ in range(n - 1)]
                out[:] = np.nan
                call(fn, a, x, out)
                call(ser, a, x, out)
                err = float(np.abs(out - ref).max() / np.abs(ref).max()) if sparse else None
                cells[name] = {"a": a, "mats": mats, "nbytes": nbytes, "err": err, "cold": [], "hot": [], "cpu1": []}
            names = list(cells)
            for rep in range(args.repeats):
                for name in (names if rep % 2 == 0 else names[::-1]):
                    c = cells[name]
                    _, _, call, fn, ser = ks[name]
                    t0 = time.perf_counter()
                    for a in c["mats"]:
                        call(fn, a, x, out)
                    c["cold"].append((time.perf_counter() - t0) / len(c["mats"]))
                    a = c["a"]
                    hot_calls = max(3, int(0.02 / max(c["nbytes"] / 30e9, 1e-6)))
                    t0 = time.perf_counter()
                    for _ in range(hot_calls):
                        call(fn, a, x, out)
                    c["hot"].append((time.perf_counter() - t0) / hot_calls)
                    t0 = time.thread_time()
                    for _ in range(hot_calls):
                        call(ser, a, x, out)
                    c["cpu1"].append((time.thread_time() - t0) / hot_calls)
            for name, c in cells.items():
                rows.append({"shape": f"{out_f}x{in_f}", "sparsity": p, "kernel": name,
                             "bytes_per_weight": round(c["nbytes"] / (out_f * in_f), 4),
                             "window": int(c["a"]["window"][0]) if "window" in c["a"] else None,
                             "cold_ms": round(float(np.median(c["cold"])) * 1e3, 4),
                             "hot_ms": round(float(np.median(c["hot"])) * 1e3, 4),
                             "cpu1_ms": round(float(np.median(c["cpu1"])) * 1e3, 4),
                             "max_rel_err_vs_dequantised": None if c["err"] is None else round(c["err"], 8)})
                print(json.dumps(rows[-1]), flush=True)
            del cells
    res = {"cpu": lscpu_model(), "cpu_tag": cpu_tag(), "threads": threads, "kernel_paths": LB.kernel_paths(),
           "working_set_mib": args.working_set_mib, "repeats": args.repeats, "machine_before": before,
           "machine_after": machine_state(), "seconds": round(time.time() - t_start, 1), "asm": asm, "rows": rows}
    Path(out_base + ".json").write_text(json.dumps(res, indent=1) + "\n")
    Path(out_base + ".md").write_text(report(res))
    print(report(res))


def report(res) -> str:
    state = idle_text

    L = ["# int8_perm against int8 + bitmask and dense Q4_0-like (issue 13, very sparse groups)", "",
         f"CPU: **{res['cpu']}** ({res['cpu_tag']}), {res['threads']} threads; kernel paths: "
         + ", ".join(f"{k}: {v}" for k, v in res["kernel_paths"].items() if k in ("int8_perm", "int8_bitmask", "q4")) + ".",
         f"Machine before (`top -bn1`): {state(res['machine_before'])}; after: {state(res['machine_after'])}. "
         f"Run took {res['seconds']} s.", "",
         f"cold: arrays copied to >= {res['working_set_mib']} MiB and walked in turn, {res['threads']} threads, wall; "
         f"hot: one copy repeatedly, {res['threads']} threads, wall; cpu1: the serial build, one thread, that thread's "
         f"CPU time (blind to other processes). Medians of {res['repeats']} repeats, the kernels taking turns in each. "
         "`x Q4` / `x bm` = Q4_0-like / int8 bitmask time over this kernel's (same column). err = max |y - y_ref| / "
         "max |y_ref| against the dense product of the dequantised weights and activations.", ""]
    rows = res["rows"]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        L += [f"## {shape} (out x in)", "",
              "| sparsity | kernel | window | bytes/weight | cold ms | x Q4 | x bm | hot ms | x Q4 | x bm | cpu1 ms | x Q4 | x bm | err |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for p in dict.fromkeys(r["sparsity"] for r in rows if r["shape"] == shape):
            rs = {r["kernel"]: r for r in rows if r["shape"] == shape and r["sparsity"] == p}
            q4, bm = rs.get("Q4_0-like dense"), rs.get("int8 bitmask")
            for r in rs.values():
                cols = []
                for k in ("cold_ms", "hot_ms", "cpu1_ms"):
                    cols += [f"{r[k]:.3f}", f"{q4[k] / r[k]:.2f}" if q4 else "", f"{bm[k] / r[k]:.2f}" if bm else ""]
                err = "" if r["max_rel_err_vs_dequantised"] is None else f"{r['max_rel_err_vs_dequantised']:.1e}"
                L.append(f"| {p:.0%} | {r['kernel']} | {r['window'] or ''} | {r['bytes_per_weight']:.3f} | "
                         + " | ".join(cols) + f" | {err} |")
        L.append("")
    asm = res["asm"]
    L += ["## Assembly of int8_perm's window loop (fresh compile)", ""]
    if "error" in asm:
        L.append(asm["error"])
    else:
        L += ["In the function: " + ", ".join(f"{k} {v}" for k, v in asm["function"].items()) + ".",
              "Window loop: " + ", ".join(f"{k} {v}" for k, v in asm["window_loop"].items() if k != "loop") + ".",
              "", "```"] + asm["window_loop"]["loop"] + ["```"]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
