"""llama.cpp as an engine for measurement: a GGUF file decoded by libllama, through ctypes.

Not part of the default setup: `scripts/build-llamacpp.sh` builds llama.cpp (from the llama-cpp-python
source distribution) plus a small C shim (scripts/llamacpp-shim.c) that gives ctypes a flat face over
llama.h's by-value structs, and prints where the build is. This module finds it there: the folder named by
SPARSEDEPLOY_LLAMACPP, else $SPARSEDEPLOY_CACHE/llamacpp, else ~/.cache/sparsedeploy/llamacpp. Where no
build is found, `unavailable()` says so in one line (and bench goes on with the other engines).

llama.cpp keeps its own KV cache, so this engine has no ONNX-style `run`; instead it is *stateful*:
`sequence(S)` starts a new sequence (the cache emptied) and returns an object with the same
`step(tokens, start) -> (logits [1, 1, V], engine seconds)` face as decode.KVSlots, which decode.py's one
greedy/sampling loop drives exactly as it drives the other engines (so `decode_ms` is per token, measured
the same way: feed one token, get its logits, argmax). One `llama_decode` call per step, the batch holding
the fed tokens at explicit positions; logits are taken for the last one only (what the loop uses).

Threads: `cores` (default: every core) for both generation and prompt batches. KV cache: llama.cpp's
default type (f16), as a user of llama.cpp would run it.
"""
from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import numpy as np

from ..errors import UserError
from .base import Runtime

ENV = "SPARSEDEPLOY_LLAMACPP"
SHIM = "libsparsedeploy_llama.so"
BUILD_SCRIPT = "scripts/build-llamacpp.sh"


def build_dir() -> Path:
    """Where `scripts/build-llamacpp.sh` puts (and this engine looks for) the build."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    return Path(os.environ.get("SPARSEDEPLOY_CACHE", Path.home() / ".cache" / "sparsedeploy")) / "llamacpp"


def _bin_dirs() -> list[Path]:
    d = build_dir()
    return [d / "build" / "bin", d / "bin", d]


def library() -> Path | None:
    """The shim library (next to libllama.so), or None when not built."""
    return next((p / SHIM for p in _bin_dirs() if (p / SHIM).is_file()), None)


def tool(name: str) -> Path | None:
    """A llama.cpp program of the build (llama-bench, llama-perplexity, llama-simple), or None."""
    return next((p / name for p in _bin_dirs() if (p / name).is_file() and os.access(p / name, os.X_OK)), None)


def build_info() -> str | None:
    f = build_dir() / "build-info.txt"
    return f.read_text(encoding="utf-8").strip() if f.is_file() else None


def find_gguf(path: str | Path) -> Path:
    """A .gguf file, or the one GGUF in a folder (f32 preferred where there are several: it is the export
    verified token for token). One-line UserError otherwise."""
    p = Path(path)
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) == b"GGUF":
                return p
        raise UserError(f"{p} is not a GGUF file", "pass a .gguf file (sparsedeploy export RUN --format gguf)")
    if p.is_dir():
        found = sorted(p.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
        f32 = [f for f in found if f.name == "model-f32.gguf"]
        if f32:
            return f32[0]
        if found:
            raise UserError(f"{p} holds several GGUF files ({', '.join(f.name for f in found)})",
                            "pass the .gguf file itself")
    raise UserError(f"no GGUF model at {p}", "export one: sparsedeploy export RUN --format gguf (or pass a .gguf file)")


_LIB: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        path = library()
        if path is None:
            raise UserError(LlamaCppRuntime.unavailable() or "llama.cpp is not built", f"run {BUILD_SCRIPT}")
        lib = ctypes.CDLL(str(path))
        lib.sdl_open.restype = ctypes.c_void_p
        lib.sdl_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.sdl_n_vocab.restype = ctypes.c_int
        lib.sdl_n_vocab.argtypes = [ctypes.c_void_p]
        lib.sdl_reset.restype = None
        lib.sdl_reset.argtypes = [ctypes.c_void_p]
        lib.sdl_feed.restype = ctypes.c_int
        lib.sdl_feed.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32), ctypes.c_int, ctypes.c_int,
                                 ctypes.POINTER(ctypes.c_float)]
        lib.sdl_close.restype = None
        lib.sdl_close.argtypes = [ctypes.c_void_p]
        lib.sdl_verbose.restype = None
        lib.sdl_verbose.argtypes = [ctypes.c_int]
        lib.sdl_verbose(1 if os.environ.get("SPARSEDEPLOY_LLAMACPP_VERBOSE") else 0)
        _LIB = lib
    return _LIB


def gguf_facts(path: Path) -> dict:
    """A few header facts of a GGUF file (architecture, context length, file type), through the gguf reader."""
    try:
        from gguf import GGUFReader

        r = GGUFReader(str(path))
        arch = r.fields["general.architecture"].contents()
        ctx = r.fields.get(f"{arch}.context_length")
        ftype = r.fields.get("general.file_type")
        return {"arch": arch, "context_length": int(ctx.contents()) if ctx else None,
                "file_type": int(ftype.contents()) if ftype else None}
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file
        raise UserError(f"{path} is not a readable GGUF file ({type(e).__name__})", "re-export it") from None


class _Sequence:
    """One generation's state in llama.cpp (its KV cache): the KVSlots face decode.py drives."""

    def __init__(self, rt: "LlamaCppRuntime", cache_len: int):
        self.rt, self.L, self.S = rt, 1, int(cache_len)
        if self.S > rt.cache_len:
            raise UserError(f"cache length {self.S} exceeds the llama.cpp context of {rt.cache_len}",
                            "build the runtime with a longer cache_len")
        rt._lib.sdl_reset(rt._h)
        self._ids = np.zeros(self.S, dtype=np.int32)

    def step(self, tokens, start: int) -> tuple[np.ndarray, float]:
        n = len(tokens)
        if start + n > self.S:
            raise UserError(f"position {start + n} is past the cache of {self.S} tokens",
                            "shorten the prompt or generate fewer tokens")
        self._ids[:n] = tokens
        rt = self.rt
        t0 = time.perf_counter()
        rc = rt._lib.sdl_feed(rt._h, self._ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), n, int(start),
                              rt._logits_ptr)
        engine_s = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"llama_decode failed (code {rc}) at position {start}")
        return rt._logits.reshape(1, 1, -1), engine_s


class LlamaCppRuntime(Runtime):
    name = "llamacpp"
    label = "llama.cpp"
    dynamic = True              # any number of tokens per call (the prompt in one batch when asked)
    stateful = True             # keeps its own KV cache: drive it through `sequence`, not `run`
    reads_onnx = False          # decodes the GGUF export (sparsedeploy export --format gguf)

    def __init__(self, path: str | Path, *, cores: int | None = None, seq_len: int | None = None,
                 cache_len: int | None = None):
        # no Runtime.__init__: there is no ONNX graph to read
        self.gguf_path = find_gguf(path)
        self.onnx_path = self.gguf_path
        facts = gguf_facts(self.gguf_path)
        self.facts = facts
        self.seq_len = seq_len
        self.cache_len = int(cache_len or min(facts["context_length"] or 512, 512))
        self.cores = int(cores or os.cpu_count() or 1)
        self._lib = _lib()
        t0 = time.perf_counter()
        self._h = self._lib.sdl_open(str(self.gguf_path).encode(), self.cache_len, self.cores, 0)
        if not self._h:
            raise UserError(f"llama.cpp could not load {self.gguf_path}",
                            "check the file (SPARSEDEPLOY_LLAMACPP_VERBOSE=1 shows llama.cpp's messages)")
        self.compile_seconds = time.perf_counter() - t0
        self.n_vocab = int(self._lib.sdl_n_vocab(self._h))
        self._logits = np.zeros(self.n_vocab, dtype=np.float32)
        self._logits_ptr = self._logits.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        self.io = {"max_positions": facts["context_length"], "input_names": [], "output_names": ["logits"],
                   "past_names": [], "present_names": [], "vocab_size": self.n_vocab}
        self.input_names, self.output_names = [], ["logits"]

    @classmethod
    def unavailable(cls) -> str | None:
        if library() is None:
            return f"llama.cpp is not built (no {SHIM} under {build_dir()}; run {BUILD_SCRIPT})"
        return None

    def sequence(self, cache_len: int | None = None) -> _Sequence:
        """A new generation: llama.cpp's cache emptied; step() feeds tokens at explicit positions."""
        return _Sequence(self, cache_len or self.cache_len)

    def run(self, inputs):
        raise NotImplementedError("llama.cpp keeps its own KV cache: decode with greedy_decode/sample_decode")

    def info(self) -> dict:
        return {"threads": self.cores, "gguf": str(self.gguf_path), "gguf_file_type": self.facts.get("file_type"),
                "kv_cache": "f16 (llama.cpp default)", "build": (build_info() or "").splitlines()[:1],
                "timing": "per token: one llama_decode call + logits copy + argmax (the shared decode loop)"}

    def close(self) -> None:
        h, self._h = getattr(self, "_h", None), None
        if h:
            self._lib.sdl_close(h)
