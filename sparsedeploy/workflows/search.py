"""`sparsedeploy search`: the configuration to deploy within a budget, from a sweep.

It runs (or resumes) the Table 5 sweep in OUT (the same layout and artifacts as `sparsedeploy sweep`: a
finished sweep with the same settings is only re-read), evaluates the perplexity of the dense model
(OUT/dense/eval.json) and of every pruned RUN (OUT/pXX/eval.json; reused when computed with the same data,
window length, window count and weights), turns every engine × sparsity of the bench into a point
(decode ms/token, perplexity) and picks:
  --ppl-budget B   the fastest point with perplexity <= B × the dense model's (B = 1.10: at most 10% worse);
  --latency-ms X   the lowest-perplexity point that decodes a token in <= X ms.
The Pareto frontier, the choice and the machine go to OUT/search.json; the chosen deployment is left ready to
serve (native: its weights built for this CPU) with the `sparsedeploy serve` line to start it.

llama.cpp (`--engines ...,llamacpp`, where built) is measured as a peer on GGUF exports of the same models:
its points are on the frontier, but only sparsedeploy's own deployments can be chosen (serve runs those); when
a peer would have won, the result says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import ui
from ..bench import frontier as fr
from ..bench.bench import BenchConfig, parse_engines
from ..errors import UserError, check
from ..pipeline.rundir import read_json, write_json
from .sweep import SweepConfig, _tag, sweep

DEFAULT_SPARSITIES = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_ENGINES = "native,deepsparse,onnxruntime"
PEER = "llamacpp"
SEARCH_JSON = "search.json"


def with_dense(sparsities) -> tuple[float, ...]:
    """The sparsities with 0 (the dense model) added: its perplexity is the reference, and it is a candidate."""
    return tuple(sorted(set(float(p) for p in sparsities) | {0.0}))


@dataclass
class SearchConfig:
    model: str = "smollm2-135m"
    ppl_budget: float | None = None      # relative to dense perplexity, >= 1.0
    latency_ms: float | None = None      # decode ms/token, > 0
    engines: str = DEFAULT_ENGINES
    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES
    allocator: str = "dlp"
    method: str = "wanda"
    nsamples: int = 32
    calib_seqlen: int = 256
    export_seqlen: int = 256
    eval_data: str | None = None         # None: wikitext2 when found locally, else held-out Wikipedia (as eval/run)
    eval_seqlen: int = 256
    max_windows: int | None = 64
    data_file: str | None = None
    device: str = "auto"
    cores: int | None = None
    prompt_tokens: int = 64
    new_tokens: int = 128
    rounds: int = 3
    gguf_type: str = "f32"               # llama.cpp peer: which GGUF type of each model it decodes

    def bench_config(self) -> BenchConfig:
        # ort_baseline as `sweep` has it by default, so that a sweep run with the same engines is reused as is
        return BenchConfig(engine=self.engines, cores=self.cores, prompt_tokens=self.prompt_tokens,
                           new_tokens=self.new_tokens, rounds=self.rounds, ort_baseline=True, gguf_type=self.gguf_type)

    def sweep_config(self, prepare_only: bool = False) -> SweepConfig:
        return SweepConfig(model=self.model, sparsities=with_dense(self.sparsities), allocator=self.allocator,
                           method=self.method, nsamples=self.nsamples, calib_seqlen=self.calib_seqlen,
                           export_seqlen=self.export_seqlen, prepare_only=prepare_only, bench=self.bench_config())


@dataclass
class SearchResult:
    budget: dict = field(default_factory=dict)       # {"kind": "ppl"|"latency", "value": B or X, ...}
    dense_ppl: float | None = None
    points: list[dict] = field(default_factory=list)
    frontier: list[dict] = field(default_factory=list)
    choice: dict | None = None
    peer_better: dict | None = None                  # a llama.cpp point that would have beaten the choice
    machine: dict | None = None
    serve: str | None = None                         # the command line that serves the choice
    json: Path | None = None
    error: str | None = None                         # nothing within the budget (then search raises after "measured")


def _ppl(doc: dict) -> float:
    return float(doc["perplexity"])


def eval_path(out: Path, sparsity: float) -> Path:
    """OUT/dense/eval.json for the dense model, OUT/pXX/eval.json (the RUN's own) for a pruned one."""
    return Path(out) / _tag(sparsity) / "eval.json"


def deployment_path(out: Path, sparsity: float) -> Path:
    return Path(out) / _tag(sparsity) / "deployment"


def _evaluate_all(cfg: SearchConfig, out: Path) -> dict[float, dict]:
    """Perplexity of the dense model and of every pruned RUN (each reused when up to date)."""
    from ..pipeline import stages as st

    ecfg = st.EvalConfig(cfg.eval_data, cfg.eval_seqlen, cfg.max_windows, cfg.data_file, cfg.device)
    docs = {}
    for p in with_dense(cfg.sparsities):
        ui.info(f"search: perplexity of the {'dense model' if p == 0 else f'{p:.0%} model'}")
        source = cfg.model if p == 0 else str(Path(out) / _tag(p))
        docs[p] = st.evaluate(source, ecfg, out=eval_path(out, p))
    return docs


def _gguf_ppl(gguf: str, cfg: SearchConfig, out: Path) -> float:
    """Perplexity of a quantized GGUF's (dequantized) weights, scored as every other point is."""
    from ..export.gguf import gguf_perplexity
    from ..pipeline import stages as st

    ecfg = st.EvalConfig(cfg.eval_data, cfg.eval_seqlen, cfg.max_windows, cfg.data_file, cfg.device)
    tag = Path(gguf).parent.parent.name                 # OUT/<tag>/deployment-gguf/model-TYPE.gguf
    source = cfg.model if tag == "dense" else str(Path(out) / tag)
    return _ppl(gguf_perplexity(gguf, source, ecfg))


def build_points(doc: dict, out: Path, sparsities, engines: list[str], *,
                 peer_ppl: Callable[[str], float] | None = None) -> list[dict]:
    """One point per engine × model of the bench document `doc` (rows under doc["engines"]), with the
    perplexity from OUT/<tag>/eval.json of the model the row's deployment holds. Rows of engines not asked for
    (the dense ONNX Runtime baseline bench adds) are left out. A llama.cpp row decoding a quantized GGUF gets
    that GGUF's own perplexity (`peer_ppl(path)`)."""
    ppl_of: dict[str, float] = {}       # resolved deployment path -> its model's perplexity
    for p in with_dense(sparsities):
        f = eval_path(out, p)
        check(f.is_file(), f"{f} is missing", "rerun sparsedeploy search: it evaluates every model of the sweep")
        ppl_of[str(deployment_path(out, p).resolve())] = _ppl(read_json(f))
    points = []
    for engine, rows in doc["engines"].items():
        for r in rows:
            if r.get("requested_engine", engine) not in engines:
                continue
            ppl = ppl_of.get(str(Path(r["deployment"]).resolve()))
            if ppl is None:
                ui.info(f"note: {r['deployment']} ({engine}) is not one of this search's models; left out")
                continue
            kind = "sparsedeploy"
            label = r["label"]
            gguf = r.get("gguf")
            if engine == PEER:
                kind = "llama.cpp peer"
                qtype = (doc.get("settings") or {}).get("gguf_type", "f32")
                label = f"{label} {qtype}"
                if qtype != "f32" and peer_ppl is not None and gguf:
                    ppl = peer_ppl(gguf)
            points.append({"label": label, "engine": engine, "sparsity": float(r["sparsity"]),
                           "ms": float(r["latency_ms"]), "ppl": ppl, "deployment": r["deployment"], "kind": kind,
                           **({"gguf": gguf} if gguf else {})})
    return points


def serve_line(point: dict, cores: int | None) -> str:
    return (f"sparsedeploy serve {point['deployment']} --engine {point['engine']}"
            + (f" --cores {cores}" if cores is not None else ""))


def _ready(point: dict, cores: int | None) -> None:
    """Leave the chosen deployment ready to serve: the native engine's weights built (tuned) for this CPU with
    the same thread count; DeepSparse and ONNX Runtime compile model.onnx when the server starts."""
    if point["engine"] == "native":
        from ..export.native import ensure_native
        from ..export.onnx_kv import read_deployment

        ensure_native(read_deployment(point["deployment"]), cores=cores, keep_fixed=True)


def search(cfg: SearchConfig, out: Path, on_step: Callable[[str, SearchResult], None] | None = None) -> SearchResult:
    """See the module doc. on_step("measured", result) is called once the points and the frontier are known
    (before the choice can fail); the result is also returned."""
    step = on_step or (lambda name, result: None)
    kind, value = fr.check_budget(cfg.ppl_budget, cfg.latency_ms)      # before any work
    engines = parse_engines(cfg.engines)
    check(any(e != PEER for e in engines), f"--engines {cfg.engines} names only the llama.cpp peer",
          "add an engine sparsedeploy serves: native, deepsparse or onnxruntime")
    check(cfg.eval_seqlen >= 8, f"--eval-seqlen {cfg.eval_seqlen} is too short", "use e.g. --eval-seqlen 256")
    check(cfg.max_windows is None or cfg.max_windows >= 1, f"--max-windows {cfg.max_windows} must be at least 1",
          "omit it to use every window")
    cfg.bench_config().validate()
    check(cfg.prompt_tokens + cfg.new_tokens <= cfg.export_seqlen, f"{cfg.prompt_tokens} prompt + {cfg.new_tokens} new "
          f"tokens exceed the deployments' context of {cfg.export_seqlen}",
          "lower --prompt-tokens/--new-tokens or raise --seqlen")
    out = Path(out)
    res = SearchResult(budget={"kind": kind, "value": value})
    # with llama.cpp among the engines (and built), the sweep exports each model's GGUF beside its deployment
    doc = sweep(cfg.sweep_config(), out)
    evals = _evaluate_all(cfg, out)
    res.machine = {k: doc["machine"].get(k) for k in ("cpu", "cores", "isa")}
    res.dense_ppl = _ppl(evals[0.0])
    res.points = build_points(doc, out, cfg.sparsities, engines, peer_ppl=lambda g: _gguf_ppl(g, cfg, out))
    res.frontier = fr.frontier(res.points)
    if kind == "ppl":
        res.budget["max_ppl"] = value * res.dense_ppl
    res.budget["data"] = evals[0.0].get("data")
    own = [p for p in res.points if p["kind"] == "sparsedeploy"]
    budget = {"ppl_budget": value} if kind == "ppl" else {"latency_ms": value}
    try:
        res.choice = fr.pick(own, dense_ppl=res.dense_ppl, **budget)
    except UserError as e:
        res.error = str(e)
    if res.choice is not None and len(own) < len(res.points):
        best = fr.pick(res.points, dense_ppl=res.dense_ppl, **budget)
        if best["kind"] != "sparsedeploy" and (best["ms"], best["ppl"]) != (res.choice["ms"], res.choice["ppl"]):
            res.peer_better = best
    res.json = out / SEARCH_JSON
    step("measured", res)
    if res.choice is not None:
        _ready(res.choice, cfg.cores)
        res.serve = serve_line(res.choice, cfg.cores)
    write_json(res.json, {
        "model": cfg.model, "allocator": cfg.allocator, "method": cfg.method, "sparsities": list(with_dense(cfg.sparsities)),
        "engines": engines, "budget": res.budget, "dense_ppl": res.dense_ppl,
        "eval": {"data": evals[0.0].get("data"), "seqlen": cfg.eval_seqlen, "max_windows": cfg.max_windows},
        "bench": {"prompt_tokens": cfg.prompt_tokens, "new_tokens": cfg.new_tokens, "rounds": cfg.rounds,
                  "cores": cfg.cores},
        "machine": res.machine, "points": res.points, "frontier": res.frontier, "choice": res.choice,
        "peer_better": res.peer_better, "serve": res.serve, "error": res.error})
    if res.error is not None:
        raise UserError(res.error)
    return res
