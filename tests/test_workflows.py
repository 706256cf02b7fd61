"""Workflows (loops over stages) called directly, without the CLI: what they return and when they report."""
from __future__ import annotations

import json

from sparsedeploy.workflows.run import RunConfig, run


def test_run_without_deploy_returns_the_quality_result_and_reports_each_step(tiny_llama_dir, corpus_file, tmp_path):
    out = tmp_path / "run"
    seen = []
    cfg = RunConfig(model=str(tiny_llama_dir), out=out, sparsity=0.5, nsamples=4, seqlen=32,
                    eval_data=f"file:{corpus_file}", eval_seqlen=32, max_windows=2, device="cpu", deploy=False)
    res = run(cfg, on_step=lambda step, r: seen.append((step, r.pruned is not None)))
    assert seen == [("evaluated", True)]
    assert res.model_dir == out / "model" and (res.model_dir / "config.json").is_file()
    assert res.plan == json.loads(res.ratios.read_text()) and res.plan["allocator"] == "dlp"
    assert res.dense["sparsity"] < 0.01 and abs(res.pruned["sparsity"] - 0.5) < 1 / 64
    assert res.deployment is None and res.bench is None
    # the same config again: every stage is up to date, the result is the same
    again = run(cfg)
    assert again.pruned["perplexity"] == res.pruned["perplexity"] and again.plan == res.plan
