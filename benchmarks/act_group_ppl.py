"""What the activation quantisation of the int8 native products costs in perplexity, per scale width (issue 13).

The int8 dense / bitmask / perm and int4 products quantise each input vector to int8 with one symmetric scale
per group of columns (`lowbit.quantize_act`). 256 columns (ACT_GROUP = 4 blocks of 64, as llama.cpp's Q8_K)
let the VNNI kernels chain four blocks' integer dot products and convert once; 64 was the earlier width (one
float FMA per block). This prints WikiText-2 perplexity of PyTorch on exactly the engine's arithmetic
(export.native.lowbit_reference_model: the build's dequantised int8 weights and int8 lm_head) with the
activations fp32 (width 0), or quantised per 64 or 256 columns, for the given deployments (e.g. the dense and
pruned ones of `sparsedeploy run --out DIR`).

    .venv/bin/python benchmarks/act_group_ppl.py DEPLOYMENT [DEPLOYMENT ...] [--widths 0,64,256] [--max-windows 64]
"""
from __future__ import annotations

import argparse
import sys
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
    from sparsedeploy.export.native import default_act_columns, ensure_native
    from sparsedeploy.pipeline.stages import EvalConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("deployments", nargs="+")
    ap.add_argument("--widths", default="0,64,256")
    ap.add_argument("--max-windows", type=int, default=64)
    ap.add_argument("--work", default="/tmp/act_group_ppl")
    ap.add_argument("--out", default=str(RESULTS / "act_group_ppl_smollm2.md"))
    a = ap.parse_args()
    widths = [int(w) for w in a.widths.split(",")]
    work = Path(a.work)
    ecfg = EvalConfig("wikitext2", 256, a.max_windows)
    rows = []
    for d in a.deployments:
        dep = Path(d)
        if not (dep / "sparsedeploy.json").is_file():
            raise SystemExit(f"error: {dep} is not a deployment (no sparsedeploy.json) — give the folders that "
                             "`sparsedeploy export` wrote")
        meta = _read_deployment(dep)
        v = weight_view(meta, "int8", work / "views" / dep.name)        # one view per deployment
        with quiet():
            index = ensure_native(v, keep_fixed=True, weights="int8")
        sp = float(meta.get("sparsity") or 0.0)
        cells = {}
        for w in widths:
            ui.info(f"perplexity: {dep} int8, activations {'fp32' if w == 0 else f'int8 per {w} columns'}")
            cells[w] = lowbit_perplexity(dict(v), index, ecfg, work / "ppl" / f"{dep.parent.name}-{dep.name}-{w}-{a.max_windows}.json",
                                         act_width=w)
        rows.append((dep, sp, cells))
    m = machine_info()
    head = " | ".join("fp32 act" if w == 0 else f"int8 / {w} col" for w in widths)
    lines = ["# Activation scale width of the int8 native products: the perplexity each costs (SmolLM2-135M)", "",
             f"Machine: {m['cpu']}, {m['cores']} logical CPUs (perplexity is CPU-independent up to float order).", "",
             f"WikiText-2, {a.max_windows} windows of 256 tokens, PyTorch on exactly the native int8 build's weights "
             "(decoder per-row int8, lm_head int8 per row, dequantised) with the decoder linears' inputs fp32 or "
             f"quantised to int8 with one scale per 64 or 256 columns. The engine uses {default_act_columns()}.", "",
             f"| deployment | sparsity | {head} |", "|---|---:|" + "---:|" * len(widths)]
    for dep, sp, c in rows:
        base = c.get(0)
        cell = [f"{c[w]:.3f}" + (f" ({100 * (c[w] / base - 1):+.2f}%)" if base and w else "") for w in widths]
        lines.append(f"| {dep.parent.name}/{dep.name} | {sp:.2f} | " + " | ".join(cell) + " |")
    text = "\n".join(lines) + "\n"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
