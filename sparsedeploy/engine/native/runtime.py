"""The native engine as a Runtime: the deployment's graph contract (input_ids, positions, causal_mask,
past_key_values.* -> logits, present.*) over NativeModel, with `present` holding only the new rows
(arrays the next call overwrites: a caller keeps them by copying, as the decode loop does)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ...errors import UserError
from ..base import Runtime, median_call_ms
from . import kernels as K
from .model import NativeModel


class NativeRuntime(Runtime):
    """The Runtime interface over NativeModel. Imports neither torch nor deepsparse."""

    name = "native"
    label = "native"
    dynamic = True                 # any L per call, like ONNX Runtime
    present_rows = "new"
    needs_graph = False            # reads only DEPLOYMENT/native/ (and the graph's names: from a native-only
                                   # deployment's sparsedeploy.json when it has no graph)

    def __init__(self, onnx_path: str | Path, *, cores: int | None = None, seq_len: int | None = None,
                 cache_len: int | None = None):
        super().__init__(onnx_path)
        t0 = time.perf_counter()
        self.threads = K.set_threads(cores)
        self.model = NativeModel(Path(onnx_path).parent / "native")
        self.seq_len, self.cache_len = seq_len, cache_len
        m = self.model
        self._past = [(f"past_key_values.{i}.key", f"past_key_values.{i}.value") for i in range(m.n_layers)]
        self._present = [(f"present.{i}.key", f"present.{i}.value") for i in range(m.n_layers)]
        self._warm()
        self.compile_seconds = time.perf_counter() - t0
        self.threading_layer = K.threading_layer()

    def _warm(self) -> None:
        """Compile every kernel signature this model uses (numba also caches them on disk between processes)."""
        S = int(self.cache_len or 8)
        for L in (1, 2):
            if S - L < 1:
                continue
            shape = (1, self.model.Hkv, S - L, self.model.D)
            feed = {"input_ids": np.zeros((1, L), np.int64), "positions": np.arange(L, dtype=np.int64)[None],
                    "causal_mask": np.ones((1, 1, L, S), np.int64)}
            for a, b in self._past:
                feed[a] = np.zeros(shape, np.float32)
                feed[b] = np.zeros(shape, np.float32)
            self.run(feed)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.ascontiguousarray(inputs["input_ids"][0], dtype=np.int64)
        pos = np.ascontiguousarray(inputs["positions"][0], dtype=np.int64)
        if int(pos.max(initial=0)) >= self.model.max_positions:
            raise UserError(f"position {int(pos.max())} is beyond the model's {self.model.max_positions}",
                            "generate fewer tokens")
        mask = inputs["causal_mask"][0, 0]
        past = [(inputs[a][0], inputs[b][0]) for a, b in self._past]
        logits, new = self.model.forward(ids, pos, mask, past)
        out = {"logits": logits}
        for (ka, va), (nk, nv) in zip(self._present, new):
            out[ka] = nk[None]
            out[va] = nv[None]
        return out

    def open_batch(self, max_batch: int, cache_len: int, max_rows: int):
        """Batched steps (sparsedeploy.engine.decode.BatchSession): the model's preallocated batch state;
        `forward_rows(state, ids, slots, positions, want)` runs a step."""
        return self.model.open_batch(max_batch, cache_len, max_rows)

    def forward_rows(self, state, ids, slots, positions, want, prof=None):
        return self.model.forward_rows(state, ids, slots, positions, want, prof)

    def info(self) -> dict:
        from .kernels import lowbit_paths

        info = {"threads": self.threads, "threading_layer": self.threading_layer, "weight_bytes": self.model.weight_bytes(),
                "weights": self.model.index.get("weights") or "fp32"}
        fmts = {g["format"] for layer in self.model.index["layers"] for g in layer.values()}
        if any(f.startswith(("int8", "int4")) for f in fmts):   # which low-bit kernels this CPU runs (VNNI or portable)
            info["lowbit_kernels"] = {f: p for f, p in lowbit_paths().items() if f in fmts}
        return info

    def time_head(self, head_path=None, repeats: int = 30) -> dict:
        """Embedding + final norm + lm_head alone: the non-decoder part of a step."""
        m = self.model
        b = m._buffers(1)
        ids = np.zeros(1, np.int64)
        pos = np.zeros(1, np.int64)

        def call():
            m.embed_tokens(ids, pos, b["x"])
            m.logits(b["x"], b["h"])

        return {"head_ms": median_call_ms(call, repeats), "compile_s": 0.0}
