"""The eval stage: perplexity of a RUN's model or any model (non-overlapping windows)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ... import ui
from ...errors import UserError, check
from ..arch import decoder_layers, layer_linears, spec_for
from ..data import default_eval_source, eval_windows, load_text
from ..evaluate import perplexity
from ..models import load, resolve
from ..prune import sparsity_of
from ..rundir import read_json, write_json
from .common import EVAL, resolve_device


@dataclass
class EvalConfig:
    data: str | None = None          # None: wikitext2 when found locally, else held-out Wikipedia summaries
    seqlen: int = 2048
    max_windows: int | None = None
    data_file: str | None = None
    device: str = "auto"


def evaluate(model_or_run: str, cfg: EvalConfig, *, out: Path | None = None, force: bool = False,
             weights=None, weights_key: dict | None = None) -> dict:
    """Perplexity of the model (non-overlapping windows), written to `out` (a RUN: RUN/eval.json) and reused
    while the key holds. `weights(model) -> {state-dict name: tensor}` replaces weights after loading (e.g. a
    GGUF file's dequantised ones, so they are scored with the model's own tokenizer and the same windows);
    `weights_key` names them in the key."""
    check(cfg.seqlen >= 8, f"--seqlen {cfg.seqlen} is too short", "use e.g. --seqlen 2048")
    check(cfg.max_windows is None or cfg.max_windows >= 1, f"--max-windows {cfg.max_windows} must be at least 1", "omit it to use every window")
    data = cfg.data or default_eval_source(cfg.data_file)
    ref = resolve(model_or_run)
    key = {"data": data, "seqlen": cfg.seqlen, "max_windows": cfg.max_windows, "fingerprint": ref.fingerprint()}
    if weights_key is not None:
        key["weights"] = weights_key
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
    if weights is not None:
        unexpected = model.load_state_dict(weights(model), strict=False).unexpected_keys
        check(not unexpected, f"replacement weights name tensors the model lacks: {unexpected[:3]}",
              "pass weights of this model")
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
