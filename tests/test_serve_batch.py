"""Continuous batching in `serve`: the scheduler (EngineService with max_batch > 1) against a fake batch
worker (fast, no model), and one real tiny native deployment whose concurrent answers equal batch 1's."""
from __future__ import annotations

import threading
import time

import httpx
import pytest

from sparsedeploy.serve.app import Settings, create_app
from sparsedeploy.serve.engine import EngineService, QueueFull

from .serve_helpers import FakeBatchWorker, running


def fake_tokens(prompt, n, vocab=300):
    return [(sum(prompt) + i) % vocab for i in range(n)]


class Recorder:
    def __init__(self):
        self.tokens, self.end, self.done = [], None, threading.Event()

    def __call__(self, ev):
        if ev[0] == "token":
            self.tokens.append(ev[1])
        else:
            self.end = ev
            self.done.set()


def _service(worker, **kw):
    kw.setdefault("max_batch", 3)
    return EngineService(lambda: worker, **kw)


def _submit(svc, prompt, n, timeout=30.0, **params):
    rec = Recorder()
    job = svc.submit(prompt, n, {"temperature": 0.0, "top_p": 1.0, "seed": None, "stop_ids": (), **params},
                     time.monotonic() + timeout, rec)
    return job, rec


def _wait(cond, timeout=10.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out waiting"
        time.sleep(0.005)


def test_requests_join_at_the_next_step_and_leave_when_done():
    w = FakeBatchWorker(delay=0.01)
    svc = _service(w, queue_size=10)
    assert svc.batched and svc.info["max_batch"] == 3
    lens = [2, 7, 4, 3, 5]
    jobs = [_submit(svc, [i + 1, 2 * i], n) for i, n in enumerate(lens)]
    for _, rec in jobs:
        assert rec.done.wait(10)
    for i, ((job, rec), n) in enumerate(zip(jobs, lens)):
        assert rec.end[0] == "done" and rec.end[1].finish_reason == "length"
        assert rec.tokens == rec.end[1].tokens == fake_tokens([i + 1, 2 * i], n)
    assert max(s["running"] for s in w.steps) == 3                 # never more than max_batch
    later = [s for s in w.steps if s["admit"] and s is not w.steps[0]]
    assert later and all(s["running"] > len(s["admit"]) for s in later)   # joined a batch already running
    assert svc.pending() == 0
    svc.close()
    assert svc.state == "stopped" and w.closed


def test_cancel_and_timeout_leave_the_batch_at_the_next_step():
    w = FakeBatchWorker(delay=0.02)
    svc = _service(w)
    a, ra = _submit(svc, [1], 200)
    b, rb = _submit(svc, [2], 200, timeout=0.3)
    c, rc = _submit(svc, [3], 8)
    _wait(lambda: len(ra.tokens) >= 3)
    svc.cancel_active(a)
    assert ra.done.wait(5) and rb.done.wait(5) and rc.done.wait(5)
    assert ra.end[1].finish_reason == "cancelled" and ra.tokens == fake_tokens([1], len(ra.tokens)) and len(ra.tokens) < 200
    assert rb.end[1].finish_reason == "timeout" and len(rb.tokens) < 200
    assert rc.end[1].finish_reason == "length" and rc.tokens == fake_tokens([3], 8)
    cancels = [c for s in w.steps for c in s["cancel"]]
    assert (a.rid, "cancelled") in cancels and (b.rid, "timeout") in cancels
    svc.close()


def test_queue_full_is_429_while_the_batch_runs_and_bad_requests_fail_alone():
    w = FakeBatchWorker(delay=0.02)
    svc = _service(w, max_batch=2, queue_size=2)
    run = [_submit(svc, [i], 30) for i in range(2)]
    _wait(lambda: len(w.seqs) == 2)
    queued = [_submit(svc, [5 + i], 2) for i in range(2)]
    assert svc.queued() == 2 and svc.pending() == 4
    with pytest.raises(QueueFull):
        _submit(svc, [9], 2)
    for _, rec in run + queued:
        assert rec.done.wait(10) and rec.end[0] == "done"
    bad, rbad = _submit(svc, [], 3)
    good, rgood = _submit(svc, [4], 3)
    assert rbad.done.wait(5) and rgood.done.wait(5)
    assert rbad.end[0] == "error" and rbad.end[1].status == 400 and rgood.tokens == fake_tokens([4], 3)
    svc.close()


def test_a_worker_dying_mid_batch_fails_its_sequences_with_503_and_restarts():
    workers = []

    def factory():
        workers.append(FakeBatchWorker(delay=0.02))
        return workers[-1]

    svc = EngineService(factory, max_batch=4)
    recs = [_submit(svc, [i], 100)[1] for i in range(3)]
    _wait(lambda: all(len(r.tokens) >= 2 for r in recs))
    workers[0]._proc.kill()
    for r in recs:
        assert r.done.wait(5) and r.end[0] == "error" and r.end[1].status == 503
    _wait(lambda: svc.state == "ready" and len(workers) == 2)
    _, rec = _submit(svc, [7], 4)
    assert rec.done.wait(5) and rec.tokens == fake_tokens([7], 4) and svc.restarts == 1
    svc.close()


def test_a_hung_step_is_killed_by_the_watchdog():
    workers = []

    def factory():
        workers.append(FakeBatchWorker(hang=not workers))
        return workers[-1]

    svc = EngineService(factory, max_batch=2, hang_grace_s=0.3)
    _, rec = _submit(svc, [1], 5, timeout=0.3)
    assert rec.done.wait(5) and rec.end[0] == "error" and rec.end[1].status == 503
    _wait(lambda: svc.state == "ready" and len(workers) == 2)
    _, rec = _submit(svc, [2], 3)
    assert rec.done.wait(5) and rec.tokens == fake_tokens([2], 3)
    svc.close()


def test_close_finishes_running_and_queued_requests():
    w = FakeBatchWorker(delay=0.01)
    svc = _service(w, max_batch=2)
    recs = [_submit(svc, [i], 6)[1] for i in range(5)]
    svc.close()
    assert all(r.done.is_set() and r.end[0] == "done" and len(r.tokens) == 6 for r in recs)


def test_max_batch_one_keeps_one_request_at_a_time():
    w = FakeBatchWorker(delay=0.0)
    svc = _service(w, max_batch=1)
    assert not svc.batched
    _, rec = _submit(svc, [3], 4)
    assert rec.done.wait(5) and rec.tokens == fake_tokens([3], 4) and w.steps == [] and w.calls == 1
    svc.close()


# ------------------------------------------------------------------------------ a real native deployment
@pytest.fixture(scope="module")
def native_deployment(tmp_path_factory, tiny_llama_dir):
    from sparsedeploy.engine.deployment import read_deployment
    from sparsedeploy.export.native import ensure_native
    from sparsedeploy.export.stage import export

    dep = export(str(tiny_llama_dir), seqlen=64, out=tmp_path_factory.mktemp("serve_batch") / "deployment")
    meta = read_deployment(dep)
    ensure_native(meta, crossover=0.9)
    return meta


def test_concurrent_requests_on_native_equal_batch1_tokens(native_deployment):
    from tokenizers import Tokenizer

    from sparsedeploy.engine.decode import greedy_decode
    from sparsedeploy.engine.native.runtime import NativeRuntime

    meta = native_deployment
    tok = Tokenizer.from_file(f"{meta['dir']}/tokenizer.json")
    prompts = ["the cat sat on", "a", "in the beginning the model was small and", "once upon a time there",
               "numbers and words", "the"]
    rt = NativeRuntime(meta["onnx"], cache_len=int(meta["seqlen"]))
    expected = []
    for i, p in enumerate(prompts):
        ids = tok.encode(p, add_special_tokens=False).ids
        toks = greedy_decode(rt, ids, 6 + 2 * i).tokens
        if 2 in toks:                                    # the tiny tokenizer's </s>: the server stops there
            toks = toks[:toks.index(2) + 1]
        expected.append(tok.decode(toks, skip_special_tokens=True))
    app = create_app(Settings(meta["dir"], engine="native", cores=1, max_batch=4, batch_prefill=8, timeout_s=60))
    svc = app.state.service
    assert svc.batched and svc.info["batch"]["batched"] is True
    with running(app) as url:
        out = [None] * len(prompts)

        def call(i):
            out[i] = httpx.post(f"{url}/v1/completions", json={"prompt": prompts[i], "max_tokens": 6 + 2 * i,
                                                                "temperature": 0}, timeout=60)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [r.status_code for r in out] == [200] * len(prompts)
        assert [r.json()["choices"][0]["text"] for r in out] == expected
        m = httpx.get(f"{url}/metrics").text
        assert svc.batch_peak >= 2                      # they did run together
        assert "sparsedeploy_batch_size" in m and "sparsedeploy_batch_step_seconds_count" in m


def test_the_workers_own_batch_limit_is_respected():
    """An engine with one KV cache (llama.cpp) opens its batch with max_batch 1: requests then run one at a time."""
    class OneAtATime(FakeBatchWorker):
        def batch_open(self, max_batch, cache_len=None, prefill_budget=64, max_positions=None):
            return super().batch_open(1, cache_len, prefill_budget, max_positions)

    w = OneAtATime(delay=0.005)
    svc = _service(w, max_batch=4)
    recs = [_submit(svc, [i], 3)[1] for i in range(3)]
    for i, r in enumerate(recs):
        assert r.done.wait(5) and r.tokens == fake_tokens([i], 3)
    assert svc.info["max_batch"] == 1 and max(s["running"] for s in w.steps) == 1
    svc.close()
