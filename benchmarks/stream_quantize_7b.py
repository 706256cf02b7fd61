"""Streamed GPTQ at full depth: `sparsedeploy quantize RUN --stream` of a pruned RUN (e.g. the 32-layer SYNTHETIC
LLaMA2-7B-shaped run that `benchmarks/stream_7b.py --keep` leaves behind), in its own process; reports the stage's
wall time, its peak RSS (the stage's own VmHWM from the manifest, and the process's from wait4), and the disk use of
the packed checkpoint (RUN/quantized/) and of the fake-quant model (RUN/model/, in the input's dtype).

Usage (needs ~ the pruned model's size + 3 GB free beside the RUN: RUN/model/ moves to RUN/pruned/ and a new
fake-quant RUN/model/ is written; GPTQ at 7B shapes is roughly an hour on 2 cores, not measured here yet):
    nice -n 19 .venv/bin/python benchmarks/stream_quantize_7b.py RUN [--bits 4 --group-size 128]
Writes benchmarks/results/stream_quantize_<N>layers_<cpu>.md and .json. Only what this run measured is printed;
times are rough on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.stream_7b import du, run_stage  # noqa: E402
from sparsedeploy.engine.native.tune import cpu_name, cpu_tag  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
GiB = 1 << 30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a pruned RUN directory (streamed or not)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args()
    run = args.run
    man = json.loads((run / "manifest.json").read_text())
    if not (man["stages"].get("prune") or {}).get("done"):
        raise SystemExit(f"{run} holds no pruned model: run benchmarks/stream_7b.py --keep (or sparsedeploy prune) first")
    src = run / "pruned" if (run / "pruned" / "config.json").is_file() else run / "model"
    need = du(src) + 3e9
    free = shutil.disk_usage(run).free
    if free < need:
        raise SystemExit(f"{free / 1e9:.0f} GB free beside {run}, this needs ~{need / 1e9:.0f} GB")
    conf = json.loads((src / "config.json").read_text())
    proc = run_stage(["quantize", str(run), "--bits", str(args.bits), "--group-size", str(args.group_size),
                      "--device", "cpu", "--stream", "--force"])
    rec = json.loads((run / "manifest.json").read_text())["stages"]["quantize"]
    qdoc = json.loads((run / "quantized" / "quantize.json").read_text())
    layers = conf.get("num_hidden_layers")
    doc = {
        "title": f"streamed GPTQ {args.bits}-bit g{args.group_size} of {run} ({layers} decoder layers)",
        "synthetic": conf.get("sparsedeploy_synthetic"),
        "cpu": cpu_name(), "cpu_tag": cpu_tag(), "cores": os.cpu_count(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
        "process": proc, "stage_seconds": rec["seconds"], "stage_peak_rss_mb": round(rec["peak_rss_mb"]),
        "streamed": rec.get("streamed"), "sparsity": qdoc["sparsity"],
        "disk": {"input_bytes": du(run / "pruned"), "quantized_bytes": du(run / "quantized"),
                 "fake_quant_model_bytes": du(run / "model")},
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"stream_quantize_{layers}layers_{cpu_tag()}"
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2))
    d = doc["disk"]
    lines = [f"# {doc['title']}", ""]
    if doc["synthetic"]:
        lines.append("SYNTHETIC weights (random, real layer shapes): speed and memory are real, model quality is meaningless.")
    lines += [f"CPU: {doc['cpu']} ({doc['cores']} cores, {doc['ram_gib']} GiB RAM); finished {doc['finished']}. "
              "Run niced on a possibly shared machine: times are rough.", "",
              "| stage | wall s (process) | seconds (manifest) | peak RSS MiB (stage VmHWM) | peak RSS MiB (process) "
              "| streamed |", "|---|---|---|---|---|---|",
              f"| quantize | {proc['wall_s']} | {doc['stage_seconds']:.1f} | {doc['stage_peak_rss_mb']} | "
              f"{proc['process_peak_rss_mb']} | {doc['streamed']} |", "",
              f"Disk: input (RUN/pruned) {d['input_bytes'] / 1e9:.2f} GB, packed checkpoint "
              f"{d['quantized_bytes'] / 1e9:.2f} GB, fake-quant model {d['fake_quant_model_bytes'] / 1e9:.2f} GB. "
              f"Weight sparsity kept: {doc['sparsity']:.4f}.", ""]
    (RESULTS / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
