"""Helpers for the server tests: a uvicorn server in a thread, and a fake engine worker whose speed,
death and cancellation the tests control (the real worker is used where the engine itself matters)."""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

from sparsedeploy.engine.decode import GenerateResult


class FakeProc:
    def __init__(self):
        self.dead = False
        self.pid = 0

    def poll(self):
        return -9 if self.dead else None

    def kill(self):
        self.dead = True


class FakeWorker:
    """Speaks WorkerRuntime's generate/cancel protocol: token i is (sum(prompt) + i) % vocab, one per `delay` s."""

    name = "fake"
    fallback_reason = None
    compile_seconds = 0.0

    def __init__(self, delay: float = 0.0, vocab: int = 300, hang: bool = False):
        self.delay, self.vocab, self.hang = delay, vocab, hang
        self._proc = FakeProc()
        self.pid = 0
        self.cancels = 0
        self.calls = 0
        self._cancel = False
        self.closed = False

    def generate(self, prompt_ids, n, *, time_limit_s=None, temperature=0.0, top_p=1.0, seed=None, stop_ids=()):
        self.calls += 1
        self._cancel = False
        t0 = time.monotonic()
        tokens, reason = [], "length"
        for i in range(n):
            if self._proc.dead:
                raise RuntimeError("the engine worker process died (exit code -9)")
            while self.hang and not self._proc.dead:       # stuck: ignores cancel and time limit
                time.sleep(0.02)
            if self._proc.dead:
                raise RuntimeError("the engine worker process died (exit code -9)")
            time.sleep(self.delay)
            tok = (sum(prompt_ids) + i) % self.vocab
            tokens.append(tok)
            yield "token", tok
            if tok in stop_ids:
                reason = "stop"
                break
            if len(tokens) >= n:
                break
            if self._cancel:
                reason = "cancelled"
                break
            if time_limit_s is not None and time.monotonic() - t0 > time_limit_s:
                reason = "timeout"
                break
        yield "done", GenerateResult(tokens=tokens, prompt_len=len(prompt_ids), engine="fake", finish_reason=reason,
                                     prefill_ms=0.0)

    def cancel(self):
        self.cancels += 1
        self._cancel = True

    def alive(self):
        return not self._proc.dead

    def close(self):
        self.closed = True


class FakeBatchWorker(FakeWorker):
    """FakeWorker plus WorkerRuntime's batch API (batch_open / batch_step): each step, after `delay` s, gives every
    running request its next token, (sum(prompt) + i) % vocab as FakeWorker does. Records every step's
    admitted ids, cancels and batch size (`steps`) so tests can check who joined and left when."""

    def __init__(self, delay: float = 0.0, vocab: int = 300, hang: bool = False):
        super().__init__(delay=delay, vocab=vocab, hang=hang)
        self.max_batch = None
        self.seqs: dict = {}
        self.steps: list[dict] = []

    def batch_open(self, max_batch, cache_len=None, prefill_budget=64, max_positions=None):
        self.max_batch, self.seqs = int(max_batch), {}
        return {"batched": True, "max_batch": self.max_batch, "cache_len": cache_len, "prefill_budget": prefill_budget}

    def batch_step(self, admit=(), cancel=()):
        from sparsedeploy.errors import UserError

        if self._proc.dead:
            raise RuntimeError("the engine worker process died (exit code -9)")
        self.calls += 1
        out = {"tokens": [], "finished": [], "errors": []}
        for c in cancel:
            rid, reason = c if isinstance(c, (tuple, list)) else (c, "cancelled")
            s = self.seqs.pop(rid, None)
            if s is not None:
                self.cancels += 1
                out["finished"].append((rid, self._result(s, reason)))
        for r in admit:
            if not r["prompt_ids"]:
                out["errors"].append((r["id"], UserError("the prompt is empty", "give at least one token")))
                continue
            assert r["id"] not in self.seqs and len(self.seqs) < self.max_batch, "admitted beyond the batch"
            self.seqs[r["id"]] = {"req": r, "tokens": []}
        while self.hang and not self._proc.dead:
            time.sleep(0.02)
        if self._proc.dead:
            raise RuntimeError("the engine worker process died (exit code -9)")
        time.sleep(self.delay)
        self.steps.append({"admit": [r["id"] for r in admit], "cancel": list(cancel), "running": len(self.seqs)})
        for rid, s in list(self.seqs.items()):
            r = s["req"]
            tok = (sum(r["prompt_ids"]) + len(s["tokens"])) % self.vocab
            s["tokens"].append(tok)
            out["tokens"].append((rid, tok))
            if tok in r["stop_ids"] or len(s["tokens"]) >= r["max_new"]:
                del self.seqs[rid]
                out["finished"].append((rid, self._result(s, "stop" if tok in r["stop_ids"] else "length")))
        out.update(rows=len(self.seqs), running=len(self.seqs), step_ms=self.delay * 1e3)
        return out

    @staticmethod
    def _result(s, reason):
        return GenerateResult(tokens=list(s["tokens"]), prompt_len=len(s["req"]["prompt_ids"]), engine="fake",
                              finish_reason=reason, prefill_ms=0.0)


def free_socket(host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, 0))
    return s


@contextmanager
def running(app):
    """Serve `app` with uvicorn in a thread on a free loopback port; yields the base URL."""
    import uvicorn

    sock = free_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                          timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        if time.monotonic() - t0 > 30 or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def sse_events(lines) -> list:
    """Parse `data: ...` lines of a server-sent-event stream into JSON docs (and the final "[DONE]")."""
    import json

    out = []
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out
