"""The one greedy decode loop, for any Runtime (ONNX Runtime, DeepSparse, or a worker running either).

Prefill: when a `prefill` runtime is given, the prompt goes through it in chunks of its L (DeepSparse:
the L it was compiled for; ONNX Runtime: the whole prompt in one call, up to S - 1 tokens); the tokens
left over (fewer than L) and everything after go through the single-token runtime. Without one, the
prompt is fed token by token through the single-token runtime, so one compiled engine is enough. Either
way the last prompt token's logits give the first generated token; `prefill_ms` covers all of that.

The cache lives in arrays allocated once per generation, one [1, Hkv, S-L, D] array per cache input,
and is never shifted or copied whole. The graph attends over (cache slots + fed tokens) with masks that
say which slots hold something, and rotary / learned positions are applied before caching, so the slot
order is irrelevant: each step writes only its L new key/value rows (the last L rows of each `present`
output: all S rows from the ONNX engines, only the L new ones from the native engine) into the free slots, or once the cache is full into the slots holding the oldest positions
(the oldest entry is dropped, as in DeepSparse's own pipeline, without moving the others).
`attention_mask` columns mirror slot occupancy and for L = 1 `causal_mask` is a view of it.

Timing per decode step: `decode_ms` is the whole step (set inputs, engine call, store the new cache
rows, argmax), `engine_ms` the engine call alone, `overhead_ms` their difference (the loop's own cost).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import UserError


@dataclass
class DecodeResult:
    tokens: list[int]                     # the n generated tokens (the prompt is not included)
    prompt_len: int
    engine: str
    prefill: str                          # how the prompt was processed
    prefill_ms: float                     # prompt in -> first generated token out
    decode_ms: list[float] = field(default_factory=list)     # per later token: whole step
    engine_ms: list[float] = field(default_factory=list)     # per later token: engine call only
    overhead_ms: list[float] = field(default_factory=list)   # per later token: decode_ms - engine_ms

    def summary(self) -> dict:
        def med(xs):
            return float(np.median(xs)) if xs else float("nan")

        return {"engine": self.engine, "prompt_len": self.prompt_len, "new_tokens": len(self.tokens),
                "prefill": self.prefill, "prefill_ms": round(self.prefill_ms, 3),
                "decode_ms_median": round(med(self.decode_ms), 3), "engine_ms_median": round(med(self.engine_ms), 3),
                "overhead_ms_median": round(med(self.overhead_ms), 4),
                "overhead_ms_mean": round(float(np.mean(self.overhead_ms)) if self.overhead_ms else float("nan"), 4),
                "tokens_per_s": round(1000.0 / med(self.decode_ms), 2) if self.decode_ms else None}

    def to_dict(self) -> dict:
        return asdict(self)


class KVSlots:
    """Cache state for one compiled shape (L tokens per call, S total): inputs preallocated, updated in place."""

    def __init__(self, runtime, seq_len: int, cache_len: int):
        io = runtime.io
        self.runtime = runtime
        self.L, self.S = int(seq_len), int(cache_len)
        self.P = self.S - self.L
        if self.P < 1:
            raise UserError(f"cache length {self.S} leaves no cache slots for {self.L} tokens per call",
                            "use a longer cache (seqlen) or a shorter prefill chunk")
        shape = (1, io["kv_heads"], self.P, io["head_dim"])
        self.past = {name: np.zeros(shape, dtype=np.float32) for name in io["past_names"]}
        self.pairs = list(zip(io["past_names"], io["present_names"]))
        self.slot_pos = np.full(self.P, -1, dtype=np.int64)          # position held by each slot, -1 = empty
        self.attention_mask = np.zeros((1, self.S), dtype=np.int64)
        self.attention_mask[0, self.P:] = 1
        if self.L == 1:
            self.causal_mask = self.attention_mask.reshape(1, 1, 1, self.S)     # a view: always in sync
        else:
            self.causal_mask = np.zeros((1, 1, self.L, self.S), dtype=np.int64)
            self.causal_mask[0, 0, :, self.P:] = np.tril(np.ones((self.L, self.L), dtype=np.int64))
        self.input_ids = np.zeros((1, self.L), dtype=np.int64)
        self.positions = np.zeros((1, self.L), dtype=np.int64)
        self._arange = np.arange(self.L, dtype=np.int64)
        self.feed = {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                     "positions": self.positions, "causal_mask": self.causal_mask, **self.past}

    def load(self, other: "KVSlots") -> None:
        """Take over another shape's cache (prefill -> decode): one copy per generation."""
        n = min(self.P, other.P)
        keep = np.argsort(other.slot_pos, kind="stable")[other.P - n:] if other.P > n else slice(None)
        for name, _ in self.pairs:
            self.past[name][:, :, :n, :] = other.past[name][:, :, keep, :]
        self.slot_pos[:] = -1
        self.slot_pos[:n] = other.slot_pos[keep]
        self.attention_mask[0, :self.P] = self.slot_pos >= 0

    def step(self, tokens, start: int) -> tuple[np.ndarray, float]:
        """Feed L tokens at positions start.. ; returns (logits [1, L, V], engine seconds)."""
        self.input_ids[0, :] = tokens
        np.add(self._arange, start, out=self.positions[0])
        if self.L > 1:
            self.causal_mask[0, 0, :, :self.P] = self.attention_mask[0, :self.P]
        t0 = time.perf_counter()
        out = self.runtime.run(self.feed)
        engine_s = time.perf_counter() - t0
        self._store(out, start)
        return out["logits"], engine_s

    def _store(self, out: dict, start: int) -> None:
        L, P = self.L, self.P
        if L == 1:
            slot = int(np.argmin(self.slot_pos))                  # an empty slot, else the oldest position
            for past, present in self.pairs:
                self.past[past][:, :, slot, :] = out[present][:, :, -1, :]
            self.slot_pos[slot] = start
            self.attention_mask[0, slot] = 1
            return
        k = min(L, P)                                             # the newest k fed tokens are kept
        slots = np.argsort(self.slot_pos, kind="stable")[:k]
        for past, present in self.pairs:
            self.past[past][:, :, slots, :] = out[present][:, :, -k:, :]
        self.slot_pos[slots] = start + L - k + np.arange(k)
        self.attention_mask[0, slots] = 1


def new_sequence(runtime, cache_len: int):
    """The per-generation state the loop steps through: KVSlots (L = 1) over a graph engine's `run`, or the
    engine's own `sequence` when it keeps its KV cache itself (`stateful`: llama.cpp). Both have
    `step(tokens, start) -> (logits [1, L, V], engine seconds)`."""
    if getattr(runtime, "stateful", False):
        return runtime.sequence(cache_len)
    return KVSlots(runtime, 1, cache_len)


def _argmax_last(logits: np.ndarray) -> int:
    return int(np.argmax(logits[0, -1]))


def _check_request(runtime, prompt_ids, n: int, cache_len: int | None, max_positions: int | None) -> tuple[list[int], int]:
    """The checks every generation makes; returns (prompt as ints, S)."""
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise UserError("the prompt is empty", "give at least one token")
    if n < 1:
        raise UserError(f"n={n} new tokens", "ask for at least one")
    S = int(cache_len or runtime.cache_len or 0)
    if S < 2:
        raise UserError("no cache length (S) for decoding", "pass cache_len or build the runtime with cache_len")
    if not runtime.dynamic and runtime.seq_len != 1:
        raise UserError(f"the decode runtime feeds {runtime.seq_len} tokens per call", "use one compiled with seq_len=1")
    if max_positions is None:
        max_positions = runtime.io.get("max_positions")       # recorded in the graph by export_onnx
    if max_positions is not None and len(prompt) + n - 1 > max_positions:
        raise UserError(f"{len(prompt)} prompt + {n} new tokens exceed the model's {max_positions} positions",
                        "shorten the prompt or generate fewer tokens")
    return prompt, S


def _feed(seq, multi, ids: list[int], S: int, L: int):
    """Feed `ids` from position 0: chunks of L tokens through the runtime `multi` while whole chunks fit (a
    shape of L tokens has S - L cache slots, so a chunk goes that way only if its tokens all fit there: more
    would push the oldest tokens out), then the rest one token per call through `seq`, which takes over the
    chunks' cache. Yields (logits, start, count) per call; the caller must exhaust it."""
    pos = 0
    if multi is not None and L > 1 and len(ids) >= L and isinstance(seq, KVSlots):
        slots = KVSlots(multi, L, S)
        while len(ids) - pos >= L and pos + L <= S - L:
            logits, _ = slots.step(ids[pos:pos + L], pos)
            yield logits, pos, L
            pos += L
        if pos:
            seq.load(slots)
    while pos < len(ids):
        logits, _ = seq.step(ids[pos:pos + 1], pos)
        yield logits, pos, 1
        pos += 1


def _prefill(dec: KVSlots, prefill, prompt: list[int], S: int) -> tuple[int, np.ndarray, str]:
    """Feed the prompt: chunks through `prefill` while they fit, the rest token by token through `dec`
    (see _feed). Returns (next position, last logits, how it was fed)."""
    if prefill is not None and not isinstance(dec, KVSlots):       # a stateful engine: the prompt in one call
        logits, _ = dec.step(prompt, 0)
        return len(prompt), logits, f"1 chunk of {len(prompt)}"
    L = 1
    if prefill is not None:
        if getattr(prefill, "dynamic", False):
            L = min(len(prompt), S - len(prompt)) if len(prompt) < S else 0
        else:
            L = int(prefill.seq_len or 1)
    logits, chunked = None, 0
    for logits, start, count in _feed(dec, prefill, prompt, S, L):
        chunked += count if count > 1 else 0
    mode = "token by token"
    if chunked:
        mode = f"{chunked // L} chunk(s) of {L}" + (f" + {len(prompt) - chunked} single" if chunked < len(prompt) else "")
    return len(prompt), logits, mode


def window_nll(runtime, ids, cache_len: int | None = None) -> tuple[float, int]:
    """Teacher-forced negative log-likelihood of a token window through the engine, one token per step (the
    decode path itself): the sum over t of -log softmax(logits_t)[ids[t + 1]], and the number of terms. With
    perplexity = exp(sum / count) this scores a window exactly as PyTorch's evaluation does."""
    ids = [int(t) for t in ids]
    S = int(cache_len or runtime.cache_len or 0)
    if len(ids) < 2 or len(ids) > S:
        raise UserError(f"a window of {len(ids)} tokens does not fit a cache of {S}", "use windows of 2..S tokens")
    seq = new_sequence(runtime, S)
    total = 0.0
    for t in range(len(ids) - 1):
        logits, _ = seq.step(ids[t:t + 1], t)
        z = logits[0, -1].astype(np.float64)
        m = float(z.max())
        total += m + float(np.log(np.exp(z - m).sum())) - float(z[ids[t + 1]])
    return total, len(ids) - 1


def greedy_decode(runtime, prompt_ids, n: int, *, prefill=None, cache_len: int | None = None,
                  max_positions: int | None = None) -> DecodeResult:
    """Greedy-generate `n` tokens after `prompt_ids` with `runtime` (L = 1).

    prefill: a runtime with L > 1 (or ONNX Runtime, any L) for the prompt; None = token by token.
    cache_len: S; defaults to runtime.cache_len.
    max_positions: the model's position limit (OPT's learned positions and the rope table end there);
        default: the limit export_onnx recorded in the graph. Exceeding it raises UserError.
    """
    prompt, S = _check_request(runtime, prompt_ids, n, cache_len, max_positions)
    dec = new_sequence(runtime, S)
    t0 = time.perf_counter()
    pos, logits, mode = _prefill(dec, prefill, prompt, S)
    token = _argmax_last(logits)
    prefill_ms = (time.perf_counter() - t0) * 1e3

    result = DecodeResult(tokens=[token], prompt_len=len(prompt), engine=runtime.name, prefill=mode,
                          prefill_ms=prefill_ms)
    tokens, decode_ms, engine_ms, overhead_ms = result.tokens, result.decode_ms, result.engine_ms, result.overhead_ms
    clock = time.perf_counter
    for _ in range(n - 1):
        t_start = clock()
        logits, engine_s = dec.step((token,), pos)
        token = int(np.argmax(logits[0, -1]))
        step_s = clock() - t_start
        pos += 1
        tokens.append(token)
        decode_ms.append(step_s * 1e3)
        engine_ms.append(engine_s * 1e3)
        overhead_ms.append((step_s - engine_s) * 1e3)
    return result


# --------------------------------------------------------------------------------- sampling (serving)
@dataclass
class GenerateResult:
    tokens: list[int]                     # generated tokens (the stop token, if one ended it, included)
    prompt_len: int
    engine: str
    finish_reason: str                    # "length" | "stop" (a stop token) | "cancelled" | "timeout"
    prefill_ms: float
    decode_ms: list[float] = field(default_factory=list)
    # with sample_decode(logprobs=K): per generated token [its log-probability, [[id, logprob] x K, most likely
    # first]] under the model's own distribution (log-softmax of the raw logits, before temperature / top_p)
    logprobs: list | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def log_softmax_rows(logits) -> np.ndarray:
    """[..., V] logits -> float64 log-probabilities (max-shifted, so exp never overflows)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def top_logprobs(lp_row: np.ndarray, k: int) -> list[list]:
    """The k most likely [id, logprob] of one log-probability row, most likely first (ties: lower id first)."""
    if k <= 0:
        return []
    k = min(int(k), lp_row.size)
    idx = np.argpartition(-lp_row, k - 1)[:k]
    idx = idx[np.lexsort((idx, -lp_row[idx]))]
    return [[int(i), float(lp_row[i])] for i in idx]


@dataclass
class ScoreResult:
    """Teacher-forced log-probabilities of a token sequence: entry t is log p(ids[t] | ids[:t]) and the
    top-k alternatives at t; entry 0 (no context) is None in both."""
    token_logprobs: list
    top_logprobs: list
    engine: str
    score_ms: float

    def to_dict(self) -> dict:
        return asdict(self)


def score_tokens(runtime, ids, top_k: int = 0, *, prefill=None, cache_len: int | None = None,
                 max_positions: int | None = None, chunk: int = 64) -> ScoreResult:
    """log p(ids[t] | ids[:t]) for every t >= 1 through the engine, plus the top_k most likely tokens at each
    position: one forward over ids[:-1], in chunks of up to `chunk` tokens where the engine takes several
    tokens per call (`prefill`, or the decode runtime itself when its shapes are dynamic), else token by token.
    Only these numbers leave the function (not the [n, V] logits)."""
    t0 = time.perf_counter()
    ids = [int(t) for t in ids]
    S = int(cache_len or runtime.cache_len or 0)
    if not ids:
        raise UserError("the prompt is empty", "give at least one token")
    if len(ids) > S:
        raise UserError(f"{len(ids)} tokens do not fit the cache of {S}", "score a shorter text")
    if max_positions is None:
        max_positions = runtime.io.get("max_positions") if getattr(runtime, "io", None) else None
    if max_positions is not None and len(ids) - 1 > max_positions:
        raise UserError(f"{len(ids)} tokens exceed the model's {max_positions} positions", "score a shorter text")
    out_lp: list = [None]
    out_top: list = [None]

    def take(rows: np.ndarray, start: int) -> None:       # rows[j] follows ids[start + j] and predicts ids[start + j + 1]
        lp = log_softmax_rows(rows)
        for j in range(lp.shape[0]):
            out_lp.append(float(lp[j, ids[start + j + 1]]))
            out_top.append(top_logprobs(lp[j], top_k))

    n = len(ids) - 1                                        # tokens to feed
    if n:
        multi = prefill if prefill is not None else (runtime if getattr(runtime, "dynamic", False) else None)
        L = 1
        if multi is not None:
            L = min(int(chunk), n, S // 2) if getattr(multi, "dynamic", False) else int(multi.seq_len or 1)
        for logits, start, count in _feed(new_sequence(runtime, S), multi, ids[:n], S, L):
            take(logits[0, -count:], start)
    return ScoreResult(token_logprobs=out_lp, top_logprobs=out_top, engine=runtime.name,
                       score_ms=(time.perf_counter() - t0) * 1e3)


def sample_token(logits, temperature: float = 0.0, top_p: float = 1.0, rng=None) -> int:
    """One token from a logits row, in numpy: argmax when temperature == 0, else softmax(logits / T)
    restricted to the smallest set of most likely tokens whose probability reaches top_p (nucleus)."""
    row = np.asarray(logits, dtype=np.float64).reshape(-1)
    if temperature <= 0.0:
        return int(np.argmax(row))
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p={top_p} is outside (0, 1]", "pass a probability mass such as 0.9")
    z = row / float(temperature)
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    rng = rng if rng is not None else np.random.default_rng()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = int(np.searchsorted(cum, top_p, side="left")) + 1   # first prefix whose mass reaches top_p
        idx = order[:min(keep, order.size)]
        q = p[idx] / p[idx].sum()
        return int(idx[int(rng.choice(idx.size, p=q))])
    return int(rng.choice(p.size, p=p))


def sample_decode(runtime, prompt_ids, n: int, *, prefill=None, cache_len: int | None = None,
                  max_positions: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int | None = None, stop_ids=(), on_token=None, should_stop=None,
                  time_limit_s: float | None = None, logprobs: int | None = None, on_logprob=None) -> GenerateResult:
    """Generate up to `n` tokens after `prompt_ids`: the same KVSlots loop as greedy_decode, with sampling
    (`sample_token`; temperature 0 = greedy, the same tokens as greedy_decode) and early ends.

    on_token(token): called as soon as each token is chosen (the server streams it).
    stop_ids: tokens that end the generation (e.g. EOS; included in `tokens`): finish_reason "stop".
    should_stop(): polled after every token; True ends it with finish_reason "cancelled".
    time_limit_s: wall time from the call; past it the generation ends with finish_reason "timeout".
    logprobs: K (>= 0) fills `result.logprobs` with each token's log-probability and the K most likely tokens.
    on_logprob(entry): with logprobs, called with each token's entry just before on_token(token) (streaming).
    """
    t_begin = time.perf_counter()
    prompt, S = _check_request(runtime, prompt_ids, n, cache_len, max_positions)
    rng = np.random.default_rng(seed)
    stops = {int(t) for t in stop_ids}
    dec = new_sequence(runtime, S)
    pos, logits, _ = _prefill(dec, prefill, prompt, S)
    token = sample_token(logits[0, -1], temperature, top_p, rng)
    result = GenerateResult(tokens=[token], prompt_len=len(prompt), engine=runtime.name, finish_reason="length",
                            prefill_ms=(time.perf_counter() - t_begin) * 1e3)
    if logprobs is not None:
        result.logprobs = []

        def record(row, tok):
            lp = log_softmax_rows(row)
            result.logprobs.append([float(lp[tok]), top_logprobs(lp, logprobs)])
        record(logits[0, -1], token)
    while True:
        if on_logprob is not None and result.logprobs is not None:
            on_logprob(result.logprobs[-1])
        if on_token is not None:
            on_token(token)
        if token in stops:
            result.finish_reason = "stop"
            break
        if len(result.tokens) >= n:
            break
        if should_stop is not None and should_stop():
            result.finish_reason = "cancelled"
            break
        if time_limit_s is not None and time.perf_counter() - t_begin > time_limit_s:
            result.finish_reason = "timeout"
            break
        t0 = time.perf_counter()
        logits, _ = dec.step((token,), pos)
        token = sample_token(logits[0, -1], temperature, top_p, rng)
        if logprobs is not None:
            record(logits[0, -1], token)
        pos += 1
        result.tokens.append(token)
        result.decode_ms.append((time.perf_counter() - t0) * 1e3)
    return result


# --------------------------------------------------------------------------------- batched steps (serving)
@dataclass
class BatchRequest:
    """One request admitted into a BatchSession (sampling as sample_decode: temperature 0 = greedy; the
    per-request RNG is numpy's default_rng(seed), drawn once per token as in batch 1)."""
    id: int
    prompt_ids: list
    max_new: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: tuple = ()


class _Seq:
    __slots__ = ("req", "prompt", "rng", "stops", "slot", "dec", "fed", "tokens", "t_begin", "prefill_ms",
                 "decode_ms", "t_last")

    def __init__(self, req: BatchRequest, prompt: list[int]):
        self.req, self.prompt = req, prompt
        self.rng = np.random.default_rng(req.seed)
        self.stops = {int(t) for t in req.stop_ids}
        self.slot, self.dec, self.fed = -1, None, 0
        self.tokens: list[int] = []
        self.t_begin = time.perf_counter()
        self.prefill_ms, self.decode_ms, self.t_last = 0.0, [], 0.0


class BatchSession:
    """Continuous batching over one runtime: `step(admit, cancel)` admits new requests, drops cancelled ones,
    advances every running sequence by one token and returns what each produced.

    Batched (a runtime with `open_batch`/`forward_rows`: the native engine): one forward per step over all
    rows — one decode row per running sequence plus prompt tokens of admitted requests up to `prefill_budget`
    rows in all (but at least half the budget of prompt tokens: chunked prefill, in admission order, so a long
    prompt does not stall the running batch); each linear group
    reads its weights once per step for every row. The KV cache of `max_batch` sequences x `cache_len` positions
    is allocated once, when the session opens; a request must fit: prompt + max_new <= cache_len.
    Emulated (every other engine): the same API as sequential batch-1 steps, each sequence with its own
    KVSlots cache; a request's whole prompt is fed in the step that admits it. An engine that keeps its one KV
    cache itself (`stateful`: llama.cpp) runs one sequence at a time (max_batch becomes 1).
    Sampling happens here with each request's own RNG, so seeded sampling gives the tokens batch 1 gives.
    """

    def __init__(self, runtime, max_batch: int, cache_len: int | None = None, *, prefill=None,
                 prefill_budget: int = 64, max_positions: int | None = None):
        self.runtime, self.prefill = runtime, prefill
        self.max_batch = int(max_batch)
        if getattr(runtime, "stateful", False):      # llama.cpp: one KV cache in the engine, one sequence at a time
            self.max_batch = min(self.max_batch, 1)
        self.S = int(cache_len or runtime.cache_len or 0)
        if self.max_batch < 1:
            raise UserError(f"max_batch={max_batch}", "use at least 1")
        if self.S < 2:
            raise UserError("no cache length (S) for decoding", "pass cache_len or build the runtime with cache_len")
        self.prefill_budget = max(1, int(prefill_budget))
        self.max_positions = max_positions if max_positions is not None else runtime.io.get("max_positions")
        self.batched = hasattr(runtime, "open_batch")
        self.state = runtime.open_batch(self.max_batch, self.S, self.max_batch + self.prefill_budget) if self.batched else None
        self.seqs: dict[int, _Seq] = {}                     # admission order (dicts keep it)
        self.free = list(range(self.max_batch))[::-1]
        R = self.max_batch + self.prefill_budget
        self._ids, self._slots, self._pos = (np.zeros(R, np.int64) for _ in range(3))
        self._want = np.zeros(R, np.int64)

    def running(self) -> int:
        return len(self.seqs)

    def _finish(self, seq: _Seq, reason: str) -> GenerateResult:
        self.seqs.pop(seq.req.id, None)
        if seq.slot >= 0:
            self.free.append(seq.slot)
        seq.dec = None
        return GenerateResult(tokens=list(seq.tokens), prompt_len=len(seq.prompt), engine=self.runtime.name,
                              finish_reason=reason, prefill_ms=seq.prefill_ms, decode_ms=list(seq.decode_ms))

    def _admit(self, req: BatchRequest) -> _Seq:
        if req.id in self.seqs:
            raise UserError(f"request id {req.id} is already running", "use a new id")
        if len(self.seqs) >= self.max_batch:
            raise UserError(f"the batch is full ({self.max_batch} sequences)", "admit it after one finishes")
        prompt, _ = _check_request(self.runtime, req.prompt_ids, int(req.max_new), self.S, self.max_positions)
        if len(prompt) + int(req.max_new) > self.S:
            raise UserError(f"{len(prompt)} prompt + {req.max_new} new tokens exceed the {self.S}-token cache",
                            "shorten the prompt or generate fewer tokens")
        if req.temperature > 0 and not 0.0 < req.top_p <= 1.0:
            raise UserError(f"top_p={req.top_p} is outside (0, 1]", "pass a probability mass such as 0.9")
        seq = _Seq(req, prompt)
        if self.batched:
            seq.slot = self.free.pop()
        else:
            seq.dec = new_sequence(self.runtime, self.S)
        self.seqs[req.id] = seq
        return seq

    def _emit(self, seq: _Seq, logits_row, now: float, out: dict) -> None:
        """Sample seq's next token from its logits row; record it and whether that ends the sequence."""
        tok = sample_token(logits_row, seq.req.temperature, seq.req.top_p, seq.rng)
        if not seq.tokens:
            seq.prefill_ms = (now - seq.t_begin) * 1e3
        else:
            seq.decode_ms.append((now - seq.t_last) * 1e3)
        seq.t_last = now
        seq.tokens.append(tok)
        out["tokens"].append((seq.req.id, tok))
        if tok in seq.stops:
            out["finished"].append((seq.req.id, self._finish(seq, "stop")))
        elif len(seq.tokens) >= seq.req.max_new:
            out["finished"].append((seq.req.id, self._finish(seq, "length")))

    def step(self, admit=(), cancel=()) -> dict:
        """admit: BatchRequest (or dicts of its fields); cancel: ids, or (id, reason) pairs (default reason
        "cancelled"). Returns {"tokens": [(id, token)], "finished": [(id, GenerateResult)], "errors": [(id, exc)],
        "rows", "running", "step_ms"}: a finished sequence's last token is in "tokens" of the same step."""
        t0 = time.perf_counter()
        out: dict = {"tokens": [], "finished": [], "errors": []}
        for c in cancel:
            rid, reason = (c if isinstance(c, (tuple, list)) else (c, "cancelled"))
            seq = self.seqs.get(rid)
            if seq is not None:
                out["finished"].append((rid, self._finish(seq, reason)))
        for req in admit:
            req = req if isinstance(req, BatchRequest) else BatchRequest(**req)
            try:
                self._admit(req)
            except Exception as e:  # noqa: BLE001 - this request's error, not the batch's
                out["errors"].append((req.id, e))
        rows = self._step_batched(out) if self.batched else self._step_emulated(out)
        out.update(rows=rows, running=len(self.seqs), step_ms=(time.perf_counter() - t0) * 1e3)
        return out

    def _step_batched(self, out: dict) -> int:
        ids, slots, pos, want = self._ids, self._slots, self._pos, self._want
        R, n, owners = 0, 0, []
        for seq in self.seqs.values():                       # decode rows: one per sequence past its prompt
            if seq.fed == len(seq.prompt):
                ids[R], slots[R], pos[R] = seq.tokens[-1], seq.slot, len(seq.prompt) + len(seq.tokens) - 1
                want[n] = R
                owners.append(seq)
                R += 1
                n += 1
        # prompt rows, decode rows included in the budget down to half of it: a step's rows stay within one
        # prompt-chunk product (64 rows: 64 lanes of the panel GEMM, where 64 + 7 would take 80)
        budget = max(self.prefill_budget - R, (self.prefill_budget + 1) // 2)
        for seq in self.seqs.values():                       # prompt chunks, in admission order
            if budget == 0:
                break
            left = len(seq.prompt) - seq.fed
            if left == 0:
                continue
            k = min(left, budget)
            ids[R:R + k] = seq.prompt[seq.fed:seq.fed + k]
            slots[R:R + k] = seq.slot
            pos[R:R + k] = np.arange(seq.fed, seq.fed + k)
            seq.fed += k
            budget -= k
            R += k
            if seq.fed == len(seq.prompt):                   # its last prompt token gives the first new token
                want[n] = R - 1
                owners.append(seq)
                n += 1
        if R == 0:
            return 0
        logits = self.runtime.forward_rows(self.state, ids[:R], slots[:R], pos[:R], want[:n])
        now = time.perf_counter()
        for j, seq in enumerate(owners):
            self._emit(seq, logits[j], now, out)
        return R

    def _step_emulated(self, out: dict) -> int:
        R = 0
        for seq in list(self.seqs.values()):
            if seq.fed < len(seq.prompt):
                _, logits, _ = _prefill(seq.dec, self.prefill, seq.prompt, self.S)
                seq.fed = len(seq.prompt)
                R += len(seq.prompt)
            else:
                logits, _ = seq.dec.step((seq.tokens[-1],), len(seq.prompt) + len(seq.tokens) - 1)
                R += 1
            self._emit(seq, logits[0, -1], time.perf_counter(), out)
        return R
