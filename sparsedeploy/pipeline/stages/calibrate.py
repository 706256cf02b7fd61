"""The calibrate stage: calibration windows and the dense model's per-linear column norms.

With `stream` (auto above pipeline.stream.AUTO_STREAM_BYTES of fp32 weights) the decoder layers are read one at a
time from the model's safetensors (pipeline/stream.py); the statistics are the same, bit for bit."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ... import ui
from ...errors import check
from ..arch import decoder_layers, spec_for
from ..data import calibration_windows, load_text
from ..models import load, load_tokenizer, resolve, synthetic_label
from ..rundir import RunDir
from ..stream import StreamedModel, use_stream
from ..walker import walk
from .common import (CALIB_STATS, CALIB_TOKENS, _model_inputs, _save_tensors, _set_model, peak_rss_mb, reset_peak_rss,
                     resolve_device)


@dataclass
class CalibConfig:
    model: str = "smollm2-135m"
    calib: str = "wikipedia-summaries"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    data_file: str | None = None
    device: str = "auto"
    allow_pickle: bool = False
    stream: bool | None = None       # read decoder layers one at a time from disk (None: auto, by size)

    def key(self) -> dict:  # what decides the artifact (the device and streaming do not)
        d = asdict(self)
        d.pop("device")
        d.pop("allow_pickle")
        d.pop("stream")
        return d


def calibrate(run: RunDir, cfg: CalibConfig, *, force: bool = False) -> Path:
    """Calibration windows and the dense model's per-linear column norms (for OWL/DLP and Wanda)."""
    check(cfg.nsamples >= 1, f"--nsamples {cfg.nsamples} must be at least 1", "use e.g. --nsamples 128")
    check(cfg.seqlen >= 8, f"--seqlen {cfg.seqlen} is too short", "use e.g. --seqlen 2048")
    ref = resolve(cfg.model, allow_pickle=cfg.allow_pickle)
    inputs = _model_inputs(ref)
    if not force and run.manifest().get("model") == cfg.model and run.is_done("calibrate", cfg.key(), inputs, (CALIB_TOKENS, CALIB_STATS)):
        ui.info(f"calibrate: up to date in {run.path}")
        return run.path / CALIB_STATS
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    reset_peak_rss()
    streamed = use_stream(ref, cfg.stream)
    sm = None
    if streamed:
        sm = StreamedModel(ref.path)
        model, tok = sm.model, load_tokenizer(ref)
    else:
        model, tok = load(ref, allow_pickle=cfg.allow_pickle)
    spec_for(model)
    text = load_text(cfg.calib, cfg.data_file)
    ids = calibration_windows(tok, text, cfg.nsamples, cfg.seqlen, cfg.seed)
    norms: dict[str, torch.Tensor] = {}
    run.path.mkdir(parents=True, exist_ok=True)  # only now: bad input above leaves nothing behind
    _set_model(run, cfg.model)

    def collect(i, layer, stats):
        for name, s in stats.items():
            norms[f"{i}.{name}"] = s.col_norm.cpu().contiguous()
        return False

    n_layers = len(decoder_layers(model))
    with ui.progress(f"calibrate {cfg.nsamples}×{cfg.seqlen} tokens", n_layers) as bar:
        walk(model, ids, collect, needs=("col_norm",), device=device, progress=bar, stream=sm)
    run.path.mkdir(parents=True, exist_ok=True)
    _save_tensors(run.path / CALIB_TOKENS, {"input_ids": ids.to(torch.int32).contiguous()})
    _save_tensors(run.path / CALIB_STATS, norms)
    for later in ("allocate", "prune"):
        run.invalidate(later)
    run.mark_done("calibrate", cfg.key(), inputs, time.perf_counter() - t0, peak_rss_mb=peak_rss_mb(),
                  streamed=bool(streamed), **({"synthetic": lab} if (lab := synthetic_label(ref)) else {}))
    return run.path / CALIB_STATS
