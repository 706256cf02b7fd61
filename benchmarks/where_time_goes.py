"""Where a DeepSparse decode step spends its time: deepsparse's debug analysis per op kind.

For each deployment (a dense and a pruned one, typically): one decode step (L = 1, S = the deployment's
seqlen) on a static copy, `model_debug_analysis` over N iterations, then its per-layer times grouped by op
kind, and for the fully-connected layers the kernel sparsity DeepSparse itself reports (does it see the
zeros?). Its total is compared with the wall time of plain engine calls, since the two disagree.

    .venv/bin/python benchmarks/where_time_goes.py DEPLOYMENT... [--cores 2] [--out benchmarks/results/where_time_goes.md]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ["NM_DISABLE_ANALYTICS"] = "1"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from sparsedeploy.engine.graphio import static_copy  # noqa: E402

INT_INPUTS = ("input_ids", "attention_mask", "positions", "causal_mask")


def analyse(dep: Path, cores: int, iterations: int) -> dict:
    from deepsparse import model_debug_analysis
    from deepsparse.engine import Engine

    meta = json.loads((dep / "sparsedeploy.json").read_text())
    S = int(meta["seqlen"])
    path = static_copy(dep / "model.onnx", tempfile.mkdtemp(prefix="where-"), seq_len=1, cache_len=S)
    eng = Engine(model=str(path), batch_size=1, num_cores=cores)
    inputs = []
    for name, shape in zip(eng.input_names, eng.input_shapes):
        arr = np.ones(shape, dtype=np.int64) if name in INT_INPUTS else np.zeros(shape, dtype=np.float32)
        inputs.append(arr)
    for _ in range(5):
        eng.run(inputs, val_inp=False)
    wall = []
    for _ in range(iterations):
        t = time.perf_counter()
        eng.run(inputs, val_inp=False)
        wall.append((time.perf_counter() - t) * 1e3)
    del eng
    res = model_debug_analysis(str(path), inputs, batch_size=1, num_cores=cores, num_iterations=iterations,
                               num_warmup_iterations=5)
    by_kind: dict[str, float] = defaultdict(float)
    fc_sparsity = []
    for layer in res["layer_info"]:
        # names like "gemm_3", "ks_gevm_be-48.4%" (a kernel-sparse matrix-vector product at 48.4% sparsity)
        kind = re.sub(r"-\d+(\.\d+)?%", "", layer["name"])
        kind = re.sub(r"[_ ]?\d+$", "", kind).lower()
        by_kind[kind] += layer["average_run_time_in_ms"]
        if any(t in kind for t in ("gevm", "gemm", "gemv", "fc", "matmul")):
            fc_sparsity.append(layer["kernel_sparsity"])
            by_kind["all matrix products"] += layer["average_run_time_in_ms"]
    return {"deployment": str(dep), "sparsity": meta.get("sparsity", 0.0), "wall_ms": float(np.median(wall)),
            "analysis_total_ms": float(res["average_total_time"]), "by_kind": dict(by_kind),
            "fc_layers": len(fc_sparsity), "fc_kernel_sparsity_mean": float(np.mean(fc_sparsity)) if fc_sparsity else None}


def _name(dep: str) -> str:
    p = Path(dep)
    return p.parent.name if p.name == "deployment" else p.name


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("deployments", nargs="+", type=Path)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "where_time_goes.md")
    a = ap.parse_args()
    results = [analyse(d, a.cores, a.iterations) for d in a.deployments]
    kinds = sorted({k for r in results for k in r["by_kind"]}, key=lambda k: -max(r["by_kind"].get(k, 0) for r in results))
    lines = ["# Where a DeepSparse decode step goes (deepsparse debug analysis)", "",
             f"One decode step, {a.cores} cores, {a.iterations} iterations. `wall` = median of plain engine calls; "
             "`analysis` = the debug analysis's own total (it disagrees with wall time).", "",
             "| | " + " | ".join(f"{_name(r['deployment'])} ({r['sparsity']:.0%})" for r in results) + " |",
             "|---|" + "---:|" * len(results),
             "| wall ms | " + " | ".join(f"{r['wall_ms']:.2f}" for r in results) + " |",
             "| analysis total ms | " + " | ".join(f"{r['analysis_total_ms']:.2f}" for r in results) + " |",
             "| kernel sparsity DeepSparse reports (mean over matrix products) | " + " | ".join(
                 "–" if r["fc_kernel_sparsity_mean"] is None else f"{r['fc_kernel_sparsity_mean']:.1%} of {r['fc_layers']}"
                 for r in results) + " |"]
    for k in kinds[:15]:
        lines.append(f"| {k} ms | " + " | ".join(f"{r['by_kind'].get(k, 0.0):.2f}" for r in results) + " |")
    text = "\n".join(lines) + "\n"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    (a.out.with_suffix(".json")).write_text(json.dumps(results, indent=2))
    print(text)


if __name__ == "__main__":
    main()
