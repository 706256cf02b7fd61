"""The quantize stage: GPTQ that keeps every pruned zero → RUN/quantized/ and a fake-quant RUN/model/."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ... import ui
from ...errors import UserError, check
from .. import quantize as qz
from ..arch import decoder_layers, get_module, spec_for
from ..data import calibration_windows, load_text
from ..models import ModelRef, load, resolve, save_model
from ..rundir import RunDir, read_json
from ..walker import walk
from .calibrate import CalibConfig
from .common import (CALIB_TOKENS, PREQUANT, QUANTIZED, RATIOS, _load_tensors, _quant_summary, _run_model,
                     layer_zero_counts, peak_rss_mb, reset_peak_rss, resolve_device)


@dataclass
class QuantConfig:
    bits: int = 4
    group_size: int = 128
    act_order: bool = False
    sym: bool = False
    percdamp: float = 0.01
    blocksize: int = 128
    true_sequential: bool = False    # GPTQ's --true-sequential: a layer's linear groups one after another (5 passes, not 2)
    calib: CalibConfig = field(default_factory=CalibConfig)   # only for RUNs that hold no calibration windows
    device: str = "auto"

    def key(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "act_order": self.act_order, "sym": self.sym,
                "percdamp": self.percdamp, "blocksize": self.blocksize, "true_sequential": self.true_sequential,
                "format": qz.FORMAT}


def quantize(run: RunDir, cfg: QuantConfig, *, force: bool = False) -> Path:
    """GPTQ every prunable linear through the walker, layer i calibrated on the outputs of the already
    quantized layers < i. Keeps every pruned zero (checked per layer). Writes RUN/quantized/ (packed
    checkpoint + quantize.json) and replaces RUN/model with the fake-quantized float model; the
    unquantized pruned model moves to RUN/pruned/ so a second quantize (other bits) starts from it."""
    qz.check_quant_args(cfg.bits, cfg.group_size)
    check(cfg.percdamp >= 0, f"percdamp {cfg.percdamp} is negative", "use e.g. 0.01")
    model_spec = _run_model(run)
    man = run.manifest()
    prune_rec = man["stages"].get("prune") or {}
    if prune_rec.get("args", {}).get("bits") is not None:
        raise UserError(f"{run.path} was pruned and quantized jointly (prune --bits {prune_rec['args']['bits']})",
                        "rerun `sparsedeploy prune ... --bits N --force` to change the quantization")
    wants_sparsity = (run.path / RATIOS).is_file() or "allocate" in man["stages"]
    pruned = prune_rec.get("done") and ((run.path / PREQUANT / "config.json").is_file() or (run.path / "model" / "config.json").is_file())
    if wants_sparsity and not pruned:
        target = ""
        if (run.path / RATIOS).is_file():
            target = f" (target sparsity {read_json(run.path / RATIOS).get('target_sparsity')})"
        raise UserError(f"{run.path} asks for sparsity{target} but holds no pruned model",
                        f"run `sparsedeploy prune MODEL --out {run.path} ...` first, then quantize")
    if (run.path / PREQUANT / "config.json").is_file():
        src = ModelRef(str(run.path / PREQUANT), str(run.path / PREQUANT), True)
    elif pruned:
        src = ModelRef(str(run.path / "model"), str(run.path / "model"), True)
    else:   # a calibrated dense RUN: quantize the dense model
        src = resolve(model_spec)
    inputs = {"prune": prune_rec.get("finished") if pruned else None, "source": src.fingerprint()}
    if not force and run.is_done("quantize", cfg.key(), inputs, (f"{QUANTIZED}/{qz.QUANT_JSON}", "model/config.json")):
        ui.info(f"quantize: up to date in {run.path / QUANTIZED}")
        return run.path / QUANTIZED
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    reset_peak_rss()
    model, tok = load(src)
    spec = spec_for(model)
    if (run.path / CALIB_TOKENS).is_file():
        ids = _load_tensors(run.path / CALIB_TOKENS)["input_ids"].to(torch.long)
        calib_from = "RUN calibration windows"
    else:
        c = cfg.calib
        ids = calibration_windows(tok, load_text(c.calib, c.data_file), c.nsamples, c.seqlen, c.seed)
        calib_from = f"{c.calib} {c.nsamples}×{c.seqlen} seed {c.seed}"
    before = layer_zero_counts(model)
    results: dict = {}

    def quantize_layer(i, layer, stats):
        for name, st in stats.items():
            lin = get_module(layer, name)
            res = qz.gptq(lin.weight.data, st.hessian, cfg.bits, cfg.group_size, cfg.act_order, cfg.sym,
                          cfg.percdamp, cfg.blocksize)
            lin.weight.data = res.weight
            res.weight = None   # the packer needs only codes, scales and zero points
            results[f"{spec.layers}.{i}.{name}"] = res
        return True

    n_layers = len(decoder_layers(model, spec))
    with ui.progress(f"quantize GPTQ {cfg.bits}-bit g{cfg.group_size}", n_layers) as bar:
        walk(model, ids, quantize_layer, needs=("hessian",), device=device, chunk=8,
             sequential=cfg.true_sequential, progress=bar)
    model.to("cpu")
    seconds = time.perf_counter() - t0
    after = layer_zero_counts(model)
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    if changed:
        k, (b, a) = next(iter(changed.items()))
        raise RuntimeError(f"quantization changed the zero count of {len(changed)} layer(s), e.g. {k}: {b[0]} -> {a[0]} "
                           "(a bug: nothing was written)")
    zeros = sum(z for z, _ in after.values())
    size = sum(n for _, n in after.values())
    doc = qz.write_packed(model, tok, results, run.path / QUANTIZED,
                          {"source": str(src.path), "method": "gptq", "calibration": calib_from,
                           "percdamp": cfg.percdamp, "true_sequential": cfg.true_sequential,
                           "sparsity": zeros / size, "zeros_per_layer": {k: z for k, (z, _) in after.items()}})
    if pruned and not (run.path / PREQUANT).exists():
        os.replace(run.path / "model", run.path / PREQUANT)
    save_model(model, tok, run.path / "model")
    run.mark_done("quantize", cfg.key(), inputs, seconds, peak_rss_mb=peak_rss_mb(), device=str(device),
                  **_quant_summary(doc))
    return run.path / QUANTIZED
