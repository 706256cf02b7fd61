"""Full depth at 7B scale on one machine: synth a SYNTHETIC 32-layer LLaMA2-7B-shaped bf16 model (or reuse one:
--model), then streamed calibrate and Wanda + DLP prune, then (--deploy) a native-only deployment of the pruned
RUN (`export RUN --format native`, int8 decoder groups — or `--weights int4`, from the GPTQ codes of a quantized
RUN —, 4-bit lm_head) and its decode timed (`bench --engine
native`), and (--quantize) a streamed GPTQ 4-bit quantize of the pruned RUN: the whole pipeline, each stage in
its own process; reports each stage's wall time and peak RSS
(the stage's own VmHWM from the RUN manifest, and the process's from wait4), and the disk use. `--run RUN` starts
from a pruned RUN this script kept (`--keep`): no synth, calibrate or prune, the earlier stages' rows from the
RUN's manifest and from this script's result of that run, e.g. to add the hour-long quantize later.

Usage (about 1 hour on 2 busy cores, more with --quantize; needs ~28 GB free under --work; deletes it afterwards
unless --keep):
    nice -n 19 .venv/bin/python benchmarks/stream_7b.py [--layers 32 --nsamples 16 --seqlen 128 --sparsity 0.7]
    nice -n 19 .venv/bin/python benchmarks/stream_7b.py --run WORK/run --model WORK/model --quantize
Writes benchmarks/results/stream_7b_<cpu>.md and .json (or stream_7b_<N>layers_<cpu> for other depths).
On a GPU machine: `--device cuda` calibrates and prunes there (stream_7b_cuda_<gpu>); `--tokenizer DIR` and
`--calib file:PATH` let it run where the default model and ../shared data are absent.
Only what this run measured is printed; times are rough on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsedeploy.engine.cpuinfo import cpu_name, cpu_tag  # noqa: E402
RESULTS = ROOT / "benchmarks" / "results"
GiB = 1 << 30


def gpu_name() -> str:
    import torch
    return torch.cuda.get_device_name(0)


def slug(text: str) -> str:
    return "_".join("".join(c if c.isalnum() else " " for c in text.lower()).split())




def run_stage(argv: list[str]) -> dict:
    """One CLI command in its own process: wall seconds and the process's peak RSS (wait4's ru_maxrss)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sparsedeploy.cli", *argv],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"failed ({status}): sparsedeploy {' '.join(argv)}")
    return {"wall_s": round(wall, 1), "process_peak_rss_mb": round(usage.ru_maxrss / 1024)}


def deploy_lines(d: dict) -> list[str]:
    """The native-only deployment of the pruned RUN: bytes, formats and the decode the bench measured."""
    rows = d["bench"]["engines"].get("native", [])
    tn = d["index"].get("tuning") or {}
    what = {"int8": "int8 decoder groups", "int4": "int4 decoder groups from the GPTQ checkpoint's codes"}[d["weights"]]
    out = [f"Native-only deployment of the pruned RUN ({what}, 4-bit lm_head): {d['bytes'] / 1e9:.2f} GB "
           f"on disk, decoder {d['index']['bytes']['decoder_linears'] / 1e9:.2f} GB; formats "
           f"{tn.get('formats')}" + (f" (chosen by bytes: {tn['fallback']})" if tn.get("fallback") else
                                     f" (timed at build, other processes {tn.get('other_load') or 0:.0%} of the CPU)") + "."]
    for r in rows:
        if r.get("latency_ms") is not None:
            out.append(f"Decode (bench --engine native, 16-token prompt + 32 tokens, 1 round): {r['latency_ms']:.1f} "
                       f"ms/token, engine RSS {r.get('rss_mb') or 0:.0f} MB, start-up {r.get('compile_s') or 0:.1f} s"
                       + (f"; per decoder layer {r['layer_ms']:.2f} ms, {r['layer_of_bound']:.0%} of its byte bound"
                          if r.get("layer_of_bound") else "") + ".")
    return out + [""]


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--work", type=Path, default=Path("/tmp/stream/7b"))
    ap.add_argument("--keep", action="store_true", help="keep the synthetic and pruned models")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where calibrate and prune compute")
    ap.add_argument("--tokenizer", default="smollm2-135m", help="model whose tokenizer the synthetic model ships")
    ap.add_argument("--calib", default="wikipedia-summaries", help="calibration text (a name or file:PATH)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--model", type=Path, default=None, help="an existing synthetic model folder (no synth stage)")
    ap.add_argument("--run", type=Path, default=None,
                    help="a pruned RUN kept by an earlier --keep run (needs --model): no calibrate or prune; kept")
    ap.add_argument("--deploy", action="store_true", help="also export the pruned RUN native-only and time its decode")
    ap.add_argument("--weights", default="int8", choices=("int8", "int4"),
                    help="the deployment's decoder value type (int4: needs --quantize or a quantized --run)")
    ap.add_argument("--quantize", action="store_true",
                    help="also GPTQ the pruned RUN to 4 bits (group 128, streamed) and report the packed checkpoint")
    args = ap.parse_args()
    if args.run is not None:
        if args.model is None or not (args.run / "manifest.json").is_file():
            raise SystemExit("--run needs a RUN directory with a manifest.json and --model, the folder it was pruned from")
        if not (json.loads((args.run / "manifest.json").read_text())["stages"].get("prune") or {}).get("done"):
            raise SystemExit(f"{args.run} holds no pruned model: run this script with --keep first")
        args.layers = json.loads((args.model / "config.json").read_text())["num_hidden_layers"]
        args.work, args.keep = args.run.parent, True

    if args.weights == "int4" and not (args.quantize or args.run and (args.run / "quantized" / "quantize.json").is_file()):
        raise SystemExit("--weights int4 builds from the GPTQ codes of a quantized RUN: add --quantize")
    where_free = args.work if args.run else args.work.parent if args.work.parent.exists() else Path("/")
    free = shutil.disk_usage(where_free).free
    need = (2 if args.run is None else 1) * 13.6e9 * args.layers / 32 + 1e9
    if free < need:
        raise SystemExit(f"{free / 1e9:.0f} GB free under {where_free}, this needs ~{need / 1e9:.0f} GB")
    if args.run is None:
        if args.work.exists():
            shutil.rmtree(args.work)
        args.work.mkdir(parents=True)
    model, run, dep = args.model or args.work / "model", args.run or args.work / "run", args.work / "deployment"
    calib = ["--calib", args.calib, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
             "--device", args.device, "--stream"]
    rows, earlier = {}, None
    args.results.mkdir(parents=True, exist_ok=True)
    where = f"cuda_{slug(gpu_name())}" if args.device == "cuda" else cpu_tag()
    name = f"stream_7b_{where}" if args.layers == 32 else f"stream_7b_{args.layers}layers_{where}"
    try:
        if args.run is None:
            if args.model is None:
                rows["synth"] = run_stage(["synth", "llama2-7b", "--layers", str(args.layers), "--dtype", "bf16",
                                           "--tokenizer", args.tokenizer, "--out", str(model)])
            rows["calibrate"] = run_stage(["calibrate", str(model), "--out", str(run), *calib])
            rows["allocate + prune"] = run_stage(["prune", str(model), "--out", str(run), "--sparsity",
                                                  str(args.sparsity), "--allocator", "dlp", "--method", "wanda", *calib])
        else:   # the processes that made this RUN: from this script's result of that run, if it is the same run
            prev = args.results / f"{name}.json"
            pruned = json.loads((run / "manifest.json").read_text())["stages"]["prune"]
            doc = json.loads(prev.read_text()) if prev.is_file() else {"stages": []}
            if any(r["stage"] == "prune" and r["seconds"] == pruned["seconds"] for r in doc["stages"]):
                earlier = doc
                rows.update({k: v for k, v in earlier["processes"].items() if not k.startswith("quantize")})
        model_bytes = du(model)
        man = json.loads((run / "manifest.json").read_text())["stages"]
        ratios = json.loads((run / "ratios.json").read_text())
        pruned_bytes = du(run / "pruned") if (run / "pruned" / "config.json").is_file() else du(run / "model")
        packed_bytes = fake_bytes = None
        sparsity = ratios.get("target_sparsity", args.sparsity)
        if args.quantize:
            rows["quantize (GPTQ 4-bit)"] = run_stage(["quantize", str(run), "--bits", "4", "--group-size", "128",
                                                       "--stream", "--device", args.device, "--force"])
            man = json.loads((run / "manifest.json").read_text())["stages"]
            packed_bytes, fake_bytes = du(run / "quantized"), du(run / "model")
        conf = json.loads((run / "model" / "config.json").read_text())
        deployed = None
        if args.deploy:
            rows["export --format native"] = run_stage(["export", str(run), "--format", "native", "--weights", args.weights,
                                                        "--head", "q4", "--seqlen", "256", "--out", str(dep)])
            bench_json = args.work / "bench.json"
            rows["bench --engine native"] = run_stage(["bench", str(dep), "--engine", "native", "--prompt-tokens", "16",
                                                       "--new-tokens", "32", "--rounds", "1", "--no-ort-baseline",
                                                       "--json", str(bench_json)])
            deployed = {"weights": args.weights, "bytes": du(dep), "bench": json.loads(bench_json.read_text()),
                        "index": {k: v for k, v in json.loads((dep / "native" / "native.json").read_text()).items()
                                  if k in ("weights", "head", "tuning", "bytes")}}
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    stage_rows = []
    for stage in ("calibrate", "allocate", "prune") + (("quantize",) if args.quantize else ()):
        rec = man[stage]
        stage_rows.append({"stage": stage, "seconds": rec["seconds"], "peak_rss_mb": round(rec["peak_rss_mb"]),
                           "streamed": rec.get("streamed"),
                           **({"peak_rss_mb_after_layer": rec["peak_rss_mb_after_layer"]}
                              if rec.get("peak_rss_mb_after_layer") else {})})
    doc = {
        "title": f"SYNTHETIC llama2-7b shapes, {args.layers} decoder layers, bf16: streamed calibrate + Wanda/DLP "
                 f"{sparsity:.0%} prune" + (" + GPTQ 4-bit" if args.quantize else ""),
        "cpu": cpu_name(), "cpu_tag": cpu_tag(), "cores": os.cpu_count(), "device": args.device,
        "gpu": gpu_name() if args.device == "cuda" else None,
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
        "calibration": (earlier or {}).get("calibration") or f"{args.nsamples}×{args.seqlen} tokens ({args.calib}, seed 0)",
        "processes_from_an_earlier_run": earlier["finished"] if earlier else None,
        "synthetic": conf.get("sparsedeploy_synthetic"),
        "processes": rows, "stages": stage_rows,
        "disk": {"synthetic_model_bytes": model_bytes, "pruned_model_bytes": pruned_bytes,
                 "packed_4bit_checkpoint_bytes": packed_bytes, "fake_quant_model_bytes": fake_bytes},
        "realized_sparsity": ratios["realized_sparsity"],
        "ratios": [round(layer["sparsity"], 4) for layer in ratios["layers"]],
        "alpha": ratios.get("alpha"),
        "deployment": deployed,
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    (args.results / f"{name}.json").write_text(json.dumps(doc, indent=2))
    lines = [f"# {doc['title']}", "",
             f"SYNTHETIC weights (random, real LLaMA2-7B layer shapes, vocabulary {conf.get('vocab_size')} from the "
             f"SmolLM2 tokenizer): speed and memory are real, model quality is meaningless.",
             f"CPU: {doc['cpu']} ({doc['cores']} cores, {doc['ram_gib']} GiB RAM)"
             + (f"; calibrate and prune on the GPU: {doc['gpu']}" if doc["gpu"] else "")
             + f"; calibration {doc['calibration']}; finished {doc['finished']}."
             + (" Run niced on a possibly shared machine: times are rough." if not doc["gpu"] else "")
             + (f" The rows before quantize are from the run that made the RUN (finished {earlier['finished']})."
                if earlier else ""), "",
             "| process | wall s | peak RSS MiB (process) |", "|---|---|---|"]
    for k, r in rows.items():
        lines.append(f"| {k} | {r['wall_s']} | {r['process_peak_rss_mb']} |")
    lines += ["", "| stage (manifest) | seconds | peak RSS MiB (stage's own VmHWM) | streamed |", "|---|---|---|---|"]
    for r in stage_rows:
        lines.append(f"| {r['stage']} | {r['seconds']:.1f} | {r['peak_rss_mb']} | {r['streamed']} |")
    for r in stage_rows:
        if r.get("peak_rss_mb_after_layer"):
            lines += ["", f"{r['stage']}: the stage's running peak RSS (MiB) after each decoder layer: "
                          + ", ".join(str(v) for v in r["peak_rss_mb_after_layer"])]
    lines += ["", f"Disk: synthetic model {model_bytes / 1e9:.2f} GB, pruned model {pruned_bytes / 1e9:.2f} GB "
              f"(bf16, zeros stored dense)"
              + (f"; packed 4-bit checkpoint (RUN/quantized: codes of kept weights only, bitmask, float32 scale + zero "
                 f"per 128 columns, bf16 rest) {packed_bytes / 1e9:.2f} GB, fake-quant model (RUN/model, bf16) "
                 f"{fake_bytes / 1e9:.2f} GB" if packed_bytes else "") + ".",
              f"Realized sparsity {doc['realized_sparsity']:.4f}; DLP α {doc['alpha']}; per-layer ratios "
              f"{doc['ratios'][0]:.3f} (first) … {doc['ratios'][-1]:.3f} (last).", ""]
    if deployed:
        lines += deploy_lines(deployed)
    (args.results / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
