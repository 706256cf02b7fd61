"""`sparsedeploy serve`: one deployment behind an OpenAI-style HTTP API (FastAPI + uvicorn).

    POST /v1/completions   {"prompt", "max_tokens", "temperature", "top_p", "stop", "stream", "seed", "echo", "logprobs"}
    POST /v1/chat/completions  {"messages", "max_tokens" | "max_completion_tokens", "temperature", "top_p", "stop",
                           "stream", "seed", "logprobs", "top_logprobs"}: the prompt is the tokenizer's chat
                           template applied to the messages
    GET  /health           200 {"status": "ok", ...} when the engine is ready, else 503 {"status": ...}
    GET  /metrics          Prometheus text: requests by endpoint/status, tokens, latency/TTFT histograms, queue
    GET  /v1/models        the one model served

Requests are decoded by one engine worker process (sparsedeploy.serve.engine): with --max-batch N > 1 by
continuous batching (sparsedeploy.engine.decode.BatchSession: up to N sequences step together, new ones join
at the next step with their prompt fed in chunks; the native engine runs each step as one batched forward,
other engines as sequential batch-1 steps), with --max-batch 1 one at a time through the bench's KV-cache loop
(sparsedeploy.engine.decode.sample_decode); temperature 0 is greedy, otherwise sampling (temperature, top_p,
seed) happens in numpy inside the worker. Protection: body size, prompt and
generation token limits (prompt + max_tokens <= the deployment's seqlen), a bounded queue (full -> 429 at
once), a per-request timeout (504), and every bad request gets a 4xx JSON error, never a 500.

Completions also take a prompt as token ids (`[1, 2, 3]` or `[[1, 2, 3]]`, what lm-eval sends), `echo`
(the prompt text before the completion) and `logprobs` K = 0..5 (OpenAI's legacy object: tokens,
token_logprobs, top_logprobs, text_offset; log-probabilities of the model's own distribution, before
temperature/top_p). With echo the prompt's tokens are scored too (a separate scoring pass through the
engine; the first token has no logprob), and `max_tokens` 0 scores the prompt alone. Streamed, each chunk
carries the logprobs of the tokens whose text it releases (the echoed prompt's with the echo chunk).
Chat completions take `logprobs: true` and `top_logprobs` K = 0..5 (OpenAI's `logprobs.content` list, per
chunk when streamed).
"""
from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError, model_validator

from ..errors import UserError, check
from .engine import EngineService, ServeError
from .metrics import TOKEN_BUCKETS, Metrics

MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_LOGPROBS = 5
MAX_MESSAGES = 256
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/health", "/metrics", "/v1/models")
GENERATION_ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class Settings:
    deployment: str
    engine: str = "deepsparse"
    cores: Optional[int] = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_prompt_tokens: Optional[int] = None     # default: seqlen - 1
    max_new_tokens: Optional[int] = None        # default: seqlen - 1
    queue_size: int = 16                        # requests waiting behind the running one
    timeout_s: float = 60.0                     # per request, queue wait included
    prefill_chunk: int = 0                      # 0: prompt token by token; L: a prefill engine with L tokens per call
    max_body_bytes: int = 1 << 20
    max_restarts: int = 3
    hang_grace_s: float = 10.0                  # a request still running this long past its deadline: kill the worker
    max_batch: int = 8                          # sequences decoded together (continuous batching); 1: one at a time
    batch_prefill: int = 64                     # prompt tokens fed per batched step (chunked prefill)


# ------------------------------------------------------------------------------------------- schema
_Stop = Union[None, Annotated[StrictStr, Field(min_length=1, max_length=MAX_STOP_CHARS)],
              Annotated[list[Annotated[StrictStr, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
                        Field(max_length=MAX_STOP)]]
_TokenIds = Annotated[list[Annotated[int, Field(strict=True, ge=0)]], Field(min_length=1)]


class _Sampling(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share (OpenAI's; others are ignored). Types are
    strict: "5" is not an integer, true is not a number, NaN/Infinity are refused."""
    model_config = ConfigDict(extra="ignore")
    model: Optional[StrictStr] = None
    temperature: Annotated[float, Field(strict=True, ge=0.0, le=2.0, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Field(strict=True, gt=0.0, le=1.0, allow_inf_nan=False)] = 1.0
    stop: _Stop = None
    stream: StrictBool = False
    seed: Optional[Annotated[int, Field(strict=True, ge=0, le=2**63 - 1)]] = None
    n: Annotated[int, Field(strict=True, ge=1, le=1)] = 1


class CompletionRequest(_Sampling):
    """What POST /v1/completions accepts. One prompt per request: a string, token ids, or a list holding one
    of either."""
    prompt: Union[StrictStr, Annotated[list[StrictStr], Field(min_length=1, max_length=1)], _TokenIds,
                  Annotated[list[_TokenIds], Field(min_length=1, max_length=1)]]
    max_tokens: Annotated[int, Field(strict=True, ge=0)] = 16
    echo: StrictBool = False
    logprobs: Optional[Annotated[int, Field(strict=True, ge=0, le=MAX_LOGPROBS)]] = None

    @model_validator(mode="after")
    def _zero_tokens_only_to_score(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 is only accepted with echo=true (scoring the prompt); ask for at least 1")
        return self


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Annotated[StrictStr, Field(min_length=1, max_length=32)]
    content: Union[StrictStr, Annotated[list[_TextPart], Field(max_length=64)], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    """What POST /v1/chat/completions accepts. max_tokens and max_completion_tokens mean the same (the newer
    name wins); without either the reply may run to the server's --max-new-tokens or the end of the context."""
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Optional[Annotated[int, Field(strict=True, ge=1)]] = None
    max_completion_tokens: Optional[Annotated[int, Field(strict=True, ge=1)]] = None
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[Annotated[int, Field(strict=True, ge=0, le=MAX_LOGPROBS)]] = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


def _validation_message(err) -> str:
    parts = []
    for e in err.errors(include_input=False, include_url=False)[:3]:
        loc = list(e.get("loc", ()))     # fields, list indices and union-member tags: drop the tags
        loc = ".".join([str(loc[0])] + [str(x) for x in loc[1:] if isinstance(x, int) or _is_field_name(x)]) if loc else ""
        parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after"}


def _is_field_name(part) -> bool:
    return isinstance(part, str) and part.isidentifier() and part.islower() and part not in _TYPE_TAGS


def parse_request(body: bytes, schema=CompletionRequest) -> CompletionRequest:
    """bytes -> a validated request, or ServeError(400/422)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ServeError(400, "invalid_request_error", "the request body is not valid UTF-8") from None
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise ServeError(400, "invalid_request_error", "the request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise ServeError(422, "invalid_request_error", "the request body must be a JSON object")
    try:
        req = schema.model_validate(doc)
    except ValidationError as e:
        raise ServeError(422, "invalid_request_error", _validation_message(e)) from None
    except (RecursionError, ValueError, TypeError) as e:
        raise ServeError(422, "invalid_request_error", f"invalid request ({type(e).__name__})") from None
    # JSON may escape lone surrogates ("\ud800"): valid JSON, but not text any tokenizer can take
    if isinstance(req, ChatRequest):
        texts = [m.role for m in req.messages] + [m.text() for m in req.messages]
    else:
        texts = [req.prompt] if isinstance(req.prompt, str) else [p for p in req.prompt if isinstance(p, str)]
    texts += [] if req.stop is None else [req.stop] if isinstance(req.stop, str) else list(req.stop)
    for t in texts:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise ServeError(400, "invalid_request_error",
                             "prompt/messages/stop hold invalid Unicode (a lone surrogate)") from None
    return req


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


# ------------------------------------------------------------------------------------------- text
class Tokenizer:
    """The deployment's tokenizer.json through the `tokenizers` library (no torch, no transformers)."""

    def __init__(self, deployment: Path, config: dict):
        from tokenizers import Tokenizer as _Tok

        self.tok = _Tok.from_file(str(deployment / "tokenizer.json"))
        eos = set()
        self.special: dict[str, str] = {}                 # bos_token, eos_token, ... as the chat template sees them
        docs = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            try:
                docs[name] = doc = json.loads((deployment / name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if not isinstance(doc, dict):
                continue
            for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
                v = doc.get(key)
                v = v.get("content") if isinstance(v, dict) else v
                if isinstance(v, str):
                    self.special[key] = v
            t = doc.get("eos_token")
            t = t.get("content") if isinstance(t, dict) else t
            if isinstance(t, str) and self.tok.token_to_id(t) is not None:
                eos.add(int(self.tok.token_to_id(t)))
        self.chat_template = _read_chat_template(deployment, docs.get("tokenizer_config.json"))
        self.vocab_size = int(config.get("vocab_size") or self.tok.get_vocab_size(with_added_tokens=True))
        cfg_eos = config.get("eos_token_id")
        for t in cfg_eos if isinstance(cfg_eos, list) else [cfg_eos]:
            if isinstance(t, int) and 0 <= t < self.tok.get_vocab_size(with_added_tokens=True):
                eos.add(t)
        self.eos_ids = sorted(eos)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def decode_raw(self, ids: list[int]) -> str:
        """Special tokens included: how a prompt given as token ids is echoed."""
        return self.tok.decode(ids, skip_special_tokens=False)

    def token_text(self, token: int) -> str:
        """One token as a logprobs entry: its text, or, for a piece of a UTF-8 character, "bytes:\\xNN..."
        (OpenAI's spelling) so that distinct tokens stay distinct keys of top_logprobs."""
        text = self.decode_raw([token])
        if "\ufffd" not in text:
            return text
        piece = self.tok.id_to_token(int(token)) or text
        table = _byte_level_inverse()
        if all(c in table for c in piece):
            return "bytes:" + "".join(f"\\x{table[c]:02x}" for c in piece)
        return piece

    def token_bytes(self, token: int) -> list[int]:
        """The token's own UTF-8 bytes (byte-level BPE pieces map back to bytes; else its text's encoding)."""
        piece = self.tok.id_to_token(int(token))
        table = _byte_level_inverse()
        if piece and all(c in table for c in piece):
            return [table[c] for c in piece]
        return list(self.decode_raw([token]).encode("utf-8"))


@functools.lru_cache(maxsize=1)
def _byte_level_inverse() -> dict[str, int]:
    """GPT-2 byte-level BPE's printable stand-in character -> the byte it stands for."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _read_chat_template(deployment: Path, config: dict | None) -> str | None:
    """The tokenizer's chat template: chat_template.jinja (transformers 5 writes it there) or the
    "chat_template" entry of tokenizer_config.json (a string, or named templates: "default")."""
    f = deployment / "chat_template.jinja"
    if f.is_file():
        return f.read_text(encoding="utf-8") or None
    t = (config or {}).get("chat_template")
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default")
    return t if isinstance(t, str) and t.strip() else None


class ChatTemplate:
    """A Hugging Face chat template rendered as transformers' apply_chat_template does (sandboxed Jinja,
    trim_blocks + lstrip_blocks, raise_exception / strftime_now / tojson), add_generation_prompt=True."""

    def __init__(self, source: str, special: dict[str, str]):
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        def strftime_now(fmt):
            return time.strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        self.template = env.from_string(source)        # TemplateSyntaxError on a broken template
        self.special = dict(special)

    def render(self, messages: list[dict]) -> str:
        return self.template.render(messages=messages, add_generation_prompt=True, **self.special)


class TextStream:
    """Generated ids -> text pieces safe to send: no half UTF-8 character, nothing that may turn out to be
    the start of a stop string, nothing after a stop string. `sent`: the characters released so far."""

    def __init__(self, tok: Tokenizer, stops: list[str]):
        self.tok, self.stops = tok, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token))
        text = self.tok.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            piece, self.sent = text[self.sent:cut], max(self.sent, cut)
            return piece
        end = len(text.rstrip("\ufffd")) - self.hold
        if end <= self.sent:
            return ""
        piece, self.sent = text[self.sent:end], end
        return piece

    def finish(self) -> str:
        if self.stopped:
            return ""
        text = self.tok.decode(self.ids)
        piece, self.sent = text[self.sent:], len(text)
        return piece


class TokenLogprobs:
    """The generated tokens' [logprob, top] entries (from the engine's "logprob" events), handed out with the
    text they belong to: a token goes out once its text starts inside what `text` has released (at the end,
    every token unless a stop string cut the text: then only those starting before the cut, as unstreamed)."""

    def __init__(self, tok: Tokenizer, text: TextStream):
        self.tok, self.text = tok, text
        self.entries: list = []       # appended by generate() as the events arrive
        self.starts: list[int] = []   # where token i's text starts in the completion
        self.given = 0

    def take(self, final: bool = False) -> list[tuple[int, int, list]]:
        """[(token id, its start in the completion, [logprob, top])] not handed out yet and due now."""
        ids = self.text.ids
        n = min(len(self.entries), len(ids))
        while len(self.starts) < n:
            self.starts.append(len(self.tok.decode(ids[:len(self.starts)])))
        end = n
        if not (final and not self.text.stopped):
            end = self.given
            while end < n and self.starts[end] < self.text.sent:
                end += 1
        out = [(ids[i], self.starts[i], self.entries[i]) for i in range(self.given, end)]
        self.given = max(self.given, end)
        return out


# ------------------------------------------------------------------------------------------- app
def _error(e: ServeError, headers: dict | None = None):
    return JSONResponse({"error": {"message": e.message, "type": e.kind, "code": e.status}}, status_code=e.status,
                        headers=headers)


class _MetricsMiddleware:
    """Counts every HTTP request by endpoint and status and times it to the last body byte."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        state = {"status": 500}
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"

        async def send_wrap(msg):
            if msg["type"] == "http.response.start":
                state["status"] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_wrap)
        finally:
            self.metrics.inc("requests_total", endpoint=endpoint, status=str(state["status"]))
            if endpoint in GENERATION_ENDPOINTS:
                self.metrics.observe("request_duration_seconds", time.perf_counter() - t0, endpoint=endpoint)


def default_worker_factory(settings: Settings, meta: dict):
    from ..engine.worker import WorkerRuntime

    def factory():
        return WorkerRuntime(settings.engine, meta["onnx"], cores=settings.cores, seq_len=1,
                             cache_len=int(meta["seqlen"]), prefill_len=settings.prefill_chunk or None)
    return factory


SERVE_FILES = ("model.onnx", "config.json", "tokenizer.json", "sparsedeploy.json")


def read_deployment_light(path: str | Path) -> dict:
    """export.onnx_kv.read_deployment's checks that serving needs, without importing torch (that module does):
    the HTTP process stays ~300 MB smaller. Returns sparsedeploy.json plus `dir` and `onnx`."""
    from ..engine.graphio import model_io

    d = Path(path)
    if not d.is_dir():
        raise UserError(f"deployment folder {d} does not exist", "write one with `sparsedeploy export`")
    try:      # a native-only deployment (export --format native) has no graph: the native engine serves it
        native_only = bool(json.loads((d / "sparsedeploy.json").read_text(encoding="utf-8")).get("native_only"))
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        native_only = False
    for name in SERVE_FILES[1:] if native_only else SERVE_FILES:
        if not (d / name).is_file() or (d / name).stat().st_size == 0:
            raise UserError(f"deployment {d} is missing {name}", "re-export the deployment")
    docs = {}
    for name in SERVE_FILES[1:]:
        try:
            docs[name] = json.loads((d / name).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"deployment {d}: {name} is not valid JSON ({type(e).__name__})", "re-export the deployment")
    meta = docs["sparsedeploy.json"]
    if not isinstance(meta, dict) or not isinstance(meta.get("seqlen"), int) or meta["seqlen"] < 2:
        raise UserError(f"deployment {d}: sparsedeploy.json lacks a valid 'seqlen'", "re-export the deployment")
    io = model_io(d / "model.onnx")                    # a corrupt graph fails here in one line
    for name in io["data_files"]:
        if not (d / name).is_file():
            raise UserError(f"deployment {d} is missing the weights file {name}", "re-export the deployment")
    meta = {**meta, "dir": str(d), "onnx": str(d / "model.onnx")}
    meta.setdefault("max_positions", io.get("max_positions"))
    return meta


def validate_settings(s: Settings) -> dict:
    """Check the settings and the deployment; returns the deployment's metadata (UserError on bad input)."""
    check(isinstance(s.port, int) and 0 <= s.port <= 65535, f"--port {s.port} is not a TCP port", "use 1-65535 (0: any free port)")
    check(bool(s.host) and not any(c.isspace() for c in s.host), f"--host {s.host!r} is not a host name or address",
          "use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface, e.g. in a container)")
    check(s.queue_size >= 0 and s.queue_size <= 100_000, f"--queue-size {s.queue_size} is out of range", "use e.g. 16")
    check(s.timeout_s > 0 and s.timeout_s <= 86_400, f"--timeout-s {s.timeout_s} is out of range", "use e.g. 60")
    check(s.prefill_chunk >= 0, f"--prefill-chunk {s.prefill_chunk} is negative", "use 0 (token by token) or e.g. 16")
    check(1 <= s.max_batch <= 256, f"--max-batch {s.max_batch} is out of range", "use 1 (one at a time) to e.g. 8")
    check(1 <= s.batch_prefill <= 4096, f"--batch-prefill {s.batch_prefill} is out of range", "use e.g. 64")
    n = os.cpu_count() or 1
    check(s.cores is None or 1 <= s.cores <= n, f"--cores {s.cores} is not between 1 and this machine's {n}",
          "omit --cores to use every core")
    meta = read_deployment_light(s.deployment)
    seqlen = int(meta["seqlen"])
    for name in ("max_prompt_tokens", "max_new_tokens"):
        v = getattr(s, name)
        if v is None:
            setattr(s, name, seqlen - 1)
        else:
            check(1 <= v <= seqlen - 1, f"--{name.replace('_', '-')} {v} is outside [1, {seqlen - 1}]",
                  f"the deployment holds {seqlen} tokens (prompt + generated); re-export with a larger --seqlen for more")
    check(s.prefill_chunk < seqlen, f"--prefill-chunk {s.prefill_chunk} is not below the deployment's seqlen {seqlen}",
          "use a smaller chunk")
    return meta


def create_app(settings: Settings, *, worker_factory=None):
    """The FastAPI app, with its engine worker already compiled (a bad deployment or engine raises here)."""
    meta = validate_settings(settings)
    dep = Path(settings.deployment)
    seqlen = int(meta["seqlen"])
    max_positions = meta.get("max_positions")
    config = json.loads((dep / "config.json").read_text(encoding="utf-8"))
    tok = Tokenizer(dep, config)
    chat, chat_problem = None, None
    if tok.chat_template is None:
        chat_problem = (f"the deployment's tokenizer has no chat template (no chat_template.jinja or tokenizer_config.json "
                        f"\"chat_template\" in {dep}); use /v1/completions with the model's own prompt format, "
                        f"or export an instruct model whose tokenizer carries one")
    else:
        try:
            chat = ChatTemplate(tok.chat_template, tok.special)
        except Exception as e:  # noqa: BLE001 - a broken template must not stop /v1/completions
            chat_problem = f"the deployment's chat template does not compile ({type(e).__name__}: {e}); fix or remove it"
    model_name = Path(str(meta.get("source") or dep.resolve().name)).name
    metrics = Metrics()
    metrics.describe("requests_total", "counter", "HTTP requests by endpoint and status code")
    metrics.describe("request_duration_seconds", "histogram", "(chat) completion request latency, to the last byte")
    metrics.describe("time_to_first_token_seconds", "histogram", "request arrival to the first generated token")
    metrics.describe("generated_tokens_total", "counter", "tokens generated")
    metrics.describe("prompt_tokens_total", "counter", "prompt tokens processed")
    metrics.describe("completion_errors_total", "counter", "completion requests that failed, by kind")
    metrics.describe("queue_depth", "gauge", "requests waiting for the engine")
    metrics.describe("worker_up", "gauge", "1 when the engine worker is ready")
    metrics.describe("worker_restarts_total", "counter", "engine worker restarts after a crash")
    for name in ("generated_tokens_total", "prompt_tokens_total", "worker_restarts_total"):
        metrics.inc(name, 0)
    context_limit = min(seqlen, max_positions + 1) if max_positions else seqlen
    factory = worker_factory or default_worker_factory(settings, meta)
    service = EngineService(factory, queue_size=settings.queue_size, metrics=metrics, max_restarts=settings.max_restarts,
                            hang_grace_s=settings.hang_grace_s, max_batch=settings.max_batch,
                            prefill_budget=settings.batch_prefill, cache_len=seqlen)

    @asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has stopped accepting connections and waited for the in-flight ones; finish what is queued
        await asyncio.get_running_loop().run_in_executor(None, service.close)

    app = FastAPI(title="sparsedeploy", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service, app.state.metrics, app.state.settings, app.state.tokenizer = service, metrics, settings, tok
    app.add_middleware(_MetricsMiddleware, metrics=metrics)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):           # a bug, not bad input: still a JSON answer
        metrics.inc("completion_errors_total", kind="internal")
        return JSONResponse({"error": {"message": f"internal error ({type(exc).__name__})", "type": "internal_error",
                                       "code": 500}}, status_code=500)

    @app.get("/health")
    async def health():
        body = {"status": "ok" if service.state == "ready" else service.state, "engine": service.info["engine"],
                "model": model_name, "seqlen": seqlen, "pending": service.pending(), "restarts": service.restarts,
                "worker_pid": service.worker_pid()}
        if service.error:
            body["error"] = service.error
        return JSONResponse(body, status_code=200 if service.state == "ready" else 503)

    @app.get("/metrics")
    async def metrics_endpoint():
        metrics.set("queue_depth", float(service.queued()))
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "sparsedeploy"}]}

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise ServeError(413, "invalid_request_error", f"the body exceeds {settings.max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise ServeError(413, "invalid_request_error", f"the body exceeds {settings.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def prompt_of(req) -> tuple[list[int], str]:
        """The request's prompt as (token ids, its text)."""
        p = req.prompt
        if isinstance(p, list) and len(p) == 1 and not isinstance(p[0], int):
            p = p[0]                                    # ["text"] or [[ids]]
        if isinstance(p, str):
            return tok.encode(p), p
        bad = next((t for t in p if t >= tok.vocab_size), None)
        if bad is not None:
            raise ServeError(400, "invalid_request_error",
                             f"prompt token id {bad} is outside the model's vocabulary (0..{tok.vocab_size - 1})")
        return list(p), tok.decode_raw(list(p))

    def admit(ids: list[int], max_tokens: int) -> None:
        if not ids:
            raise ServeError(400, "invalid_request_error", "the prompt is empty (no tokens)")
        if len(ids) > settings.max_prompt_tokens:
            raise ServeError(400, "context_length_exceeded",
                             f"the prompt has {len(ids)} tokens; this server accepts at most {settings.max_prompt_tokens}")
        if max_tokens > settings.max_new_tokens:
            raise ServeError(400, "invalid_request_error",
                             f"max_tokens {max_tokens} exceeds this server's limit of {settings.max_new_tokens}")
        if len(ids) + max_tokens > context_limit:
            raise ServeError(400, "context_length_exceeded",
                             f"{len(ids)} prompt tokens + max_tokens {max_tokens} exceed the deployment's "
                             f"{context_limit}-token context; shorten the prompt or lower max_tokens")

    def stops_of(req) -> list[str]:
        return [] if req.stop is None else [req.stop] if isinstance(req.stop, str) else list(req.stop)

    def submit(ids, max_tokens, params, deadline, kind="generate"):
        """Queue a job; returns (job, its event queue)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(ev):
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:          # the loop is gone (server stopped)
                pass

        if kind == "score":
            return service.submit_score(ids, params["top_k"], deadline, on_event), events
        return service.submit(ids, max_tokens, params, deadline, on_event), events

    async def next_event(job, events, deadline):
        try:
            return await asyncio.wait_for(events.get(), timeout=max(deadline - time.monotonic(), 0.001))
        except asyncio.TimeoutError:
            service.cancel_active(job)
            raise ServeError(504, "timeout", f"the request took longer than {settings.timeout_s:g} s") from None

    async def score_prompt(ids, top_k, deadline):
        """The prompt's ScoreResult, through the engine thread (raises ServeError)."""
        job, events = submit(ids, 0, {"top_k": top_k}, deadline, kind="score")
        try:
            ev = await next_event(job, events, deadline)
        finally:
            if not job.finished.is_set():
                service.cancel_active(job)
        if ev[0] == "done":
            return ev[1]
        raise ev[1]

    async def generate(job, events, text: TextStream, deadline, arrived, lps: TokenLogprobs | None = None):
        """Yields ("text", piece) then ("end", finish_reason, GenerateResult); raises ServeError. With `lps`,
        the tokens' logprob entries are collected there as they arrive."""
        n, first = 0, True
        try:
            while True:
                ev = await next_event(job, events, deadline)
                if ev[0] == "logprob":
                    if lps is not None:
                        lps.entries.append(ev[1])
                elif ev[0] == "token":
                    n += 1
                    if first:
                        metrics.observe("time_to_first_token_seconds", time.perf_counter() - arrived)
                        first = False
                    piece = text.add(ev[1])
                    if text.stopped:
                        service.cancel_active(job)
                    if piece:
                        yield ("text", piece)
                elif ev[0] == "done":
                    res = ev[1]
                    reason = "stop" if text.stopped else res.finish_reason
                    if reason == "timeout":
                        raise ServeError(504, "timeout", f"the request took longer than {settings.timeout_s:g} s")
                    if reason == "cancelled":
                        reason = "stop"
                    tail = text.finish()
                    if tail:
                        yield ("text", tail)
                    yield ("end", reason, res)
                    return
                else:
                    raise ev[1]
        finally:
            metrics.inc("generated_tokens_total", n)
            if not job.finished.is_set():
                service.cancel_active(job)      # client gone or error: free the engine

    def offsets(ids: list[int], decode, base: int) -> list[int]:
        """Where each token's text starts in decode(ids), plus base."""
        return [base + len(decode(ids[:i])) for i in range(len(ids))]

    def logprobs_doc(ids, lps, tops, starts) -> dict:
        """OpenAI's legacy completions logprobs object for tokens `ids`."""
        return {"tokens": [tok.token_text(t) for t in ids], "token_logprobs": list(lps),
                "top_logprobs": [None if top is None else {tok.token_text(i): lp for i, lp in top} for top in tops],
                "text_offset": starts}

    def generated_doc(taken, base: int) -> dict:
        """logprobs_doc of TokenLogprobs.take()'s tokens, offsets after `base` characters (the echo)."""
        return logprobs_doc([t for t, _, _ in taken], [e[0] for _, _, e in taken], [e[1] for _, _, e in taken],
                            [base + s for _, s, _ in taken])

    def chat_logprobs(taken) -> dict:
        """OpenAI's chat `logprobs` object ({"content": [...]}) for TokenLogprobs.take()'s tokens."""
        def item(t, lp):
            return {"token": tok.decode_raw([t]), "logprob": lp, "bytes": tok.token_bytes(t)}
        return {"content": [{**item(t, e[0]), "top_logprobs": [item(i, lp) for i, lp in e[1]]} for t, _, e in taken]}

    def usage(n_prompt: int, completion: int) -> dict:
        return {"prompt_tokens": n_prompt, "completion_tokens": completion, "total_tokens": n_prompt + completion}

    def sse_response(gen):
        return StreamingResponse(gen, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def sse_error(e: ServeError) -> str:
        metrics.inc("completion_errors_total", kind=e.kind)
        return f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind, 'code': e.status}})}\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request):
        arrived = time.perf_counter()
        deadline = time.monotonic() + settings.timeout_s
        try:
            req = parse_request(await read_body(request), CompletionRequest)
            ids, prompt_text = prompt_of(req)
            admit(ids, req.max_tokens)
            stops = stops_of(req)
            metrics.inc("prompt_tokens_total", len(ids))
            scored = None
            if req.echo and req.logprobs is not None:
                scored = await score_prompt(ids, req.logprobs, deadline)
            job = events = None
            if req.max_tokens > 0:
                params = {"temperature": float(req.temperature), "top_p": float(req.top_p),
                          "seed": req.seed, "stop_ids": tok.eos_ids}
                if req.logprobs is not None:
                    params["logprobs"] = int(req.logprobs)
                job, events = submit(ids, req.max_tokens, params, deadline)
        except ServeError as e:
            metrics.inc("completion_errors_total", kind=e.kind)
            return _error(e, {"Retry-After": "1"} if e.status in (429, 503) else None)
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        text = TextStream(tok, stops)
        echoed = prompt_text if req.echo else ""
        lps = TokenLogprobs(tok, text) if req.logprobs is not None else None

        async def run():
            if job is None:                         # max_tokens 0 (echo): nothing to generate
                yield ("end", "length", None)
                return
            async for ev in generate(job, events, text, deadline, arrived, lps):
                yield ev

        def chunk(piece: str, reason=None, extra=None, logprobs=None) -> dict:
            doc = {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                   "choices": [{"text": piece, "index": 0, "logprobs": logprobs, "finish_reason": reason}]}
            doc.update(extra or {})
            return doc

        def logprobs_of(prompt: bool, final: bool = False) -> dict | None:
            """The logprobs due now: the echoed prompt's (when `prompt`), then the generated tokens whose text
            has been released (all that are kept when `final`)."""
            if lps is None:
                return None
            doc = generated_doc(lps.take(final), len(echoed))
            if prompt and scored is not None:
                head = logprobs_doc(ids, scored.token_logprobs, scored.top_logprobs, offsets(ids, tok.decode_raw, 0))
                doc = {k: head[k] + doc[k] for k in doc}
            return doc

        if not req.stream:
            parts = []
            try:
                async for ev in run():
                    if ev[0] == "text":
                        parts.append(ev[1])
                    else:
                        _, reason, res = ev
            except ServeError as e:
                metrics.inc("completion_errors_total", kind=e.kind)
                return _error(e)
            count = len(res.tokens) if res is not None else 0
            metrics.observe("completion_tokens", count, buckets=TOKEN_BUCKETS)
            completion = "".join(parts)
            return JSONResponse({**chunk(echoed + completion, reason, logprobs=logprobs_of(True, final=True)),
                                 "usage": usage(len(ids), count)})

        async def sse():
            try:
                if echoed:
                    yield f"data: {json.dumps(chunk(echoed, logprobs=logprobs_of(True)))}\n\n"
                async for ev in run():
                    if ev[0] == "text":
                        yield f"data: {json.dumps(chunk(ev[1], logprobs=logprobs_of(False)))}\n\n"
                    else:
                        _, reason, res = ev
                        count = len(res.tokens) if res is not None else 0
                        metrics.observe("completion_tokens", count, buckets=TOKEN_BUCKETS)
                        last = chunk('', reason, {'usage': usage(len(ids), count)}, logprobs=logprobs_of(False, final=True))
                        yield f"data: {json.dumps(last)}\n\n"
            except ServeError as e:
                yield sse_error(e)
            yield "data: [DONE]\n\n"

        return sse_response(sse())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrived = time.perf_counter()
        deadline = time.monotonic() + settings.timeout_s
        try:
            req = parse_request(await read_body(request), ChatRequest)
            if chat is None:
                raise ServeError(400, "invalid_request_error", chat_problem)
            try:
                prompt = chat.render([{"role": m.role, "content": m.text()} for m in req.messages])
            except Exception as e:  # noqa: BLE001 - the template's own complaint (raise_exception) or a render error
                raise ServeError(400, "invalid_request_error",
                                 f"the chat template refused these messages: {str(e)[:300]}") from None
            ids = tok.encode(prompt)
            asked = req.max_completion_tokens or req.max_tokens
            max_tokens = asked or max(1, min(settings.max_new_tokens, context_limit - len(ids)))
            admit(ids, max_tokens)
            metrics.inc("prompt_tokens_total", len(ids))
            params = {"temperature": float(req.temperature), "top_p": float(req.top_p), "seed": req.seed,
                      "stop_ids": tok.eos_ids}
            if req.logprobs:
                params["logprobs"] = int(req.top_logprobs or 0)
            job, events = submit(ids, max_tokens, params, deadline)
        except ServeError as e:
            metrics.inc("completion_errors_total", kind=e.kind)
            return _error(e, {"Retry-After": "1"} if e.status in (429, 503) else None)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        text = TextStream(tok, stops_of(req))
        lps = TokenLogprobs(tok, text) if req.logprobs else None

        def chat_lp(final: bool = False):
            return chat_logprobs(lps.take(final)) if lps is not None else None

        if not req.stream:
            parts = []
            try:
                async for ev in generate(job, events, text, deadline, arrived, lps):
                    if ev[0] == "text":
                        parts.append(ev[1])
                    else:
                        _, reason, res = ev
            except ServeError as e:
                metrics.inc("completion_errors_total", kind=e.kind)
                return _error(e)
            metrics.observe("completion_tokens", len(res.tokens), buckets=TOKEN_BUCKETS)
            return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                                              "logprobs": chat_lp(final=True), "finish_reason": reason}],
                                 "usage": usage(len(ids), len(res.tokens))})

        def chunk(delta: dict, reason=None, extra=None, logprobs=None) -> str:
            doc = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                   "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}
            doc.update(extra or {})
            return f"data: {json.dumps(doc)}\n\n"

        async def sse():
            yield chunk({"role": "assistant", "content": ""})
            try:
                async for ev in generate(job, events, text, deadline, arrived, lps):
                    if ev[0] == "text":
                        yield chunk({"content": ev[1]}, logprobs=chat_lp())
                    else:
                        _, reason, res = ev
                        metrics.observe("completion_tokens", len(res.tokens), buckets=TOKEN_BUCKETS)
                        yield chunk({}, reason, {"usage": usage(len(ids), len(res.tokens))}, logprobs=chat_lp(final=True))
            except ServeError as e:
                yield sse_error(e)
            yield "data: [DONE]\n\n"

        return sse_response(sse())

    return app


def _check_bind(host: str, port: int) -> None:
    """Fail in one line, before compiling anything, when the address cannot be listened on."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as e:
        raise UserError(f"--host {host} does not resolve ({e})", "use an address such as 127.0.0.1 or 0.0.0.0") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})", "pick another --port or --host") from None


def serve(settings: Settings) -> None:
    """Compile the engine, then serve until SIGTERM/SIGINT (in-flight and queued requests are finished)."""
    import uvicorn

    from .. import ui

    _check_bind(settings.host, settings.port)
    app = create_app(settings)
    svc = app.state.service
    ui.info(f"serving {settings.deployment} ({svc.info['engine']}, compiled in {svc.info['compile_s']:.2f} s) "
            f"on http://{settings.host}:{settings.port}  — POST /v1/completions, POST /v1/chat/completions, GET /health, GET /metrics")
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=int(settings.timeout_s) + 5,
                            limit_concurrency=2 * settings.queue_size + 64, lifespan="on")
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; a SIGTERM (docker stop)
    # that drained every request is a clean exit (status 0), so it lands on a no-op handler.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if svc.state not in ("stopped", "failed"):
            svc.close()
    check(server.started, f"could not listen on {settings.host}:{settings.port} (in use, or not an address here?)",
          "pick another --port or --host")
