"""Perplexity measured through an engine: the deployment as it runs (its formats, value types and kernels),
teacher-forced one token per step through the engine's own decode step, on the same windows the eval stage
uses, so the number is comparable with PyTorch's (`sparsedeploy eval`) on the same weights."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from .. import ui
from ..errors import check
from ..engine import make_runtime
from ..engine.decode import window_nll


def windows_for(deployment_dir: str | Path, data: str, seqlen: int, max_windows: int | None,
                data_file: str | None = None) -> np.ndarray:
    """The eval stage's windows [N, seqlen] of `data`, through the deployment's own tokenizer."""
    from transformers import AutoTokenizer

    from ..pipeline.data import eval_windows, load_text

    tok = AutoTokenizer.from_pretrained(str(deployment_dir))
    return np.asarray(eval_windows(tok, load_text(data, data_file), seqlen, max_windows))


def engine_perplexity(model_path: str | Path, engine: str, windows: np.ndarray, *, cores: int | None = None,
                      cache_len: int | None = None) -> dict:
    """exp(mean NLL) over every window's next-token predictions, computed from the engine's logits.
    model_path: the deployment's model.onnx (native reads its native/ weights beside it) or a GGUF for llama.cpp."""
    windows = np.asarray(windows)
    check(windows.ndim == 2 and windows.shape[1] >= 2, "perplexity needs windows of at least 2 tokens",
          "pass an [N, L] array of token ids")
    L = int(windows.shape[1])
    S = int(cache_len or L)                      # engines compiled for a fixed cache (DeepSparse): pass theirs
    check(S >= L, f"windows of {L} tokens do not fit a cache of {S}", f"use windows of at most {S} tokens")
    rt = make_runtime(engine, model_path, cores=cores, seq_len=1, cache_len=S)
    total, count = 0.0, 0
    t0 = time.perf_counter()
    try:
        with ui.progress(f"perplexity through {rt.name} ({windows.shape[0]}×{L})", windows.shape[0]) as bar:
            for i, w in enumerate(windows):
                s, n = window_nll(rt, w, S)
                total += s
                count += n
                bar(i + 1)
    finally:
        rt.close()
    return {"perplexity": math.exp(total / count), "engine": rt.name, "windows": int(windows.shape[0]), "seqlen": L,
            "tokens": int(count), "seconds": round(time.perf_counter() - t0, 2)}


def deployment_perplexity(deployment: str | Path, engine: str, *, data: str | None, seqlen: int,
                          max_windows: int | None, data_file: str | None = None, cores: int | None = None) -> dict:
    """`sparsedeploy eval DEPLOYMENT --engine E`: the deployment's perplexity through engine E (a RUN directory
    means its deployment/); native builds (or reuses) its weights for this CPU first."""
    from ..engine import canonical, engine_class
    from ..pipeline.data import default_eval_source
    from .bench import _read_deployment

    d = Path(deployment)
    if (d / "manifest.json").is_file() and (d / "deployment").is_dir():
        d = d / "deployment"
    meta = _read_deployment(d)
    name = canonical(engine)
    check(engine_class(name).reads_onnx, f"--engine {engine} does not run a deployment folder",
          "score llama.cpp's GGUF with llama-perplexity, or pick native, deepsparse or onnxruntime")
    S = int(meta["seqlen"])
    check(2 <= seqlen <= S, f"--seqlen {seqlen} does not fit the deployment's context of {S}",
          f"use --seqlen between 2 and {S}")
    if name == "native":
        from ..export.native import ensure_native

        ensure_native(meta, cores=cores, keep_fixed=True)
    data = data or default_eval_source(data_file)
    windows = windows_for(d, data, seqlen, max_windows, data_file)
    doc = engine_perplexity(meta["onnx"], name, windows, cores=cores, cache_len=S)
    doc.update(data=data, deployment=str(d), sparsity=float(meta.get("sparsity") or 0.0))
    return doc
