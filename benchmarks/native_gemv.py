"""Per-layer sparse GEMV: the native engine's numba kernels against DeepSparse, ONNX Runtime and dense,
at LLaMA-7B linear shapes, batch 1, with the memory-bandwidth bound. (Issue 6, table (a).)

Each cell times N different matrices of the shape in turn (N chosen so that they hold >= 256 MiB together),
so no product is served from the last-level cache, as in a real decode step; the time per product is the
total / N, median over repeats. DeepSparse and ONNX Runtime time the same N matrices as one ONNX graph of N
independent MatMuls on the same input (each in its own process; they would compete with numba's threads).
The bound is the bytes a product must read (values + indices, or the dense matrix) / the STREAM-like
bandwidth measured in the same run.

    .venv/bin/python benchmarks/native_gemv.py [--threads 2] [--sparsities 0.5,0.6,0.7,0.8,0.9]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["NM_DISABLE_ANALYTICS"] = "1"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
WORKING_SET = 256 << 20


def matrices(shape, sparsity, n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        W = rng.standard_normal(shape, dtype=np.float32)
        if sparsity > 0:   # magnitude-style unstructured pruning of the whole matrix: uneven rows -> CSR
            W[rng.random(shape, dtype=np.float32) < sparsity] = 0
        out.append(W)
    return out


def time_calls(call, n_items, repeats):
    call(0)
    for i in range(n_items):
        call(i)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(n_items):
            call(i)
        ts.append((time.perf_counter() - t0) / n_items)
    return float(np.median(ts)) * 1e3


def engine_worker(args):
    """Child: time the N-MatMul graph on one engine, print ms per product."""
    cfg = json.loads(args.worker)
    x = np.random.default_rng(1).standard_normal((1, cfg["in"]), dtype=np.float32)
    if cfg["engine"] == "deepsparse":
        from deepsparse import Engine
        eng = Engine(model=cfg["onnx"], batch_size=1, num_cores=cfg["threads"])
        call = lambda: eng.run([x], val_inp=False)  # noqa: E731
    else:
        import onnxruntime as ort
        o = ort.SessionOptions()
        o.intra_op_num_threads = cfg["threads"]
        o.log_severity_level = 3
        sess = ort.InferenceSession(cfg["onnx"], sess_options=o, providers=["CPUExecutionProvider"])
        call = lambda: sess.run(None, {"x": x})  # noqa: E731
    for _ in range(3):
        call()
    ts = []
    for _ in range(cfg["repeats"]):
        t0 = time.perf_counter()
        call()
        ts.append(time.perf_counter() - t0)
    print(json.dumps({"ms": float(np.median(ts)) / cfg["n"] * 1e3}))


def onnx_graph(mats, path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out_f, in_f = mats[0].shape
    inits, nodes, outputs = [], [], []
    for i, W in enumerate(mats):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(W.T), f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, out_f]))
    g = helper.make_graph(nodes, "gemv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_f])], outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    onnx.save(m, str(path), save_as_external_data=True, location=Path(path).name + ".data")


def run_engine(engine, onnx_path, n, in_f, threads, repeats):
    cfg = {"engine": engine, "onnx": str(onnx_path), "n": n, "in": in_f, "threads": threads, "repeats": repeats}
    p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    if p.returncode != 0:
        return None, p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"
    return json.loads(p.stdout.strip().splitlines()[-1])["ms"], None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sparsities", default="0.5,0.6,0.7,0.8,0.9")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--engines", default="deepsparse,onnxruntime")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "native_gemv"))
    ap.add_argument("--worker", default=None)
    args = ap.parse_args()
    if args.worker:
        return engine_worker(args)

    from sparsedeploy.bench.report import machine_info, measure_bandwidth
    from sparsedeploy.engine import unavailable
    from sparsedeploy.engine.native import kernels as K
    from sparsedeploy.engine.native.pack import compress

    threads = K.set_threads(args.threads)
    bw = measure_bandwidth(threads=threads, mbytes=256)
    gbs = bw["gbs"]
    engines = [e for e in args.engines.split(",") if e and (e != "deepsparse" or unavailable("deepsparse") is None)]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    empty = np.zeros(0, np.float32)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="gemv-"))
    for shape in SHAPES:
        out_f, in_f = shape
        x = np.random.default_rng(1).standard_normal(in_f, dtype=np.float32)
        y = np.zeros(out_f, np.float32)
        n_dense = max(2, -(-WORKING_SET // (out_f * in_f * 4)))
        dense = matrices(shape, 0.0, n_dense)
        t_numpy = time_calls(lambda i: np.dot(dense[i], x, out=y), n_dense, args.repeats)
        t_dense = time_calls(lambda i: K.dense_gemv(dense[i], x, empty, y, False), n_dense, args.repeats)
        del dense
        for p in sparsities:
            mats = matrices(shape, p, 1)
            nbytes = sum(a.nbytes for a in compress(mats[0], 0.0)[1].values())
            n = max(2, -(-WORKING_SET // nbytes))
            mats += matrices(shape, p, n - 1, seed=2)
            packed = [compress(W, 0.0) for W in mats]
            ref = mats[0].astype(np.float64) @ x
            fmt, a = packed[0]
            K.csr_gemv(a["rowptr"], a["cols"], a["vals"], x, empty, y, False)
            err = float(np.abs(y - ref).max())
            t_csr = time_calls(lambda i: K.csr_gemv(packed[i][1]["rowptr"], packed[i][1]["cols"], packed[i][1]["vals"],
                                                     x, empty, y, False), n, args.repeats)
            row = {"shape": f"{out_f}x{in_f}", "sparsity": p, "dense_numpy_ms": t_numpy, "dense_numba_ms": t_dense,
                   "csr_ms": t_csr, "csr_max_abs_err": err, "csr_bytes": nbytes, "products_cycled": n,
                   "bound_ms": nbytes / (gbs * 1e9) * 1e3, "dense_bound_ms": out_f * in_f * 4 / (gbs * 1e9) * 1e3}
            for e in engines:
                # the engines time at most 2 GiB of graph (ONNX's protobuf limit does not apply to external data, but
                # DeepSparse's compile time grows with the graph)
                m = min(n, max(2, (2 << 30) // (out_f * in_f * 4)))
                path = tmp / f"{e}-{out_f}x{in_f}-{p}.onnx"
                onnx_graph(mats[:m], path)
                ms, err_msg = run_engine(e, path, m, in_f, threads, max(5, args.repeats // 2))
                row[f"{e}_ms"] = ms
                if err_msg:
                    row[f"{e}_error"] = err_msg
                for f in tmp.glob(path.name + "*"):
                    f.unlink()
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
            del mats, packed
    doc = {"machine": {**machine_info(), "bandwidth": bw}, "threads": threads, "threading_layer": K.threading_layer(),
           "rows": rows, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    Path(args.out + ".json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"# Sparse GEMV per layer: native numba CSR vs DeepSparse vs ONNX Runtime vs dense",
             "",
             f"{doc['machine']['cpu']}, {threads} threads (numba threading layer {doc['threading_layer']}), fp32, batch 1. "
             f"Measured bandwidth {gbs:.1f} GB/s (STREAM-like, same run). Each time is per product, cycling over enough "
             "different matrices (>= 256 MiB) that none is cache-resident. Unstructured random pruning (uneven rows: CSR, "
             "uint16 column indices). Bound = bytes read (values + indices) / bandwidth.",
             "",
             "| W (out×in) | sparsity | dense numpy | dense numba | **native CSR** | " +
             " | ".join(engines) + " | bound | native / bound | native vs DeepSparse |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(engines) + "---:|---:|---:|"]
    for r in rows:
        ds = r.get("deepsparse_ms")
        lines.append(f"| {r['shape']} | {r['sparsity']:.0%} | {r['dense_numpy_ms']:.2f} | {r['dense_numba_ms']:.2f} | "
                     f"**{r['csr_ms']:.2f}** | " + " | ".join(f"{r[e + '_ms']:.2f}" if r.get(e + "_ms") else "–" for e in engines)
                     + f" | {r['bound_ms']:.2f} | {r['csr_ms'] / r['bound_ms']:.2f}× | "
                     + (f"{ds / r['csr_ms']:.2f}× faster" if ds else "–") + " |")
    lines += ["", f"Dense bound per shape: " + ", ".join(f"{s[0]}x{s[1]} {s[0] * s[1] * 4 / (gbs * 1e9) * 1e3:.2f} ms" for s in SHAPES),
              "", f"Finished {doc['finished']}; `benchmarks/native_gemv.py --threads {threads}`."]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
