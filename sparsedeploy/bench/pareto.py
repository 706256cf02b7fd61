"""Perplexity against decode latency on this CPU: sparsedeploy's deployments beside the peer a user would pick
instead, llama.cpp decoding dense GGUF files (f32/f16/Q8_0/Q4_0/Q4_1) — timed in the same interleaved rounds.

A job is (meta, engine): a deployment's meta (engine native / deepsparse / onnxruntime) or, for llama.cpp, the
dense deployment's meta with "gguf" (the file) and "label" set; a meta with "engines" runs on those only. Jobs are timed in groups so that every worker
of a group fits in memory; the `anchors` (by default llama.cpp on dense Q4_0 and Q8_0) run in every group, and
each row is also given as a ratio to the anchors timed in its own group. A point's perplexity comes from the
caller (the same text and windows for every point). `frontier` keeps the points no other point beats on both
latency and perplexity (bench/frontier.py).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import ui
from ..errors import check
from . import report
from .frontier import frontier
from .bench import BenchConfig, DENSE_BELOW, prompt_ids, step_bytes, time_jobs


@dataclass
class ParetoConfig:
    bench: BenchConfig = field(default_factory=lambda: BenchConfig(engine="native", ort_baseline=False))
    group_size: int = 2                  # sparsedeploy deployments per group (each brings one job per engine)
    anchors: tuple[str, ...] = ("Dense Q4_0 (llama.cpp)", "Dense Q8_0 (llama.cpp)")


def _groups(deps: list[dict], size: int) -> list[list[dict]]:
    deps = sorted(deps, key=lambda d: d["sparsity"])
    return [deps[i:i + size] for i in range(0, len(deps), size)] or [[]]


def measure(deps: list[dict], ggufs: list[dict], cfg: ParetoConfig) -> dict:
    """Time every deployment on every engine of cfg.bench and every llama.cpp GGUF job, in groups (see module
    doc). `ggufs`: metas with "gguf" and "label". Returns {"rows", "machine", "settings"}."""
    engines = cfg.bench.engines
    check(bool(deps) or bool(ggufs), "nothing to time", "give deployments or GGUF files")
    dense = next((d for d in deps if d["sparsity"] < DENSE_BELOW), None)
    prompt = prompt_ids(deps[0] if deps else ggufs[0], cfg.bench.prompt_tokens)
    ui.info("measuring memory bandwidth…")
    bw = report.measure_bandwidth(threads=cfg.bench.cores, mbytes=cfg.bench.bandwidth_mbytes)
    machine = dict(report.machine_info(), bandwidth=bw)
    anchors = [g for g in ggufs if g["label"] in cfg.anchors]
    rest = [g for g in ggufs if g["label"] not in cfg.anchors]
    rows: list[dict] = []
    groups = _groups(deps, cfg.group_size)
    for gi, group in enumerate(groups):
        jobs = [(d, e) for d in group for e in (d.get("engines") or engines)] + [(g, "llamacpp") for g in anchors]
        if gi == 0:
            jobs += [(g, "llamacpp") for g in rest]
        ui.info(f"pareto group {gi + 1}/{len(groups)}: {len(jobs)} workers")
        t0 = time.perf_counter()
        grows = time_jobs(jobs, cfg.bench, prompt, dense if dense in group else None)
        for r, (d, _) in zip(grows, jobs):
            r["group"] = gi
            r["kind"] = "llama.cpp peer" if r["requested_engine"] == "llamacpp" else "sparsedeploy"
            r["config"] = d.get("config") or r["label"]
            r["step_bytes"] = step_bytes(d) if r["kind"] == "sparsedeploy" else None
            numel = sum(size for name, (_, size) in (d.get("weights") or {}).items() if ".layers." in name)
            nb = (r.get("native_bytes") or {}).get("decoder_linears")
            r["bytes_per_weight"] = nb / numel if nb and numel else None
        ui.info(f"  group {gi + 1} took {time.perf_counter() - t0:.0f} s")
        rows += grows
    for r in rows:     # ratios against the anchors timed in the same group
        for a in cfg.anchors:
            same = [x for x in rows if x["group"] == r["group"] and x["label"] == a]
            if same:
                r.setdefault("vs", {})[a] = same[0]["latency_ms"] / r["latency_ms"]
    return {"rows": rows, "machine": machine, "settings": asdict(cfg), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}


def points(doc: dict, ppl: dict[str, float], bytes_per_weight: dict[str, float] | None = None) -> list[dict]:
    """One point per (configuration, engine): timed rows pooled over groups (median), perplexity by label."""
    pooled: dict[tuple[str, str], list[dict]] = {}
    for r in doc["rows"]:
        pooled.setdefault((r["config"], r["engine"]), []).append(r)
    out = []
    for (config, engine), rs in pooled.items():
        ms = float(np.median([r["latency_ms"] for r in rs]))
        vs = {}
        for r in rs:
            for a, v in (r.get("vs") or {}).items():
                vs.setdefault(a, []).append(v)
        out.append({"label": config, "engine": engine, "kind": rs[0]["kind"], "sparsity": rs[0]["sparsity"],
                    "ms": ms, "ms_per_group": [r["latency_ms"] for r in rs], "ppl": ppl.get(config),
                    "deployment": rs[0].get("gguf") or rs[0]["deployment"],
                    "vs": {a: float(np.median(v)) for a, v in vs.items()},
                    "bytes_per_weight": (bytes_per_weight or {}).get(config) or rs[0].get("bytes_per_weight"),
                    "weight_mb": rs[0].get("weight_mb"), "peak_rss_mb": rs[0].get("peak_rss_mb"),
                    "tokens": rs[0].get("tokens")})
    return sorted(out, key=lambda p: p["ms"])


# ----------------------------------------------------------------------------------------------- reports
def _fmt(x, spec=".2f") -> str:
    return report.DASH if x is None else format(x, spec)


def markdown(pts: list[dict], *, title: str, machine: dict, anchors: tuple[str, ...], notes: list[str]) -> str:
    front = {(p["label"], p["engine"]) for p in frontier(pts)}
    has_ppl = any(p.get("ppl") is not None for p in pts)
    head = ["Configuration", "Engine", "ms/token", "tokens/s"] + (["Perplexity"] if has_ppl else []) + \
        ["Decoder bytes/weight"] + [f"× vs {a.split(' (')[0]}" for a in anchors] + (["Frontier"] if has_ppl else [])
    body = []
    for p in pts:
        cells = [p["label"], p["engine"], f"{p['ms']:.2f}", f"{1000 / p['ms']:.1f}"]
        if has_ppl:
            cells.append(_fmt(p.get("ppl")))
        cells.append(_fmt(p.get("bytes_per_weight"), ".3f"))
        cells += [_fmt(p["vs"].get(a)) for a in anchors]
        if has_ppl:
            cells.append("**yes**" if (p["label"], p["engine"]) in front else "")
        body.append(cells)
    bw = (machine.get("bandwidth") or {}).get("gbs")
    lines = [f"# {title}", "",
             f"Machine: {machine.get('cpu')}, {machine.get('cores')} logical CPUs"
             + (f", memory bandwidth probe {bw:.1f} GB/s" if bw else "") + ".", ""]
    lines += [f"- {n}" for n in notes] + [""]
    lines.append(report._markdown(head, body))
    return "\n".join(lines) + "\n"


def plot(pts: list[dict], path: Path, *, title: str, machine: dict) -> Path | None:
    """Perplexity (log) against ms/token, one marker per engine, the frontier drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    pts = [p for p in pts if p.get("ppl") is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(9, 6))
    markers = {"llamacpp": "s", "native": "o", "deepsparse": "^", "onnxruntime": "v"}
    for eng in sorted({p["engine"] for p in pts}):
        ps = [p for p in pts if p["engine"] == eng]
        ax.scatter([p["ms"] for p in ps], [p["ppl"] for p in ps], marker=markers.get(eng, "x"), s=50,
                   label=("llama.cpp (dense GGUF)" if eng == "llamacpp" else eng))
        for p in ps:
            ax.annotate(p["label"].replace(" (llama.cpp)", ""), (p["ms"], p["ppl"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
    f = frontier(pts)
    ax.step([p["ms"] for p in f], [p["ppl"] for p in f], where="post", color="k", lw=1, alpha=0.6, label="frontier")
    ax.set_yscale("log")
    ax.set_xlabel("decode ms/token (lower is better)")
    ax.set_ylabel("perplexity (log; lower is better)")
    ax.set_title(f"{title}\n{machine.get('cpu')}, {machine.get('cores')} CPUs", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
