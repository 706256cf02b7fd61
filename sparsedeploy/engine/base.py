"""Inference engines behind one interface, and the registry that names them.

    rt = make_runtime("deepsparse", "deploy/model.onnx", cores=2, seq_len=1, cache_len=512)
    out = rt.run({"input_ids": ..., ...})          # name -> array, in the graph's names
    rt.close()

Shapes: `seq_len` is L, the number of tokens fed per call (1 for decoding); `cache_len` is S, the total
attention window (cache slots + the fed tokens), i.e. the deployment's `seqlen`. DeepSparse needs both
fixed at compile time; ONNX Runtime and the native engine accept any L per call.

An engine is a `Runtime` subclass registered under a name (`register`); `make_runtime` looks the name up,
asks the class whether it can run here (`unavailable()`), and falls back to the class's `fallback` engine
with a one-line notice when it cannot. Engine modules are imported when first asked for, so naming an
engine never loads another engine's library. Nothing in `sparsedeploy.engine` imports torch,
transformers, or any sparsedeploy package above it (tests/test_layers.py says so).
"""
from __future__ import annotations

import importlib
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UserError
from .graphio import model_io


def _stderr_notice(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Runtime(ABC):
    """One compiled model. `run` maps input name -> array to output name -> array."""

    name: str = "?"
    label: str = "?"                 # how reports and notices name it
    compile_seconds: float = 0.0
    seq_len: int | None = None       # L; None = any (ONNX Runtime)
    cache_len: int | None = None     # S
    fallback_reason: str | None = None
    dynamic: bool = False            # True: any (L, S) per call (ONNX Runtime, native)
    present_rows: str = "all"        # "all": `present` holds all S rows; "new": only the L new ones
    fallback: str | None = None      # engine to use instead where this one cannot run (None: refuse)
    stateful: bool = False           # True: keeps its own KV cache; decode.py steps `sequence(S)`, not `run`
    reads_onnx: bool = True          # False: runs another export of the model (llama.cpp: a GGUF file)
    needs_graph: bool = True         # False: runs a native-only deployment (no model.onnx: native, the worker)
    cores: int | None = None

    def __init__(self, onnx_path: str | Path):
        self.onnx_path = Path(onnx_path)
        self.io = model_io(self.onnx_path)
        if self.io.get("native_only") and self.needs_graph:
            raise UserError(f"{self.onnx_path.parent} is a native-only deployment (no ONNX graph) and {self.label} "
                            "runs ONNX graphs", "use --engine native (or export the model with --format onnx)")
        self.input_names: list[str] = self.io["input_names"]
        self.output_names: list[str] = self.io["output_names"]

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this engine cannot run on this machine, or None when it can."""
        return None

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def time_head(self, head_path: str | Path, repeats: int = 30) -> dict:
        """Embedding + final norm + lm_head alone (the deployment's head.onnx), on this engine:
        {"head_ms", "compile_s"}. Lets a report split a step into decoder layers and the rest."""
        raise NotImplementedError(f"{self.name} cannot time the head part alone")

    def info(self) -> dict:
        """Engine-specific facts a report shows (threads, resident weights, chosen kernels, ...)."""
        return {}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, L={self.seq_len}, S={self.cache_len}, compile {self.compile_seconds:.2f}s)"


# ------------------------------------------------------------------------------------------ registry
_REGISTRY: dict[str, str] = {}          # name -> "module:Class"
_ALIASES: dict[str, str] = {}


def register(name: str, target: str, *, aliases: tuple[str, ...] = ()) -> None:
    """Name an engine: `target` is "package.module:RuntimeSubclass", imported when first used."""
    _REGISTRY[name] = target
    for a in aliases:
        _ALIASES[a] = name


register("native", "sparsedeploy.engine.native.runtime:NativeRuntime")
register("deepsparse", "sparsedeploy.engine.deepsparse:DeepSparseRuntime", aliases=("ds",))
register("onnxruntime", "sparsedeploy.engine.onnxruntime:OrtRuntime", aliases=("ort",))
# measurement peer (a GGUF export, not the ONNX deployment; built by scripts/build-llamacpp.sh)
register("llamacpp", "sparsedeploy.engine.llamacpp:LlamaCppRuntime", aliases=("llama.cpp", "llamacpp"))


def engine_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def canonical(engine: str) -> str:
    """The registered name for `engine` (case, '-' and '_' ignored; aliases resolved), or UserError."""
    e = engine.lower().replace("-", "").replace("_", "")
    e = _ALIASES.get(e, e)
    if e not in _REGISTRY:
        raise UserError(f"unknown engine '{engine}'", f"use one of: {', '.join(_REGISTRY)}")
    return e


def engine_class(engine: str) -> type[Runtime]:
    module, cls = _REGISTRY[canonical(engine)].split(":")
    return getattr(importlib.import_module(module), cls)


def unavailable(engine: str) -> str | None:
    """Why `engine` cannot run here (None: it can)."""
    return engine_class(engine).unavailable()


def make_runtime(engine: str, onnx_path: str | Path, *, cores: int | None = None, seq_len: int | None = 1,
                 cache_len: int | None = None, notice: Callable[[str], None] | None = _stderr_notice) -> Runtime:
    """Build `engine` on `onnx_path`. Where the engine cannot run (DeepSparse off x86-64, Python >= 3.12, an
    import failure) this says so in one line through `notice` and returns its fallback engine instead (whose
    `fallback_reason` says why); an engine without a fallback raises UserError."""
    name = canonical(engine)
    if cores is not None and int(cores) < 1:
        raise UserError(f"cores={cores} must be at least 1", "omit it to use every core")
    cls = engine_class(name)
    reason = cls.unavailable()
    if reason is None:
        return cls(onnx_path, cores=cores, seq_len=seq_len, cache_len=cache_len)
    if cls.fallback is None:
        raise UserError(f"engine '{name}' cannot run here: {reason}", f"use one of the others: {', '.join(_REGISTRY)}")
    if notice is not None:
        notice(f"note: {reason}; using {engine_class(cls.fallback).label} instead")
    rt = make_runtime(cls.fallback, onnx_path, cores=cores, seq_len=seq_len, cache_len=cache_len, notice=notice)
    rt.fallback_reason = reason
    return rt


# ------------------------------------------------------------------------------------------ timing
def median_call_ms(call: Callable[[], object], repeats: int = 30, warmup: int = 3) -> float:
    """Median wall time of `call()` in ms over `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))
