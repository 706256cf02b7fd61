"""int4 + bitmask (GPTQ grid, engine/native/int4.py) beside int8 + bitmask and the dense Q4_0-like reference
(engine/native/lowbit.py), at LLaMA-7B linear shapes, batch 1. (Issue 13, "low-bit sparse formats".)

Same method as benchmarks/lowbit_gemv.py (whose helpers it uses): per (shape, sparsity, kernel) the stored
arrays are copied until the copies hold >= 512 MiB; "cold" walks the copies in turn (median over repeats of
walk time / copies), "hot" calls one copy repeatedly. GB/s = bytes the product reads (stored arrays + the
int8 activation blocks) / time; bytes/weight = stored bytes / (out x in). Matrices are pruned per output row
by magnitude (equal counts), int4 quantised by RTN on the GPTQ grid (int4.rtn_int4) per group of 128 (and 256, 64)
columns. Dense kernels are timed once per shape. `quantize_act` (shared by all these kernels: once per input
vector in a model) is not included. Results go to benchmarks/results/int4_gemv_<cpu>.{json,md}.

    .venv/bin/python benchmarks/int4_gemv.py [--threads 2] [--sparsities 0.5,0.7,0.9] [--shapes 4096x4096,...]
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

from lowbit_gemv import asm_in_fresh_process, idle_text, lscpu_model, machine_state, pruned, time_cell  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]



def kernels(portable: bool):
    """name -> (sparse?, encode(W) -> arrays, call(arrays, act, out))."""
    from sparsedeploy.engine.native import int4 as I4
    from sparsedeploy.engine.native import lowbit as LB

    e = np.zeros(0, np.float32)

    def i4(gs, k, scales="fp32"):
        enc = lambda W: I4.encode_int4_bitmask_from_weights(W, gs, scales=scales)  # noqa: E731
        call = lambda a, x, o: k(a["rowptr"], a["masks"], a["vals"], a["scale"], a["zero"], gs,  # noqa: E731
                                 x["q"], x["corr"], x["s"], e, o, False)
        return (True, enc, call)

    ks = {
        "int8 dense": (False, LB.encode_int8,
                       lambda a, x, o: LB.int8_gemv(a["wq"], a["wscale"], x["q"], x["corr"], x["s"], e, o, False)),
        "int8 bitmask": (True, LB.encode_int8_bitmask,
                         lambda a, x, o: LB.int8_bitmask_gemv(a["rowptr"], a["masks"], a["vals"], a["wscale"], x["q"],
                                                              x["corr"], x["s"], e, o, False)),
        "int4 bitmask g256": i4(256, I4.int4_bitmask_gemv),
        "int4 bitmask g128": i4(128, I4.int4_bitmask_gemv),
        "int4 bitmask g64": i4(64, I4.int4_bitmask_gemv),
        "int4 bitmask g256 fp16": i4(256, I4.int4_bitmask_gemv, "fp16"),     # float16 scales and zeros (uint16 bits)
        "int4 bitmask g128 fp16": i4(128, I4.int4_bitmask_gemv, "fp16"),
    }
    if portable:
        ks["int4 bitmask g128, plain numba"] = i4(128, I4.int4_bitmask_gemv_portable)
    if LB.has_vnni():
        ks["Q4_0-like dense"] = (False, LB.encode_q4,
                                 lambda a, x, o: LB.q4_gemv_vnni(a["w4"], a["ws"], x["q"], x["corr"], x["s"], e, o, False))
    return ks


def asm_worker():
    """Child with a fresh numba cache: compile the kernels, count key instructions in their hot loops."""
    from native_asm_check import loops
    from sparsedeploy.engine.native import int4 as I4
    from sparsedeploy.engine.native import lowbit as LB

    rng = np.random.default_rng(0)
    W = rng.standard_normal((64, 320)).astype(np.float32)
    Wk = pruned((64, 320), 0.7)
    x = rng.standard_normal(320).astype(np.float32)
    q, corr, s = LB.act_buffers(320)
    LB.quantize_act(x, q, corr, s)
    e, out = np.zeros(0, np.float32), np.zeros(64, np.float32)
    bm, i4, q4 = LB.encode_int8_bitmask(Wk), I4.encode_int4_bitmask_from_weights(Wk, 128), LB.encode_q4(W)
    h4 = I4.encode_int4_bitmask_from_weights(Wk, 128, scales="fp16")
    if I4.kernel_paths()["int4_bitmask"] != "portable":     # compile the uint16-scale specialisation too
        I4.int4_bitmask_gemv_vnni(h4["rowptr"], h4["masks"], h4["vals"], h4["scale"], h4["zero"], 128, q, corr, s, e,
                                  out, False)
    calls = {"int4_bitmask_gemv_vnni": (I4, lambda: I4.int4_bitmask_gemv_vnni(
                 i4["rowptr"], i4["masks"], i4["vals"], i4["scale"], i4["zero"], 128, q, corr, s, e, out, False)),
             "int8_bitmask_gemv_vnni": (LB, lambda: LB.int8_bitmask_gemv_vnni(
                 bm["rowptr"], bm["masks"], bm["vals"], bm["wscale"], q, corr, s, e, out, False)),
             "q4_gemv_vnni": (LB, lambda: LB.q4_gemv_vnni(q4["w4"], q4["ws"], q, corr, s, e, out, False))}
    if I4.kernel_paths()["int4_bitmask"] == "portable":
        calls.pop("int4_bitmask_gemv_vnni")
    if not (LB.has_vnni() and LB.has_vbmi2()):
        calls = {}
    res = {}
    key = re.compile(r"^\s*(vpdpbusd|vpexpandb|vfmadd\w*ps|vfnmadd\w*ps)\b")
    for name, (mod, call) in calls.items():
        call()
        asm = "\n".join(getattr(mod, name).inspect_asm().values())
        cands = [b for b in loops(asm) if any(key.match(l) for l in b)]
        body = max(cands, key=lambda b: (sum(1 for l in b if key.match(l)) / len(b), -len(b))) if cands else []
        ins = [l.strip().split()[0] for l in body if l.strip() and not l.strip().endswith(":")]
        count = lambda pre: sum(1 for i in ins if i.startswith(pre))  # noqa: E731
        res[name] = {"function_vpdpbusd": len(re.findall(r"\bvpdpbusd\b", asm)),
                     # the float16 scales' widening (the uint16-scale specialisation, compiled above)
                     "function_vcvtph2ps": len(re.findall(r"\bvcvtph2ps\b", asm)),
                     "function_vpexpandb": len(re.findall(r"\bvpexpandb\b", asm)),
                     "loop_instructions": len(ins), "vpdpbusd": count("vpdpbusd"), "vpexpandb": count("vpexpandb"),
                     "vpmultishiftqb": count("vpmultishiftqb"), "vperm": count("vperm"), "popcnt": count("popcnt"),
                     "fma": count("vfmadd") + count("vfnmadd"), "branches": sum(1 for i in ins if i.startswith("j")),
                     "zmm": any("%zmm" in l for l in body), "loop": [l.rstrip() for l in body[:160]]}
    print(json.dumps(res))


def run_asm_check():
    return asm_in_fresh_process(__file__, "int4")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sparsities", default="0.5,0.7,0.9")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--working-set-mib", type=int, default=512)
    ap.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES))
    ap.add_argument("--portable", action="store_true", help="also time the plain-numba int4 kernel")
    ap.add_argument("--kernels", default=None, help="comma-separated kernel names to time (default: all)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/int4_gemv_<cpu>")
    ap.add_argument("--asm-worker", action="store_true")
    ap.add_argument("--asm-only", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if args.asm_worker:
        return asm_worker()
    out_base = args.out or str(ROOT / "benchmarks" / "results" / f"int4_gemv_{cpu_tag()}")
    if args.asm_only:
        print(json.dumps(run_asm_check(), indent=1))
        return None
    if args.report_only:
        res = json.loads(Path(out_base + ".json").read_text())
        Path(out_base + ".md").write_text(report(res))
        return None

    from sparsedeploy.bench.report import machine_info, measure_bandwidth
    from sparsedeploy.engine.native import int4 as I4
    from sparsedeploy.engine.native import kernels as K
    from sparsedeploy.engine.native import lowbit as LB

    t_start = time.time()
    before = machine_state()
    asm = run_asm_check()
    threads = K.set_threads(args.threads)
    bw = measure_bandwidth(threads=threads, mbytes=256)
    ks = kernels(args.portable)
    if args.kernels:
        want = [k.strip() for k in args.kernels.split(",") if k.strip()]
        bad = [k for k in want if k not in ks]
        if bad:
            raise SystemExit(f"int4_gemv: unknown kernel {bad[0]!r}; use some of: {', '.join(ks)}")
        ks = {k: v for k, v in ks.items() if k in want}
    sparsities = [float(s) for s in args.sparsities.split(",") if s]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ws = args.working_set_mib << 20
    rows = []
    for shape in shapes:
        out_f, in_f = shape
        xv = np.random.default_rng(1).standard_normal(in_f, dtype=np.float32)
        q, corr, s = LB.act_buffers(in_f)
        LB.quantize_act(xv, q, corr, s)
        x = {"x": xv, "q": q, "corr": corr, "s": s}
        abytes = q.nbytes + s.nbytes
        out = np.zeros(out_f, np.float32)
        for p in [0.0] + sparsities:
            W = pruned(shape, p)
            exact = W.astype(np.float64) @ xv
            for name, (sparse, enc, call) in ks.items():
                if sparse != (p > 0):
                    continue
                a = enc(W)
                a = {k: v for k, v in a.items() if k != "group_size"}
                nbytes = sum(v.nbytes for v in a.values())
                n = max(2, -(-ws // nbytes))
                mats = [a] + [{k: v.copy() for k, v in a.items()} for _ in range(n - 1)]
                call(a, x, out)
                rel = float(np.linalg.norm(out - exact) / np.linalg.norm(exact))
                read = nbytes + abytes
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
    res = {"cpu": lscpu_model(), "cpu_tag": cpu_tag(), "machine": machine_info(), "threads": threads, "bandwidth": bw,
           "kernel_paths": {**LB.kernel_paths(), **I4.kernel_paths()}, "working_set_mib": args.working_set_mib,
           "repeats": args.repeats, "machine_before": before, "machine_after": after,
           "wall_s": round(time.time() - t_start, 1), "asm": asm, "rows": rows}
    Path(out_base + ".json").write_text(json.dumps(res, indent=1) + "\n")
    Path(out_base + ".md").write_text(report(res))
    print(report(res))


def report(res) -> str:
    rows = res["rows"]
    bw = res["bandwidth"]
    mb, ma = res["machine_before"], res["machine_after"]
    idle = idle_text

    L = ["# int4 + bitmask (GPTQ grid) against int8 + bitmask and dense Q4_0-like (issue 13)", "",
         f"CPU: **{res['cpu']}** ({res['cpu_tag']}, lscpu), {res['threads']} threads; kernel paths: "
         + ", ".join(f"{k}: {v}" for k, v in res["kernel_paths"].items()) + ".",
         f"Measured read bandwidth (STREAM-like, {bw['best_kernel']}): {bw['gbs']} GB/s "
         f"(sum {bw['sum_gbs']}, dot {bw['dot_gbs']}, copy {bw['copy_gbs']}).",
         f"Machine before the run (`top -bn1`): {idle(mb)}; after: {idle(ma)}. Run took {res.get('wall_s', '?')} s.", "",
         f"Cold: the stored arrays copied until the copies hold >= {res['working_set_mib']} MiB, walked in turn; hot: one "
         f"copy called repeatedly; median of {res['repeats']} repeats. GB/s = bytes read (stored arrays + int8 "
         "activation blocks) / time. bytes/weight = stored bytes / (out x in): for int4 bitmask, 0.5 per kept weight + "
         "1/8 (mask) + 8/group (float32 scale and zero; `fp16` rows: 4/group, float16 ones) + rowptr. Rows pruned per output row by magnitude (equal "
         "counts); int4 by RTN on the GPTQ grid (asymmetric, float zero point) per group of 256 / 128 / 64 columns (a group of 256 shares the activation scale of its 4 blocks: the VNNI kernel chains 4 blocks in integers, g128 chains 2, g64 none). "
         "`x Q4` = Q4_0-like dense cold time / this kernel's, `x i8bm` = int8 bitmask cold time at the same "
         "sparsity / this kernel's. rel err = ||y - W x|| / ||W x|| against the fp32 product of the same pruned "
         "matrix. `quantize_act` (shared by all these kernels) is not included.", ""]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    for shape in shapes:
        rs = [r for r in rows if r["shape"] == shape]
        q4 = next((r for r in rs if r["kernel"] == "Q4_0-like dense"), None)
        L += [f"## {shape} (out x in)", "",
              "| sparsity | kernel | bytes/weight | cold ms | cold GB/s | hot ms | hot GB/s | x Q4 | x i8bm | rel err |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rs:
            i8 = next((t for t in rs if t["kernel"] == "int8 bitmask" and t["sparsity"] == r["sparsity"]), None)
            xq = f"{q4['cold_ms'] / r['cold_ms']:.2f}" if q4 else ""
            xi = f"{i8['cold_ms'] / r['cold_ms']:.2f}" if i8 else ""
            sp = "dense" if r["sparsity"] == 0 else format(r["sparsity"], ".0%")
            L.append(f"| {sp} | {r['kernel']} | {r['bytes_per_weight']:.3f} | {r['cold_ms']:.3f} | {r['cold_gbs']:.1f} | "
                     f"{r['hot_ms']:.3f} | {r['hot_gbs']:.1f} | {xq} | {xi} | {r['rel_err_vs_fp32']:.4f} |")
        L.append("")
    L += ["## Summary: int4 bitmask (g128) against int8 bitmask and dense Q4_0-like, cold and hot", "",
          "| shape | sparsity | int4 g128 cold ms | int8 bm cold ms | Q4 cold ms | int4 / int8 bm time (cold) | "
          "int4 / int8 bm time (hot) | int4 / Q4 time (cold) | int4 bytes / int8 bm bytes |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for shape in shapes:
        rs = [r for r in rows if r["shape"] == shape]
        q4 = next((r for r in rs if r["kernel"] == "Q4_0-like dense"), None)
        for p in sorted({r["sparsity"] for r in rs if r["sparsity"] > 0}):
            a = next((r for r in rs if r["sparsity"] == p and r["kernel"] == "int4 bitmask g128"), None)
            b = next((r for r in rs if r["sparsity"] == p and r["kernel"] == "int8 bitmask"), None)
            if not a or not b:
                continue
            q4c = f"{q4['cold_ms']:.3f}" if q4 else ""
            q4r = f"{a['cold_ms'] / q4['cold_ms']:.2f}" if q4 else ""
            L.append(f"| {shape} | {p:.0%} | {a['cold_ms']:.3f} | {b['cold_ms']:.3f} | {q4c} | "
                     f"{a['cold_ms'] / b['cold_ms']:.2f} | {a['hot_ms'] / b['hot_ms']:.2f} | {q4r} | "
                     f"{a['bytes'] / b['bytes']:.2f} |")
    L += ["", "Below 1 in the ratio columns: int4 + bitmask is faster.", ""] + res.get("notes", []) + [""]
    asm = res["asm"]
    L += ["## Assembly evidence", "",
          "Fresh numba compile (empty cache); the loop shown is the machine-code loop densest in vpdpbusd / vpexpandb / "
          "FMA (the unrolled block loop).", ""]
    if "error" in asm:
        L.append(f"asm check failed: {asm['error']}")
    else:
        L += ["| kernel | vpdpbusd in function | vpexpandb in function | loop instructions | vpdpbusd | vpexpandb | "
              "vpmultishiftqb | vperm* | popcnt | FMA | branches | zmm |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for name, d in asm.items():
            L.append(f"| {name} | {d['function_vpdpbusd']} | {d['function_vpexpandb']} | {d['loop_instructions']} | "
                     f"{d['vpdpbusd']} | {d['vpexpandb']} | {d['vpmultishiftqb']} | {d['vperm']} | {d['popcnt']} | "
                     f"{d['fma']} | {d['branches']} | {d['zmm']} |")
        for name, d in asm.items():
            L += ["", f"### {name}", "", "```"] + d["loop"] + ["```"]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
