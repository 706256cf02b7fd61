"""WikiText-2 perplexity of SmolLM2-135M pruned with {magnitude, Wanda, SparseGPT} × {uniform, OWL, DLP}
at 50/60/70/80% (the shape of the DLP paper's Table 10), plus wall time and peak RAM of each prune.

Every prune runs in its own process (so peak RSS is that prune's), reusing one dense calibration.
Writes benchmarks/results/prune_ppl.md (and .json). Usage:
    .venv/bin/python benchmarks/prune_ppl.py [--nsamples 64 --seqlen 256 --eval-windows 64] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsedeploy.pipeline import stages  # noqa: E402
from sparsedeploy.pipeline.rundir import RunDir  # noqa: E402

WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def _finished_prune(run: Path, method: str, allocator: str, p: float) -> dict | None:
    """A prune an interrupted earlier invocation finished (its RUN says so): reuse it, process time unknown."""
    try:
        rec = RunDir(run).stage("prune")
        plan = json.loads((run / "ratios.json").read_text())
    except Exception:  # noqa: BLE001 - anything missing: prune again
        return None
    if not (rec and rec.get("done") and rec["args"].get("method") == method and plan.get("allocator") == allocator
            and abs(plan.get("target_sparsity", -1) - p) < 1e-9 and (run / "model" / "config.json").is_file()):
        return None
    return {"prune_s": rec["seconds"], "process_s": None, "peak_rss_mb": round(rec["peak_rss_mb"]),
            "realized": rec["realized_sparsity"]}


def prune_in_subprocess(run: Path, method: str, allocator: str, p: float, a) -> dict:
    cmd = [sys.executable, "-m", "sparsedeploy.cli", "prune", "smollm2-135m", "--out", str(run),
           "--sparsity", str(p), "--allocator", allocator, "--method", method,
           "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--device", "cpu"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"prune failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    rec = RunDir(run).stage("prune")
    return {"prune_s": rec["seconds"], "process_s": round(wall, 1), "peak_rss_mb": round(rec["peak_rss_mb"]),
            "realized": rec["realized_sparsity"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--eval-seqlen", type=int, default=256)
    ap.add_argument("--sparsities", default="0.5,0.6,0.7,0.8")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--allocators", default="uniform,owl,dlp")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_prune"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prune_ppl"))
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ecfg = stages.EvalConfig("wikitext2", a.eval_seqlen, a.eval_windows, str(WIKITEXT) if WIKITEXT.is_file() else None, "cpu")

    # One dense calibration shared by every prune (copied into each RUN; the manifest then skips it).
    base = work / "_calibrated"
    stages.calibrate(RunDir(base), stages.CalibConfig("smollm2-135m", "wikipedia-summaries", a.nsamples, a.seqlen, 0, None, "cpu"))
    dense = stages.evaluate("smollm2-135m", ecfg, out=work / "dense_eval.json")

    results_path = Path(a.out).with_suffix(".json")
    done = {}
    if results_path.is_file():  # resume: keep finished cells measured with the same settings
        old = json.loads(results_path.read_text())
        grid = ("sparsities", "methods", "allocators", "work", "out")   # the grid may grow; the measurement may not change
        same = {k: v for k, v in vars(a).items() if k not in grid}
        if {k: v for k, v in old.get("settings", {}).items() if k not in grid} == same:
            done = {(r["method"], r["allocator"], r["sparsity"]): r for r in old["rows"]}
    for p in [float(s) for s in a.sparsities.split(",")]:
        for method in a.methods.split(","):
            for allocator in a.allocators.split(","):
                key = (method, allocator, p)
                if key in done:
                    continue
                run = work / f"{method}-{allocator}-{int(p * 100)}"
                if not run.exists():
                    shutil.copytree(base, run)
                info = _finished_prune(run, method, allocator, p) or prune_in_subprocess(run, method, allocator, p, a)
                ev = stages.evaluate(str(run), ecfg)
                row = {"method": method, "allocator": allocator, "sparsity": p, "perplexity": ev["perplexity"], **info}
                print(json.dumps(row), flush=True)
                done[key] = row
                _write(results_path, a, dense, _ordered(done))   # every finished cell, so an interruption loses none
    _write(results_path, a, dense, _ordered(done))


def _ordered(done: dict) -> list[dict]:
    methods = {"magnitude": 0, "wanda": 1, "sparsegpt": 2}
    allocators = {"uniform": 0, "owl": 1, "dlp": 2}
    return sorted(done.values(), key=lambda r: (r["sparsity"], methods.get(r["method"], 9), allocators.get(r["allocator"], 9)))


def _write(results_path: Path, a, dense: dict, rows: list[dict]) -> None:
    machine = {"cpu": _cpu_model(), "cores": len(os.sched_getaffinity(0)), "python": platform.python_version()}
    doc = {"settings": vars(a), "machine": machine, "dense_perplexity": dense["perplexity"], "eval": dense["data"], "rows": rows}
    results_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = results_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(results_path)
    md = results_path.with_suffix(".md")
    tmp = md.with_suffix(".tmp")
    tmp.write_text(render_markdown(doc))
    tmp.replace(md)


def render_markdown(doc: dict) -> str:
    s = doc["settings"]
    rows = doc["rows"]
    sparsities = sorted({r["sparsity"] for r in rows})
    lines = [
        "# SmolLM2-135M: WikiText-2 perplexity after pruning (DLP paper Table 10 shape)",
        "",
        f"Calibration: {s['nsamples']} × {s['seqlen']} tokens of `wikipedia-summaries`, seed 0, dense statistics for OWL/DLP, "
        f"sequential (pruned) propagation for Wanda/SparseGPT. Evaluation: first {s['eval_windows']} non-overlapping "
        f"{s['eval_seqlen']}-token windows of {doc['eval']}. DLP: median statistic, paper α. OWL: M=5, λ=0.08.",
        f"Machine: {doc['machine']['cpu']}, {doc['machine']['cores']} cores. Dense perplexity: **{doc['dense_perplexity']:.2f}**.",
        "",
        "| Method | Allocator | " + " | ".join(f"{p:.0%}" for p in sparsities) + " |",
        "|---|---|" + "---|" * len(sparsities),
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        for allocator in dict.fromkeys(r["allocator"] for r in rows):
            cells = []
            for p in sparsities:
                r = next((r for r in rows if r["method"] == method and r["allocator"] == allocator and r["sparsity"] == p), None)
                if r is None:
                    cells.append("–")
                    continue
                best = min(x["perplexity"] for x in rows if x["method"] == method and x["sparsity"] == p)
                cell = f"{r['perplexity']:.2f}"
                cells.append(f"**{cell}**" if r["perplexity"] == best else cell)
            lines.append(f"| {method} | {allocator} | " + " | ".join(cells) + " |")
    lines += ["", "Bold: the best allocator for that method and sparsity.", "",
              "## Prune cost (each prune in its own process, 2 threads)", "",
              "Wall times here are upper bounds, not costs: other benchmarks shared the 2 cores, and some prunes were "
              "paused (SIGSTOP) while decode latencies were timed (e.g. wanda-uniform-70%).", "",
              "| Method | Allocator | Sparsity | Prune wall time (s) | Process time incl. load/save (s) | Peak RSS (MB) | Realized sparsity |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['allocator']} | {r['sparsity']:.0%} | {r['prune_s']:.1f} | "
                     f"{'–' if r['process_s'] is None else format(r['process_s'], '.1f')} | "
                     f"{r['peak_rss_mb']} | {r['realized']:.4f} |")
    return "\n".join(lines) + "\n"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
