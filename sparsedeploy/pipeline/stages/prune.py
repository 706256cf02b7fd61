"""The prune stage: calibrate (if needed), allocate, then prune every decoder layer → RUN/model/.

Streamed (`stream`, auto above pipeline.stream.AUTO_STREAM_BYTES of fp32 weights): the walker reads decoder layer i
from the input's safetensors, prunes it in fp32 exactly as in memory, and the shard writer stores it in the input's
dtype (bf16 in → bf16 out); the other tensors, config and tokenizer are copied as they are. Same masks and
weights as the in-memory prune (for fp32 inputs bit for bit; for bf16 inputs the in-memory fp32 result rounded
to bf16, the dtype the in-memory path would widen to fp32)."""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ... import ui
from ...errors import check
from .. import quantize as qz
from ..arch import decoder_layers, get_module, spec_for
from ..models import load, replace_dir, resolve, save_model, synthetic_label
from ..prune import NEEDS, PRUNERS, parse_pattern, prune_sparsegpt
from ..rundir import RunDir
from ..stream import DTYPES, ShardWriter, StreamedModel, copy_side_files, use_stream
from ..walker import walk
from .allocate import AllocConfig, allocate, check_sparsity, check_spread
from .calibrate import CalibConfig, calibrate
from .common import (ALLOCATORS, CALIB_TOKENS, PREQUANT, QUANTIZED, RATIOS, _load_tensors, _model_inputs,
                     _quant_summary, _set_model, layer_zero_counts, peak_rss_mb, record_realized, reset_peak_rss,
                     resolve_device)


@dataclass
class PruneConfig:
    model: str = "smollm2-135m"
    sparsity: float = 0.5
    allocator: str = "dlp"
    method: str = "wanda"
    pattern: str = "unstructured"
    alpha: float | None = None
    stat: str = "median"
    owl_m: float = 5.0
    owl_lambda: float | None = None
    calib: CalibConfig = field(default_factory=CalibConfig)
    sequential: bool = False
    device: str = "auto"
    allow_pickle: bool = False
    bits: int | None = None          # joint SparseGPT + GPTQ-style quantization inside the column loop
    group_size: int = 128
    act_order: bool = False
    sym: bool = False
    stream: bool | None = None       # read/write decoder layers one at a time (None: auto, by size)

    def alloc_config(self) -> AllocConfig:
        return AllocConfig(self.sparsity, self.allocator, self.alpha, self.stat, self.owl_m, self.owl_lambda)

    def key(self) -> dict:
        key = {"method": self.method, "pattern": self.pattern, "sequential": self.sequential}
        if self.bits is not None:   # only then, so RUNs pruned before joint quantization existed stay up to date
            key.update(bits=self.bits, group_size=self.group_size, sym=self.sym)
        return key


def validate_prune(cfg: PruneConfig) -> tuple[int, int] | None:
    check_sparsity(cfg.sparsity)
    check(cfg.method in PRUNERS, f"unknown method '{cfg.method}'", f"use one of {', '.join(PRUNERS)}")
    check(cfg.allocator in ALLOCATORS, f"unknown allocator '{cfg.allocator}'", f"use one of {', '.join(ALLOCATORS)}")
    check(cfg.stat in ("median", "mean"), f"unknown --dlp-stat '{cfg.stat}'", "use median or mean")
    check_spread(cfg.alloc_config())
    if cfg.bits is not None:
        qz.check_quant_args(cfg.bits, cfg.group_size)
        check(cfg.method == "sparsegpt", f"--bits with --method {cfg.method}: only SparseGPT quantizes inside its pruning loop",
              f"use --method sparsegpt, or prune with {cfg.method} and then run `sparsedeploy quantize RUN --bits {cfg.bits}` (GPTQ)")
        check(not cfg.act_order, "--act-order is not supported on the joint SparseGPT path (its mask and groups follow column order)",
              "drop --act-order, or prune first and run `sparsedeploy quantize RUN --act-order`")
    nm = parse_pattern(cfg.pattern)
    if nm is not None:
        n, m = nm
        check(cfg.allocator == "uniform", f"--pattern {cfg.pattern} fixes every layer at {1 - n / m:.0%} sparsity",
              "use --allocator uniform with N:M patterns")
        check(abs(cfg.sparsity - (1 - n / m)) < 1e-9, f"--pattern {cfg.pattern} prunes exactly {1 - n / m:g}, not {cfg.sparsity:g}",
              f"pass --sparsity {1 - n / m:g}")
    return nm


def prune(run: RunDir, cfg: PruneConfig, *, force: bool = False) -> Path:
    nm = validate_prune(cfg)
    device = resolve_device(cfg.device)
    ref = resolve(cfg.model, allow_pickle=cfg.allow_pickle)
    streamed = use_stream(ref, cfg.stream)
    if streamed:
        check(cfg.bits is None, "--bits (joint SparseGPT quantization) is not available on the streamed path",
              "prune with --no-stream, or prune streamed and then run `sparsedeploy quantize`")
    needs_data = bool(NEEDS[cfg.method]) or cfg.allocator != "uniform"
    if needs_data:
        cfg.calib.model = cfg.model
        cfg.calib.stream = streamed
        calibrate(run, cfg.calib, force=force)
    else:
        run.path.mkdir(parents=True, exist_ok=True)
        _set_model(run, cfg.model)
    plan = allocate(run, cfg.alloc_config(), force=force, stream=streamed)
    inputs = {"allocate": run.stage("allocate")["finished"], "model": _model_inputs(ref),
              "calibrate": (run.stage("calibrate") or {}).get("finished") if NEEDS[cfg.method] else None}
    key = cfg.key() | ({"stream": True} if streamed else {})   # a streamed output keeps the input's dtype
    if not force and run.is_done("prune", key, inputs, ("model/config.json",)):
        ui.info(f"prune: up to date in {run.path / 'model'}")
        return run.path / "model"
    t0 = time.perf_counter()
    reset_peak_rss()
    if streamed:
        sm = StreamedModel(ref.path)
        model, tok = sm.model, None
    else:
        sm = None
        model, tok = load(ref, allow_pickle=cfg.allow_pickle)
    spec = spec_for(model)
    ratios = [layer["sparsity"] for layer in plan["layers"]]
    check(len(ratios) == len(decoder_layers(model, spec)), f"{RATIOS} has {len(ratios)} layers but the model has "
          f"{len(decoder_layers(model, spec))}", "rerun allocate with --force")
    ids = None
    if NEEDS[cfg.method]:
        ids = _load_tensors(run.path / CALIB_TOKENS)["input_ids"].to(torch.long)
    pruner = PRUNERS[cfg.method]
    quantized: dict = {}

    def prune_layer(i, layer, stats):
        names = list(stats) or list(spec.linears)
        for name in names:
            lin = get_module(layer, name)
            if cfg.bits is None:
                lin.weight.data = pruner(lin.weight.data, stats.get(name), ratios[i], nm)
                continue
            rows, cols = lin.weight.shape
            cq = qz.ColumnQuantizer(rows, cols, cfg.bits, cfg.group_size, cfg.sym, lin.weight.device)
            W = prune_sparsegpt(lin.weight.data, stats.get(name), ratios[i], nm, quant=cq)
            zeros = int((W == 0).sum())
            if zeros != cq.pruned:   # kept weights never quantize to 0: the zeros are exactly the pruned ones
                raise RuntimeError(f"joint prune+quantize of layer {i} {name}: {zeros} zeros but {cq.pruned} pruned weights")
            lin.weight.data = W
            quantized[f"{spec.layers}.{i}.{name}"] = cq.result(W.cpu(), act_order=False)
        return True

    writer, counts, tmp = None, [], None
    if streamed:
        tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=run.path))
        writer = ShardWriter(tmp)
        stored = sm.src.meta()

    def write_layer(i, layer):
        """Streamed: layer i is final; its tensors go to the shard writer in the input's dtypes."""
        prefix = f"{spec.layers}.{i}."
        zeros = size = 0
        for name in sm.layer_tensor_names(i):
            rel = name[len(prefix):]
            if rel.endswith(".weight") and rel[:-len(".weight")] in spec.linears:
                w = get_module(layer, rel[:-len(".weight")]).weight.detach().to("cpu", DTYPES[stored[name][0]])
                zeros += int((w == 0).sum())
                size += w.numel()
                writer.add(name, w)
            else:
                writer.add(name, sm.src.get(name))
        counts.append((zeros, size))

    try:
        with ui.progress(f"prune {cfg.method} → {cfg.allocator} {cfg.sparsity:.0%}", len(ratios)) as bar:
            walk(model, ids, prune_layer, needs=NEEDS[cfg.method], device=device, chunk=8,
                 sequential=cfg.sequential, progress=bar, stream=sm, on_done=write_layer if streamed else None)
        if streamed:
            for name in sm.src.names():
                if not name.startswith(f"{spec.layers}."):
                    writer.add(name, sm.src.get(name))
            writer.close()
            copy_side_files(sm.src.path, tmp)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    drop_quantized(run)
    extra = {}
    if cfg.bits is not None:
        counts = layer_zero_counts(model)
        doc = qz.write_packed(model, tok, quantized, run.path / QUANTIZED,
                              {"source": "prune --bits (joint SparseGPT)", "method": "sparsegpt-joint",
                               "sparsity": sum(z for z, _ in counts.values()) / sum(n for _, n in counts.values())})
        extra["quantized"] = _quant_summary(doc)
    if streamed:
        replace_dir(tmp, run.path / "model")
        plan = record_realized(run, None, plan, counts)
    else:
        save_model(model, tok, run.path / "model")
        plan = record_realized(run, model, plan)
    run.mark_done("prune", key, inputs, seconds, peak_rss_mb=peak_rss_mb(), device=str(device),
                  realized_sparsity=plan["realized_sparsity"], streamed=bool(streamed), **extra,
                  **({"synthetic": lab} if (lab := synthetic_label(ref)) else {}))
    return run.path / "model"


def drop_quantized(run: RunDir) -> None:
    """A new pruned model makes any earlier quantization of the RUN stale: remove it."""
    for name in (QUANTIZED, PREQUANT):
        if (run.path / name).exists():
            shutil.rmtree(run.path / name)
    run.invalidate("quantize")
