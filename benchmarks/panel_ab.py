"""Which batched product is fastest for R rows on this CPU: panels (csr_gemm_panels at each PANEL width) against
the row tiles (csr_gemm_t over a CSR view) and, for bitmask groups, simd.bitmask_gemm_rows on the format itself.

It loads a deployment's native fp32 sparse groups (every layer's qkv, o, up, down), builds their CSR views and
panel-major copies for each --panels width, and times each kind over all layers with R random rows, the variants
interleaved (order rotated each round), median of --rounds. This is how model.PANEL_IN_MAX and PANEL_ROWS_MIN
were chosen. Writes benchmarks/results/panel_ab_<cpu>.{json,md} (or --out STEM). On an idle machine, a minute:

    .venv/bin/python benchmarks/panel_ab.py --deployment DEP [--rows 8,16,32,64] [--panels 64,128,256]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from sparsedeploy.engine.cpuinfo import cpu_name, cpu_tag  # noqa: E402

KINDS = ("qkv", "o", "up", "down")


def csr_view(g):
    """(rowptr, cols, vals) of an fp32 sparse group (an ELL group's flattened arrays, a bitmask group's twin)."""
    if g.fmt == "ell":
        k = g.a.shape[1]
        return np.arange(g.rows + 1, dtype=np.int64) * k, g.a.reshape(-1), g.b.reshape(-1)
    if g.fmt == "bitmask":
        g.prepare_rows()
        return g.twin
    if g.fmt == "csr":
        return g.a, g.b, g.c
    return None


def main() -> None:
    from numba import get_num_threads

    from sparsedeploy.engine.deployment import read_deployment
    from sparsedeploy.engine.native import kernels as K
    from sparsedeploy.engine.native import model as M
    from sparsedeploy.engine.native import simd_rows as SR
    from sparsedeploy.engine.native.runtime import NativeRuntime

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deployment", type=Path, required=True)
    ap.add_argument("--rows", default="8,16,32,64")
    ap.add_argument("--panels", default="64,128,256")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--cores", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    rows_list = [int(x) for x in a.rows.split(",")]
    panels = [int(x) for x in a.panels.split(",")]
    meta = read_deployment(a.deployment)
    rt = NativeRuntime(meta["onnx"], cores=a.cores, cache_len=int(meta["seqlen"]))
    nth = get_num_threads()
    groups = {k: [] for k in KINDS}
    for layer in rt.model.layers:
        for k in KINDS:
            g = layer[k]
            csr = csr_view(g)
            if csr is None:
                continue
            pan = {}
            for P in panels:
                SR.PANEL = P                       # panel_major reads it; csr_gemm_panels takes the layout as given
                pan[P] = SR.panel_major(*csr, g.cols_in)
            groups[k].append((g, csr, pan))
    SR.PANEL = max(panels) if 128 not in panels else 128
    variants = [f"panels{P}" for P in panels] + ["tiles", "bitmask_rows"]
    rng = np.random.default_rng(0)

    def run(k: str, v: str, X: dict, L: int) -> float:
        t0 = time.perf_counter()
        for g, csr, pan in groups[k]:
            x = X[g.cols_in]
            Y = np.empty((L, g.rows), np.float32)
            if v == "bitmask_rows" and g.fmt == "bitmask":
                K.bitmask_gemm_rows(g.a, g.b, g.c, x, g.bias, Y, False)
            elif v.startswith("panels"):
                off, cols, vals = pan[int(v[6:])]
                Xt = M._xt_buffer(g.cols_in, L, 16)
                M._transpose(x, Xt)
                Yt = M._xt_buffer(g.rows, L, 16, "y")
                SR.csr_gemm_panels(off, cols, vals, Xt, Yt, g.bias, Y, False, nth)
            else:                                  # tiles (and bitmask_rows of a non-bitmask group)
                Xt = M._xt_buffer(g.cols_in, L)
                M._transpose(x, Xt)
                SR.csr_gemm_t(*csr, Xt, g.bias, Y, False)
        return time.perf_counter() - t0

    results = []
    for L in rows_list:
        X = {w: rng.standard_normal((L, w)).astype(np.float32) for w in {g.cols_in for k in KINDS for g, _, _ in groups[k]}}
        times = {(k, v): [] for k in KINDS for v in variants}
        for k in KINDS:
            for v in variants:
                run(k, v, X, L)                    # compile and warm
        for rnd in range(a.rounds):
            order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
            for k in KINDS:
                for v in order:
                    times[(k, v)].append(run(k, v, X, L))
        row = {"rows": L, "ms": {k: {v: round(1e3 * float(np.median(times[(k, v)])), 3) for v in variants} for k in KINDS}}
        row["total_ms"] = {v: round(sum(row["ms"][k][v] for k in KINDS), 3) for v in variants}
        results.append(row)
        print(json.dumps(row), flush=True)
    doc = {"cpu": cpu_name(), "cpu_tag": cpu_tag(), "threads": nth, "deployment": str(a.deployment),
           "layers": len(rt.model.layers), "rounds": a.rounds, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
           "panel_in_max": M.PANEL_IN_MAX, "panel_rows_min": M.PANEL_ROWS_MIN, "results": results,
           "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    stem = a.out or ROOT / "benchmarks" / "results" / f"panel_ab_{cpu_tag()}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    md = [f"# Batched sparse products by row count — {doc['cpu']} ({nth} threads)", "",
          f"Deployment `{doc['deployment']}`: every layer's fp32 sparse groups ({doc['layers']} layers), ms summed over "
          f"layers, median of {a.rounds} interleaved rounds. panelsP: csr_gemm_panels over a panel-major copy with "
          "P-column panels; tiles: csr_gemm_t (8/16/64-row tiles over the CSR view); bitmask_rows: "
          "simd.bitmask_gemm_rows on bitmask groups (the others on the tiles). The engine now uses: panels of "
          f"{SR.PANEL if 128 in panels else 128} columns past {doc['panel_rows_min']} rows for groups at most "
          f"{doc['panel_in_max']} wide. Load average at the end {doc['loadavg_at_end']}; {doc['finished']}.", "",
          "| rows | group | " + " | ".join(variants) + " |", "|---:|---|" + "---:|" * len(variants)]
    for row in results:
        for k in (*KINDS, "total"):
            ms = row["total_ms"] if k == "total" else row["ms"][k]
            best = min(ms.values())
            md.append(f"| {row['rows']} | {k} | " + " | ".join(
                (f"**{ms[v]}**" if ms[v] == best else str(ms[v])) for v in variants) + " |")
    md.append("")
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    stem.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {stem}.{{json,md}}")


if __name__ == "__main__":
    main()
