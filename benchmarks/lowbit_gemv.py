"""int8 low-bit GEMV kernels (engine/native/lowbit.py) against the fp32 ones and a dense Q4_0-like reference,
at LLaMA-7B linear shapes, batch 1. (Issue 13, first steps.)

Per (shape, sparsity, kernel): the weights are stored once and copied until the copies hold >= 512 MiB
(`--working-set-mib`); a "cold" time walks the copies in turn (nothing stays in the 260 MiB last-level cache
this VM advertises) and is the median over repeats of (walk time / copies); a "hot" time calls the kernel
on one copy repeatedly (cache-resident where it fits). GB/s = the bytes the product actually reads (its
stored arrays plus the activation vector it reads) / time; bytes/weight = stored bytes / (out x in).
Matrices are pruned per output row (each row keeps the same count, by magnitude, as Wanda does), so ELL and
bitmask both apply; the dense kernels are timed once per shape (their time does not depend on the zeros).

The int8 block kernels (dense, bitmask) and the Q4 reference read int8 activations: `quantize_act` of the
input is timed separately (done once per input vector in a model, shared by the products reading it).

    .venv/bin/python benchmarks/lowbit_gemv.py [--threads 2] [--sparsities 0.5,0.7,0.9]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
QUIET = Path("/tmp/sparsedeploy-quiet")


def pruned(shape, sparsity, seed=0):
    """Gaussian weights, each row keeping its round((1 - sparsity) * in) largest magnitudes."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal(shape, dtype=np.float32)
    k = int(round((1 - sparsity) * shape[1]))
    if k < shape[1]:
        drop = np.argpartition(np.abs(W), shape[1] - k, axis=1)[:, :shape[1] - k]
        np.put_along_axis(W, drop, 0, axis=1)
    return W


def kernels():
    """name -> (value type, storage, sparse?, encode(W) -> arrays, call(arrays, act, out))."""
    from sparsedeploy.engine.native import kernels as K
    from sparsedeploy.engine.native import lowbit as LB
    from sparsedeploy.engine.native.pack import encode

    e = np.zeros(0, np.float32)
    ks = {
        "fp32 dense": (False, lambda W: encode(W, "dense"), lambda a, x, o: K.dense_gemv(a["w"], x["x"], e, o, False)),
        "fp32 bitmask": (True, lambda W: encode(W, "bitmask"),
                         lambda a, x, o: K.bitmask_gemv(a["rowptr"], a["masks"], a["vals"], x["x"], e, o, False)),
        "fp32 ELL": (True, lambda W: encode(W, "ell"), lambda a, x, o: K.ell_gemv(a["cols"], a["vals"], x["x"], e, o, False)),
        "int8 dense": (False, LB.encode_int8,
                       lambda a, x, o: LB.int8_gemv(a["wq"], a["wscale"], x["q"], x["corr"], x["s"], e, o, False)),
        "int8 bitmask": (True, LB.encode_int8_bitmask,
                         lambda a, x, o: LB.int8_bitmask_gemv(a["rowptr"], a["masks"], a["vals"], a["wscale"], x["q"],
                                                              x["corr"], x["s"], e, o, False)),
        "int8 ELL": (True, LB.encode_int8_ell,
                     lambda a, x, o: LB.int8_ell_gemv(a["cols"], a["vals"], a["wscale"], x["x"], e, o, False)),
        "int8 ELL, plain numba": (True, LB.encode_int8_ell,
                                  lambda a, x, o: LB.int8_ell_gemv_portable(a["cols"], a["vals"], a["wscale"], x["x"], e, o, False)),
    }
    if LB.has_vnni():
        ks["Q4_0-like dense"] = (False, LB.encode_q4,
                                 lambda a, x, o: LB.q4_gemv_vnni(a["w4"], a["ws"], x["q"], x["corr"], x["s"], e, o, False))
    return ks


INT8_ACT = ("int8 dense", "int8 bitmask", "Q4_0-like dense")


def act_bytes(name, x):
    return sum(x[k].nbytes for k in ("q", "corr", "s")) if name in INT8_ACT else x["x"].nbytes


def time_cell(call, mats, x, out, repeats, hot_calls):
    n = len(mats)
    for a in mats:                                   # compile, touch every copy
        call(a, x, out)
    cold = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for a in mats:
            call(a, x, out)
        cold.append((time.perf_counter() - t0) / n)
    hot = []
    a = mats[0]
    for _ in range(3):
        call(a, x, out)
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(hot_calls):
            call(a, x, out)
        hot.append((time.perf_counter() - t0) / hot_calls)
    return float(np.median(cold)) * 1e3, float(np.median(hot)) * 1e3


def asm_worker():
    """Child with a fresh numba cache: compile the int8 kernels, find the loops holding their key instructions."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from native_asm_check import loops
    from sparsedeploy.engine.native import lowbit as LB

    rng = np.random.default_rng(0)
    W = rng.standard_normal((64, 320)).astype(np.float32)
    Wk = pruned((64, 320), 0.7)
    x = rng.standard_normal(320).astype(np.float32)
    q, corr, s = LB.act_buffers(320)
    LB.quantize_act(x, q, corr, s)
    e, out = np.zeros(0, np.float32), np.zeros(64, np.float32)
    d, bm, el, q4 = LB.encode_int8(W), LB.encode_int8_bitmask(Wk), LB.encode_int8_ell(Wk), None
    calls = {"int8_gemv_vnni": lambda: LB.int8_gemv_vnni(d["wq"], d["wscale"], q, corr, s, e, out, False),
             "int8_bitmask_gemv_vnni": lambda: LB.int8_bitmask_gemv_vnni(bm["rowptr"], bm["masks"], bm["vals"], bm["wscale"],
                                                                         q, corr, s, e, out, False),
             "int8_ell_gemv_avx512": lambda: LB.int8_ell_gemv_avx512(el["cols"], el["vals"], el["wscale"], x, e, out, False),
             "int8_ell_gemv_portable": lambda: LB.int8_ell_gemv_portable(el["cols"], el["vals"], el["wscale"], x, e, out, False)}
    if LB.has_vnni():
        q4 = LB.encode_q4(W)
        calls["q4_gemv_vnni"] = lambda: LB.q4_gemv_vnni(q4["w4"], q4["ws"], q, corr, s, e, out, False)
    if not (LB.has_vnni() and LB.has_vbmi2()):
        calls = {k: v for k, v in calls.items() if "vnni" not in k}
    if not LB.has_avx512f():
        calls.pop("int8_ell_gemv_avx512")
    res = {}
    for name, call in calls.items():
        call()
        fn = getattr(LB, name)
        asm = "\n".join(fn.inspect_asm().values())
        key = re.compile(r"^\s*(vpdpbusd|vpexpandb|vfmadd\w*ps|vgather\w+)\b")
        cands = [b for b in loops(asm) if any(key.match(l) for l in b)]
        # the densest loop in key instructions: the unrolled inner loop, not the row loop around it
        body = max(cands, key=lambda b: (sum(1 for l in b if key.match(l)) / len(b), -len(b))) if cands else []
        if name.startswith("int8_ell_gemv") and cands:   # the gather loop of the widest registers, densest in gathers
            width = lambda b: 2 if any("gather" in l and "%zmm" in l for l in b) else 1 if any("gather" in l for l in b) else 0  # noqa: E731
            body = max(cands, key=lambda b: (width(b), sum("gather" in l for l in b) / len(b)))
        ins = [l.strip().split()[0] for l in body if l.strip() and not l.strip().endswith(":")]
        count = lambda pre: sum(1 for i in ins if i.startswith(pre))  # noqa: E731
        res[name] = {"function_vpdpbusd": len(re.findall(r"\bvpdpbusd\b", asm)),
                     "function_vpexpandb": len(re.findall(r"\bvpexpandb\b", asm)),
                     "loop_instructions": len(ins), "vpdpbusd": count("vpdpbusd"), "vpexpandb": count("vpexpandb"),
                     "popcnt": count("popcnt"), "gathers": count("vgather") + count("vpgather"),
                     "fma": count("vfmadd"), "zmm": any("%zmm" in l for l in body),
                     "ymm": any("%ymm" in l for l in body), "loop": [l.rstrip() for l in body[:48]]}
    print(json.dumps(res))


def asm_in_fresh_process(script: str, tag: str) -> dict:
    """Run `script --asm-worker` with an empty numba cache (so the kernels compile and their assembly can be
    read) and return the JSON it prints last, or {"error": its last stderr line}."""
    env = dict(os.environ, NUMBA_CACHE_DIR=tempfile.mkdtemp(prefix=f"numba-{tag}-asm-"))
    p = subprocess.run([sys.executable, script, "--asm-worker"], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_asm_check():
    return asm_in_fresh_process(__file__, "lowbit")


def idle_text(m: dict) -> str:
    """machine_state() in a report line: idle, or the busy processes, and the load average."""
    quiet = f"; quiet file {'present' if m['quiet_file'] else 'absent'}" if "quiet_file" in m else ""
    return ("idle" if not m["busy_processes"] else "busy: " + "; ".join(m["busy_processes"])) + \
        f" (load average {m['load_average']}{quiet})"


def machine_state() -> dict:
    top = subprocess.run(["top", "-bn1"], capture_output=True, text=True).stdout.splitlines()
    procs = []
    started = False
    for l in top:
        if l.strip().startswith("PID"):
            started = True
            continue
        if started and l.strip():
            f = l.split()
            try:
                if float(f[8]) >= 5.0:
                    procs.append(f"{f[-1]} {f[8]}% (nice {f[3]})")
            except (ValueError, IndexError):
                pass
    load = next((l.split("load average:")[1].strip() for l in top if "load average" in l), "?")
    return {"load_average": load, "busy_processes": procs[:6], "quiet_file": QUIET.exists()}


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for l in out.splitlines():
            if l.startswith("Model name:"):
                return l.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sparsities", default="0.5,0.7,0.9")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--working-set-mib", type=int, default=512)
    ap.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lowbit_gemv"))
    ap.add_argument("--asm-worker", action="store_true")
    ap.add_argument("--asm-only", action="store_true", help="redo the assembly check into an existing --out json/md")
    ap.add_argument("--report-only", action="store_true", help="rewrite the md from an existing --out json")
    args = ap.parse_args()
    if args.asm_worker:
        return asm_worker()
    if args.report_only:
        res = json.loads(Path(args.out + ".json").read_text())
        Path(args.out + ".md").write_text(report(res))
        return None
    if args.asm_only:
        res = json.loads(Path(args.out + ".json").read_text())
        res["asm"] = run_asm_check()
        Path(args.out + ".json").write_text(json.dumps(res, indent=1) + "\n")
        Path(args.out + ".md").write_text(report(res))
        return None

    from sparsedeploy.bench.report import machine_info, measure_bandwidth
    from sparsedeploy.engine.native import kernels as K
    from sparsedeploy.engine.native import lowbit as LB

    before = machine_state()
    asm = run_asm_check()
    threads = K.set_threads(args.threads)
    bw = measure_bandwidth(threads=threads, mbytes=256)
    ks = kernels()
    sparsities = [float(s) for s in args.sparsities.split(",") if s]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ws = args.working_set_mib << 20
    rows = []
    quant_us = {}
    for shape in shapes:
        out_f, in_f = shape
        xv = np.random.default_rng(1).standard_normal(in_f, dtype=np.float32)
        q, corr, s = LB.act_buffers(in_f)
        LB.quantize_act(xv, q, corr, s)
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(200):
                LB.quantize_act(xv, q, corr, s)
            ts.append((time.perf_counter() - t0) / 200)
        quant_us[in_f] = round(float(np.median(ts)) * 1e6, 2)
        x = {"x": xv, "q": q, "corr": corr, "s": s}
        out = np.zeros(out_f, np.float32)
        for p in [0.0] + sparsities:
            W = pruned(shape, p)
            Wd = W.astype(np.float64)
            exact = Wd @ xv
            for name, (sparse, enc, call) in ks.items():
                if sparse != (p > 0):
                    continue
                a = enc(W)
                nbytes = sum(v.nbytes for v in a.values())
                n = max(2, -(-ws // nbytes))
                mats = [a] + [{k: v.copy() for k, v in a.items()} for _ in range(n - 1)]
                call(a, x, out)
                rel = float(np.linalg.norm(out - exact) / np.linalg.norm(exact))
                read = nbytes + act_bytes(name, x)
                hot_calls = max(3, int(0.05 / max(read / 20e9, 1e-6)))
                cold, hot = time_cell(call, mats, x, out, args.repeats, hot_calls)
                del mats
                rows.append({"shape": f"{out_f}x{in_f}", "sparsity": p, "kernel": name, "copies": n,
                             "bytes": int(read), "bytes_per_weight": round(nbytes / (out_f * in_f), 4),
                             "cold_ms": round(cold, 4), "hot_ms": round(hot, 4),
                             "cold_gbs": round(read / cold / 1e6, 2), "hot_gbs": round(read / hot / 1e6, 2),
                             "rel_err_vs_fp32": round(rel, 5)})
                print(json.dumps(rows[-1]), flush=True)
    after = machine_state()
    res = {"cpu": lscpu_model(), "machine": machine_info(), "threads": threads, "bandwidth": bw,
           "kernel_paths": LB.kernel_paths(), "working_set_mib": args.working_set_mib, "repeats": args.repeats,
           "machine_before": before, "machine_after": after, "quantize_act_us": quant_us, "asm": asm, "rows": rows}
    Path(args.out + ".json").write_text(json.dumps(res, indent=1) + "\n")
    Path(args.out + ".md").write_text(report(res))
    print(report(res))


def report(res) -> str:
    rows = res["rows"]
    bw = res["bandwidth"]
    mb, ma = res["machine_before"], res["machine_after"]
    idle = idle_text

    L = ["# int8 low-bit GEMV kernels (issue 13, first steps)", "",
         f"CPU: **{res['cpu']}** (lscpu), {res['threads']} threads; kernel paths on this CPU: "
         + ", ".join(f"{k}: {v}" for k, v in res["kernel_paths"].items()) + ".",
         f"Measured read bandwidth (STREAM-like, {bw['best_kernel']}): {bw['gbs']} GB/s "
         f"(sum {bw['sum_gbs']}, dot {bw['dot_gbs']}, copy {bw['copy_gbs']}).",
         f"Machine before the run (`top -bn1`): {idle(mb)}; after: {idle(ma)}.", "",
         f"Cold: the stored weights copied until the copies hold >= {res['working_set_mib']} MiB, walked in turn "
         "(nothing stays in cache); hot: one copy called repeatedly. Median of "
         f"{res['repeats']} repeats. GB/s = bytes the product reads (stored arrays + its activation vector) / time. "
         "Rows pruned per output row by magnitude (equal counts, so ELL applies). The dense kernels are timed once "
         "per shape; `x Q4` = the Q4_0-like dense time / this kernel's (cold), `x int8` = int8 dense / this. "
         "rel err = ||y - W x|| / ||W x|| against the fp32 product of the same (pruned) matrix.",
         "", "The int8 dense/bitmask and Q4 kernels take int8 activations; `quantize_act` costs "
         + ", ".join(f"{v} us (width {k})" for k, v in res["quantize_act_us"].items())
         + " per input vector (not included below; once per vector in a model).", ""]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    for shape in shapes:
        rs = [r for r in rows if r["shape"] == shape]
        dense = {r["kernel"]: r for r in rs if r["sparsity"] == 0}
        q4 = dense.get("Q4_0-like dense")
        i8 = dense.get("int8 dense")
        L += [f"## {shape} (out x in)", "",
              "| sparsity | kernel | bytes/weight | cold ms | cold GB/s | hot ms | hot GB/s | x Q4 | x int8 | rel err |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rs:
            xq = f"{q4['cold_ms'] / r['cold_ms']:.2f}" if q4 else ""
            xi = f"{i8['cold_ms'] / r['cold_ms']:.2f}" if i8 else ""
            sp = "dense" if r["sparsity"] == 0 else format(r["sparsity"], ".0%")
            L.append(f"| {sp} | {r['kernel']} | "
                     f"{r['bytes_per_weight']:.3f} | {r['cold_ms']:.3f} | {r['cold_gbs']:.1f} | {r['hot_ms']:.3f} | "
                     f"{r['hot_gbs']:.1f} | {xq} | {xi} | {r['rel_err_vs_fp32']:.4f} |")
        L.append("")
    L += ["## Summary: the fastest int8 format per sparsity (cold), against dense Q4_0-like and dense int8", "",
          "| shape | sparsity | fastest | cold ms | x Q4 | x int8 dense | hot / cold | bytes read / Q4's |",
          "|---|---:|---|---:|---:|---:|---:|---:|"]
    for shape in shapes:
        rs = [r for r in rows if r["shape"] == shape]
        dense = {r["kernel"]: r for r in rs if r["sparsity"] == 0}
        q4, i8 = dense.get("Q4_0-like dense"), dense.get("int8 dense")
        for p in sorted({r["sparsity"] for r in rs if r["sparsity"] > 0}):
            cand = [r for r in rs if r["sparsity"] == p and r["kernel"].startswith("int8")]
            if not cand or not q4 or not i8:
                continue
            b = min(cand, key=lambda r: r["cold_ms"])
            L.append(f"| {shape} | {p:.0%} | {b['kernel']} | {b['cold_ms']:.3f} | {q4['cold_ms'] / b['cold_ms']:.2f} | "
                     f"{i8['cold_ms'] / b['cold_ms']:.2f} | {b['hot_ms'] / b['cold_ms']:.2f} | {b['bytes'] / q4['bytes']:.2f} |")
    L += ["", "hot / cold near 1: the kernel is compute-bound (the cache-resident time is about the cold one); far "
          "below 1: memory-bound.", ""]
    asm = res["asm"]
    L += ["## Assembly evidence", "",
          "Fresh numba compile (empty cache) of each kernel; the loop shown is the loop of the machine code densest in "
          "the kernel's key instructions (vpdpbusd / vpexpandb / FMA / gathers; for int8 ELL: the loop of the widest gathers, densest in them). "
          "`int8 ELL` in the tables is the kernel `kernel_paths()` names for this CPU (avx512: int8_ell_gemv_avx512), "
          "`int8 ELL, plain numba` the portable loop.", ""]
    if "error" in asm:
        L.append(f"asm check failed: {asm['error']}")
    else:
        L += ["| kernel | vpdpbusd in function | vpexpandb in function | loop instructions | vpdpbusd in loop | "
              "vpexpandb in loop | popcnt | gathers | FMA | zmm |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for name, d in asm.items():
            L.append(f"| {name} | {d['function_vpdpbusd']} | {d['function_vpexpandb']} | {d['loop_instructions']} | "
                     f"{d['vpdpbusd']} | {d['vpexpandb']} | {d['popcnt']} | {d['gathers']} | {d['fma']} | {d['zmm']} |")
        for name, d in asm.items():
            L += ["", f"### {name}", "", "```"] + d["loop"] + ["```"]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
