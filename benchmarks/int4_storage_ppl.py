"""What an int4 build's scale storage costs and saves: bytes per decoder weight and perplexity (issue 13).

An int4 native build (`compile --engine native --weights int4`, engine/native/int4.py) stores per output row and
group of columns a scale and a zero point: float32 in groups of 128 by default (8 bytes a group), or, with
`--int4-group 256 --int4-scales fp16`, float16 in groups of 256 (4 bytes a group of 256: 0.296 instead of 0.343
bytes a weight at 70%). For each given deployment and each storage this builds the int4 weights (round-to-
nearest, the codes chosen against the stored float16 values) and prints
  - the stored decoder bytes per weight (the index's bytes / the dense weight count),
  - WikiText-2 perplexity of PyTorch on exactly that build's arithmetic (export.native.lowbit_reference_model:
    dequantised weights, int8 lm_head, int8 activations per 256 columns) over `--max-windows` windows,
  - the perplexity through the native engine itself on the first `--engine-windows` of those windows, beside
    PyTorch's on the same windows (the issue's "within 0.5%").

    .venv/bin/python benchmarks/int4_storage_ppl.py DEPLOYMENT [DEPLOYMENT ...] [--storages 128:fp32,256:fp16]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pareto import lowbit_perplexity, quiet, weight_view  # noqa: E402

from sparsedeploy import ui  # noqa: E402
from sparsedeploy.bench.bench import _read_deployment  # noqa: E402
from sparsedeploy.bench.report import machine_info  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    import numpy as np

    from sparsedeploy.bench.quality import engine_perplexity
    from sparsedeploy.export.native import ensure_native
    from sparsedeploy.pipeline.data import eval_windows, load_text
    from sparsedeploy.pipeline.stages import EvalConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("deployments", nargs="+")
    ap.add_argument("--storages", default="128:fp32,256:fp32,128:fp16,256:fp16",
                    help="comma-separated GROUP:SCALES (GROUP a multiple of 64 or -1; SCALES fp32 | fp16)")
    ap.add_argument("--max-windows", type=int, default=64)
    ap.add_argument("--engine-windows", type=int, default=16, help="windows scored through the engine (0: none)")
    ap.add_argument("--cores", type=int, default=None)
    ap.add_argument("--work", default="/tmp/int4_storage_ppl")
    ap.add_argument("--out", default=str(RESULTS / "int4_storage_ppl_smollm2"))
    a = ap.parse_args()
    storages = []
    for s in a.storages.split(","):
        g, _, sc = s.partition(":")
        try:
            storages.append((int(g), sc or "fp32"))
        except ValueError:
            raise SystemExit(f"error: --storages entry {s!r} is not GROUP:SCALES — use e.g. 256:fp16") from None
    work = Path(a.work)
    ecfg = EvalConfig("wikitext2", 256, a.max_windows)
    ecfg_engine = EvalConfig("wikitext2", 256, a.engine_windows)
    rows = []
    t0 = time.time()
    for d in a.deployments:
        dep = Path(d)
        if not (dep / "sparsedeploy.json").is_file():
            raise SystemExit(f"error: {dep} is not a deployment (no sparsedeploy.json) — give the folders that "
                             "`sparsedeploy export` wrote")
        meta = _read_deployment(dep)
        sp = float(meta.get("sparsity") or 0.0)
        for g, sc in storages:
            tag = f"int4-{g}-{sc}"
            v = weight_view(meta, tag, work / "views" / dep.parent.name)
            with quiet():
                index = ensure_native(v, keep_fixed=False, weights="int4", cores=a.cores, int4_group=g, int4_scales=sc)
            b = index["bytes"]
            bpw = 4 * b["decoder_linears"] / b["decoder_linears_dense"]
            ui.info(f"perplexity: {dep} int4 groups of {g}, {sc} scales ({bpw:.3f} bytes a decoder weight)")
            name = f"{dep.parent.name}-{dep.name}-{tag}"
            ppl = lowbit_perplexity(dict(v), index, ecfg, work / "ppl" / f"{name}-{a.max_windows}.json")
            row = {"deployment": f"{dep.parent.name}/{dep.name}", "sparsity": sp, "group_size": g, "scales": sc,
                   "decoder_bytes_per_weight": round(bpw, 4), "decoder_bytes": b["decoder_linears"],
                   "quantization": index.get("quantization"), "perplexity_pytorch": ppl}
            if a.engine_windows:
                ppl_pt = lowbit_perplexity(dict(v), index, ecfg_engine, work / "ppl" / f"{name}-{a.engine_windows}.json")
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(v["dir"]))
                windows = np.asarray(eval_windows(tok, load_text(ecfg_engine.data), 256, a.engine_windows))
                eng = engine_perplexity(v["onnx"], "native", windows, cores=a.cores, cache_len=int(v["seqlen"]))
                row.update(engine_windows=a.engine_windows, perplexity_pytorch_engine_windows=ppl_pt,
                           perplexity_engine=eng["perplexity"], engine_seconds=eng["seconds"],
                           engine_vs_pytorch_pct=100 * (eng["perplexity"] / ppl_pt - 1))
            rows.append(row)
            print(json.dumps(row), flush=True)
    m = machine_info()
    doc = {"machine": m, "max_windows": a.max_windows, "engine_windows": a.engine_windows, "rows": rows,
           "wall_s": round(time.time() - t0, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    Path(a.out + ".json").write_text(json.dumps(doc, indent=1) + "\n")
    Path(a.out + ".md").write_text(report(doc))
    print(report(doc))


def report(doc: dict) -> str:
    m = doc["machine"]
    L = ["# int4 scale storage: bytes per decoder weight and perplexity (SmolLM2-135M)", "",
         f"Machine: {m['cpu']}, {m['cores']} logical CPUs (bytes and perplexity do not depend on it; the engine "
         "column's float order does). Finished " + doc["finished"] + ".", "",
         f"Round-to-nearest int4 over the keep bitmask (asymmetric, float zero point), per row and group of columns; "
         f"scales and zeros float32, or float16 with the codes chosen against the rounded values. Perplexity: "
         f"WikiText-2, windows of 256 tokens; 'PyTorch' = PyTorch on exactly the build's arithmetic (dequantised "
         f"weights, int8 lm_head, int8 activations per 256 columns), {doc['max_windows']} windows; 'engine' = "
         f"through the native engine on the first {doc['engine_windows']} windows, against PyTorch on those.", "",
         "| deployment | sparsity | group | scales | decoder bytes/weight | perplexity (PyTorch) | engine | PyTorch, same windows | engine vs PyTorch |",
         "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in doc["rows"]:
        eng = (f"{r['perplexity_engine']:.3f} | {r['perplexity_pytorch_engine_windows']:.3f} | "
               f"{r['engine_vs_pytorch_pct']:+.3f}%") if "perplexity_engine" in r else " | | "
        L.append(f"| {r['deployment']} | {r['sparsity']:.2f} | {r['group_size']} | {r['scales']} | "
                 f"{r['decoder_bytes_per_weight']:.3f} | {r['perplexity_pytorch']:.3f} | {eng} |")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
