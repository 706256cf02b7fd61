"""The main job (`sparsedeploy run`): prune the model with DLP + Wanda, compare perplexity with the dense
model's, then export both, compile the pruned one and bench dense vs pruned (Table 5).

`run(cfg, on_step)` returns a RunResult; `on_step(step, result)` is called as each step finishes (with the
result filled so far), so a caller can show the perplexity table long before the bench is done. Steps, in
order: "evaluated", then with cfg.deploy "exported", "picked" (only for engine auto), "compiled", "benched".
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass
class RunConfig:
    model: str = "smollm2-135m"
    out: Path = Path("runs/default")
    sparsity: float = 0.6
    allocator: str = "dlp"
    method: str = "wanda"
    nsamples: int = 32                 # calibration windows (the papers use 128×2048; this default fits 2 cores)
    seqlen: int = 256
    eval_data: str | None = None       # None: wikitext2 if found locally, else held-out Wikipedia
    eval_seqlen: int = 256
    max_windows: int | None = 64
    data_file: str | None = None
    device: str = "auto"
    deploy: bool = True                # then export, compile and bench dense vs pruned
    engine: str = "auto"               # auto: the fastest on a short probe
    cores: int | None = None
    export_seqlen: int = 256
    prompt_tokens: int = 64
    new_tokens: int = 128
    force: bool = False


@dataclass
class RunResult:
    plan: dict | None = None                 # RUN/ratios.json
    dense: dict | None = None                # the dense model's eval document
    pruned: dict | None = None               # the pruned model's eval document
    model_dir: Path | None = None            # RUN/model
    ratios: Path | None = None               # RUN/ratios.json
    figure: Path | None = None               # RUN/ratios.png
    dense_deployment: Path | None = None
    deployment: Path | None = None           # the pruned model's
    engine: str | None = None
    engine_why: str | None = None            # the probe's verdict (None when the engine was named)
    compiled: dict | None = None             # compile_deployment's record
    bench: dict | None = None                # the bench document (report.write_reports format)
    reports: Path | None = None              # stem of table5.{json,csv,md,png}


def run(cfg: RunConfig, on_step: Callable[[str, RunResult], None] | None = None) -> RunResult:
    from ..pipeline import stages as st

    step = on_step or (lambda name, result: None)
    out, res = Path(cfg.out), RunResult()
    pcfg = st.PruneConfig(cfg.model, cfg.sparsity, cfg.allocator, cfg.method, "unstructured",
                          calib=st.CalibConfig(cfg.model, "wikipedia-summaries", cfg.nsamples, cfg.seqlen, 0, None, cfg.device),
                          device=cfg.device)
    res.model_dir = st.prune(st.RunDir(out), pcfg, force=cfg.force)
    ecfg = st.EvalConfig(cfg.eval_data, cfg.eval_seqlen, cfg.max_windows, cfg.data_file, cfg.device)
    res.dense = st.evaluate(cfg.model, ecfg, out=out / "eval_dense.json", force=cfg.force)
    res.pruned = st.evaluate(str(out), ecfg, force=cfg.force)
    res.ratios, res.figure = out / st.RATIOS, out / st.RATIOS_PNG
    res.plan = st.read_json(res.ratios)
    step("evaluated", res)
    if not cfg.deploy:
        return res
    from ..bench import bench as bench_mod, report
    from ..export.stage import export as export_stage
    res.dense_deployment = export_stage(cfg.model, seqlen=cfg.export_seqlen, out=out / "dense-deployment", force=cfg.force)
    res.deployment = export_stage(str(out), seqlen=cfg.export_seqlen, force=cfg.force)
    step("exported", res)
    res.engine = cfg.engine
    if cfg.engine == "auto":
        res.engine, res.engine_why = bench_mod.pick_engine(res.deployment, cfg.cores)
        step("picked", res)
    res.compiled = bench_mod.compile_deployment(res.deployment, res.engine, cfg.cores)
    step("compiled", res)
    engines = res.engine
    if peer_gguf(cfg, res.dense_deployment) is not None:
        engines += ",llamacpp"
    bcfg = bench_mod.BenchConfig(engine=engines, cores=cfg.cores, prompt_tokens=cfg.prompt_tokens, new_tokens=cfg.new_tokens,
                                 rounds=3, group_size=None, ort_baseline=True, gguf_type=PEER_TYPE)
    res.bench = bench_mod.bench([res.dense_deployment, res.deployment], bcfg,
                                title=f"{cfg.model}: dense vs {cfg.allocator.upper()}+{cfg.method} — decode ms/token")
    res.reports = out / "table5"
    report.write_reports(res.bench, res.reports)
    step("benched", res)
    return res


PEER_TYPE = "q4_0"


def peer_gguf(cfg: RunConfig, dense_deployment: Path) -> Path | None:
    """Where llama.cpp is built (scripts/build-llamacpp.sh): the dense model as a Q4_0 GGUF inside the dense
    deployment, so that the bench times the peer a user would otherwise deploy in the same rounds."""
    from ..engine import unavailable

    if unavailable("llamacpp") is not None:
        return None
    from .. import ui
    from ..errors import UserError
    from ..export.gguf import export_gguf

    try:
        return export_gguf(cfg.model, qtype=PEER_TYPE, out=Path(dense_deployment) / f"model-{PEER_TYPE}.gguf",
                           force=cfg.force, cores=cfg.cores)
    except UserError as e:            # e.g. an architecture llama.cpp's llama graph does not cover
        ui.info(f"note: no llama.cpp peer for this model: {e}")
        return None
