"""ONNX Runtime on the CPU: dynamic shapes, so one session serves prefill and decode."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .base import Runtime, median_call_ms


def _session(path: str | Path, cores: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(cores or 0)          # 0 = ORT's default (all physical cores)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class OrtRuntime(Runtime):
    name = "onnxruntime"
    label = "ONNX Runtime"
    dynamic = True

    def __init__(self, onnx_path: str | Path, *, cores: int | None = None, seq_len: int | None = None,
                 cache_len: int | None = None):
        super().__init__(onnx_path)
        self.seq_len, self.cache_len, self.cores = seq_len, cache_len, cores
        t0 = time.perf_counter()
        self._sess = _session(self.onnx_path, cores)
        self.compile_seconds = time.perf_counter() - t0

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self._sess.run(self.output_names, inputs)
        return dict(zip(self.output_names, outs))

    def time_head(self, head_path: str | Path, repeats: int = 30) -> dict:
        ids = np.zeros((1, 1), dtype=np.int64)
        t0 = time.perf_counter()
        sess = _session(head_path, self.cores)
        compile_s = time.perf_counter() - t0
        return {"head_ms": median_call_ms(lambda: sess.run(None, {"input_ids": ids}), repeats), "compile_s": compile_s}

    def close(self) -> None:
        self._sess = None
