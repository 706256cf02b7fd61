"""Stages: `stage(run, cfg) -> artifact`. Each reads only what earlier stages wrote, writes to a temp
name and renames, then marks itself done in the manifest; a stage done with the same arguments and
inputs is skipped unless forced.
"""
from __future__ import annotations

import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import ui
from ..errors import UserError, check
from . import allocate as alloc
from .arch import decoder_layers, get_module, layer_linears, spec_for
from .data import calibration_windows, default_eval_source, eval_windows, load_text
from .evaluate import perplexity
from .models import ModelRef, load, resolve, save_model
from . import quantize as qz
from .prune import NEEDS, PRUNERS, parse_pattern, prune_sparsegpt, sparsity_of
from .rundir import RunDir, read_json, write_json
from .walker import walk

CALIB_TOKENS = "calib_tokens.safetensors"
CALIB_STATS = "calib_stats.safetensors"
RATIOS = "ratios.json"
RATIOS_PNG = "ratios.png"
EVAL = "eval.json"
QUANTIZED = "quantized"      # the packed checkpoint (RUN/quantized/)
PREQUANT = "pruned"          # the unquantized pruned model, kept once RUN/model holds the fake-quant one
ALLOCATORS = ("uniform", "owl", "dlp")
METHODS = tuple(PRUNERS)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        check(torch.cuda.is_available(), "--device cuda was asked for but no CUDA GPU is visible", "use --device cpu or auto")
        return torch.device("cuda")
    check(device == "cpu", f"unknown device '{device}'", "use auto, cpu or cuda")
    return torch.device("cpu")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------------------------- calibrate
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

    def key(self) -> dict:  # what decides the artifact (the device does not)
        d = asdict(self)
        d.pop("device")
        d.pop("allow_pickle")
        return d


def _model_inputs(ref: ModelRef) -> dict:
    return {"model": ref.spec, "fingerprint": ref.fingerprint()}


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
        walk(model, ids, collect, needs=("col_norm",), device=device, progress=bar)
    run.path.mkdir(parents=True, exist_ok=True)
    _save_tensors(run.path / CALIB_TOKENS, {"input_ids": ids.to(torch.int32).contiguous()})
    _save_tensors(run.path / CALIB_STATS, norms)
    for later in ("allocate", "prune"):
        run.invalidate(later)
    run.mark_done("calibrate", cfg.key(), inputs, time.perf_counter() - t0, peak_rss_mb=peak_rss_mb())
    return run.path / CALIB_STATS


def _save_tensors(path: Path, tensors: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def _load_tensors(path: Path) -> dict:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise UserError(f"{path} is missing", "run `sparsedeploy calibrate` for this RUN first")
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path} is corrupt ({type(e).__name__})", "rerun `sparsedeploy calibrate ... --force`")


# ---------------------------------------------------------------------------------------------- allocate
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
    """Per decoder layer: Wanda-score statistics (when norms are given) and the prunable parameter count."""
    spec = spec_for(model)
    stats, sizes = [], []
    for i, layer in enumerate(decoder_layers(model, spec)):
        lins = layer_linears(layer, spec)
        sizes.append(sum(lin.weight.numel() for lin in lins.values()))
        if norms is not None:
            try:
                cols = [norms[f"{i}.{name}"] for name in lins]
            except KeyError as e:
                raise UserError(f"calibration statistics lack {e.args[0]}", "rerun `sparsedeploy calibrate --force`")
            stats.append(alloc.layer_statistics([lin.weight.detach() for lin in lins.values()], cols, owl_m=owl_m))
    return stats, sizes


def _run_model(run: RunDir) -> str:
    model = run.manifest().get("model")
    if not model:
        raise UserError(f"{run.path} is not a RUN directory with a calibrated model",
                        f"run `sparsedeploy calibrate MODEL --out {run.path}` first")
    return model


def allocate(run: RunDir, cfg: AllocConfig, *, force: bool = False, model=None) -> dict:
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
    if model is None:
        model, _ = load(resolve(_run_model(run)))
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
        from .plots import plot_allocation
        plot_allocation(run.path / RATIOS_PNG, overlay, f"{model.config.model_type} · target sparsity {cfg.sparsity:.0%}")
    run.invalidate("prune")
    run.mark_done("allocate", asdict(cfg), inputs, time.perf_counter() - t0)
    return doc


# ---------------------------------------------------------------------------------------------- prune
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
    needs_data = bool(NEEDS[cfg.method]) or cfg.allocator != "uniform"
    if needs_data:
        cfg.calib.model = cfg.model
        calibrate(run, cfg.calib, force=force)
    else:
        run.path.mkdir(parents=True, exist_ok=True)
        _set_model(run, cfg.model)
    plan = allocate(run, cfg.alloc_config(), force=force)
    inputs = {"allocate": run.stage("allocate")["finished"], "model": _model_inputs(ref),
              "calibrate": (run.stage("calibrate") or {}).get("finished") if NEEDS[cfg.method] else None}
    if not force and run.is_done("prune", cfg.key(), inputs, ("model/config.json",)):
        ui.info(f"prune: up to date in {run.path / 'model'}")
        return run.path / "model"
    t0 = time.perf_counter()
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

    with ui.progress(f"prune {cfg.method} → {cfg.allocator} {cfg.sparsity:.0%}", len(ratios)) as bar:
        walk(model, ids, prune_layer, needs=NEEDS[cfg.method], device=device, chunk=8,
             sequential=cfg.sequential, progress=bar)
    seconds = time.perf_counter() - t0
    drop_quantized(run)
    extra = {}
    if cfg.bits is not None:
        counts = layer_zero_counts(model)
        doc = qz.write_packed(model, tok, quantized, run.path / QUANTIZED,
                              {"source": "prune --bits (joint SparseGPT)", "method": "sparsegpt-joint",
                               "sparsity": sum(z for z, _ in counts.values()) / sum(n for _, n in counts.values())})
        extra["quantized"] = _quant_summary(doc)
    save_model(model, tok, run.path / "model")
    plan = record_realized(run, model, plan)
    run.mark_done("prune", cfg.key(), inputs, seconds, peak_rss_mb=peak_rss_mb(), device=str(device),
                  realized_sparsity=plan["realized_sparsity"], **extra)
    return run.path / "model"


def drop_quantized(run: RunDir) -> None:
    """A new pruned model makes any earlier quantization of the RUN stale: remove it."""
    for name in (QUANTIZED, PREQUANT):
        if (run.path / name).exists():
            shutil.rmtree(run.path / name)
    run.invalidate("quantize")


def _quant_summary(doc: dict) -> dict:
    return {k: doc[k] for k in ("bits", "group_size", "sym", "act_order", "format", "ratio_vs_fp32", "ratio_vs_fp16")} | {
        "checkpoint_bytes": doc["bytes"]["checkpoint"]}


# ---------------------------------------------------------------------------------------------- quantize
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


def _set_model(run: RunDir, model: str) -> None:
    man = run.manifest()
    if man.get("model") != model:
        man["model"] = model
        for rec in man["stages"].values():
            rec["done"] = False
        write_json(run.manifest_path, man)


def layer_zero_counts(model) -> dict[str, tuple[int, int]]:
    """{decoder layer prefix (e.g. model.layers.3): (zeros, size)} over its prunable linears' weights."""
    spec = spec_for(model)
    out = {}
    for i, layer in enumerate(decoder_layers(model, spec)):
        ws = [lin.weight.detach() for lin in layer_linears(layer, spec).values()]
        out[f"{spec.layers}.{i}"] = (sum(int((w == 0).sum()) for w in ws), sum(w.numel() for w in ws))
    return out


def record_realized(run: RunDir, model, plan: dict) -> dict:
    """Measure each decoder layer's sparsity from the weights and store it beside the plan."""
    counts = list(layer_zero_counts(model).values())
    for entry, (z, n) in zip(plan["layers"], counts):
        entry["realized"] = z / n
    plan["realized_sparsity"] = sum(z for z, _ in counts) / sum(n for _, n in counts)
    plan["realized_from"] = "weights"
    write_json(run.path / RATIOS, plan)
    return plan


# ---------------------------------------------------------------------------------------------- eval
@dataclass
class EvalConfig:
    data: str | None = None          # None: wikitext2 when found locally, else held-out Wikipedia summaries
    seqlen: int = 2048
    max_windows: int | None = None
    data_file: str | None = None
    device: str = "auto"


def evaluate(model_or_run: str, cfg: EvalConfig, *, out: Path | None = None, force: bool = False) -> dict:
    check(cfg.seqlen >= 8, f"--seqlen {cfg.seqlen} is too short", "use e.g. --seqlen 2048")
    check(cfg.max_windows is None or cfg.max_windows >= 1, f"--max-windows {cfg.max_windows} must be at least 1", "omit it to use every window")
    data = cfg.data or default_eval_source(cfg.data_file)
    ref = resolve(model_or_run)
    key = {"data": data, "seqlen": cfg.seqlen, "max_windows": cfg.max_windows, "fingerprint": ref.fingerprint()}
    is_run = (Path(model_or_run) / "manifest.json").is_file()
    if out is None and is_run:
        out = Path(model_or_run) / EVAL
    if out is not None and not force and out.is_file():
        try:
            old = read_json(out)
            if old.get("key") == key:
                return old
        except UserError:
            pass
    device = resolve_device(cfg.device)
    model, tok = load(ref)
    windows = eval_windows(tok, load_text(data, cfg.data_file), cfg.seqlen, cfg.max_windows)
    t0 = time.perf_counter()
    with ui.progress(f"perplexity on {data} ({windows.shape[0]}×{cfg.seqlen})", windows.shape[0]) as bar:
        ppl = perplexity(model, windows, device=device, progress=bar)
    doc = {"perplexity": ppl, "tokens": int(windows.numel()), "windows": int(windows.shape[0]),
           "seqlen": cfg.seqlen, "data": data, "model": model_or_run, "seconds": round(time.perf_counter() - t0, 2),
           "sparsity": _weight_sparsity(model), "key": key}
    if out is not None:
        write_json(out, doc)
    return doc


def _weight_sparsity(model) -> float:
    spec = spec_for(model)
    ws = [lin.weight for layer in decoder_layers(model, spec) for lin in layer_linears(layer, spec).values()]
    return sum(sparsity_of(w) * w.numel() for w in ws) / sum(w.numel() for w in ws)
