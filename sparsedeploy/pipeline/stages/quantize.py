"""The quantize stage: GPTQ that keeps every pruned zero → RUN/quantized/ and a fake-quant RUN/model/.

One walk serves both paths; each layer is packed into RUN/quantized/ as soon as it is final (pipeline.quantize.
PackedWriter, shard by shard). Streamed (`stream`, auto above pipeline.stream.AUTO_STREAM_BYTES of fp32 weights, as
prune): the walker reads decoder layer i of the input (the RUN's pruned model) from its safetensors, GPTQ runs on
it in fp32 exactly as in memory, and the fake-quant layer goes to RUN/model/ shard by shard in the input's dtype.
Codes, scales, zero points and masks equal the in-memory quantize's bit for bit (for bf16 inputs too: both
compute in fp32 from the same bf16 values); for fp32 inputs every tensor does. For a bf16 input the other
tensors (embeddings, norms) stay bf16 in both folders and RUN/model's fake-quant weights are the fp32 values
rounded to bf16 (the in-memory path widens everything to fp32): the exact values are the packed codes'. (An fp16
input whose fake-quant weight would round to 0 in fp16 is refused: quantize it with --no-stream.)"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ... import ui
from ...errors import UserError, check
from .. import quantize as qz
from ..arch import decoder_layers, get_module, spec_for, tied_aliases
from ..data import calibration_windows, load_text
from ..models import ModelRef, load, load_tokenizer, replace_dir, resolve, save_model, synthetic_label
from ..rundir import RunDir, read_json
from ..stream import DTYPES, ShardWriter, StreamedModel, copy_side_files, use_stream
from ..walker import walk
from .calibrate import CalibConfig
from .common import (CALIB_TOKENS, PREQUANT, QUANTIZED, RATIOS, _load_tensors, _quant_summary, _run_model,
                     peak_rss_mb, reset_peak_rss, resolve_device)


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
    stream: bool | None = None       # read/write decoder layers one at a time (None: auto, by size)

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
    streamed = use_stream(src, cfg.stream)
    key = cfg.key() | ({"stream": True} if streamed else {})   # a streamed output keeps the input's dtype
    if not force and run.is_done("quantize", key, inputs, (f"{QUANTIZED}/{qz.QUANT_JSON}", "model/config.json")):
        ui.info(f"quantize: up to date in {run.path / QUANTIZED}")
        return run.path / QUANTIZED
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    reset_peak_rss()
    if streamed:
        sm = StreamedModel(src.path)
        model, tok = sm.model, None
    else:
        sm = None
        model, tok = load(src)
    spec = spec_for(model)
    if (run.path / CALIB_TOKENS).is_file():
        ids = _load_tensors(run.path / CALIB_TOKENS)["input_ids"].to(torch.long)
        calib_from = "RUN calibration windows"
    else:
        c = cfg.calib
        tok = tok or load_tokenizer(src)
        ids = calibration_windows(tok, load_text(c.calib, c.data_file), c.nsamples, c.seqlen, c.seed)
        calib_from = f"{c.calib} {c.nsamples}×{c.seqlen} seed {c.seed}"
    pending: dict = {}     # this layer's GPTQ results (codes, scales), until the layer is written
    counts: dict[str, tuple[int, int]] = {}
    hwm: list[int] = []    # the stage's peak RSS (MiB) so far, after each layer: flat unless memory creeps

    def quantize_layer(i, layer, stats):
        for name, st in stats.items():
            lin = get_module(layer, name)
            zeros = int((lin.weight.data == 0).sum())
            res = qz.gptq(lin.weight.data, st.take_hessian(), cfg.bits, cfg.group_size, cfg.act_order, cfg.sym,
                          cfg.percdamp, cfg.blocksize, own_h=True)
            if int((res.weight == 0).sum()) != zeros:
                raise RuntimeError(f"quantization changed the zero count of layer {i} {name}: {zeros} -> "
                                   f"{int((res.weight == 0).sum())} (a bug: nothing was written)")
            lin.weight.data = res.weight
            res.weight = None   # the packer needs only codes, scales and zero points
            pending[name] = res
        return True

    qtmp = Path(tempfile.mkdtemp(prefix=f".{QUANTIZED}.", dir=run.path))
    mtmp = Path(tempfile.mkdtemp(prefix=".model.", dir=run.path)) if streamed else None
    packed = qz.PackedWriter(qtmp)
    fake = ShardWriter(mtmp) if streamed else None
    stored = sm.src.meta() if streamed else {}

    def write_layer(i, layer):
        """Layer i is final: its packed linears and other tensors to RUN/quantized (both paths) and, streamed, the
        fake-quant layer to RUN/model in the input's dtypes."""
        prefix = f"{spec.layers}.{i}."
        state = layer.state_dict()
        names = sm.layer_tensor_names(i) if streamed else [prefix + k for k in state]
        z = n = 0
        for name in names:
            rel = name[len(prefix):]
            mod = rel[:-len(".weight")] if rel.endswith(".weight") else None
            if mod in pending:
                w = state[rel]
                packed.add_linear(prefix + mod, pending.pop(mod), w)
                zeros = int((w == 0).sum())
                z, n = z + zeros, n + w.numel()
                if streamed:
                    w = w.to(DTYPES[stored[name][0]])
                    if int((w == 0).sum()) != zeros:
                        raise UserError(f"{name}: the quantized weights underflow to 0 in the model's dtype {w.dtype}",
                                        "quantize with --no-stream (fp32 output)")
                    fake.add(name, w)
                continue
            t = sm.src.get(name) if streamed else state[rel]
            packed.add(name, t)
            if streamed:
                fake.add(name, t)
        if pending:
            raise RuntimeError(f"layer {i}: {sorted(pending)} were quantized but are not among its tensors (a bug)")
        counts[f"{spec.layers}.{i}"] = (z, n)
        hwm.append(round(peak_rss_mb()))

    try:
        with ui.progress(f"quantize GPTQ {cfg.bits}-bit g{cfg.group_size}", len(decoder_layers(model, spec))) as bar:
            walk(model, ids, quantize_layer, needs=("hessian",), device=device, chunk=8,
                 sequential=cfg.true_sequential, progress=bar, stream=sm, on_done=write_layer)
        layers = f"{spec.layers}."
        if streamed:
            tied = sm.tied
            for name in sm.src.names():
                if not name.startswith(layers):
                    t = sm.src.get(name)
                    fake.add(name, t)
                    if name not in tied:
                        packed.add(name, t)
            fake.close()
            copy_side_files(sm.src.path, mtmp)
            copy_side_files(sm.src.path, qtmp)
        else:
            model.to("cpu")
            state = model.state_dict()
            tied = tied_aliases(model)
            for name, t in state.items():
                if not name.startswith(layers) and name not in tied:
                    packed.add(name, t.detach())
            qz.write_side_files(qtmp, model.config, tok)
        zeros = sum(z for z, _ in counts.values())
        size = sum(n for _, n in counts.values())
        doc = packed.close(tied, {"source": str(src.path), "method": "gptq", "calibration": calib_from,
                                  "percdamp": cfg.percdamp, "true_sequential": cfg.true_sequential,
                                  "sparsity": zeros / size, "zeros_per_layer": {k: z for k, (z, _) in counts.items()}})
        if not streamed:
            qz.check_restores(qtmp, state, tied)
    except BaseException:
        for tmp in (qtmp, mtmp):
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    replace_dir(qtmp, run.path / QUANTIZED)
    if pruned and not (run.path / PREQUANT).exists():
        os.replace(run.path / "model", run.path / PREQUANT)
    if streamed:
        replace_dir(mtmp, run.path / "model")
    else:
        save_model(model, tok, run.path / "model")
    run.mark_done("quantize", key, inputs, seconds, peak_rss_mb=peak_rss_mb(), peak_rss_mb_after_layer=hwm,
                  device=str(device),
                  streamed=bool(streamed), **_quant_summary(doc),
                  **({"synthetic": lab} if (lab := synthetic_label(src)) else {}))
    return run.path / QUANTIZED
