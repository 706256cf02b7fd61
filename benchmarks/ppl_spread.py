"""How far perplexity through a low-bit native build can be from PyTorch's on the same arithmetic, and why (issue 13).

The int8 activation quantisation of the low-bit products (`lowbit.quantize_act`: rint(x * 127 / max|x|) per
256 columns) turns float-order differences of 1e-7 into whole int8 steps wherever x sits near a rounding
boundary, and 30 layers carry those on. So the engine (exact int32 dot products, its own float order) and PyTorch
(float32 matmuls on the dequantised operands) need not give the same perplexity per window even though both
compute the same quantised model. This measures that spread per window, against a yardstick: PyTorch against
itself with the embedding weights multiplied by (1 + 1e-6 N(0, 1)), with the activations quantised and not.

    .venv/bin/python benchmarks/ppl_spread.py DEPLOYMENT [--windows 16] [--out STEM]

DEPLOYMENT must hold a low-bit native build (compile --engine native --weights int8 | int4 ...).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    import numpy as np
    import torch

    from sparsedeploy.bench.bench import _read_deployment
    from sparsedeploy.bench.quality import windows_for
    from sparsedeploy.bench.report import machine_info
    from sparsedeploy.engine import make_runtime
    from sparsedeploy.engine.decode import window_nll
    from sparsedeploy.engine.native.pack import read_index
    from sparsedeploy.export.native import lowbit_reference_model
    from sparsedeploy.pipeline.evaluate import perplexity

    ap = argparse.ArgumentParser()
    ap.add_argument("deployment")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--cores", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "ppl_spread_smollm2"))
    a = ap.parse_args()
    meta = _read_deployment(Path(a.deployment))
    index = read_index(Path(meta["dir"]) / "native")
    if index is None or (index.get("weights") or "fp32") == "fp32":
        raise SystemExit(f"error: {a.deployment} has no low-bit native build — compile it first: sparsedeploy "
                         "compile DEPLOYMENT --engine native --weights int8")
    win = np.asarray(windows_for(meta["dir"], "wikitext2", a.seqlen, a.windows))
    model, _, quantise_activations = lowbit_reference_model(meta, index)
    emb = model.get_input_embeddings()
    gen = torch.Generator().manual_seed(a.seed)
    noise = 1e-6 * torch.randn(emb.weight.shape, generator=gen)

    def both(w):
        """(PyTorch's perplexity of window w, the same with the embedding perturbed)."""
        t = torch.from_numpy(w[None])
        p = perplexity(model, t)
        with torch.no_grad():
            old = emb.weight.clone()
            emb.weight.mul_(1 + noise)
        try:
            q = perplexity(model, t)
        finally:
            with torch.no_grad():
                emb.weight.copy_(old)
        return p, q

    t0 = time.time()
    rows = []
    rt = make_runtime("native", meta["onnx"], cores=a.cores, seq_len=1, cache_len=int(meta["seqlen"]))
    try:
        hooks = quantise_activations()
        try:
            for i, w in enumerate(win):
                s, n = window_nll(rt, w, int(meta["seqlen"]))
                p, q = both(w)
                rows.append({"window": i, "engine": math.exp(s / n), "engine_nll": s, "tokens": n, "pytorch": p,
                             "pytorch_perturbed": q})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            for h in hooks:
                h.remove()
        for r, w in zip(rows, win):
            r["pytorch_fp32_act"], r["pytorch_fp32_act_perturbed"] = both(w)
    finally:
        rt.close()

    def pooled(key):        # the perplexity over all windows from per-window perplexities (equal token counts)
        return math.exp(sum(math.log(r[key]) for r in rows) / len(rows))

    def pct(x, y):
        return 100 * (x / y - 1)

    doc = {"deployment": str(meta["dir"]), "weights": index.get("weights"), "quantization": index.get("quantization"),
           "windows": len(rows), "seqlen": a.seqlen, "machine": machine_info(), "rows": rows,
           "wall_s": round(time.time() - t0, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    doc["summary"] = {
        "engine_vs_pytorch_pooled_pct": pct(pooled("engine"), pooled("pytorch")),
        "perturbed_vs_pytorch_pooled_pct": pct(pooled("pytorch_perturbed"), pooled("pytorch")),
        "fp32_act_perturbed_pooled_pct": pct(pooled("pytorch_fp32_act_perturbed"), pooled("pytorch_fp32_act")),
        "engine_vs_pytorch_window_mean_abs_pct": float(np.mean([abs(pct(r["engine"], r["pytorch"])) for r in rows])),
        "perturbed_window_mean_abs_pct": float(np.mean([abs(pct(r["pytorch_perturbed"], r["pytorch"])) for r in rows])),
        "fp32_act_perturbed_window_mean_abs_pct": float(np.mean([abs(pct(r["pytorch_fp32_act_perturbed"],
                                                                          r["pytorch_fp32_act"])) for r in rows])),
    }
    Path(a.out + ".json").write_text(json.dumps(doc, indent=1) + "\n")
    Path(a.out + ".md").write_text(report(doc))
    print(report(doc))


def report(doc: dict) -> str:
    m, s = doc["machine"], doc["summary"]

    def pct(x, y):
        return f"{100 * (x / y - 1):+.3f}%"

    L = ["# Perplexity through the native engine against PyTorch on the same low-bit arithmetic: the spread, per window",
         "", f"Machine: {m['cpu']}, {m['cores']} logical CPUs. Deployment `{doc['deployment']}`: {doc['weights']} "
         f"({doc['quantization']}). WikiText-2, {doc['windows']} windows of {doc['seqlen']} tokens. Finished "
         f"{doc['finished']}.", "",
         "'perturbed': PyTorch again with the embedding weights multiplied by (1 + 1e-6 N(0, 1)) — a change far "
         "below any quantisation step; 'fp32 act': the same pair with the activations not quantised.", "",
         "| window | engine | PyTorch | engine vs PyTorch | PyTorch perturbed | vs PyTorch | fp32 act | fp32 act perturbed | vs fp32 act |",
         "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["rows"]:
        L.append(f"| {r['window']} | {r['engine']:.3f} | {r['pytorch']:.3f} | {pct(r['engine'], r['pytorch'])} | "
                 f"{r['pytorch_perturbed']:.3f} | {pct(r['pytorch_perturbed'], r['pytorch'])} | "
                 f"{r['pytorch_fp32_act']:.4f} | {r['pytorch_fp32_act_perturbed']:.4f} | "
                 f"{pct(r['pytorch_fp32_act_perturbed'], r['pytorch_fp32_act'])} |")
    L += ["", f"Over all {doc['windows']} windows: engine vs PyTorch **{s['engine_vs_pytorch_pooled_pct']:+.3f}%** "
          f"(mean |per-window| {s['engine_vs_pytorch_window_mean_abs_pct']:.2f}%); PyTorch perturbed vs PyTorch "
          f"**{s['perturbed_vs_pytorch_pooled_pct']:+.3f}%** (mean |per-window| {s['perturbed_window_mean_abs_pct']:.2f}%); "
          f"with fp32 activations the perturbation moves it {s['fp32_act_perturbed_pooled_pct']:+.5f}% (mean "
          f"|per-window| {s['fp32_act_perturbed_window_mean_abs_pct']:.5f}%).", ""]
    return "\n".join(L)


if __name__ == "__main__":
    main()
