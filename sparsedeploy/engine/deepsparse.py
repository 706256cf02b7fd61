"""DeepSparse (Neural Magic, 1.8): a sparse-aware CPU engine, compiled for fixed (L, S) on a private copy
of the graph (it rewrites the file it is given). Where it cannot run, `make_runtime` falls back to ONNX
Runtime with a one-line notice. NM_DISABLE_ANALYTICS is set by `import sparsedeploy` before deepsparse loads
(otherwise it makes a blocking network call)."""
from __future__ import annotations

import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import UserError
from .base import Runtime, median_call_ms
from .graphio import load_header, static_copy


def _engine(path: Path, cores: int | None):
    import sparsedeploy  # noqa: F401  (NM_DISABLE_ANALYTICS before the import)
    from deepsparse import Engine

    return Engine(model=str(path), batch_size=1, num_cores=cores)


class DeepSparseRuntime(Runtime):
    name = "deepsparse"
    label = "DeepSparse"
    fallback = "onnxruntime"

    @classmethod
    def unavailable(cls) -> str | None:
        machine = platform.machine().lower()
        if machine not in ("x86_64", "amd64"):
            return f"DeepSparse needs an x86-64 CPU (this is {machine})"
        if sys.version_info >= (3, 12):
            return f"DeepSparse 1.8 has no build for Python {sys.version_info.major}.{sys.version_info.minor}"
        import sparsedeploy  # noqa: F401
        try:
            import deepsparse  # noqa: F401
            from deepsparse import Engine  # noqa: F401
        except Exception as e:  # noqa: BLE001 - any import failure means "not usable here"
            return f"deepsparse does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        return None

    def __init__(self, onnx_path: str | Path, *, cores: int | None = None, seq_len: int | None = 1,
                 cache_len: int | None = None):
        super().__init__(onnx_path)
        seq_len = 1 if seq_len is None else seq_len
        if cache_len is None or not 1 <= int(seq_len) < int(cache_len):
            raise UserError(f"DeepSparse needs static shapes with 1 <= seq_len < cache_len (got L={seq_len}, S={cache_len})",
                            "pass seq_len (tokens per call) and cache_len (total context)")
        self.seq_len, self.cache_len, self.cores = int(seq_len), int(cache_len), cores
        self._tmp = tempfile.mkdtemp(prefix="sparsedeploy-ds-")
        try:
            copy = static_copy(self.onnx_path, self._tmp, seq_len=self.seq_len, cache_len=self.cache_len)
            t0 = time.perf_counter()
            self._engine = _engine(copy, cores)
            self.compile_seconds = time.perf_counter() - t0
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        if list(self._engine.input_names) != self.input_names:
            raise RuntimeError(f"DeepSparse reordered the inputs: {self._engine.input_names[:4]}...")
        self.output_names = list(self._engine.output_names)
        # Fully static here; a dynamic dim would mean DeepSparse silently fell back to its slow unoptimized path.
        self.input_shapes = [tuple(int(d) for d in s) for s in self._engine.input_shapes]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self._engine.run([inputs[n] for n in self.input_names], val_inp=False)
        return dict(zip(self.output_names, outs))

    def time_head(self, head_path: str | Path, repeats: int = 30) -> dict:
        head_path = Path(head_path)
        ids = np.zeros((1, 1), dtype=np.int64)
        tmp = tempfile.mkdtemp(prefix="sparsedeploy-head-")
        try:
            proto = load_header(head_path)
            for name in {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}:
                shutil.copy2(head_path.parent / name, Path(tmp) / name)
            shutil.copy2(head_path, Path(tmp) / head_path.name)
            t0 = time.perf_counter()
            eng = _engine(Path(tmp) / head_path.name, self.cores)
            compile_s = time.perf_counter() - t0
            return {"head_ms": median_call_ms(lambda: eng.run([ids], val_inp=False), repeats), "compile_s": compile_s}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def close(self) -> None:
        self._engine = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
