"""The allocate stage: per-decoder-layer sparsity ratios → RUN/ratios.json (+ ratios.png)."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from ... import ui
from ...errors import UserError, check
from .. import allocate as alloc
from ..arch import spec_for
from ..models import load, resolve
from ..rundir import RunDir, read_json, write_json
from ..stream import StreamedWeights, iter_layer_weights, use_stream
from .common import ALLOCATORS, CALIB_STATS, RATIOS, RATIOS_PNG, _load_tensors, _run_model, peak_rss_mb, reset_peak_rss


@dataclass
class AllocConfig:
    sparsity: float = 0.5
    allocator: str = "dlp"
    alpha: float | None = None
    stat: str = "median"
    owl_m: float = 5.0
    owl_lambda: float | None = None


def check_sparsity(p: float) -> None:
    check(0.0 < p < 1.0, f"sparsity {p} is outside (0, 1)", "pass a fraction such as --sparsity 0.7")


def check_spread(cfg: AllocConfig) -> None:
    """Reject α / λ whose span 2α alone cannot fit in [0, 1) before any work is done; the exact
    feasibility for the model's layers is checked by the allocator itself."""
    for name, value in (("α (--alpha)", cfg.alpha), ("λ (--owl-lambda)", cfg.owl_lambda)):
        if value is not None:
            check(0.0 <= value and 2 * value <= alloc.R_MAX, f"{name} = {value} spreads ratios over 2·{value}, "
                  "more than [0, 1) can hold", f"use a value below {alloc.R_MAX / 2:g}, or omit it for the paper's default")


def layer_stats(model, norms: dict[str, torch.Tensor] | None, owl_m: float) -> tuple[list[dict], list[int]]:
    """Per decoder layer: Wanda-score statistics (when norms are given) and the prunable parameter count.
    `model`: an in-memory model, or a pipeline.stream.StreamedWeights (one layer's weights read at a time)."""
    spec = model.spec if isinstance(model, StreamedWeights) else spec_for(model)
    stats, sizes = [], []
    for i, weights in enumerate(iter_layer_weights(model)):
        sizes.append(sum(w.numel() for w in weights))
        if norms is not None:
            try:
                cols = [norms[f"{i}.{name}"] for name in spec.linears]
            except KeyError as e:
                raise UserError(f"calibration statistics lack {e.args[0]}", "rerun `sparsedeploy calibrate --force`")
            stats.append(alloc.layer_statistics(weights, cols, owl_m=owl_m))
        del weights
    return stats, sizes


def allocate(run: RunDir, cfg: AllocConfig, *, force: bool = False, model=None, stream: bool | None = None) -> dict:
    """Per-layer ratios. `stream` (None: auto by size) reads each layer's weights from the model's safetensors
    instead of loading the whole model; the ratios are the same."""
    check_sparsity(cfg.sparsity)
    check_spread(cfg)
    check(cfg.allocator in ALLOCATORS, f"unknown allocator '{cfg.allocator}'", f"use one of {', '.join(ALLOCATORS)}")
    check(cfg.stat in ("median", "mean"), f"unknown --dlp-stat '{cfg.stat}'", "use median (the paper) or mean (the authors' code)")
    needs_calib = cfg.allocator != "uniform"
    calib = run.stage("calibrate")
    if needs_calib and not (calib and calib.get("done")):
        raise UserError(f"{cfg.allocator} needs calibration statistics in {run.path}",
                        f"run `sparsedeploy calibrate MODEL --out {run.path}` first")
    inputs = {"calibrate": calib.get("finished") if calib else None, "model": _run_model(run)}
    if not force and run.is_done("allocate", asdict(cfg), inputs, (RATIOS,)):
        ui.info(f"allocate: up to date in {run.path}")
        return read_json(run.path / RATIOS)
    t0 = time.perf_counter()
    reset_peak_rss()
    if model is None:
        ref = resolve(_run_model(run))
        model = StreamedWeights(ref.path) if use_stream(ref, stream) else load(ref)[0]
    norms = _load_tensors(run.path / CALIB_STATS) if calib and calib.get("done") else None
    stats, sizes = layer_stats(model, norms, cfg.owl_m)
    result = alloc.allocate(cfg.allocator, stats, sizes, cfg.sparsity, alpha=cfg.alpha, stat=cfg.stat,
                            owl_lambda=cfg.owl_lambda, owl_m=cfg.owl_m)
    doc = {
        "target_sparsity": cfg.sparsity, "allocator": cfg.allocator, "alpha": result.alpha,
        "stat": cfg.stat if cfg.allocator == "dlp" else None,
        "realized_sparsity": result.weighted_mean, "realized_from": "plan",
        "sizes": sizes, "layers": result.to_layers(),
    }
    write_json(run.path / RATIOS, doc)
    if stats:  # Figure 3: importance bars with every allocator's ratios overlaid
        overlay = {}
        for name in ALLOCATORS:
            try:
                overlay[name] = alloc.allocate(name, stats, sizes, cfg.sparsity, stat=cfg.stat, owl_m=cfg.owl_m).to_layers()
            except UserError:
                pass
        overlay[cfg.allocator] = doc["layers"]
        from ..plots import plot_allocation
        model_type = model.config["model_type"] if isinstance(model, StreamedWeights) else model.config.model_type
        plot_allocation(run.path / RATIOS_PNG, overlay, f"{model_type} · target sparsity {cfg.sparsity:.0%}")
    run.invalidate("prune")
    run.mark_done("allocate", asdict(cfg), inputs, time.perf_counter() - t0, peak_rss_mb=peak_rss_mb(),
                  streamed=isinstance(model, StreamedWeights))
    return doc
