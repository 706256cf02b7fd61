"""Where a native-engine decode step spends its time, per kind of kernel, and what the Python side costs.

For each deployment: a greedy decode (prompt token by token, then N timed steps) on the native engine in this
process (no torch loaded), first plain, then with every numba kernel wrapped in a timer. Kernel time is
grouped by kind (sparse products, dense decoder products, lm_head, attention, norms + activation); what is
left of the instrumented step is Python: the per-layer calls, the embedding lookup and the decode loop. The
plain step time is the one to compare with the bench; the timers add their own cost (reported).
Each kind's bytes are set against the measured bandwidth (the kernel's floor at that rate).

    .venv/bin/python benchmarks/native_where_time_goes.py DEPLOYMENT... [--threads 2] [--out benchmarks/results/native_where_time_goes]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

KINDS = {"csr_gemv": "sparse products", "ell_gemv": "sparse products", "csr_gemm": "sparse products",
         "ell_gemm": "sparse products", "bitmask_gemv": "sparse products", "bitmask_gemm": "sparse products", "dense_gemv": "dense products", "attention": "attention",
         "rms_norm": "norms + activation", "layer_norm": "norms + activation", "silu_mul": "norms + activation",
         "relu_": "norms + activation"}


def _timed(fn, kind, acc, calls, on):
    def timed(*args):
        if not on[0]:
            return fn(*args)
        t0 = time.perf_counter()
        fn(*args)
        acc[kind] += time.perf_counter() - t0
        calls[kind] += 1
    return timed


def profile(dep: Path, threads: int, prompt_len: int, steps: int) -> dict:
    from sparsedeploy.engine.decode import KVSlots, greedy_decode
    from sparsedeploy.bench.bench import prompt_ids
    from sparsedeploy.export.onnx_kv import read_deployment
    from sparsedeploy.engine.native import kernels as K
    from sparsedeploy.engine.native.runtime import NativeRuntime

    meta = read_deployment(dep)
    from sparsedeploy.engine.native.pack import read_index
    if read_index(dep / "native") is None:
        import subprocess
        subprocess.run([sys.executable, "-c", "import sys; from sparsedeploy.export.native import ensure_native; "
                        "from sparsedeploy.export.onnx_kv import read_deployment; ensure_native(read_deployment(sys.argv[1]))",
                        str(dep)], check=True, cwd=str(ROOT))     # in a child: building may import torch
    rt = NativeRuntime(meta["onnx"], cores=threads, cache_len=int(meta["seqlen"]))
    prompt = prompt_ids(meta, prompt_len)
    plain = greedy_decode(rt, prompt, steps + 1)
    vocab = rt.model.vocab
    acc: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    originals = {name: getattr(K, name) for name in KINDS}

    on = [False]

    def wrap(name, fn):
        def timed(*args):
            if not on[0]:
                return fn(*args)
            t0 = time.perf_counter()
            fn(*args)
            kind = KINDS[name]
            if name == "dense_gemv" and args[3].shape[0] == vocab:
                kind = "lm_head"
            acc[kind] += time.perf_counter() - t0
            calls[kind] += 1
        return timed

    t0 = time.perf_counter()
    for _ in range(10000):
        a = time.perf_counter()
        acc["_probe"] += time.perf_counter() - a
    timer_us = (time.perf_counter() - t0) / 10000 * 1e6
    acc.clear()
    for name, fn in originals.items():
        setattr(K, name, wrap(name, fn))
    # products call the build the tuner chose through Linear.gemv (bound at load): wrap those too
    m = rt.model
    linears = [lay[g] for lay in m.layers for g in ("qkv", "o", "up", "down")] + [m.lm_head]
    saved = [(lin, lin.gemv) for lin in linears]
    for lin in linears:
        kind = "lm_head" if lin is m.lm_head else ("dense products" if lin.fmt == "dense" else "sparse products")
        lin.gemv = _timed(lin.gemv, kind, acc, calls, on)
    try:
        dec = KVSlots(rt, 1, int(meta["seqlen"]))
        pos = 0
        for t in prompt:                       # prefill, not timed
            logits, _ = dec.step((t,), pos)
            pos += 1
        token = int(np.argmax(logits[0, -1]))
        on[0] = True
        step_times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            logits, _ = dec.step((token,), pos)
            token = int(np.argmax(logits[0, -1]))
            step_times.append(time.perf_counter() - t0)
            pos += 1
        on[0] = False
        kern = {k: v / steps * 1e3 for k, v in acc.items()}
        ncalls = {k: v / steps for k, v in calls.items()}
    finally:
        for name, fn in originals.items():
            setattr(K, name, fn)
        for lin, fn in saved:
            lin.gemv = fn
    step_instr = float(np.sum(step_times)) / steps * 1e3
    step_plain = float(np.median(plain.decode_ms))
    wb = rt.model.weight_bytes()
    return {"deployment": str(dep), "sparsity": meta.get("sparsity", 0.0), "layers": meta["num_layers"],
            "step_ms_plain": step_plain, "step_ms_instrumented": step_instr, "kernel_ms": kern,
            "calls_per_step": ncalls, "python_ms": step_instr - sum(kern.values()),
            "loop_overhead_ms": float(np.median(plain.overhead_ms)), "timer_us_per_call": timer_us,
            "weight_bytes": wb, "threads": K.threading_layer()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("deployments", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "native_where_time_goes"))
    a = ap.parse_args()
    from sparsedeploy.bench.report import machine_info, measure_bandwidth

    bw = measure_bandwidth(threads=a.threads, mbytes=256)
    rows = [profile(Path(d), a.threads, a.prompt_tokens, a.steps) for d in a.deployments]
    doc = {"machine": {**machine_info(), "bandwidth": bw}, "rows": rows, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    Path(a.out + ".json").write_text(json.dumps(doc, indent=1) + "\n")
    kinds = ["sparse products", "dense products", "lm_head", "attention", "norms + activation"]
    lines = ["# Where a native decode step goes", "",
             f"{doc['machine']['cpu']}, {a.threads} threads, bandwidth {bw['gbs']:.1f} GB/s. Decode steps after a "
             f"{a.prompt_tokens}-token prompt, {a.steps} steps; ms per step. 'Python' = instrumented step − all kernel "
             "time (per-layer calls, embedding lookup, the decode loop, and the timers themselves).", "",
             "| deployment | sparsity | step ms (plain) | step ms (timed) | " + " | ".join(kinds) +
             " | Python | kernel calls/step | decoder-linear MB | floor of products at bandwidth |",
             "|---|---:|---:|---:|" + "---:|" * len(kinds) + "---:|---:|---:|---:|"]
    for r in rows:
        k = r["kernel_ms"]
        lin_mb = r["weight_bytes"]["decoder_linears"] / 2**20
        floor = (r["weight_bytes"]["decoder_linears"]) / (bw["gbs"] * 1e9) * 1e3
        lines.append(f"| {Path(r['deployment']).parent.name}/{Path(r['deployment']).name} | {r['sparsity']:.0%} | "
                     f"{r['step_ms_plain']:.2f} | {r['step_ms_instrumented']:.2f} | "
                     + " | ".join(f"{k.get(x, 0.0):.2f}" for x in kinds)
                     + f" | {r['python_ms']:.2f} | {sum(r['calls_per_step'].values()):.0f} | {lin_mb:.0f} | {floor:.2f} |")
    lines += ["", f"Timer cost ≈ {rows[0]['timer_us_per_call']:.2f} µs per kernel call (inside the Python column).",
              f"Finished {doc['finished']}."]
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
