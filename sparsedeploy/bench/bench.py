"""Compile and benchmark deployments: each engine alone in its own worker process, models interleaved.

A bench takes one or more deployment folders (typically the dense model and pruned copies of it), starts
one worker per (deployment, engine), warms each up, then runs `rounds` rounds in which every worker decodes
the same prompt in turn (the order rotates every round, so drift hits all models alike). Latencies of all
rounds are pooled: median and p90 per token. Per group of workers the non-decoder part of a step
(embedding, final norm, lm_head: the deployment's head.onnx) is timed on the same engine, which splits a
step into decoder-layer time and the rest; a STREAM-like probe gives the memory bandwidth that turns the
bytes a step must read into a lower bound on its time.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import ui
from ..errors import UserError, check
from ..export.onnx_kv import DEPLOY_META, read_deployment
from ..pipeline.rundir import read_json, write_json
from . import report
from ..engine import engine_class, engine_names, unavailable
from ..engine.cpuload import OtherLoad  # noqa: F401  (re-exported)
from ..engine.worker import WorkerRuntime

DENSE_BELOW = 0.005          # a deployment with fewer zeros than this is "Dense"
SETTLE_S = 0.25              # pause before each timed decode: the previous engine's worker threads spin-wait a
                             # little after their last call, which would otherwise steal cores from the next


def label_for(sparsity: float) -> str:
    return "Dense" if sparsity < DENSE_BELOW else f"{round(100 * sparsity)}%"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _check_engine(engine: str) -> str:
    check(engine in engine_names(), f"unknown engine '{engine}'", f"use one of: {', '.join(engine_names())}")
    return engine


def parse_engines(text: str) -> list[str]:
    """'native,deepsparse' -> ['native', 'deepsparse'] (each checked; 'all' = every engine)."""
    names = list(engine_names()) if text.strip() == "all" else [e.strip() for e in text.split(",") if e.strip()]
    check(bool(names), "no engine given", f"use one or more of: {', '.join(engine_names())} (comma-separated)")
    check(len(set(names)) == len(names), f"engine listed twice in '{text}'", "name each engine once")
    for e in names:
        _check_engine(e)
    return names


def _read_deployment(deployment: str | Path) -> dict:
    """read_deployment, with a RUN directory (manifest.json, no sparsedeploy.json) named as what it is."""
    d = Path(deployment)
    if (d / "manifest.json").is_file() and not (d / DEPLOY_META).is_file():
        if (d / "deployment" / DEPLOY_META).is_file():
            raise UserError(f"{d} is a RUN directory, not a deployment", f"pass its deployment: {d / 'deployment'}")
        raise UserError(f"{d} has no deployment yet", f"export it first: sparsedeploy export {d}")
    return read_deployment(d)


def _check_cores(cores: int | None) -> None:
    import os

    n = os.cpu_count() or 1
    check(cores is None or 1 <= cores <= n, f"--cores {cores} is not between 1 and this machine's {n}",
          "omit --cores to use every core")


# ----------------------------------------------------------------------------------------------- compile
def compile_deployment(deployment: str | Path, engine: str = "deepsparse", cores: int | None = None, *,
                       crossover: float | None = None, force: bool = False, weights: str | None = None,
                       head: str | None = None, act_columns: int | None = None, int4_group: int | None = None,
                       int4_scales: str | None = None) -> dict:
    """Compile the deployment for one decode step on `engine` (in a worker, on a copy of model.onnx), check
    that its greedy tokens equal PyTorch's from export time, and record compile time -> compile-<engine>.json.
    The native engine first builds DEPLOYMENT/native/ from the pruned safetensors: each group's format is the
    fastest one measured on this CPU with `cores` threads, unless `crossover` fixes the rule (dense below that
    sparsity, ELL/CSR above); `force`: rebuild. weights (native): the decoder groups' value type, "fp32" or
    "int8" (per-row round-to-nearest at build time); an int8 build's tokens are checked against PyTorch on the
    same fake-quantised weights and activations (export.native.lowbit_reference_tokens), and the index's
    tokens against fp32 PyTorch are reported beside. int4_group / int4_scales: an int4 build's storage
    (pack.check_int4)."""
    from ..export.verify import VerificationError

    _check_engine(engine)
    _check_cores(cores)
    meta = _read_deployment(deployment)
    onnx_path = Path(meta["onnx"])
    check(not meta.get("native_only") or engine == "native", f"{deployment} is a native-only deployment (no ONNX "
          f"graph) and --engine {engine} runs ONNX graphs", "use --engine native")
    before = file_sha256(onnx_path) if onnx_path.is_file() else None
    t0 = time.perf_counter()
    index = None
    if engine == "native":
        from ..export.native import ensure_native

        index = ensure_native(meta, crossover=crossover, force=force, cores=cores, weights=weights, head=head,
                              act_columns=act_columns, int4_group=int4_group, int4_scales=int4_scales)
    else:
        check(weights in (None, "fp32"), f"--weights {weights} is for the native engine only", "add --engine native")
        check(head is None, f"--head {head} is for the native engine only", "add --engine native --weights int8")
        check(act_columns is None, f"--act-columns {act_columns} is for the native engine only",
              "add --engine native --weights int8")
        check(int4_group is None and int4_scales is None, "--int4-group / --int4-scales are for the native engine only",
              "add --engine native --weights int4")
    build_s = time.perf_counter() - t0
    with WorkerRuntime(engine, onnx_path, cores=cores, seq_len=1, cache_len=int(meta["seqlen"])) as w:
        rec = {"requested_engine": engine, "engine": w.name, "fallback_reason": w.fallback_reason,
               "compile_s": round(w.compile_seconds + build_s, 3), "cores": cores, "seqlen": meta["seqlen"]}
        if index is not None:
            rec["native"] = {**(w.engine_info or {}), "crossover": index["crossover"], "build_s": round(build_s, 3),
                             "formats": _format_counts(index), "deepsparse_loaded": w.deepsparse_loaded,
                             "tuning": index.get("tuning"), "measured": measured_summary(index),
                             "weights": index.get("weights") or "fp32", "quantization": index.get("quantization")}
        verified = meta.get("verified") or {}
        if verified.get("tokens"):
            res = w.decode(verified["prompt_ids"], len(verified["tokens"]))
            ref = verified["tokens"]
            tied = None
            if index is not None and (index.get("weights") or "fp32") != "fp32":
                from ..export.native import default_act_columns, lowbit_reference_tokens

                refs = lowbit_reference_tokens(meta, index, verified["prompt_ids"], len(ref), engine_tokens=res.tokens)
                rec["tokens"] = res.tokens
                rec["pytorch_reference"] = (f"{index['weights']} weights as built (see quantization) + int8 activations "
                                            f"per {index.get('act_columns') or default_act_columns()} columns where the engine quantises them")
                rec["tokens_equal_pytorch_fp32"] = res.tokens == ref
                rec["tokens_equal_pytorch_quantized_weights_only"] = res.tokens == refs["weights"]
                ref = refs["weights_and_activations"]
                tied = refs.get("teacher_forced")
            rec["tokens_equal_pytorch"] = res.tokens == ref
            if not rec["tokens_equal_pytorch"] and tied is not None:
                # a low-bit build: the same path as PyTorch up to activation rounding ties (lowbit_reference_tokens)
                rec["tokens_teacher_forced"] = tied
            rec["tokens_match_pytorch"] = rec["tokens_equal_pytorch"] or bool(tied and tied["within_ties"])
            if not rec["tokens_match_pytorch"]:
                why = (f"; on the engine's own prefix its token at step {tied['step']} is "
                       f"{100 * tied['max_gap_share']:.2f}% of the logit range below PyTorch's best") if tied else ""
                raise VerificationError(f"{w.name} greedy tokens {res.tokens} differ from PyTorch's {ref}{why}",
                                        "report it with the deployment; ONNX Runtime's tokens matched at export")
            rec["decode_ms_median"] = res.summary()["decode_ms_median"]
        rec["peak_rss_mb"] = w.peak_rss_mb()
    rec["onnx_unchanged"] = file_sha256(onnx_path) == before if before is not None else None
    check(rec["onnx_unchanged"] is not False, f"{onnx_path} changed during compile", "report it: engines must only see a copy")
    write_json(Path(deployment) / f"compile-{engine}.json", rec)
    return rec


def measured_summary(index: dict) -> list[dict] | None:
    """Per group kind: the chosen formats, the sparsity range, and the summed measured ms of each candidate over
    the layers (None when the formats came from a fixed --crossover)."""
    if not index.get("tuning"):
        return None
    out = []
    for g in index["layers"][0] if index["layers"] else {}:
        rows = [layer[g] for layer in index["layers"]]
        tot: dict[str, float] = {}
        for r in rows:
            for f, ms in (r.get("measured_ms") or {}).items():
                tot[f] = tot.get(f, 0.0) + ms
        chosen: dict[str, int] = {}
        for r in rows:
            chosen[r["format"]] = chosen.get(r["format"], 0) + 1
        sp = [r["sparsity"] for r in rows]
        out.append({"group": g, "shape": rows[0]["shape"], "sparsity": [min(sp), max(sp)], "chosen": chosen,
                    "ms_all_layers": {f: round(v, 3) for f, v in tot.items()}})
    return out


def _format_counts(index: dict) -> dict:
    out: dict[str, int] = {}
    for layer in index["layers"]:
        for g in layer.values():
            out[g["format"]] = out.get(g["format"], 0) + 1
    return out


def available_engines() -> list[str]:
    """The registered engines that can run here (DeepSparse only where it imports) on an ONNX deployment
    (llama.cpp, a measurement peer on a GGUF export, is only benched when named)."""
    return [e for e in engine_names() if unavailable(e) is None and engine_class(e).reads_onnx]


def gguf_for(meta: dict, gguf_type: str = "f32") -> Path | None:
    """The GGUF export of a deployment's model: DEPLOYMENT/model-TYPE.gguf, else the sibling folder
    `sparsedeploy export --format gguf` writes by default (RUN/deployment-gguf/model-TYPE.gguf)."""
    d = Path(meta["dir"])
    for f in (d / f"model-{gguf_type}.gguf", d.parent / "deployment-gguf" / f"model-{gguf_type}.gguf"):
        if f.is_file():
            return f
    return None


def _llamacpp_jobs(deps: list[dict], cfg: "BenchConfig") -> list[str]:
    """cfg's engines, with llama.cpp dropped (one-line notice) where it is not built; each deployment's GGUF
    recorded in meta["gguf"] (a deployment without one: notice, and llama.cpp skips it)."""
    engines = cfg.engines
    if "llamacpp" not in engines:
        return engines
    why = unavailable("llamacpp")
    if why is not None:
        ui.info(f"note: {why}; the other engines go on")
        engines = [e for e in engines if e != "llamacpp"]
        check(bool(engines), f"no engine left to bench: {why}", "build it, or name another engine")
        return engines
    missing = []
    for m in deps:
        f = gguf_for(m, cfg.gguf_type)
        m["gguf"] = str(f) if f is not None else None
        if f is None:
            missing.append(m["dir"])
    if missing:
        ui.info(f"note: llama.cpp decodes {len(deps) - len(missing)} of {len(deps)} models: no model-{cfg.gguf_type}.gguf "
                f"for {', '.join(missing)} — export one: sparsedeploy export RUN --format gguf --type {cfg.gguf_type}")
    return engines


def pick_engine(deployment: str | Path, cores: int | None = None, *, prompt_tokens: int = 16, new_tokens: int = 48,
                rounds: int = 3, busy_above: float = 0.15, disagree_above: float = 0.10) -> tuple[str, str]:
    """The fastest engine on this machine for this deployment, from an interleaved decode probe of every
    available engine (`rounds` rounds, the engines' order rotated each round); returns (engine, one line with
    the probe's numbers). The line says so when the probe cannot be trusted: other processes used more than
    `busy_above` of the CPU meanwhile, or the winner was not the fastest in every round, or its round medians
    spread by more than `disagree_above`."""
    meta = _read_deployment(deployment)
    engines = available_engines()
    if "native" in engines:
        from ..export.native import ensure_native
        try:
            ensure_native(meta, cores=cores, keep_fixed=True)
        except UserError as e:
            ui.info(f"native engine skipped: {e}")
            engines.remove("native")
    prompt = prompt_ids(meta, prompt_tokens)
    S = int(meta["seqlen"])
    n = max(2, min(new_tokens, S - len(prompt)))
    per_round: dict[str, list[float]] = {}
    times: dict[str, list[float]] = {}
    workers = []
    try:
        for e in engines:
            w = WorkerRuntime(e, meta["onnx"], cores=cores, seq_len=1, cache_len=S)
            workers.append(w)
            w.decode(prompt[:4], 2)
        with OtherLoad([w.pid for w in workers]) as load:
            for r in range(rounds):
                for w in workers[r % len(workers):] + workers[:r % len(workers)]:
                    time.sleep(SETTLE_S)
                    ms = w.decode(prompt, n).decode_ms
                    times.setdefault(w.name, []).extend(ms)
                    per_round.setdefault(w.name, []).append(float(np.median(ms)))
    finally:
        for w in workers:
            w.close()
    med = {e: float(np.median(t)) for e, t in times.items()}
    best = min(med, key=med.get)
    others = ", ".join(f"{e} {ms:.1f}" for e, ms in sorted(med.items(), key=lambda kv: kv[1]))
    why = (f"fastest at {meta.get('sparsity', 0):.0%} sparsity on {rounds} interleaved rounds of {n} tokens "
           f"(ms/token: {others})")
    warnings = []
    if load.fraction is not None and load.fraction > busy_above:
        warnings.append(f"other processes used {load.fraction:.0%} of the CPU during the probe")
    lost = [r for r in range(rounds) if min(per_round, key=lambda e: per_round[e][r]) != best]
    spread = (max(per_round[best]) - min(per_round[best])) / min(per_round[best])
    if lost or spread > disagree_above:
        warnings.append(f"the rounds disagree ({best} per round: "
                        + ", ".join(f"{x:.1f}" for x in per_round[best])
                        + (f"; not fastest in round {', '.join(str(r + 1) for r in lost)}" if lost else "") + ")")
    if warnings:
        why += "; UNRELIABLE: " + "; ".join(warnings) + " — rerun on an idle machine or name one with --engine"
    else:
        why += "; name one with --engine"
    return best, why


# ----------------------------------------------------------------------------------------------- bench
@dataclass
class BenchConfig:
    engine: str = "deepsparse"
    cores: int | None = None
    prompt_tokens: int = 64
    new_tokens: int = 128
    rounds: int = 3
    ort_baseline: bool = True          # also time the dense model on ONNX Runtime in the same rounds
    group_size: int | None = None      # pruned models per group (each group adds the dense model); None = all
    bandwidth_mbytes: int = 256
    prefill_chunk: int = 0             # 0: prompt token by token through the decode engine; L > 1: a second
                                       # engine compiled for L-token chunks (ONNX Runtime: one call, any L)
    gguf_type: str = "f32"             # llamacpp: which GGUF export of each deployment it decodes

    @property
    def engines(self) -> list[str]:
        return parse_engines(self.engine)

    def validate(self) -> None:
        self.engines  # noqa: B018 - checks every name
        _check_cores(self.cores)
        check(self.prompt_tokens >= 1, f"--prompt-tokens {self.prompt_tokens} must be at least 1", "use e.g. 64")
        check(self.new_tokens >= 2, f"--new-tokens {self.new_tokens} must be at least 2", "use e.g. 128")
        check(self.prefill_chunk == 0 or 2 <= self.prefill_chunk <= self.prompt_tokens,
              f"--prefill-chunk {self.prefill_chunk} must be 0 or between 2 and --prompt-tokens",
              "use 0 (token by token) or e.g. 16")
        check(self.rounds >= 1, f"--rounds {self.rounds} must be at least 1", "use e.g. 3")
        from ..export.gguf import check_type
        check_type(self.gguf_type)
        check(self.group_size is None or self.group_size >= 1, f"--group-size {self.group_size} must be at least 1",
              "omit it to bench every model together")


def prompt_ids(meta: dict, n: int, seed: int = 0) -> list[int]:
    """`n` token ids of held-out Wikipedia text through the deployment's own tokenizer (random ids when the
    tokenizer or the text is unavailable, e.g. synthetic models: the cost of a step does not depend on them)."""
    ids: list[int] = []
    if not meta.get("synthetic"):
        try:
            from tokenizers import Tokenizer

            from ..pipeline.data import load_text

            text = str(load_text("wikipedia-summaries-heldout"))[:20000]
            ids = Tokenizer.from_file(str(Path(meta["dir"]) / "tokenizer.json")).encode(text, add_special_tokens=False).ids
        except Exception:  # noqa: BLE001 - any failure: fall back to random ids
            ids = []
    if len(ids) < n:
        rng = np.random.default_rng(seed)
        ids = rng.integers(0, int(meta["vocab_size"]), size=n).tolist()
    return [int(t) for t in ids[:n]]


def step_bytes(meta: dict) -> dict:
    """Bytes one decode step reads: decoder linears in a compact encoding, the rest of the weights dense,
    one embedding row, and the KV cache over all S slots (the graph attends to every slot)."""
    weights = meta.get("weights") or {}
    layers_prefix = ("model.layers.", "model.decoder.layers.")
    linears, dense = [], 0
    for name, (zeros, size) in weights.items():
        if name.startswith(layers_prefix):
            linears.append({"numel": int(size), "nnz": int(size - zeros)})
        else:
            dense += int(size) * 4
    dense += int(meta["hidden_size"]) * 4
    kv = 2 * int(meta["num_layers"]) * int(meta["num_kv_heads"]) * int(meta["seqlen"]) * int(meta["head_dim"]) * 4
    return report.step_bytes(linears, dense, kv)


def _group(deps: list[dict], size: int | None) -> list[list[dict]]:
    dense = [d for d in deps if d["sparsity"] < DENSE_BELOW]
    pruned = [d for d in deps if d["sparsity"] >= DENSE_BELOW]
    if size is None or not dense or len(pruned) <= size:
        return [deps]
    return [dense[:1] + pruned[i:i + size] for i in range(0, len(pruned), size)]


def _group_key(group: list[dict], cfg: BenchConfig) -> str:
    parts = [json.dumps(asdict(cfg), sort_keys=True)]
    parts += [f"{d['dir']}:{d.get('export_key')}" for d in group]
    if "native" in cfg.engines:          # re-tuned or rebuilt native weights invalidate a cached group
        for d in group:
            f = Path(d["dir"]) / "native" / "native.json"
            parts.append(hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else "-")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _bench_group(group: list[dict], cfg: BenchConfig, prompt: list[int], engines: list[str] | None = None) -> list[dict]:
    """Workers for every model of the group (+ dense on ONNX Runtime), interleaved rounds -> one row each.
    llama.cpp decodes each deployment's GGUF export (meta["gguf"]; none: skipped)."""
    jobs = [(d, e) for e in (engines or cfg.engines) for d in group if e != "llamacpp" or d.get("gguf")]
    dense = next((d for d in group if d["sparsity"] < DENSE_BELOW), None)
    if cfg.ort_baseline and "onnxruntime" not in cfg.engines and dense is not None:
        jobs.append((dense, "onnxruntime"))
    return time_jobs(jobs, cfg, prompt, dense)


def time_jobs(jobs: list[tuple[dict, str]], cfg: BenchConfig, prompt: list[int], dense: dict | None) -> list[dict]:
    """One worker per (deployment meta, engine) job, each warmed up, then `cfg.rounds` interleaved rounds (order
    rotated per round) -> one row per job. A job's meta may carry "label" (else Dense / NN%), "env" (variables
    for its worker alone, e.g. the native load mode) and, for llama.cpp, "gguf" (the file it decodes). `dense`: the meta whose head.onnx splits a step into layers and the rest."""
    workers: list[WorkerRuntime] = []
    rows: list[dict] = []
    try:
        with ui.progress(f"compile {len(jobs)} engines", len(jobs)) as bar:
            for j, (d, engine) in enumerate(jobs):
                path = d["gguf"] if engine == "llamacpp" else d["onnx"]
                w = WorkerRuntime(engine, path, cores=cfg.cores, seq_len=1, cache_len=int(d["seqlen"]),
                                  prefill_len=cfg.prefill_chunk or None, env=d.get("env"))
                workers.append(w)
                w.decode(prompt[:8], 4)                                   # warm-up
                native = w.engine_info if w.name == "native" else None
                label = d.get("label") or label_for(d["sparsity"])
                vt = (native or {}).get("weights") or "fp32"
                if vt != "fp32" and not label.endswith(vt):       # a low-bit native build says so in every label
                    label = f"{label} {vt}"
                rows.append({"label": label, "sparsity": d["sparsity"], "deployment": d["dir"], "weights": vt,
                             "weight_mb": round(native["weight_bytes"]["total"] / 2**20, 1) if native else None,
                             "native_bytes": native["weight_bytes"] if native else None,
                             "engine": w.name, "requested_engine": engine, "fallback_reason": w.fallback_reason,
                             "compile_s": round(w.compile_seconds, 3), "synthetic": bool(d.get("synthetic")),
                             "gguf": str(path) if engine == "llamacpp" else None,
                             "_decode": [], "_engine": [], "_overhead": [], "_prefill": [], "_tokens": None})
                bar(j + 1)
        head_ms = {}
        if dense is not None and dense.get("head"):
            for w, (d, engine) in zip(workers, jobs):
                if d is dense and w.name not in head_ms and engine_class(engine).reads_onnx:
                    head_ms[w.name] = w.time_head(Path(d["dir"]) / d["head"])["head_ms"]
        total = cfg.rounds * len(workers)
        with ui.progress(f"decode {cfg.new_tokens} tokens × {cfg.rounds} rounds × {len(workers)} models", total) as bar:
            done = 0
            for r in range(cfg.rounds):
                order = list(range(len(workers)))
                order = order[r % len(order):] + order[:r % len(order)]
                for i in order:
                    time.sleep(SETTLE_S)
                    res = workers[i].decode(prompt, cfg.new_tokens)
                    row = rows[i]
                    row["_decode"] += res.decode_ms
                    row["_engine"] += res.engine_ms
                    row["_overhead"] += res.overhead_ms
                    row["_prefill"].append(res.prefill_ms)
                    row["_tokens"] = res.tokens
                    row["prefill"] = res.prefill
                    done += 1
                    bar(done)
        for w, row, (d, _) in zip(workers, rows, jobs):
            row["peak_rss_mb"] = w.peak_rss_mb()
            row["rss_mb"] = w.rss_mb()
            dec = np.asarray(row.pop("_decode"))
            row["latency_ms"] = float(np.median(dec))
            row["latency_p90_ms"] = float(np.percentile(dec, 90))
            row["throughput_tps"] = 1000.0 / row["latency_ms"]
            row["engine_ms"] = float(np.median(row.pop("_engine")))
            row["overhead_ms"] = float(np.median(row.pop("_overhead")))
            row["prefill_ms"] = float(np.median(row.pop("_prefill")))
            row["tokens"] = row.pop("_tokens")
            row["steps_timed"] = int(dec.size)
            if row["engine"] in head_ms:
                row["head_ms"] = head_ms[row["engine"]]
                row["layer_ms"] = (row["latency_ms"] - head_ms[row["engine"]]) / int(d["num_layers"])
            b = step_bytes(d)
            row["step_bytes"] = b
            row["num_layers"] = int(d["num_layers"])
            row["seqlen"] = int(d["seqlen"])
    finally:
        for w in workers:
            w.close()
    return rows


def bench(deployments: list[str | Path], cfg: BenchConfig, *, json_out: Path | None = None,
          cache_dir: Path | None = None, title: str | None = None) -> dict:
    """Benchmark deployments (see module doc). Returns the report document (report.write_reports format)."""
    cfg.validate()
    check(len(deployments) >= 1, "no deployment given", "pass one or more deployment folders")
    deps = []
    for dep in deployments:
        meta = _read_deployment(dep)
        meta.setdefault("sparsity", 0.0)
        S = int(meta["seqlen"])
        check(cfg.prompt_tokens + cfg.new_tokens <= S, f"{cfg.prompt_tokens} prompt + {cfg.new_tokens} new tokens exceed "
              f"{dep}'s cache of {S}", f"lower --prompt-tokens/--new-tokens or re-export with --seqlen {cfg.prompt_tokens + cfg.new_tokens}")
        deps.append(meta)
    sizes = {(m["num_layers"], m["hidden_size"], m["vocab_size"]) for m in deps}
    check(len(sizes) == 1, "the deployments are different models (layers, hidden size or vocabulary differ)",
          "bench pruned copies of one model together")
    engines = _llamacpp_jobs(deps, cfg)
    graphless = [m["dir"] for m in deps if m.get("native_only")]
    check(not graphless or all(e in ("native", "llamacpp") for e in engines),
          f"{graphless[0] if graphless else ''} is a native-only deployment (no ONNX graph) and --engine "
          f"{','.join(e for e in engines if e not in ('native', 'llamacpp'))} runs ONNX graphs",
          "use --engine native (and llamacpp on a GGUF export)")
    if "native" in cfg.engines:
        from ..export.native import ensure_native

        for m in deps:
            ensure_native(m, cores=cfg.cores, keep_fixed=True)
    originals = {m["onnx"]: file_sha256(Path(m["onnx"])) for m in deps if not m.get("native_only")}
    deps.sort(key=lambda m: m["sparsity"])
    prompt = prompt_ids(deps[0], cfg.prompt_tokens)
    ui.info("measuring memory bandwidth…")
    bw = report.measure_bandwidth(threads=cfg.cores, mbytes=cfg.bandwidth_mbytes)
    machine = report.machine_info()
    machine["bandwidth"] = bw
    rows: list[dict] = []
    groups = _group(deps, cfg.group_size)
    for gi, group in enumerate(groups):
        key = _group_key(group, cfg)
        cached = cache_dir / f"group-{gi}.json" if cache_dir is not None else None
        if cached is not None and cached.is_file():
            try:
                doc = read_json(cached)
                if doc.get("key") == key:
                    ui.info(f"bench group {gi + 1}/{len(groups)}: reusing {cached}")
                    rows += [dict(r, group=gi) for r in doc["rows"]]
                    continue
            except UserError:
                pass
        ui.info(f"bench group {gi + 1}/{len(groups)}: {', '.join(label_for(d['sparsity']) for d in group)}")
        grows = _bench_group(group, cfg, prompt, engines)
        if cached is not None:
            write_json(cached, {"key": key, "rows": grows})
        rows += [dict(r, group=gi) for r in grows]
    for m in deps:
        if m.get("native_only"):
            continue
        check(file_sha256(Path(m["onnx"])) == originals[m["onnx"]], f"{m['onnx']} changed during the bench",
              "report it: engines must only see a copy")
    doc = assemble(rows, cfg, machine, title=title, synthetic=any(m.get("synthetic") for m in deps))
    if json_out is not None:
        write_json(Path(json_out), doc)
    return doc


def assemble(rows: list[dict], cfg: BenchConfig, machine: dict, *, title: str | None, synthetic: bool) -> dict:
    """Rows -> the report document: per engine, one row per model (dense pooled over groups), with
    speedups against the dense model of the same group, bounds and token agreement."""
    gbs = machine["bandwidth"]["gbs"]
    engines: dict[str, list[dict]] = {}
    groups = {r["group"] for r in rows}
    dense_ort = [r for r in rows if r["engine"] == "onnxruntime" and r["sparsity"] < DENSE_BELOW]
    for r in rows:
        r = dict(r)
        r["bound_ms"] = report.bound_ms(r["step_bytes"]["total"], gbs)
        same = [x for x in rows if x["engine"] == r["engine"] and x["sparsity"] < DENSE_BELOW and x["group"] == r["group"]]
        if same and len(groups) > 1:   # speedups against the dense model timed in the same rounds
            r["in_group"] = {k: same[0].get(k) for k in ("latency_ms", "engine_ms", "layer_ms")}
        nb = r.get("native_bytes")
        if nb and r.get("layer_ms") is not None:
            # the native engine's own bytes per decoder layer: its stored linears (CSR/ELL with 16-bit indices, or
            # dense) + the key/value rows it attends to (occupied slots only: prompt + half the new tokens on average)
            sb = r["step_bytes"]
            slots = min(1.0, (cfg.prompt_tokens + cfg.new_tokens / 2) / max(1, int(r.get("seqlen") or 0) or 1))
            per_layer = (nb["decoder_linears"] + sb["kv"] * slots) / int(r["num_layers"])
            r["layer_bound_ms"] = report.bound_ms(per_layer, gbs)
            r["layer_of_bound"] = r["layer_ms"] / r["layer_bound_ms"]
        ort = [x for x in dense_ort if x["group"] == r["group"]]
        if ort:
            r["dense_ort_ms"] = ort[0]["latency_ms"]
        engines.setdefault(r["engine"], []).append(r)
    for name, erows in engines.items():   # the dense model measured in several groups: keep one pooled row
        dense = [r for r in erows if r["sparsity"] < DENSE_BELOW]
        if len(dense) > 1:
            keep = dict(dense[0])
            keep.pop("in_group", None)
            for k in ("latency_ms", "latency_p90_ms", "engine_ms", "layer_ms", "overhead_ms", "prefill_ms", "dense_ort_ms"):
                vals = [r[k] for r in dense if r.get(k) is not None]
                if vals:
                    keep[k] = float(np.median(vals))
            keep["throughput_tps"] = 1000.0 / keep["latency_ms"]
            keep["groups"] = [r["group"] for r in dense]
            keep["latency_ms_per_group"] = [r["latency_ms"] for r in dense]
            engines[name] = [keep] + [r for r in erows if r["sparsity"] >= DENSE_BELOW]
    tokens = {}
    for name, erows in engines.items():
        for r in erows:
            # a quantised GGUF (the llama.cpp peer's Q4_0) decodes other weights: its tokens are not compared
            gguf = str(r.get("gguf") or "")
            if r["sparsity"] < DENSE_BELOW and (not gguf or gguf.endswith("-f32.gguf")):
                tokens[name] = r["tokens"]
    agree = None
    if len(tokens) > 1:
        agree = len({tuple(t) for t in tokens.values()}) == 1
    doc = {
        "title": title or f"Decode latency, {cfg.prompt_tokens}-token prompt + {cfg.new_tokens} new tokens",
        "machine": machine, "settings": asdict(cfg), "engines": engines, "synthetic": synthetic,
        "dense_ort_ms": float(np.median([r["latency_ms"] for r in dense_ort])) if dense_ort else None,
        "dense_tokens_agree_across_engines": agree,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "notes": [],
    }
    if len(groups) > 1:
        doc["notes"].append(f"{len(groups)} groups of models, each with the dense model in its rounds: every speedup "
                            "is against the dense model timed in the same group; the Dense column is the median over "
                            "groups (per group: " + ", ".join(f"{x:.1f}" for x in
                                                               next(iter(engines.values()))[0].get("latency_ms_per_group", [])) + " ms).")
    return doc
