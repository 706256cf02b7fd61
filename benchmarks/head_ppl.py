"""What each lm_head choice of a low-bit native build costs in perplexity (issue 13: "lm_head and embeddings in
int8 by default for every low-bit deployment, 4-bit optional; report the perplexity each choice costs").

For SmolLM2-135M, dense and Wanda+DLP deployments from a sweep (the Pareto's `--work` folder), with the decoder
in int8 (per row) and in int4 (RTN, groups of 128): WikiText-2 perplexity of PyTorch on exactly the engine's
arithmetic (export.native.lowbit_reference_model: dequantised weights, int8 activations per 256 columns where
the kernels take them) with the lm_head fp32, int8 per row, or 4-bit Q4_0-like. The embedding lookup stays fp32.

    .venv/bin/python benchmarks/head_ppl.py [--work runs] [--sparsities 0,0.5] [--max-windows 64]
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
HEADS = ("fp32", "int8", "q4")


def main() -> None:
    from sparsedeploy.export.native import default_act_columns, ensure_native
    from sparsedeploy.pipeline.stages import EvalConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=str(ROOT / "runs"))
    ap.add_argument("--sparsities", default="0,0.5")
    ap.add_argument("--max-windows", type=int, default=64)
    a = ap.parse_args()
    work = Path(a.work)
    sweep = work / "sweep_smollm2"
    ecfg = EvalConfig("wikitext2", 256, a.max_windows)
    rows = []
    for p in (float(x) for x in a.sparsities.split(",")):
        tag = "dense" if p < 0.005 else f"p{round(p * 100)}"
        dep = sweep / tag / "deployment"
        if not (dep / "sparsedeploy.json").is_file():
            raise SystemExit(f"error: {dep} is missing — run benchmarks/pareto.py --only smollm2 --work {work} first")
        meta = _read_deployment(dep)
        for weights in ("int8", "int4"):
            v = weight_view(meta, weights, work / "views_smollm2")
            with quiet():
                index = ensure_native(v, keep_fixed=True, weights=weights)
            cells = {}
            for head in HEADS:
                ui.info(f"perplexity: {tag} {weights}, lm_head {head}")
                idx = dict(index, head=head, key=dict(index["key"], head_for_ppl=head))
                cells[head] = lowbit_perplexity(dict(v), idx, ecfg, work / "ppl" / f"head-{tag}-{weights}-{head}-{a.max_windows}.json")
            rows.append((tag, weights, cells))
    m = machine_info()
    lines = ["# lm_head choices of a low-bit native build: the perplexity each costs (SmolLM2-135M)", "",
             f"Machine: {m['cpu']}, {m['cores']} logical CPUs (perplexity is CPU-independent up to float order).", "",
             f"WikiText-2, {a.max_windows} windows of 256 tokens, PyTorch on exactly the native engine's arithmetic "
             f"(decoder weights dequantised, activations int8 per {default_act_columns()} columns where the kernels quantise them); "
             "the embedding lookup stays fp32. Heads: fp32; int8 per output row (the default of every low-bit build); "
             "q4 = 4-bit Q4_0-like, a float16 scale per 32 columns (`compile --head q4`).", "",
             "| Model | Decoder | lm_head fp32 | lm_head int8 | lm_head q4 | int8 cost | q4 cost |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for tag, weights, c in rows:
        lines.append(f"| {'dense' if tag == 'dense' else 'Wanda+DLP ' + tag[1:] + '%'} | {weights} | {c['fp32']:.2f} | "
                     f"{c['int8']:.2f} | {c['q4']:.2f} | {100 * (c['int8'] / c['fp32'] - 1):+.2f}% | "
                     f"{100 * (c['q4'] / c['fp32'] - 1):+.2f}% |")
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "head_ppl_smollm2.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
