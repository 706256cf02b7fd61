"""Inference engines behind one interface, and a worker process that runs one engine alone.

    rt = make_runtime("deepsparse", "deploy/model.onnx", cores=2, seq_len=1, cache_len=512)
    out = rt.run({"input_ids": ..., ...})          # name -> array, in the graph's names
    rt.close()

Shapes: `seq_len` is L, the number of tokens fed per call (1 for decoding); `cache_len` is S, the total
attention window (cache slots + the fed tokens), i.e. the deployment's `seqlen`. DeepSparse needs both
fixed at compile time; ONNX Runtime accepts any shape and only records them.

This module and decode.py import neither torch nor transformers: the worker process
(`WorkerRuntime`) imports only them, numpy, onnx and the engine, and refuses torch outright, because a
second set of busy threads on the same cores makes DeepSparse's step time collapse (25 -> 2000 ms).
"""
from __future__ import annotations

import os
import pickle
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UserError

ENGINES = ("deepsparse", "onnxruntime", "native")
CACHE_INPUT_PREFIX = "past_key_values."
CACHE_OUTPUT_PREFIX = "present."


def _stderr_notice(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ graph io
def _io_from_proto(proto, path: Path) -> dict:
    inits = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    names = [i.name for i in inputs]
    outputs = [o.name for o in proto.graph.output]
    past = [n for n in names if n.startswith(CACHE_INPUT_PREFIX)]
    if not past or "input_ids" not in names or "logits" not in outputs:
        raise UserError(f"{path} is not a KV-cache text-generation graph", "export it with sparsedeploy.export.onnx_kv")
    dims = inputs[names.index(past[0])].type.tensor_type.shape.dim
    data_files = sorted({e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"})
    vocab = proto.graph.output[outputs.index("logits")].type.tensor_type.shape.dim[2].dim_value or None
    props = {p.key: p.value for p in proto.metadata_props}
    max_pos = int(props["sparsedeploy.max_positions"]) if "sparsedeploy.max_positions" in props else None
    return {"max_positions": max_pos, "input_names": names, "output_names": outputs, "past_names": past,
            "present_names": [CACHE_OUTPUT_PREFIX + n[len(CACHE_INPUT_PREFIX):] for n in past],
            "kv_heads": dims[1].dim_value, "head_dim": dims[3].dim_value, "vocab_size": vocab, "data_files": data_files}


def _load_header(path: Path):
    """The graph without external weights (inline weights are parsed too: ~2 s for a 0.5 GB file)."""
    import onnx

    if not path.is_file():
        raise UserError(f"ONNX model {path} does not exist", "export the model first")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - a parse failure of any kind means a corrupt file
        raise UserError(f"{path} is not a readable ONNX model ({type(e).__name__})", "re-export the model") from None


_IO_CACHE: dict[tuple, dict] = {}


def model_io(onnx_path: str | Path) -> dict:
    """Names and cache geometry of a KV-cache graph (cached per file version)."""
    path = Path(onnx_path).resolve()
    try:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    if key is not None and key in _IO_CACHE:
        return dict(_IO_CACHE[key])
    io = _io_from_proto(_load_header(path), path)
    if key is not None:
        _IO_CACHE.clear()
        _IO_CACHE[key] = io
    return dict(io)


# --------------------------------------------------------------------------------------- interface
class Runtime(ABC):
    """One compiled model. `run` maps input name -> array to output name -> array."""

    name: str = "?"
    compile_seconds: float = 0.0
    seq_len: int | None = None       # L; None = any (ONNX Runtime)
    cache_len: int | None = None     # S
    fallback_reason: str | None = None
    dynamic: bool = False            # True: any (L, S) per call (ONNX Runtime)

    def __init__(self, onnx_path: str | Path):
        self.onnx_path = Path(onnx_path)
        self.io = model_io(self.onnx_path)
        self.input_names: list[str] = self.io["input_names"]
        self.output_names: list[str] = self.io["output_names"]

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, L={self.seq_len}, S={self.cache_len}, compile {self.compile_seconds:.2f}s)"


class OrtRuntime(Runtime):
    """ONNX Runtime on the CPU; dynamic shapes, so one session serves prefill and decode."""

    name = "onnxruntime"
    dynamic = True

    def __init__(self, onnx_path: str | Path, *, cores: int | None = None, seq_len: int | None = None,
                 cache_len: int | None = None):
        super().__init__(onnx_path)
        import onnxruntime as ort

        self.seq_len, self.cache_len = seq_len, cache_len
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(cores or 0)          # 0 = ORT's default (all physical cores)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        t0 = time.perf_counter()
        self._sess = ort.InferenceSession(str(self.onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.compile_seconds = time.perf_counter() - t0

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self._sess.run(self.output_names, inputs)
        return dict(zip(self.output_names, outs))

    def close(self) -> None:
        self._sess = None


def deepsparse_unavailable() -> str | None:
    """Why DeepSparse cannot run here, or None when it can."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        return f"DeepSparse needs an x86-64 CPU (this is {machine})"
    if sys.version_info >= (3, 12):
        return f"DeepSparse 1.8 has no build for Python {sys.version_info.major}.{sys.version_info.minor}"
    import sparsedeploy  # noqa: F401  (NM_DISABLE_ANALYTICS before the import)
    try:
        import deepsparse  # noqa: F401
        from deepsparse import Engine  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable here"
        return f"deepsparse does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def static_copy(onnx_path: str | Path, dest_dir: str | Path, *, seq_len: int, cache_len: int,
                batch: int = 1) -> Path:
    """Copy model.onnx (and its external weights) into dest_dir with every input shape fixed for (L, S).
    DeepSparse rewrites the file it is given, so it only ever sees such a copy."""
    import onnx

    src = Path(onnx_path)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    proto = _load_header(src)
    io = _io_from_proto(proto, src)
    for name in io["data_files"]:
        shutil.copy2(src.parent / name, dest / name)
    L, S = int(seq_len), int(cache_len)
    for inp in proto.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if inp.name not in io["input_names"]:
            continue
        dims[0].dim_value = batch
        if inp.name in ("input_ids", "positions"):
            dims[1].dim_value = L
        elif inp.name == "attention_mask":
            dims[1].dim_value = S
        elif inp.name == "causal_mask":
            dims[2].dim_value = L
            dims[3].dim_value = S
        elif inp.name.startswith(CACHE_INPUT_PREFIX):
            dims[2].dim_value = S - L
    out = dest / src.name
    onnx.save_model(proto, str(out))
    return out


class DeepSparseRuntime(Runtime):
    """A DeepSparse engine compiled for fixed (L, S) on a private copy of the model (the original is never touched)."""

    name = "deepsparse"

    def __init__(self, onnx_path: str | Path, *, cores: int | None = None, seq_len: int = 1, cache_len: int):
        super().__init__(onnx_path)
        if cache_len is None or seq_len is None or not 1 <= int(seq_len) < int(cache_len):
            raise UserError(f"DeepSparse needs static shapes with 1 <= seq_len < cache_len (got L={seq_len}, S={cache_len})",
                            "pass seq_len (tokens per call) and cache_len (total context)")
        import sparsedeploy  # noqa: F401
        from deepsparse import Engine

        self.seq_len, self.cache_len = int(seq_len), int(cache_len)
        self._tmp = tempfile.mkdtemp(prefix="sparsedeploy-ds-")
        try:
            copy = static_copy(self.onnx_path, self._tmp, seq_len=self.seq_len, cache_len=self.cache_len)
            t0 = time.perf_counter()
            self._engine = Engine(model=str(copy), batch_size=1, num_cores=cores)
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

    def close(self) -> None:
        self._engine = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def make_runtime(engine: str, onnx_path: str | Path, *, cores: int | None = None, seq_len: int | None = 1,
                 cache_len: int | None = None, notice: Callable[[str], None] | None = _stderr_notice) -> Runtime:
    """`engine` is "deepsparse", "onnxruntime" or "native" (sparsedeploy.native: numba kernels over the
    deployment's native/ weights; needs neither torch nor deepsparse). Where DeepSparse cannot run (non-x86, Python >= 3.12, import
    failure) this says so in one line through `notice` and returns ONNX Runtime instead (its `fallback_reason`
    says why)."""
    engine = engine.lower().replace("-", "").replace("_", "")
    engine = {"ort": "onnxruntime", "ds": "deepsparse"}.get(engine, engine)
    if engine not in ENGINES:
        raise UserError(f"unknown engine '{engine}'", f"use one of: {', '.join(ENGINES)}")
    if cores is not None and int(cores) < 1:
        raise UserError(f"cores={cores} must be at least 1", "omit it to use every core")
    if engine == "native":
        from ..native.model import NativeRuntime

        return NativeRuntime(onnx_path, cores=cores, seq_len=seq_len, cache_len=cache_len)
    if engine == "deepsparse":
        reason = deepsparse_unavailable()
        if reason is None:
            return DeepSparseRuntime(onnx_path, cores=cores, seq_len=seq_len if seq_len is not None else 1,
                                     cache_len=cache_len)
        if notice is not None:
            notice(f"note: {reason}; using ONNX Runtime instead")
        rt = OrtRuntime(onnx_path, cores=cores, seq_len=seq_len, cache_len=cache_len)
        rt.fallback_reason = reason
        return rt
    return OrtRuntime(onnx_path, cores=cores, seq_len=seq_len, cache_len=cache_len)


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


def time_head(engine: str, head_path: str | Path, *, cores: int | None = None, repeats: int = 30) -> dict:
    """Compile head.onnx (input_ids [1, 1] -> logits) on `engine` and time one call: {"head_ms", "compile_s"}."""
    head_path = Path(head_path)
    ids = np.zeros((1, 1), dtype=np.int64)
    tmp = None
    t0 = time.perf_counter()
    if engine == "deepsparse":
        import sparsedeploy  # noqa: F401
        from deepsparse import Engine

        tmp = tempfile.mkdtemp(prefix="sparsedeploy-head-")
        try:
            proto = _load_header(head_path)
            data = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
            for name in data:
                shutil.copy2(head_path.parent / name, Path(tmp) / name)
            shutil.copy2(head_path, Path(tmp) / head_path.name)
            eng = Engine(model=str(Path(tmp) / head_path.name), batch_size=1, num_cores=cores)
            call = lambda: eng.run([ids], val_inp=False)  # noqa: E731
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    else:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(cores or 0)
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(head_path), sess_options=opts, providers=["CPUExecutionProvider"])
        call = lambda: sess.run(None, {"input_ids": ids})  # noqa: E731
    compile_s = time.perf_counter() - t0
    try:
        head_ms = median_call_ms(call, repeats)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"head_ms": head_ms, "compile_s": compile_s}


# ------------------------------------------------------------------------------------------ worker
def _send(stream, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)))
    stream.write(data)
    stream.flush()


def _recv(stream):
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError
    (n,) = struct.unpack("<Q", head)
    data = stream.read(n)
    if len(data) < n:
        raise EOFError
    return pickle.loads(data)


class _NoTorch:
    """Import hook for the worker: torch must not load there (deepsparse only imports it optionally)."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not loaded in the engine worker")
        return None


def _portable_error(e: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(e).__name__}: {e}")


_CANCEL = {"flag": False, "installed": False}


def _install_cancel_handler() -> None:
    """SIGUSR1 sets the worker's cancel flag (installed at start: the signal's default action would kill it)."""
    import signal

    if not _CANCEL["installed"]:
        signal.signal(signal.SIGUSR1, lambda *_: _CANCEL.__setitem__("flag", True))
        _CANCEL["installed"] = True


def _generate_in_worker(dec, step, prefill, proto_out, msg):
    """The worker's side of WorkerRuntime.generate: SIGUSR1 from the parent cancels the generation
    in progress (the loop polls the flag after every token)."""
    _install_cancel_handler()
    _CANCEL["flag"] = False
    return dec.sample_decode(step, msg[1], msg[2], prefill=prefill,
                             on_token=lambda t: _send(proto_out, ("token", int(t))),
                             should_stop=lambda: _CANCEL["flag"], **msg[3])


def _worker_main() -> None:
    """Child side of WorkerRuntime: build the runtime(s), then serve requests until told to stop."""
    sys.meta_path.insert(0, _NoTorch())
    _install_cancel_handler()
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)                           # engines print banners on stdout: keep them off the protocol pipe
    sys.stdout = sys.stderr
    proto_in = sys.stdin.buffer
    from . import decode as dec

    cfg = _recv(proto_in)
    runtimes: list[Runtime] = []
    try:
        step = make_runtime(cfg["engine"], cfg["onnx_path"], cores=cfg["cores"], seq_len=cfg["seq_len"],
                            cache_len=cfg["cache_len"])
        runtimes.append(step)
        prefill = None
        if cfg.get("prefill_len"):
            if step.dynamic:
                prefill = step                  # dynamic shapes: the same session prefills
            else:
                prefill = make_runtime(cfg["engine"], cfg["onnx_path"], cores=cfg["cores"],
                                       seq_len=cfg["prefill_len"], cache_len=cfg["cache_len"])
                runtimes.append(prefill)
        _send(proto_out, ("ok", {"name": step.name, "compile_seconds": sum(r.compile_seconds for r in runtimes),
                                 "fallback_reason": step.fallback_reason, "output_names": step.output_names,
                                 "torch_loaded": "torch" in sys.modules, "deepsparse_loaded": "deepsparse" in sys.modules,
                                 "pid": os.getpid(), "dynamic": bool(step.dynamic),
                                 "native": ({"threads": step.threads, "threading_layer": step.threading_layer,
                                             "weight_bytes": step.model.weight_bytes()} if step.name == "native" else None)}))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        _send(proto_out, ("error", _portable_error(e)))
        return
    while True:
        try:
            msg = _recv(proto_in)
        except EOFError:
            break
        kind = msg[0]
        if kind == "close":
            break
        try:
            if kind == "run":
                # Unpickled arrays carry a fresh dtype object; DeepSparse rejects anything but numpy's
                # builtin dtype instances ("unsupported type 'int64'"), so re-view them with those.
                result = step.run({k: np.asarray(v).view(np.asarray(v).dtype.type) for k, v in msg[1].items()})
            elif kind == "time_head":
                if hasattr(step, "time_head"):       # the native engine times its own head part
                    result = step.time_head(repeats=msg[2])
                else:
                    result = time_head(step.name, msg[1], cores=cfg["cores"], repeats=msg[2])
            elif kind == "decode":
                result = dec.greedy_decode(step, msg[1], msg[2], prefill=prefill, **msg[3])
            elif kind == "generate":    # streamed: ("token", t) per token, then the final ("ok", GenerateResult)
                result = _generate_in_worker(dec, step, prefill, proto_out, msg)
            else:
                raise ValueError(f"unknown request {kind!r}")
            _send(proto_out, ("ok", result))
        except Exception as e:  # noqa: BLE001
            _send(proto_out, ("error", _portable_error(e)))
    for r in runtimes:
        r.close()


class WorkerRuntime(Runtime):
    """The same engine in its own process, so nothing else in this process competes for its cores.

    `run` sends one call across (fine for checks, too slow to time); `decode` runs the whole greedy loop
    (sparsedeploy.bench.decode.greedy_decode) inside the worker and returns its DecodeResult, which is
    how timings should be taken. With `prefill_len`, the worker also compiles a prefill engine with
    L = prefill_len. If the engine kills the process (DeepSparse aborts on some errors), calls raise
    RuntimeError instead of hanging.
    """

    def __init__(self, engine: str, onnx_path: str | Path, *, cores: int | None = None, seq_len: int | None = 1,
                 cache_len: int | None = None, prefill_len: int | None = None):
        super().__init__(onnx_path)
        self.seq_len, self.cache_len = seq_len, cache_len
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["NM_DISABLE_ANALYTICS"] = "1"
        if cores:
            env["OMP_NUM_THREADS"] = str(cores)
        self._proc = subprocess.Popen([sys.executable, "-c", "from sparsedeploy.bench.runtime import _worker_main; _worker_main()"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        _send(self._proc.stdin, {"engine": engine, "onnx_path": str(Path(onnx_path).resolve()), "cores": cores,
                                 "seq_len": seq_len, "cache_len": cache_len, "prefill_len": prefill_len})
        try:
            info = self._reply()
        except BaseException:
            self.close()
            raise
        self.name = info["name"]
        self.dynamic = info["dynamic"]
        self.native = info["native"]
        self.deepsparse_loaded = info["deepsparse_loaded"]
        self.compile_seconds = info["compile_seconds"]
        self.fallback_reason = info["fallback_reason"]
        self.output_names = info["output_names"]
        self.torch_loaded = info["torch_loaded"]
        self.pid = info["pid"]

    def _reply(self):
        try:
            status, payload = _recv(self._proc.stdout)
        except EOFError:
            code = self._proc.wait()
            raise RuntimeError(f"the engine worker process died (exit code {code}); see its messages above") from None
        if status == "error":
            raise payload
        return payload

    def _call(self, msg):
        if self._proc is None:
            raise RuntimeError("this worker runtime is closed")
        try:
            _send(self._proc.stdin, msg)
        except (BrokenPipeError, OSError):
            code = self._proc.wait()
            raise RuntimeError(f"the engine worker process died (exit code {code})") from None
        return self._reply()

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._call(("run", inputs))

    def decode(self, prompt_ids, n: int, **kwargs):
        """greedy_decode inside the worker; kwargs go to it (e.g. max_positions)."""
        return self._call(("decode", [int(t) for t in prompt_ids], int(n), kwargs))

    def generate(self, prompt_ids, n: int, **kwargs):
        """sample_decode inside the worker, streamed: yields ("token", id) as each token is made, then
        ("done", GenerateResult). kwargs go to sparsedeploy.bench.decode.sample_decode (temperature, top_p,
        seed, stop_ids, time_limit_s, ...). Iterate it to the end (the pipe carries one exchange at a time);
        `cancel()` makes the worker stop early. A dead worker raises RuntimeError."""
        if self._proc is None:
            raise RuntimeError("this worker runtime is closed")
        try:
            _send(self._proc.stdin, ("generate", [int(t) for t in prompt_ids], int(n), kwargs))
        except (BrokenPipeError, OSError):
            code = self._proc.wait()
            raise RuntimeError(f"the engine worker process died (exit code {code})") from None
        while True:
            try:
                status, payload = _recv(self._proc.stdout)
            except EOFError:
                code = self._proc.wait()
                raise RuntimeError(f"the engine worker process died (exit code {code})") from None
            if status == "token":
                yield "token", payload
            elif status == "ok":
                yield "done", payload
                return
            else:
                raise payload

    def cancel(self) -> None:
        """Ask the worker to end the generation in progress after its current token (no-op when idle)."""
        import signal

        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGUSR1)
            except OSError:
                pass

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def time_head(self, head_path: str | Path, repeats: int = 30) -> dict:
        """Time head.onnx on this worker's engine (see time_head)."""
        return self._call(("time_head", str(Path(head_path).resolve()), int(repeats)))

    def peak_rss_mb(self, field: str = "VmHWM") -> float | None:
        """The worker's peak resident memory so far (Linux), engine and cache included (field="VmRSS": now)."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
        except (OSError, ValueError, AttributeError):
            pass
        return None

    def rss_mb(self) -> float | None:
        """The worker's resident memory now."""
        return self.peak_rss_mb("VmRSS")

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            _send(proc.stdin, ("close",))
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __del__(self):
        if getattr(self, "_proc", None) is not None:
            try:
                self.close()
            except Exception:  # noqa: BLE001
                pass
