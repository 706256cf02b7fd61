"""The server's one engine: a WorkerRuntime (its own process) fed by one thread from a bounded queue.

    svc = EngineService(factory, queue_size=16, metrics=m)   # factory() -> WorkerRuntime (compiles)
    job = svc.submit(prompt_ids, max_new, params, deadline, on_event)   # raises QueueFull at once
    ... on_event(("token", id)), then exactly one of on_event(("done", GenerateResult)) / on_event(("error", ServeError))
    (with params["logprobs"], each token's on_event(("logprob", [logprob, top])) comes just before its ("token", id))
    job = svc.submit_score(prompt_ids, top_k, deadline, on_event)   # prompt log-probs: ("done", ScoreResult) | error
    svc.close()                                              # finishes the running and queued jobs, then stops

With max_batch 1, requests run one at a time through `WorkerRuntime.generate` (the decode loop with its
preallocated cache); a job's `cancel()` (client gone, stop string seen, timeout) asks the worker to stop after
its current token. With max_batch > 1 (and a worker with `batch_step`), continuous batching: the engine thread
drives `WorkerRuntime.batch_step` in a loop; queued requests join the running batch at the next step (up to
max_batch sequences), and a finished, cancelled or timed-out one leaves it at the next step, freeing its
slot for the next queued request. Engines without a batched forward run the same steps as sequential
batch-1 steps inside the worker (sparsedeploy.engine.decode.BatchSession).
A worker that dies (crash, kill -9, or a hang past the job's deadline + grace, when the watchdog kills it)
fails its job with a 503-type error and is restarted; after `max_restarts` failures within `restart_window_s`
the service enters the "failed" state and answers every request with 503.
"""
from __future__ import annotations

import collections
import signal
import threading
import time
from typing import Callable

STATES = ("starting", "ready", "restarting", "failed", "stopping", "stopped")


class ServeError(Exception):
    """An error with the HTTP status and OpenAI-style type it should be answered with."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


class QueueFull(ServeError):
    def __init__(self, size: int):
        super().__init__(429, "queue_full", f"the request queue is full ({size} waiting); retry later")


class Job:
    def __init__(self, prompt_ids, max_new: int, params: dict, deadline: float, on_event: Callable,
                 kind: str = "generate"):
        self.kind = kind                         # "generate" | "score" (see EngineService.submit_score)
        self.prompt_ids = list(prompt_ids)
        self.max_new = int(max_new)
        self.params = dict(params)
        self.deadline = float(deadline)          # time.monotonic() after which it is a timeout
        self.on_event = on_event
        self.cancelled = threading.Event()
        self.started: float | None = None
        self.finished = threading.Event()
        self.rid: int | None = None              # its id in the worker's batch (batched mode)

    def cancel(self) -> None:
        self.cancelled.set()


class EngineService:
    def __init__(self, factory: Callable, *, queue_size: int = 16, metrics=None, max_restarts: int = 3,
                 restart_window_s: float = 300.0, hang_grace_s: float = 10.0, max_batch: int = 1,
                 prefill_budget: int = 64, cache_len: int | None = None):
        self.factory = factory
        self.max_batch, self.prefill_budget, self.cache_len = int(max_batch), int(prefill_budget), cache_len
        self.batched = False                     # set by _start_worker: max_batch > 1 and the worker can batch
        self._running: dict[int, Job] = {}       # batched mode: the sequences in the worker's batch
        self._next_rid = 0
        self._step_started: float | None = None
        self.batch_peak = 0                      # most sequences in one step so far
        self.queue_size = int(queue_size)
        self.metrics = metrics
        self.max_restarts, self.restart_window_s, self.hang_grace_s = max_restarts, restart_window_s, hang_grace_s
        self.state = "starting"
        self.error: str | None = None
        self.restarts = 0
        self._restart_times: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._active: Job | None = None
        self._closing = False
        self.worker = None
        self.worker = self._start_worker()       # in the caller's thread: a bad deployment fails here, loudly
        self.info = {"engine": self.worker.name, "fallback_reason": getattr(self.worker, "fallback_reason", None),
                     "compile_s": round(getattr(self.worker, "compile_seconds", 0.0), 3),
                     "max_batch": int(self.batch_info.get("max_batch", self.max_batch)) if self.batched else 1,
                     "batch": self.batch_info}
        if metrics is not None:
            metrics.describe("batch_size", "gauge", "sequences in the engine's last step")
            metrics.describe("batch_step_seconds", "histogram", "one engine step (every running sequence one token)")
        self.state = "ready"
        self._gauge()
        self._thread = threading.Thread(target=self._batch_loop if self.batched else self._loop,
                                        name="sparsedeploy-engine", daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(target=self._watch, name="sparsedeploy-watchdog", daemon=True)
        self._watchdog.start()

    # ------------------------------------------------------------------------------------------ worker
    def _start_worker(self):
        # The worker inherits this thread's signal mask: with SIGINT blocked, a Ctrl-C in the server's
        # terminal (sent to the whole process group) cannot kill the engine under a request being finished.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            worker = self.factory()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        if self.max_batch > 1 and hasattr(worker, "batch_step"):
            try:
                self.batch_info = worker.batch_open(self.max_batch, self.cache_len, self.prefill_budget)
            except BaseException:
                worker.close()
                raise
            self.batched = True
        else:
            self.batch_info = None
        return worker

    def worker_pid(self) -> int | None:
        w = self.worker
        proc = getattr(w, "_proc", None)
        return getattr(w, "pid", None) if proc is not None else None

    def _restart(self, why: str) -> bool:
        """Replace the worker; False (and state "failed") when restarts come too often or the start fails."""
        now = time.monotonic()
        self._restart_times.append(now)
        while self._restart_times and now - self._restart_times[0] > self.restart_window_s:
            self._restart_times.popleft()
        old, self.worker = self.worker, None
        try:
            if old is not None:
                old.close()
        except Exception:  # noqa: BLE001 - it is dead already
            pass
        if len(self._restart_times) > self.max_restarts:
            self._fail(f"the engine worker died {len(self._restart_times)} times in {self.restart_window_s:.0f} s "
                       f"(last: {why}); not restarting")
            return False
        self.state = "restarting"
        self._gauge()
        try:
            self.worker = self._start_worker()
        except Exception as e:  # noqa: BLE001
            self._fail(f"the engine worker could not be restarted ({type(e).__name__}: {e})")
            return False
        self.restarts += 1
        if self.metrics is not None:
            self.metrics.inc("worker_restarts_total")
        self.state = "ready"
        self._gauge()
        return True

    def _fail(self, message: str) -> None:
        self.state, self.error = "failed", message
        self._gauge()
        with self._cv:
            pending, self._queue = list(self._queue), collections.deque()
        for job in pending:
            self._finish(job, ("error", ServeError(503, "engine_unavailable", message)))

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.set("worker_up", 1.0 if self.state == "ready" else 0.0)
            self.metrics.set("queue_depth", float(len(self._queue)))

    # ------------------------------------------------------------------------------------------ jobs
    def pending(self) -> int:
        with self._cv:
            return len(self._queue) + (self._active is not None) + len(self._running)

    def queued(self) -> int:
        """Requests waiting for the engine (not yet running)."""
        with self._cv:
            return len(self._queue)

    def submit(self, prompt_ids, max_new: int, params: dict, deadline: float, on_event: Callable,
               kind: str = "generate") -> Job:
        with self._cv:
            if self.state == "failed":
                raise ServeError(503, "engine_unavailable", self.error or "the engine has failed")
            if self._closing or self.state in ("stopping", "stopped"):
                raise ServeError(503, "shutting_down", "the server is shutting down")
            if len(self._queue) >= self.queue_size:
                raise QueueFull(self.queue_size)
            job = Job(prompt_ids, max_new, params, deadline, on_event, kind)
            self._queue.append(job)
            self._cv.notify_all()
        self._gauge()
        return job

    def _finish(self, job: Job, event) -> None:
        try:
            job.on_event(event)
        finally:
            job.finished.set()

    def _next(self):
        """The next job; "dead" when the worker died while idle; None when closing with nothing left."""
        with self._cv:
            while not self._queue:
                if self._closing:
                    return None
                self._cv.wait(timeout=1.0)
                w = self.worker
                if not self._queue and self.state == "ready" and w is not None and hasattr(w, "alive") and not w.alive():
                    return "dead"
            job = self._queue.popleft()
            self._active = job
        self._gauge()
        return job

    def _loop(self) -> None:
        while True:
            job = self._next()
            if job is None:
                break
            if job == "dead":                          # restart now, so /health shows it before a request fails
                self._restart("the worker died while idle")
                continue
            try:
                if job.cancelled.is_set():
                    self._finish(job, ("error", ServeError(499, "cancelled", "the request was cancelled")))
                    continue
                remaining = job.deadline - time.monotonic()
                if remaining <= 0:
                    self._finish(job, ("error", ServeError(504, "timeout", "the request timed out in the queue")))
                    continue
                if self.state not in ("ready", "stopping") or self.worker is None:
                    self._finish(job, ("error", ServeError(503, "engine_unavailable", self.error or "no engine")))
                    continue
                if job.kind == "score":
                    self._run_score(job)
                else:
                    self._run(job, remaining)
            finally:
                with self._cv:
                    self._active = None
                self._gauge()

    def _run(self, job: Job, remaining: float) -> None:
        job.started = time.monotonic()
        worker = self.worker
        signalled = False
        try:
            for kind, payload in worker.generate(job.prompt_ids, job.max_new, time_limit_s=remaining, **job.params):
                if kind == "token":
                    job.on_event(("token", payload))
                    if job.cancelled.is_set() and not signalled:
                        worker.cancel()
                        signalled = True
                elif kind == "logprob":
                    job.on_event(("logprob", payload))
                else:
                    self._finish(job, ("done", payload))
                    return
        except Exception as e:  # noqa: BLE001
            self._job_failed(job, e)
        finally:
            job.started = None

    def _job_failed(self, job: Job, e: Exception) -> None:
        """A batch-1 job's worker call raised: the worker died (503, restart), or the request failed inside it
        (400 for a UserError, else 500)."""
        if isinstance(e, RuntimeError):
            if "process died" not in str(e) and "closed" not in str(e):
                self._finish(job, ("error", ServeError(500, "engine_error", f"{type(e).__name__}: {e}")))
                return
            self._finish(job, ("error", ServeError(503, "engine_unavailable",
                                                   "the engine worker died during this request; it is being restarted")))
            self._restart(str(e))
            return
        status = 400 if type(e).__name__ == "UserError" else 500
        self._finish(job, ("error", ServeError(status, "invalid_request_error" if status == 400 else "engine_error",
                                               str(e))))

    # ------------------------------------------------------------------------------------------ scoring
    def submit_score(self, prompt_ids, top_k: int, deadline: float, on_event: Callable) -> Job:
        """Queue a scoring job (the prompt's token log-probabilities, for echo + logprobs): it waits in the same
        queue as generations and runs in the engine thread; on_event gets ("done", ScoreResult) or ("error", ...)."""
        return self.submit(prompt_ids, 0, {"top_k": int(top_k)}, deadline, on_event, kind="score")

    def _run_score(self, job: Job) -> None:
        job.started = time.monotonic()
        try:
            self._finish(job, ("done", self.worker.score(job.prompt_ids, job.params["top_k"])))
        except Exception as e:  # noqa: BLE001
            self._job_failed(job, e)
        finally:
            job.started = None

    # ------------------------------------------------------------------------------------------ batched mode
    def _batch_wait(self) -> str | None:
        """Block while there is nothing to do; "dead" when the worker died while idle, "stop" when closing."""
        with self._cv:
            while not self._queue and not self._running:
                if self._closing:
                    return "stop"
                self._cv.wait(timeout=1.0)
                w = self.worker
                if not self._queue and self.state == "ready" and w is not None and hasattr(w, "alive") and not w.alive():
                    return "dead"
        return None

    @staticmethod
    def _solo(job: Job) -> bool:
        """A job the batch cannot carry: prompt scoring, or a generation that wants its tokens' log-probs. It runs
        alone between two batch steps (the running sequences wait for it), through the batch-1 path."""
        return job.kind == "score" or job.params.get("logprobs") is not None

    def _take_admissions(self) -> tuple[list[Job], list, Job | None]:
        """Queued jobs that join the batch now (up to its free places), those that end before they start, and at
        most one solo job (`_solo`) to run before the next step: the queue's order is kept."""
        admit, ended, solo = [], [], None
        now = time.monotonic()
        with self._cv:
            limit = int((self.batch_info or {}).get("max_batch") or self.max_batch)   # the worker's own limit
            while self._queue and len(self._running) + len(admit) < limit:
                job = self._queue[0]
                if job.cancelled.is_set():
                    self._queue.popleft()
                    ended.append((job, ServeError(499, "cancelled", "the request was cancelled")))
                elif job.deadline <= now:
                    self._queue.popleft()
                    ended.append((job, ServeError(504, "timeout", "the request timed out in the queue")))
                elif self._solo(job):
                    if not admit:
                        solo = self._queue.popleft()
                        self._active = solo
                    break
                else:
                    admit.append(self._queue.popleft())
        return admit, ended, solo

    def _run_solo(self, job: Job) -> None:
        worker = self.worker
        try:
            if self.state not in ("ready", "stopping") or worker is None:
                self._finish(job, ("error", ServeError(503, "engine_unavailable", self.error or "no engine")))
            elif job.kind == "score":
                self._run_score(job)
            else:
                self._run(job, job.deadline - time.monotonic())
        finally:
            with self._cv:
                self._active = None
        if self.worker is not worker:          # the worker died under it: the batch it held is gone too
            self._fail_running(ServeError(503, "engine_unavailable",
                                          "the engine worker died during this request; it is being restarted"))

    def _fail_running(self, err: ServeError) -> None:
        with self._cv:
            jobs, self._running = list(self._running.values()), {}
        for job in jobs:
            job.started = None
            self._finish(job, ("error", err))

    def _batch_loop(self) -> None:
        from ..engine.decode import GenerateResult  # noqa: F401  (the worker's results are of this type)

        while True:
            why = self._batch_wait()
            if why == "stop":
                break
            if why == "dead":
                self._restart_batched("the worker died while idle")
                continue
            admit, ended, solo = self._take_admissions()
            self._gauge()
            for job, err in ended:
                self._finish(job, ("error", err))
            if solo is not None:
                self._run_solo(solo)
                self._gauge()
                continue
            if self.state not in ("ready", "stopping") or self.worker is None:
                for job in admit:
                    self._finish(job, ("error", ServeError(503, "engine_unavailable", self.error or "no engine")))
                if self.state == "failed":
                    self._fail_running(ServeError(503, "engine_unavailable", self.error or "the engine has failed"))
                continue
            now = time.monotonic()
            cancel = []
            with self._cv:
                for rid, job in self._running.items():
                    if job.cancelled.is_set():
                        cancel.append((rid, "cancelled"))
                    elif now > job.deadline:
                        cancel.append((rid, "timeout"))
                reqs = []
                for job in admit:
                    job.rid, self._next_rid = self._next_rid, self._next_rid + 1
                    job.started = now
                    self._running[job.rid] = job
                    reqs.append({"id": job.rid, "prompt_ids": job.prompt_ids, "max_new": job.max_new,
                                 "temperature": float(job.params.get("temperature", 0.0)),
                                 "top_p": float(job.params.get("top_p", 1.0)), "seed": job.params.get("seed"),
                                 "stop_ids": tuple(job.params.get("stop_ids", ()))})
            if not reqs and not cancel and not self._running:
                continue
            worker = self.worker
            self._step_started = time.monotonic()
            try:
                out = worker.batch_step(reqs, cancel)
            except RuntimeError as e:
                self._step_started = None
                if "process died" not in str(e) and "closed" not in str(e):
                    self._fail_running(ServeError(500, "engine_error", f"{type(e).__name__}: {e}"))
                    self._reopen(str(e))
                    continue
                self._fail_running(ServeError(503, "engine_unavailable",
                                              "the engine worker died during this request; it is being restarted"))
                self._restart_batched(str(e))
                continue
            except Exception as e:  # noqa: BLE001 - the step itself failed: every sequence in it is lost
                self._step_started = None
                self._fail_running(ServeError(500, "engine_error", f"{type(e).__name__}: {e}"))
                self._reopen(str(e))
                continue
            self._step_started = None
            size = len(out["tokens"])
            self.batch_peak = max(self.batch_peak, size)
            if self.metrics is not None:
                self.metrics.set("batch_size", float(size))
                self.metrics.observe("batch_step_seconds", float(out.get("step_ms", 0.0)) / 1e3)
            for rid, tok in out["tokens"]:
                job = self._running.get(rid)
                if job is not None:
                    job.on_event(("token", tok))
            done = [(rid, ("done", res)) for rid, res in out["finished"]]
            for rid, e in out["errors"]:
                bad = type(e).__name__ == "UserError"
                done.append((rid, ("error", ServeError(400 if bad else 500, "invalid_request_error" if bad else "engine_error",
                                                       str(e)))))
            for rid, event in done:
                with self._cv:
                    job = self._running.pop(rid, None)
                if job is not None:
                    job.started = None
                    self._finish(job, event)
            self._gauge()

    def _reopen(self, why: str) -> None:
        """After a failed step: a fresh batch in the same worker (or a new worker when that fails too)."""
        try:
            self.worker.batch_open(self.max_batch, self.cache_len, self.prefill_budget)
        except Exception:  # noqa: BLE001
            self._restart_batched(why)

    def _restart_batched(self, why: str) -> None:
        self._fail_running(ServeError(503, "engine_unavailable",
                                      "the engine worker died during this request; it is being restarted"))
        self._restart(why)

    def cancel_active(self, job: Job) -> None:
        """Cancel `job`: a queued one is skipped, the running one stops after its current token."""
        job.cancel()
        with self._cv:
            running = self._active is job
        if running and self.worker is not None and job.started is not None and hasattr(self.worker, "cancel"):
            self.worker.cancel()

    def _watch(self) -> None:
        """Kill a worker that runs past a job's deadline by hang_grace_s (a hang, not a slow token):
        the engine thread then sees it die, fails the job with 503 and restarts it."""
        while not (self._closing and self._active is None and not self._queue and not self._running):
            time.sleep(0.5)
            job, worker = self._active, self.worker
            if self.batched and job is None:     # a step in flight while a sequence in it is long past its deadline
                with self._cv:
                    deadlines = [j.deadline for j in self._running.values()]
                if self._step_started is None or not deadlines or worker is None:
                    continue
                if time.monotonic() > min(deadlines) + self.hang_grace_s:
                    proc = getattr(worker, "_proc", None)
                    if proc is not None and proc.poll() is None:
                        proc.kill()
                continue
            if job is None or job.started is None or worker is None:
                continue
            if time.monotonic() > job.deadline + self.hang_grace_s:
                proc = getattr(worker, "_proc", None)
                if proc is not None and proc.poll() is None:
                    proc.kill()

    # ------------------------------------------------------------------------------------------ shutdown
    def close(self, timeout: float | None = None) -> None:
        """Finish the running and queued jobs, then stop the worker."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self.state == "ready":
            self.state = "stopping"
        self._thread.join(timeout)
        if self.worker is not None:
            try:
                self.worker.close()
            except Exception:  # noqa: BLE001
                pass
        if self.state != "failed":
            self.state = "stopped"
        self._gauge()
