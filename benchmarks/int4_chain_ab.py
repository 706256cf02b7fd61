"""int4 + bitmask: chained integer sums against a float step per block, same weights, same machine, one run.

engine/native/int4.py chains the vpdpbusd sums of the 64-column blocks that share a weight group and an
activation scale (int4_chain: 2 with groups of 128, 4 with groups of 256, at 256-column activation scales).
With activation scales per 64 columns (act_buffers(columns=64)) no two blocks share a scale, so the kernel takes
the per-block path on the same weights: that is the A/B here (the activations' int8 values differ slightly
between the two scale widths; the work per block does not). LLaMA-7B linear shapes, 2 threads, pruned by
magnitude (random weights), RTN int4; hot = one copy called repeatedly, cold = copies rotated through >= 512 MiB;
median of 5. Writes benchmarks/results/int4_chain_ab_<cpu>.{json,md}. On an idle machine, about a minute:

    .venv/bin/python benchmarks/int4_chain_ab.py
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from numba import set_num_threads  # noqa: E402

from sparsedeploy.engine.cpuinfo import cpu_name, cpu_tag  # noqa: E402
from sparsedeploy.engine.native import int4 as I4, lowbit as LB  # noqa: E402

E = np.zeros(0, np.float32)


def main() -> None:
    set_num_threads(2)
    rng = np.random.default_rng(0)
    load0 = os.getloadavg()
    rows = []
    for (o, i) in [(4096, 4096), (11008, 4096), (4096, 11008)]:
        for sp in (0.7, 0.9):
            W = rng.standard_normal((o, i)).astype(np.float32)
            W[rng.random(W.shape) < sp] = 0
            x = rng.standard_normal(i).astype(np.float32)
            for gs in (128, 256):
                enc = I4.encode_int4_bitmask_from_weights(W, gs)
                ncopy = max(1, int(512e6 // sum(a.nbytes for a in enc.values())))
                copies = [{k: v.copy() for k, v in enc.items()} for _ in range(ncopy)]
                res = {}
                for act in (64, 256):
                    q, corr, s = LB.act_buffers(i, act)
                    LB.quantize_act(x, q, corr, s)
                    out = np.zeros(o, np.float32)

                    def call(e):
                        I4.int4_bitmask_gemv(e["rowptr"], e["masks"], e["vals"], e["scale"], e["zero"],
                                             int(e["group_size"][0]), q, corr, s, E, out, False)
                    call(enc)
                    hot, cold = [], []
                    for _ in range(5):
                        t = time.perf_counter()
                        for _ in range(20):
                            call(enc)
                        hot.append((time.perf_counter() - t) / 20)
                        t = time.perf_counter()
                        for c in copies:
                            call(c)
                        cold.append((time.perf_counter() - t) / len(copies))
                    res[act] = {"chain": int(I4.int4_chain(gs // 64, s.shape[0], corr.shape[0])),
                                "hot_ms": float(np.median(hot)) * 1e3, "cold_ms": float(np.median(cold)) * 1e3}
                rows.append({"shape": f"{o}x{i}", "sparsity": sp, "group_size": gs, "per_block": res[64],
                             "chained": res[256]})
                print(json.dumps(rows[-1]), flush=True)
    doc = {"cpu": cpu_name(), "cpu_tag": cpu_tag(), "paths": I4.kernel_paths(),
           "loadavg_start": [round(v, 2) for v in load0], "loadavg_end": [round(v, 2) for v in os.getloadavg()],
           "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    stem = ROOT / "benchmarks" / "results" / f"int4_chain_ab_{cpu_tag()}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2))
    md = [f"# int4 + bitmask: chained integer sums vs a float step per block — {doc['cpu']}, 2 threads", "",
          f"Kernel path: {doc['paths']}; load average {doc['loadavg_start']} → {doc['loadavg_end']}; "
          f"{doc['finished']}. Same weights per row pair; per-block = activation scales per 64 columns (chain 1), "
          "chained = per 256 (chain 2 at g128, 4 at g256). Median of 5, ms.", "",
          "| shape | sparsity | group | per-block hot | chained hot | × hot | per-block cold | chained cold | × cold |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        a, b = r["per_block"], r["chained"]
        md.append(f"| {r['shape']} | {r['sparsity']:.0%} | {r['group_size']} (chain {b['chain']}) | {a['hot_ms']:.3f} | "
                  f"{b['hot_ms']:.3f} | {a['hot_ms'] / b['hot_ms']:.2f} | {a['cold_ms']:.3f} | {b['cold_ms']:.3f} | "
                  f"{a['cold_ms'] / b['cold_ms']:.2f} |")
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
