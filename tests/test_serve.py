"""`sparsedeploy serve`: the HTTP API on a tiny exported deployment.

References: the greedy tokens PyTorch produced at export time (sparsedeploy.json "verified"), an
independent numpy nucleus computation for top_p, and a fake worker (tests/serve_helpers.py) wherever the
test is about queueing, timeouts, cancellation or a failing engine rather than the engine's numbers.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from sparsedeploy.engine import unavailable
from sparsedeploy.serve.app import Settings, create_app

from .serve_helpers import FakeWorker, free_socket, running, sse_events

ROOT = Path(__file__).resolve().parents[1]
ENGINE = "deepsparse" if unavailable("deepsparse") is None else "onnxruntime"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_llama_dir) -> Path:
    from sparsedeploy.export.stage import export

    return export(str(tiny_llama_dir), seqlen=64, out=tmp_path_factory.mktemp("serve") / "deployment")


@pytest.fixture(scope="module")
def meta(deployment) -> dict:
    return json.loads((deployment / "sparsedeploy.json").read_text())


@pytest.fixture(scope="module")
def real_server(deployment):
    """One real engine worker (the default engine, falling back to ONNX Runtime) behind the HTTP API."""
    app = create_app(Settings(str(deployment), engine=ENGINE, cores=1, max_prompt_tokens=40, max_new_tokens=48,
                              queue_size=4, timeout_s=60))
    with running(app) as url:
        yield url, app


def fake_app(deployment, *, delay=0.0, factory=None, **kw):
    worker = FakeWorker(delay=delay)
    app = create_app(Settings(str(deployment), **kw), worker_factory=factory or (lambda: worker))
    return app, worker


def post(url, body, **kw):
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60, **kw)


def decode(deployment, ids):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(deployment / "tokenizer.json")).decode(ids, skip_special_tokens=True)


def expected_greedy(deployment, meta, n):
    """PyTorch's greedy tokens from export, cut after the first EOS (where the server stops)."""
    toks = meta["verified"]["tokens"][:n]
    eos = 2  # tiny tokenizer: </s>
    if eos in toks:
        toks = toks[:toks.index(eos) + 1]
    return toks


# ----------------------------------------------------------------------------------- sampling (numpy)
def test_sample_token_greedy_and_nucleus_match_an_independent_computation():
    from sparsedeploy.engine.decode import sample_token

    rng = np.random.default_rng(0)
    logits = rng.normal(size=50) * 3
    assert sample_token(logits, 0.0) == int(np.argmax(logits))
    # top_p so small that only the most likely token survives: greedy whatever the seed
    assert {sample_token(logits, 1.5, 1e-9, np.random.default_rng(s)) for s in range(20)} == {int(np.argmax(logits))}
    # the nucleus: the fewest most-likely tokens whose probability reaches top_p (computed here by a loop)
    T, top_p = 0.7, 0.6
    p = np.exp(logits / T - (logits / T).max())
    p /= p.sum()
    nucleus, mass = set(), 0.0
    for i in sorted(range(50), key=lambda i: -p[i]):
        nucleus.add(i)
        mass += p[i]
        if mass >= top_p:
            break
    draws = [sample_token(logits, T, top_p, np.random.default_rng(s)) for s in range(400)]
    assert set(draws) <= nucleus and len(set(draws)) > 1
    # without top_p the frequencies follow softmax(logits / T)
    g = np.random.default_rng(1)
    counts = np.bincount([sample_token(logits[:4], 1.0, 1.0, g) for _ in range(4000)], minlength=4) / 4000
    q = np.exp(logits[:4] - logits[:4].max())
    assert np.allclose(counts, q / q.sum(), atol=0.03)


def test_sample_decode_at_temperature_zero_is_greedy_decode(deployment, meta):
    from sparsedeploy.engine.decode import greedy_decode, sample_decode
    from sparsedeploy.engine.onnxruntime import OrtRuntime

    rt = OrtRuntime(deployment / "model.onnx", cores=1, seq_len=1, cache_len=64)
    prompt = meta["verified"]["prompt_ids"]
    greedy = greedy_decode(rt, prompt, 16)
    sampled = sample_decode(rt, prompt, 16, temperature=0.0)
    assert sampled.tokens == greedy.tokens == meta["verified"]["tokens"]
    assert sampled.finish_reason == "length"
    seen = []
    stop_at = greedy.tokens[5]
    res = sample_decode(rt, prompt, 16, stop_ids=[stop_at], on_token=seen.append)
    assert res.tokens == seen == greedy.tokens[:greedy.tokens.index(stop_at) + 1] and res.finish_reason == "stop"
    res = sample_decode(rt, prompt, 16, should_stop=lambda: True)
    assert res.tokens == greedy.tokens[:1] and res.finish_reason == "cancelled"


# ----------------------------------------------------------------------------------- the real engine
def test_worker_streams_generate_and_sigusr1_cancels(deployment, meta, monkeypatch):
    """WorkerRuntime.generate streams the tokens of the greedy loop; the worker's side stops on SIGUSR1."""
    from sparsedeploy.engine import decode, worker as runtime, onnxruntime as ortmod

    prompt = meta["verified"]["prompt_ids"]
    with runtime.WorkerRuntime("onnxruntime", deployment / "model.onnx", cores=1, seq_len=1, cache_len=64) as w:
        events = list(w.generate(prompt, 16, temperature=0.0))
        assert [e[0] for e in events] == ["token"] * 16 + ["done"]
        assert [e[1] for e in events[:-1]] == events[-1][1].tokens == meta["verified"]["tokens"]
        assert w.decode(prompt, 4).tokens == meta["verified"]["tokens"][:4]    # the protocol is still in step
    rt = ortmod.OrtRuntime(deployment / "model.onnx", cores=1, seq_len=1, cache_len=64)
    sent = []

    def send(stream, obj):
        sent.append(obj)
        if len(sent) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)      # what WorkerRuntime.cancel sends

    monkeypatch.setattr(runtime, "_send", send)
    old = signal.getsignal(signal.SIGUSR1)
    try:
        res = runtime._generate_in_worker(decode, rt, None, None, ("generate", prompt, 30, {}))
    finally:
        signal.signal(signal.SIGUSR1, old)
        runtime._CANCEL["installed"] = False
    assert res.finish_reason == "cancelled" and res.tokens == [o[1] for o in sent] and len(res.tokens) == 2


def test_completion_is_pytorchs_greedy_text_and_stream_equals_it(real_server, deployment, meta):
    url, app = real_server
    from sparsedeploy.export.stage import VERIFY_PROMPT

    r = post(url, {"prompt": VERIFY_PROMPT, "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200, r.text
    doc = r.json()
    want = expected_greedy(deployment, meta, 16)
    assert doc["choices"][0]["text"] == decode(deployment, want)
    assert doc["usage"] == {"prompt_tokens": len(meta["verified"]["prompt_ids"]), "completion_tokens": len(want),
                            "total_tokens": len(meta["verified"]["prompt_ids"]) + len(want)}
    assert doc["choices"][0]["finish_reason"] == ("stop" if len(want) < 16 else "length")
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": VERIFY_PROMPT, "max_tokens": 16,
                                                             "temperature": 0, "stream": True}, timeout=60) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        events = sse_events(s.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == doc["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == doc["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == doc["usage"] and len(chunks) >= 3


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(real_server):
    url, _ = real_server
    body = {"prompt": "the cat sat on", "max_tokens": 24, "temperature": 1.5, "seed": 7}
    a, b = post(url, body).json(), post(url, body).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    others = {post(url, {**body, "seed": s}).json()["choices"][0]["text"] for s in range(8, 12)}
    assert len(others | {a["choices"][0]["text"]}) > 1           # different seeds, different samples
    greedy = post(url, {**body, "temperature": 0}).json()["choices"][0]["text"]
    assert post(url, {**body, "top_p": 1e-9}).json()["choices"][0]["text"] == greedy


def test_stop_string_cuts_the_text(real_server):
    url, _ = real_server
    base = post(url, {"prompt": "the dog ran", "max_tokens": 30, "temperature": 0}).json()["choices"][0]["text"]
    assert len(base) > 6
    stop = base[3:5]
    cut = base.index(stop)
    doc = post(url, {"prompt": "the dog ran", "max_tokens": 30, "temperature": 0, "stop": ["\x00never", stop]}).json()
    assert doc["choices"][0]["text"] == base[:cut] and doc["choices"][0]["finish_reason"] == "stop"
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "the dog ran", "max_tokens": 30,
                                                             "temperature": 0, "stop": stop, "stream": True}) as s:
        events = sse_events(s.iter_lines())
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == base[:cut]


def test_limits_are_400_json(real_server):
    url, _ = real_server
    long_prompt = " ".join(["the cat sat on a mat"] * 40)
    cases = [({"prompt": long_prompt, "max_tokens": 1}, "at most 40"),
             ({"prompt": "the cat", "max_tokens": 49}, "limit of 48"),
             ({"prompt": " ".join(["the cat sat"] * 4), "max_tokens": 48}, "context"),
             ({"prompt": "", "max_tokens": 4}, "empty")]
    for body, needle in cases:
        r = post(url, body)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], (body, r.text)


def test_metrics_and_health(real_server):
    url, app = real_server
    post(url, {"prompt": "the cat", "max_tokens": 5, "temperature": 0})
    post(url, {"prompt": "the cat", "max_tokens": "5"})
    h = httpx.get(f"{url}/health")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["seqlen"] == 64
    text = httpx.get(f"{url}/metrics").text
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(lines['sparsedeploy_requests_total{endpoint="/v1/completions",status="200"}']) >= 1
    assert float(lines['sparsedeploy_requests_total{endpoint="/v1/completions",status="422"}']) >= 1
    assert float(lines["sparsedeploy_generated_tokens_total"]) >= 5
    n = float(lines['sparsedeploy_request_duration_seconds_count{endpoint="/v1/completions"}'])
    assert float(lines['sparsedeploy_request_duration_seconds_bucket{endpoint="/v1/completions",le="+Inf"}']) == n
    assert float(lines["sparsedeploy_time_to_first_token_seconds_count"]) >= 1
    assert "# TYPE sparsedeploy_request_duration_seconds histogram" in text


def test_a_killed_worker_gives_503_then_restarts(deployment):
    app = create_app(Settings(str(deployment), engine="onnxruntime", cores=1, timeout_s=30))
    svc = app.state.service
    with running(app) as url:
        pid = svc.worker_pid()
        os.kill(pid, signal.SIGSTOP)               # hold it so the request is surely in flight when it dies
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("r", post(url, {"prompt": "the cat", "max_tokens": 20})))
        t.start()
        deadline = time.monotonic() + 10
        while svc.pending() == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
        t.join(30)
        r = out["r"]
        assert r.status_code == 503 and r.json()["error"]["type"] == "engine_unavailable"
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        h = httpx.get(f"{url}/health").json()
        assert h["status"] == "ok" and h["restarts"] == 1 and h["worker_pid"] != pid
        assert post(url, {"prompt": "the cat", "max_tokens": 4}).status_code == 200
        assert "sparsedeploy_worker_restarts_total 1" in httpx.get(f"{url}/metrics").text
        # dying while idle is noticed without a request
        pid2 = svc.worker_pid()
        os.kill(pid2, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while svc.restarts < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert svc.restarts == 2 and post(url, {"prompt": "the cat", "max_tokens": 4}).status_code == 200


# ----------------------------------------------------------------------------------- fake engine
def test_full_queue_answers_429_at_once(deployment):
    app, worker = fake_app(deployment, delay=0.05, queue_size=1, timeout_s=30)
    with running(app) as url:
        results = []
        threads = [threading.Thread(target=lambda: results.append(post(url, {"prompt": "the cat", "max_tokens": 20})))
                   for _ in range(2)]
        for t in threads:
            t.start()
            time.sleep(0.15)                     # first one running, second one waiting
        assert app.state.service.pending() == 2
        t0 = time.monotonic()
        r = post(url, {"prompt": "the cat", "max_tokens": 2})
        assert r.status_code == 429 and time.monotonic() - t0 < 0.5 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "queue_full"
        for t in threads:
            t.join(30)
        assert [x.status_code for x in results] == [200, 200]
        assert 'status="429"} 1' in httpx.get(f"{url}/metrics").text


def test_timeout_is_504_and_frees_the_engine(deployment):
    app, worker = fake_app(deployment, delay=0.05, timeout_s=0.5)
    with running(app) as url:
        t0 = time.monotonic()
        r = post(url, {"prompt": "the cat", "max_tokens": 60})
        took = time.monotonic() - t0
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout" and 0.4 < took < 2.0
        time.sleep(0.2)
        assert app.state.service.pending() == 0 and worker.cancels >= 1
        assert post(url, {"prompt": "the cat", "max_tokens": 3}).status_code == 200


def test_client_that_leaves_a_stream_cancels_its_generation(deployment):
    app, worker = fake_app(deployment, delay=0.05, timeout_s=30)
    with running(app) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "the cat", "max_tokens": 60, "stream": True,
                                                                 "temperature": 0}) as s:
            next(s.iter_lines())
        deadline = time.monotonic() + 5
        while app.state.service.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.state.service.pending() == 0 and worker.cancels >= 1


def test_a_hung_worker_is_killed_by_the_watchdog_and_replaced(deployment):
    workers = []

    def factory():
        workers.append(FakeWorker(hang=not workers))     # the first one hangs, its replacement works
        return workers[-1]

    app = create_app(Settings(str(deployment), timeout_s=0.5, hang_grace_s=0.5), worker_factory=factory)
    with running(app) as url:
        r = post(url, {"prompt": "the cat", "max_tokens": 5})
        assert r.status_code == 504
        deadline = time.monotonic() + 10
        while app.state.service.restarts < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert workers[0]._proc.dead and app.state.service.restarts == 1
        assert post(url, {"prompt": "the cat", "max_tokens": 5}).status_code == 200


def test_engine_that_cannot_restart_enters_a_failed_state(deployment):
    workers = []

    def factory():
        if workers:
            raise RuntimeError("cannot start")
        workers.append(FakeWorker(delay=0.05))
        return workers[0]

    app = create_app(Settings(str(deployment), timeout_s=30), worker_factory=factory)
    with running(app) as url:
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("r", post(url, {"prompt": "the cat", "max_tokens": 50})))
        t.start()
        time.sleep(0.2)
        workers[0]._proc.kill()
        t.join(10)
        assert out["r"].status_code == 503
        h = httpx.get(f"{url}/health")
        assert h.status_code == 503 and h.json()["status"] == "failed" and "could not be restarted" in h.json()["error"]
        r = post(url, {"prompt": "the cat", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["type"] == "engine_unavailable"


BAD_REQUESTS = [
    (b"\xff\xfe\x00garbage", 400, "UTF-8"),
    (b"{not json", 400, "JSON"),
    (b"", 400, "JSON"),
    (b'{"prompt": "x", "temperature": NaN}', 400, "JSON"),
    (b'{"prompt": "x", "max_tokens": Infinity}', 400, "JSON"),
    (b"[1, 2, 3]", 422, "object"),
    (b'"a string"', 422, "object"),
    (b"null", 422, "object"),
    (b"{}", 422, "prompt"),
    (b'{"prompt": 5}', 422, "prompt"),
    (b'{"prompt": ["a", "b"]}', 422, "prompt"),
    (b'{"prompt": null}', 422, "prompt"),
    (b'{"prompt": "x", "max_tokens": -1}', 422, "max_tokens"),
    (b'{"prompt": "x", "max_tokens": 0}', 422, "max_tokens"),
    (b'{"prompt": "x", "max_tokens": "5"}', 422, "max_tokens"),
    (b'{"prompt": "x", "max_tokens": 5.5}', 422, "max_tokens"),
    (b'{"prompt": "x", "max_tokens": true}', 422, "max_tokens"),
    (b'{"prompt": "x", "max_tokens": 1000000000000000000000000000000}', 400, "max_tokens"),
    (b'{"prompt": "x", "max_tokens": 100000}', 400, "max_tokens"),
    (b'{"prompt": "x", "temperature": -0.5}', 422, "temperature"),
    (b'{"prompt": "x", "temperature": 3}', 422, "temperature"),
    (b'{"prompt": "x", "temperature": "hot"}', 422, "temperature"),
    (b'{"prompt": "x", "top_p": 0}', 422, "top_p"),
    (b'{"prompt": "x", "top_p": 1.5}', 422, "top_p"),
    (b'{"prompt": "x", "stop": 7}', 422, "stop"),
    (b'{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 422, "stop"),
    (b'{"prompt": "x", "stop": [""]}', 422, "stop"),
    (b'{"prompt": "x", "stream": "yes"}', 422, "stream"),
    (b'{"prompt": "x", "seed": -1}', 422, "seed"),
    (b'{"prompt": "x", "n": 2}', 422, "n"),
    (b'{"prompt": "a\\ud800b"}', 400, "surrogate"),
    (b'{"prompt": "x", "stop": "\\udfff"}', 422, "stop"),
    (b'{"prompt": "x", "max_tokens": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, ""),
]


def test_bad_requests_get_4xx_json_never_500(deployment):
    app, worker = fake_app(deployment, max_new_tokens=32)
    with running(app) as url:
        for body, status, needle in BAD_REQUESTS:
            r = httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"})
            assert r.status_code in (status, 422 if status == 400 else status), (body[:60], r.status_code, r.text)
            err = r.json()["error"]
            assert needle in err["message"] and err["code"] == r.status_code, (body[:60], r.text)
        r = httpx.post(f"{url}/v1/completions", content=b'{"prompt": "' + b"a" * (1 << 21) + b'"}')
        assert r.status_code == 413 and "exceeds" in r.json()["error"]["message"]
        assert httpx.get(f"{url}/v1/completions").status_code == 405
        assert httpx.get(f"{url}/nope").status_code == 404
        assert worker.calls == 0
        assert post(url, {"prompt": "the cat", "max_tokens": 3}).status_code == 200


# ----------------------------------------------------------------------------------- the CLI
def _serve_cmd(deployment, port, *extra):
    return [sys.executable, "-c", "from sparsedeploy.cli import main; main()", "serve", str(deployment),
            "--engine", "onnxruntime", "--cores", "1", "--port", str(port), *map(str, extra)]


def _wait_health(url, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode}: {proc.stderr.read().decode()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("serve did not become healthy")


def test_serve_binds_loopback_by_default_and_sigterm_finishes_in_flight_requests(deployment):
    import psutil

    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "NM_DISABLE_ANALYTICS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(_serve_cmd(deployment, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_health(url, proc)
        listening = [c.laddr for c in psutil.Process(proc.pid).net_connections(kind="inet") if c.status == "LISTEN"]
        assert [a.ip for a in listening] == ["127.0.0.1"], listening
        maps = {m.path for m in psutil.Process(proc.pid).memory_maps()}
        assert not [m for m in maps if "libtorch" in m], "the HTTP process must not load torch"
        worker = httpx.get(f"{url}/health").json()["worker_pid"]
        os.kill(worker, signal.SIGSTOP)                   # the request below is in flight until SIGCONT
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "the cat", "max_tokens": 30,
                                                                 "temperature": 0, "stream": True}, timeout=60) as s:
            assert s.status_code == 200
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert proc.poll() is None                    # waiting for the in-flight request
            with pytest.raises(httpx.HTTPError):
                httpx.get(f"{url}/health", timeout=2)     # but no longer accepting new connections
            os.kill(worker, signal.SIGCONT)
            events = sse_events(s.iter_lines())
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] in ("length", "stop")
        assert "error" not in events[-2]
        assert proc.wait(30) == 0
        assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_bad_arguments_are_one_line_errors(deployment, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(deployment, bad)
    (bad / "model.onnx").write_bytes(b"garbage")
    busy = free_socket()
    busy.listen(1)
    env = {**os.environ, "NM_DISABLE_ANALYTICS": "1", "PYTHONPATH": str(ROOT)}
    cases = [
        (["serve", tmp_path / "missing"], "does not exist"),
        (["serve", bad], "model.onnx"),
        (["serve", deployment, "--port", "70000"], "--port"),
        (["serve", deployment, "--cores", "999"], "--cores"),
        (["serve", deployment, "--engine", "tensorrt"], "unknown engine"),
        (["serve", deployment, "--max-new-tokens", "64"], "--max-new-tokens"),
        (["serve", deployment, "--max-prompt-tokens", "0"], "--max-prompt-tokens"),
        (["serve", deployment, "--queue-size", "-1"], "--queue-size"),
        (["serve", deployment, "--timeout-s", "0"], "--timeout-s"),
        (["serve", deployment, "--host", "no such host"], "--host"),
        (["serve", deployment, "--port", busy.getsockname()[1]], "cannot listen"),
        (["serve", deployment, "--port", "abc"], "--port"),
    ]
    try:
        for argv, needle in cases:
            r = subprocess.run([sys.executable, "-c", "from sparsedeploy.cli import main; main()", *map(str, argv)],
                               capture_output=True, text=True, env=env, timeout=120)
            err = r.stderr.strip()
            assert r.returncode == 2 and err.startswith("error:") and needle in err, (argv, r.returncode, err)
            assert len(err.splitlines()) == 1, err
    finally:
        busy.close()
