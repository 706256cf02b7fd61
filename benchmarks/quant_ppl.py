"""WikiText-2 perplexity of SmolLM2-135M pruned with Wanda + {uniform, DLP} at 50/60%, then GPTQ-quantized
to 8/4/3 bits (group 128) with every pruned zero kept — the shape of the DLP paper's Table 17 — plus the
on-disk size of each packed checkpoint vs dense fp32/fp16. Extra rows: joint SparseGPT + 4-bit at 50% DLP
(quantized inside SparseGPT's column loop) next to SparseGPT-then-GPTQ, and the dense model quantized.

Same calibration / evaluation sizes as benchmarks/prune_ppl.py (64×256 calibration windows of
wikipedia-summaries, the first 64 non-overlapping 256-token windows of WikiText-2). Pruned RUNs are copied
from --source (prune_ppl's RUNs) when there, else pruned here. Resumable cell by cell: every finished cell
is written to benchmarks/results/quant_ppl.{json,md} at once and skipped by the next invocation.
Decode speed is not measured here (shared cores); `--export` writes the 4-bit DLP-50% deployment for timing
on an idle machine (`sparsedeploy bench`). Usage (nice: the machine is shared):
    nice -n 19 .venv/bin/python benchmarks/quant_ppl.py [--export | --export-only]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsedeploy.pipeline import stages  # noqa: E402
from sparsedeploy.pipeline.rundir import RunDir  # noqa: E402

WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
DEFAULT_SOURCE = ROOT.parent / "main" / "runs" / "bench_prune"
PRIORITY = [16, 4, 3, 8]     # the order cells are measured in (an interrupted run has the 4-bit column first)


def _calib(a) -> stages.CalibConfig:
    return stages.CalibConfig("smollm2-135m", "wikipedia-summaries", a.nsamples, a.seqlen, 0, None, "cpu")


def _prepare(a, work: Path, name: str, method: str, allocator: str, p: float, bits: int | None = None) -> Path:
    """A pruned RUN: copied from --source when it holds one with these settings, else pruned here."""
    run = work / name
    src = Path(a.source) / name
    if not run.exists() and bits is not None and (Path(a.source) / "_calibrated" / "calib_tokens.safetensors").is_file():
        src = Path(a.source) / "_calibrated"      # the joint path prunes here, from the shared dense calibration
    if not run.exists() and (src / "calib_tokens.safetensors").is_file():
        tmp = work / f".{name}.copy"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)                 # copy2 keeps mtimes: the RUN's fingerprints stay valid
        tmp.replace(run)
    if bits is None and (run / "model" / "config.json").is_file() and (RunDir(run).stage("prune") or {}).get("done"):
        return run
    cfg = stages.PruneConfig("smollm2-135m", p, allocator, method, calib=_calib(a), device="cpu",
                             bits=bits, group_size=a.group_size)
    stages.prune(RunDir(run), cfg)
    return run


def _dense_run(a, work: Path) -> Path:
    run = work / "dense"
    base = Path(a.source) / "_calibrated"
    if not run.exists() and (base / "calib_tokens.safetensors").is_file():
        shutil.copytree(base, run)
    if not (run / "calib_tokens.safetensors").is_file():
        stages.calibrate(RunDir(run), _calib(a))
    if (Path(a.source) / "dense_eval.json").is_file() and not (run / "eval.json").exists():
        shutil.copy2(Path(a.source) / "dense_eval.json", run / "eval.json")   # reused only if its key matches
    return run


def _eval(path: Path, out: Path, ecfg) -> float:
    return stages.evaluate(str(path), ecfg, out=out)["perplexity"]


def _quantize(run: Path, bits: int, a) -> dict:
    t0 = time.perf_counter()
    stages.quantize(RunDir(run), stages.QuantConfig(bits=bits, group_size=a.group_size, calib=_calib(a), device="cpu"))
    wall = time.perf_counter() - t0
    doc = json.loads((run / "quantized" / "quantize.json").read_text())
    shutil.copy(run / "quantized" / "quantize.json", run / f"quantize_{bits}.json")
    rec = RunDir(run).stage("quantize")
    return {"quantize_s": rec["seconds"], "process_s": round(wall, 1), "bytes": doc["bytes"],
            "realized": doc["sparsity"]}


def _size_16(run: Path) -> dict:
    """The unquantized model's own sizes (its fp32 safetensors; fp16 = half of that)."""
    model = run / "pruned" if (run / "pruned").is_dir() else run / "model"
    if run.name == "dense" or not model.is_dir():   # the dense RUN: the cached dense model
        from sparsedeploy.pipeline.models import resolve
        model = Path(resolve("smollm2-135m").path)
    b = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    return {"checkpoint": b, "fp16_estimate": b // 2}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--eval-seqlen", type=int, default=256)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--sparsities", default="0.5,0.6")
    ap.add_argument("--allocators", default="uniform,dlp")
    ap.add_argument("--bits", default="16,8,4,3", help="16 = not quantized")
    ap.add_argument("--extra", default="joint,sparsegpt,dense", help="extra rows (comma list; '' for none)")
    ap.add_argument("--source", default=str(DEFAULT_SOURCE), help="prune_ppl's RUNs to copy instead of pruning")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_quant"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quant_ppl"))
    ap.add_argument("--export", action="store_true", help="then export the 4-bit DLP-50%% model (for timing elsewhere)")
    ap.add_argument("--export-only", action="store_true", help="only that export (quantizing the RUN to 4 bits if needed)")
    a = ap.parse_args()
    if a.export_only:
        return _export(a, Path(a.work))
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ecfg = stages.EvalConfig("wikitext2", a.eval_seqlen, a.eval_windows, str(WIKITEXT) if WIKITEXT.is_file() else None, "cpu")
    bits_list = [int(b) for b in a.bits.split(",")]

    results_path = Path(a.out).with_suffix(".json")
    done: dict = {}
    if results_path.is_file():
        old = json.loads(results_path.read_text())
        keep = ("nsamples", "seqlen", "eval_windows", "eval_seqlen", "group_size")
        if all(old.get("settings", {}).get(k) == vars(a)[k] for k in keep):
            done = {_key(r): r for r in old["rows"]}

    def cell(method, allocator, p, bits, run_fn):
        key = (method, allocator, p, bits)
        if key in done:
            return
        row = {"method": method, "allocator": allocator, "sparsity": p, "bits": bits, **run_fn()}
        print(json.dumps(row), flush=True)
        done[key] = row
        _write(results_path, a, list(done.values()))

    grid = [("wanda", al, float(p)) for p in a.sparsities.split(",") for al in a.allocators.split(",")]
    extras = [e for e in a.extra.split(",") if e]
    if "sparsegpt" in extras:
        grid.append(("sparsegpt", "dlp", 0.5))
    if "dense" in extras:
        grid.append(("dense", "-", 0.0))
    runs: dict = {}
    for bits in sorted(bits_list, key=lambda b: PRIORITY.index(b) if b in PRIORITY else 9):   # a column at a time
        for method, allocator, p in grid:
            if method == "sparsegpt" and bits not in (16, 4):
                continue
            if (method, allocator, p, bits) in done:
                continue
            name = f"{method}-{allocator}-{int(p * 100)}"
            if name not in runs:
                runs[name] = _dense_run(a, work) if method == "dense" else _prepare(a, work, name, method, allocator, p)
            run = runs[name]
            if bits == 16:
                def f16(run=run, dense=method == "dense"):
                    # the unquantized model: the dense one, RUN/pruned once quantized, else RUN/model
                    # (eval.json: prune_ppl's own evaluation is reused when its key — the weights — matches)
                    if dense:
                        src = Path(stages.resolve("smollm2-135m").path)
                    else:
                        src = run / "pruned" if (run / "pruned").is_dir() else run
                    return {"perplexity": _eval(src, run / "eval.json", ecfg), "bytes": _size_16(run)}
                cell(method, allocator, p, 16, f16)
            else:
                def fq(run=run, bits=bits):
                    info = _quantize(run, bits, a)
                    return {"perplexity": _eval(run, run / f"eval_{bits}.json", ecfg), **info}
                cell(method, allocator, p, bits, fq)
    if "joint" in extras:
        def fj():
            t0 = time.perf_counter()
            run = _prepare(a, work, "sparsegpt-joint4-dlp-50", "sparsegpt", "dlp", 0.5, bits=4)
            rec = RunDir(run).stage("prune")
            doc = json.loads((run / "quantized" / "quantize.json").read_text())
            return {"perplexity": _eval(run, run / "eval_4.json", ecfg), "bytes": doc["bytes"], "realized": doc["sparsity"],
                    "quantize_s": rec["seconds"], "process_s": round(time.perf_counter() - t0, 1), "joint": True}
        cell("sparsegpt-joint", "dlp", 0.5, 4, fj)
    _write(results_path, a, list(done.values()))
    if a.export:
        _export(a, work)


def _export(a, work: Path) -> None:
    from sparsedeploy.export.stage import export
    work.mkdir(parents=True, exist_ok=True)
    run = _prepare(a, work, "wanda-dlp-50", "wanda", "dlp", 0.5)
    stages.quantize(RunDir(run), stages.QuantConfig(bits=4, group_size=a.group_size, calib=_calib(a), device="cpu"))
    dep = export(str(run), seqlen=256)
    print(f"4-bit DLP-50% deployment (fake-quant FP32 weights, verified tokens): {dep}", flush=True)


def _key(r: dict) -> tuple:
    return (r["method"], r["allocator"], r["sparsity"], r["bits"])


def _write(results_path: Path, a, rows: list[dict]) -> None:
    machine = {"cpu": _machine_cpu(), "cores": len(os.sched_getaffinity(0)), "python": platform.python_version()}
    doc = {"settings": vars(a), "machine": machine, "eval": "wikitext2", "rows": sorted(rows, key=_order)}
    results_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = results_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(results_path)
    md = results_path.with_suffix(".md")
    tmp = md.with_suffix(".mdtmp")
    tmp.write_text(render_markdown(doc))
    tmp.replace(md)


def _order(r: dict) -> tuple:
    methods = {"dense": 0, "wanda": 1, "sparsegpt": 2, "sparsegpt-joint": 3}
    return (methods.get(r["method"], 9), r["sparsity"], r["allocator"], -r["bits"])


def _mb(b: int) -> str:
    return f"{b / 1e6:.1f}"


def render_markdown(doc: dict) -> str:
    s = doc["settings"]
    rows = doc["rows"]
    bits = sorted({r["bits"] for r in rows}, reverse=True)
    lines = [
        "# SmolLM2-135M: WikiText-2 perplexity of pruned + GPTQ-quantized models (DLP paper Table 17 shape)",
        "",
        f"Pruning: Wanda (and SparseGPT where named), calibration {s['nsamples']} × {s['seqlen']} tokens of "
        f"`wikipedia-summaries`, seed 0 (the RUNs of `benchmarks/prune_ppl.py`). Quantization: GPTQ, asymmetric, "
        f"group {s['group_size']} (SmolLM2's 576-wide inputs end in a 64-column group), 1% damping, layer by "
        f"layer on the outputs of the already-quantized layers, the same calibration windows, on a grid without a zero "
        f"level (float offset) plus a keep bitmask: every pruned zero is kept and no new zero is made (checked per layer). 16 = not quantized (fp32 weights). Evaluation: first "
        f"{s['eval_windows']} non-overlapping {s['eval_seqlen']}-token windows of WikiText-2 test.",
        f"Machine: {doc['machine']['cpu']}, {doc['machine']['cores']} cores (shared).",
        "",
        "| Method | Allocator | Sparsity | " + " | ".join("16 (no quant)" if b == 16 else f"{b}-bit" for b in bits) + " |",
        "|---|---|---|" + "---|" * len(bits),
    ]
    seen = []
    for r in rows:
        k = (r["method"], r["allocator"], r["sparsity"])
        if k in seen:
            continue
        seen.append(k)
        cells = []
        for b in bits:
            x = next((x for x in rows if (x["method"], x["allocator"], x["sparsity"], x["bits"]) == k + (b,)), None)
            cells.append("–" if x is None else f"{x['perplexity']:.2f}")
        name = {"sparsegpt-joint": "SparseGPT joint (quantized in its loop)", "sparsegpt": "SparseGPT, then GPTQ"}.get(r["method"], r["method"])
        lines.append(f"| {name} | {r['allocator']} | {r['sparsity']:.0%} | " + " | ".join(cells) + " |")
    if any("–" in ln for ln in lines[7:]):
        lines += ["", "– : not measured yet (the 8- and 3-bit columns, the 60% rows at 4 bits and the extra rows were cut "
                  "by the time limit); `nice -n 19 .venv/bin/python benchmarks/quant_ppl.py` resumes exactly those cells."]
    lines += ["", "## Checkpoint size on disk", "",
              "Packed checkpoint = `RUN/quantized/model.safetensors` (`sparsedeploy-packed/2`: codes bit-packed into "
              "uint8, a 1-bit keep mask, fp32 group scales and offsets; see the README). "
              "Everything that is not a decoder linear (the tied 49152×576 embedding, norms) stays fp32 in it, so the "
              "second column isolates what quantization buys on the linears it touches.", "",
              "| Method | Allocator | Sparsity | Bits | Checkpoint (MB) | vs dense fp32 | vs dense fp16 | Decoder linears: packed / fp16 (MB) | GPTQ time (s) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["bytes"]
        if r["bits"] == 16:
            lines.append(f"| {r['method']} | {r['allocator']} | {r['sparsity']:.0%} | 16 (fp32 file) | {_mb(b['checkpoint'])} | "
                         f"– | – | – | – |")
            continue
        lines.append(f"| {r['method']} | {r['allocator']} | {r['sparsity']:.0%} | {r['bits']} | {_mb(b['checkpoint'])} | "
                     f"{b['checkpoint'] / b['dense_fp32']:.1%} | {b['checkpoint'] / b['dense_fp16']:.1%} | "
                     f"{_mb(b['quantized_linears_packed'])} / {_mb(b['quantized_linears_fp16'])} | {r.get('quantize_s', 0):.0f} |")
    lines += ["", "GPTQ time is wall time on shared cores and includes any time the process was paused (SIGSTOP) while "
              "other benchmarks timed decode; it is an upper bound, not a cost.",
              "", "## Deployment and decode speed", "",
              "The ONNX export of a quantized RUN carries the **fake-quantized FP32 weights** (dequantized values, same zeros): "
              "DeepSparse has no INT4 kernels, so the exported model runs at exactly the FP32 sparse model's speed, with "
              "the quantized model's numerics (export verifies its greedy tokens against PyTorch on the fake-quant weights). "
              "Measured in `quant_decode_smollm2.md` (`python benchmarks/quant_ppl.py --export-only` writes the 4-bit "
              "DLP-50% deployment; `sparsedeploy bench` times it beside the same model before quantization, and that file "
              "holds the figures of its own run, with its machine). This script times no decode itself, so it prints no "
              "decode figure.", ""]
    return "\n".join(lines) + "\n"


def _machine_cpu() -> str:
    from sparsedeploy.bench.report import machine_info
    return machine_info()["cpu"]


if __name__ == "__main__":
    main()
