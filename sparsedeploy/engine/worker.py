"""The worker process: one engine alone in its own process, so nothing else competes for its cores.

The worker imports only numpy, onnx, the engine's library and this package, and refuses torch outright:
a second set of busy threads on the same cores makes DeepSparse's step time collapse (25 -> 2000 ms).
Protocol: length-prefixed pickles over the child's stdin/stdout (engines' banners go to stderr).
"""
from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

from .base import Runtime, engine_class, make_runtime


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
                             on_logprob=lambda e: _send(proto_out, ("logprob", e)),
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
    batch = None
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
                                 "info": step.info()}))
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
                result = step.time_head(msg[1], repeats=msg[2])
            elif kind == "decode":
                result = dec.greedy_decode(step, msg[1], msg[2], prefill=prefill, **msg[3])
            elif kind == "generate":    # streamed: ("token", t) per token (after its ("logprob", [lp, top]) when
                                        # logprobs were asked for), then the final ("ok", GenerateResult)
                result = _generate_in_worker(dec, step, prefill, proto_out, msg)
            elif kind == "score":       # per-token log-probabilities of a sequence (ScoreResult), not the logits
                result = dec.score_tokens(step, msg[1], msg[2], prefill=prefill, **msg[3])
            elif kind == "batch_open":  # a new BatchSession replaces the previous one (and its sequences)
                batch = None
                batch = dec.BatchSession(step, prefill=prefill, **msg[1])
                result = {"batched": batch.batched, "max_batch": batch.max_batch, "cache_len": batch.S,
                          "prefill_budget": batch.prefill_budget,
                          "cache_bytes": batch.state.nbytes() if batch.batched else None}
            elif kind == "batch_step":
                if batch is None:
                    raise ValueError("batch_step before batch_open")
                result = batch.step(msg[1], msg[2])
                result["errors"] = [(rid, _portable_error(e)) for rid, e in result["errors"]]
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
    (sparsedeploy.engine.decode.greedy_decode) inside the worker and returns its DecodeResult, which is
    how timings should be taken. With `prefill_len`, the worker also compiles a prefill engine with
    L = prefill_len. If the engine kills the process (DeepSparse aborts on some errors), calls raise
    RuntimeError instead of hanging.
    """

    needs_graph = False            # the engine in the worker checks for itself

    def __init__(self, engine: str, onnx_path: str | Path, *, cores: int | None = None, seq_len: int | None = 1,
                 cache_len: int | None = None, prefill_len: int | None = None, env: dict | None = None):
        if getattr(engine_class(engine), "stateful", False):    # llama.cpp: a GGUF file, no graph to read here
            self.onnx_path, self.io, self.input_names, self.output_names = Path(onnx_path), {}, [], ["logits"]
        else:
            super().__init__(onnx_path)
        self.seq_len, self.cache_len = seq_len, cache_len
        extra_env = dict(env or {})          # e.g. SPARSEDEPLOY_NATIVE_LOAD for this worker only
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["NM_DISABLE_ANALYTICS"] = "1"
        env.update(extra_env)
        if cores:
            env["OMP_NUM_THREADS"] = str(cores)
        self._proc = subprocess.Popen([sys.executable, "-c", "from sparsedeploy.engine.worker import _worker_main; _worker_main()"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        _send(self._proc.stdin, {"engine": engine, "onnx_path": os.path.abspath(onnx_path), "cores": cores,
                                 "seq_len": seq_len, "cache_len": cache_len, "prefill_len": prefill_len})
        try:
            info = self._reply()
        except BaseException:
            self.close()
            raise
        self.name = info["name"]
        self.dynamic = info["dynamic"]
        self.engine_info = info["info"]
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
        """sample_decode inside the worker, streamed: yields ("token", id) as each token is made (preceded by
        ("logprob", [logprob, top]) when kwargs ask for logprobs), then ("done", GenerateResult). kwargs go to sparsedeploy.engine.decode.sample_decode (temperature, top_p,
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
            if status in ("token", "logprob"):
                yield status, payload
            elif status == "ok":
                yield "done", payload
                return
            else:
                raise payload

    def score(self, ids, top_k: int = 0, **kwargs):
        """score_tokens inside the worker: log p(ids[t] | ids[:t]) and the top_k alternatives at every position
        (a ScoreResult); only those numbers cross the pipe."""
        return self._call(("score", [int(t) for t in ids], int(top_k), kwargs))
    def batch_open(self, max_batch: int, cache_len: int | None = None, prefill_budget: int = 64,
                   max_positions: int | None = None) -> dict:
        """Start continuous batching in the worker (sparsedeploy.engine.decode.BatchSession; its KV cache is
        allocated here, once). Engines without a batched forward get the same API as sequential batch-1 steps
        (the reply's "batched" says which). Returns the session's sizes."""
        kw = {"max_batch": int(max_batch), "cache_len": cache_len or self.cache_len,
              "prefill_budget": int(prefill_budget), "max_positions": max_positions}
        return self._call(("batch_open", kw))

    def batch_step(self, admit=(), cancel=()) -> dict:
        """One step of the open batch: admit requests (dicts of BatchRequest's fields: id, prompt_ids, max_new,
        temperature, top_p, seed, stop_ids), drop `cancel` ids (or (id, reason) pairs); returns the new token of
        every running sequence, those that finished (GenerateResult) and per-request errors (BatchSession.step)."""
        return self._call(("batch_step", [dict(r) for r in admit], list(cancel)))

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
        return self._call(("time_head", os.path.abspath(head_path), int(repeats)))

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

