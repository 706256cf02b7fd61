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
