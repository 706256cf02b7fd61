"""Table 5 on this machine: decode latency / throughput / speedup across 0–90% sparsity.

(a) SmolLM2-135M, Wanda + DLP, 0–90% in steps of 10, DeepSparse (+ dense ONNX Runtime in the same rounds),
    then the same deployments on ONNX Runtime alone.
(b) Synthetic LLaMA2-7B shapes (random weights), 2 decoder layers, magnitude pruning, DeepSparse in groups
    that each re-time the dense model (all eleven 7B-sized engines do not fit in memory at once).

Each sweep resumes (pruned models, exports and finished bench groups are reused). Results are copied to
benchmarks/results/<name>.{json,csv,md,png}. Run on an otherwise idle machine:

    .venv/bin/python benchmarks/table5.py [--only smollm2|synthetic|smollm2-ort] [--work runs/table5]
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsedeploy.bench.bench import BenchConfig, bench  # noqa: E402
from sparsedeploy.bench import report  # noqa: E402
from sparsedeploy.workflows.sweep import SweepConfig, sweep  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _publish(src_stem: Path, name: str) -> None:
    for ext in ("json", "csv", "md", "png"):
        shutil.copy2(src_stem.with_suffix(f".{ext}"), RESULTS / f"{name}.{ext}")
    print(f"wrote {RESULTS / name}.{{json,csv,md,png}}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["smollm2", "smollm2-ort", "synthetic"], action="append")
    ap.add_argument("--work", default=str(ROOT / "runs"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    a = ap.parse_args()
    work = Path(a.work)
    todo = a.only or ["smollm2", "smollm2-ort", "synthetic"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    common = dict(prompt_tokens=a.prompt_tokens, new_tokens=a.new_tokens, rounds=a.rounds)

    if "smollm2" in todo or "smollm2-ort" in todo:
        cfg = SweepConfig("smollm2-135m", allocator="dlp", method="wanda", nsamples=32, calib_seqlen=256,
                          export_seqlen=256, bench=BenchConfig(engine="deepsparse", **common))
        if "smollm2" in todo:
            sweep(cfg, work / "sweep_smollm2")
            _publish(work / "sweep_smollm2" / "table5", "table5_smollm2_deepsparse")
        if "smollm2-ort" in todo:
            cfg.prepare_only = True
            deps = sweep(cfg, work / "sweep_smollm2")["deployments"]
            doc = bench(deps, BenchConfig(engine="onnxruntime", **common), cache_dir=work / "sweep_smollm2_ort",
                        title="smollm2-135m: DLP + wanda — decode ms/token")
            report.write_reports(doc, work / "sweep_smollm2_ort" / "table5")
            _publish(work / "sweep_smollm2_ort" / "table5", "table5_smollm2_onnxruntime")
    if "synthetic" in todo:
        cfg = SweepConfig(synthetic="llama2-7b", layers=2, method="magnitude", allocator="uniform",
                          export_seqlen=256, bench=BenchConfig(engine="deepsparse", group_size=3, **common))
        sweep(cfg, work / "sweep_synthetic_llama2_7b")
        _publish(work / "sweep_synthetic_llama2_7b" / "table5", "table5_synthetic_llama2_7b_2layers")


if __name__ == "__main__":
    main()
