"""What the stages share: artifact names, the device, peak RSS, tensor files, the RUN's model, zero counts."""
from __future__ import annotations

import resource
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ...errors import UserError, check
from ..arch import decoder_layers, layer_linears, spec_for
from ..models import ModelRef
from ..prune import PRUNERS
from ..rundir import RunDir, write_json

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
    """This process's peak RSS (VmHWM) since it started or since the last `reset_peak_rss()`, in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> None:
    """Start a stage's peak-RSS count afresh (Linux: /proc/self/clear_refs 5), so each stage reports its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _model_inputs(ref: ModelRef) -> dict:
    return {"model": ref.spec, "fingerprint": ref.fingerprint()}


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


def _run_model(run: RunDir) -> str:
    model = run.manifest().get("model")
    if not model:
        raise UserError(f"{run.path} is not a RUN directory with a calibrated model",
                        f"run `sparsedeploy calibrate MODEL --out {run.path}` first")
    return model


def _set_model(run: RunDir, model: str) -> None:
    man = run.manifest()
    if man.get("model") != model:
        man["model"] = model
        for rec in man["stages"].values():
            rec["done"] = False
        write_json(run.manifest_path, man)


def _quant_summary(doc: dict) -> dict:
    return {k: doc[k] for k in ("bits", "group_size", "sym", "act_order", "format", "ratio_vs_fp32", "ratio_vs_fp16")} | {
        "checkpoint_bytes": doc["bytes"]["checkpoint"]}


def layer_zero_counts(model) -> dict[str, tuple[int, int]]:
    """{decoder layer prefix (e.g. model.layers.3): (zeros, size)} over its prunable linears' weights."""
    spec = spec_for(model)
    out = {}
    for i, layer in enumerate(decoder_layers(model, spec)):
        ws = [lin.weight.detach() for lin in layer_linears(layer, spec).values()]
        out[f"{spec.layers}.{i}"] = (sum(int((w == 0).sum()) for w in ws), sum(w.numel() for w in ws))
    return out


def record_realized(run: RunDir, model, plan: dict, counts: list[tuple[int, int]] | None = None) -> dict:
    """Measure each decoder layer's sparsity from the weights (or the (zeros, size) counts per layer a streamed
    prune took while writing) and store it beside the plan."""
    counts = list(layer_zero_counts(model).values()) if counts is None else counts
    for entry, (z, n) in zip(plan["layers"], counts):
        entry["realized"] = z / n
    plan["realized_sparsity"] = sum(z for z, _ in counts) / sum(n for _, n in counts)
    plan["realized_from"] = "weights"
    write_json(run.path / RATIOS, plan)
    return plan
