"""Table 5 on three engines in one run: the native numba engine, DeepSparse and ONNX Runtime (issue 6).

(b) Synthetic LLaMA2-7B shapes (random weights), 2 decoder layers, magnitude pruning 0–90%: every engine
    on every sparsity; groups of one pruned model + the dense one (six 7B-sized workers fit in memory),
    each group re-timing dense on every engine, so each speedup is against dense timed in the same rounds.
(c) SmolLM2-135M, Wanda + DLP 0–90% (the deployments of benchmarks/table5.py, reused), groups of three.

Resumable (exports, native weights and finished bench groups are reused). Results are copied to
benchmarks/results/native_<name>.{json,csv,md,png}. Run on an otherwise idle machine:

    .venv/bin/python benchmarks/native_table5.py [--only synthetic|smollm2] [--prepare-only]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsedeploy.bench.bench import BenchConfig  # noqa: E402
from sparsedeploy.workflows.sweep import SweepConfig, parse_sparsities, sweep  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from table5 import RESULTS, _publish  # noqa: E402

ENGINES = "native,deepsparse,onnxruntime"




def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["smollm2", "synthetic"], action="append")
    ap.add_argument("--work", default=str(ROOT / "runs"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prepare-only", action="store_true")
    ap.add_argument("--sparsities", default="0,0.5,0.6,0.7,0.8,0.9")
    ap.add_argument("--engines", default=ENGINES)
    ap.add_argument("--synthetic-group-size", type=int, default=1, help="pruned models per group (each adds dense; "
                    "every worker of a group stays resident: 7B-shaped ones take 1-3 GB each)")
    a = ap.parse_args()
    work = Path(a.work)
    todo = a.only or ["synthetic", "smollm2"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    if "synthetic" in todo:
        sp = parse_sparsities(a.sparsities)
        cfg = SweepConfig(synthetic="llama2-7b", layers=2, method="magnitude", allocator="uniform", export_seqlen=256,
                          sparsities=sp,
                          prepare_only=a.prepare_only,
                          bench=BenchConfig(engine=a.engines, group_size=a.synthetic_group_size, prompt_tokens=16, new_tokens=64,
                                            rounds=a.rounds, ort_baseline=False))
        sweep(cfg, work / "sweep_synthetic_llama2_7b")
        if not a.prepare_only:
            _publish(work / "sweep_synthetic_llama2_7b" / "table5", "native_table5_synthetic_llama2_7b_2layers")
    if "smollm2" in todo:
        cfg = SweepConfig("smollm2-135m", allocator="dlp", method="wanda", nsamples=32, calib_seqlen=256,
                          sparsities=parse_sparsities(a.sparsities),
                          export_seqlen=256, prepare_only=a.prepare_only,
                          bench=BenchConfig(engine=a.engines, group_size=3, prompt_tokens=64, new_tokens=128,
                                            rounds=a.rounds, ort_baseline=False))
        out = work / "sweep_smollm2"
        if a.prepare_only:
            sweep(cfg, out)
        else:
            from sparsedeploy.bench import report
            from sparsedeploy.bench.bench import bench

            cfg.prepare_only = True
            deps = sweep(cfg, out)["deployments"]
            doc = bench(deps, cfg.bench, cache_dir=work / "sweep_smollm2_native", title="smollm2-135m: DLP + wanda — decode ms/token")
            report.write_reports(doc, work / "sweep_smollm2_native" / "table5")
            _publish(work / "sweep_smollm2_native" / "table5", "native_table5_smollm2")


if __name__ == "__main__":
    main()
