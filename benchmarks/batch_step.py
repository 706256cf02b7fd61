"""Where a batched decode step's time goes: the native engine stepping B sequences together vs batch 1.

For each B (default 1, 2, 4, 8) it opens a BatchSession on the deployment's native weights, admits B requests
with --context-token prompts, runs until every one is decoding, then times --steps steady decode steps
(BatchSession.step: one forward over B rows + sampling), and times the same forward again with its per-part
profile (embed, norms, qkv, attention, o, up, act, down, head), and a new request's whole prompt as one prefill
chunk (one step of --context rows) against the batch-1 loop's token-by-token prompt. The batch-1 decode loop (greedy_decode's
KVSlots step, what `serve --max-batch 1` runs) is timed on the same prompt as the reference. Writes
benchmarks/results/batch_step_<cpu>.{json,md}, naming the CPU. On an idle machine, about a minute:

    .venv/bin/python benchmarks/batch_step.py --deployment DEP [--batches 1,2,4,8] [--steps 40] [--cores 2]
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




def main() -> None:
    from sparsedeploy.engine.decode import BatchRequest, BatchSession, greedy_decode
    from sparsedeploy.engine.deployment import read_deployment
    from sparsedeploy.engine.native.runtime import NativeRuntime

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deployment", type=Path, required=True, help="a deployment with native weights (compile --engine native)")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--context", type=int, default=64, help="prompt tokens of each sequence before timing")
    ap.add_argument("--cores", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    batches = [int(x) for x in a.batches.split(",")]
    meta = read_deployment(a.deployment)
    S = int(meta["seqlen"])
    if a.context + a.steps + 8 > S:
        raise SystemExit(f"--context {a.context} + --steps {a.steps} do not fit the deployment's seqlen {S}")
    rt = NativeRuntime(meta["onnx"], cores=a.cores, cache_len=S)
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(10, rt.model.vocab, a.context)] for _ in range(max(batches))]
    n_new = a.steps + 4

    ref = greedy_decode(rt, prompts[0], n_new)               # batch 1: the KVSlots loop, prompt token by token
    b1_ms = float(np.median(ref.decode_ms))
    rows = []
    for B in batches:
        sess = BatchSession(rt, B, S, prefill_budget=64)
        sess.step([BatchRequest(i, prompts[i], n_new + 8) for i in range(B)])
        while any(s.fed < len(s.prompt) for s in sess.seqs.values()):
            sess.step()
        for _ in range(2):                                   # warm
            sess.step()
        times = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            out = sess.step()
            times.append((time.perf_counter() - t0) * 1e3)
            assert out["rows"] == B
        seqs = list(sess.seqs.values())
        ids = np.array([s.tokens[-1] for s in seqs], np.int64)
        slots = np.array([s.slot for s in seqs], np.int64)
        pos = np.array([len(s.prompt) + len(s.tokens) - 1 for s in seqs], np.int64)
        want = np.arange(B, dtype=np.int64)
        prof: dict = {}
        reps = max(5, a.steps // 2)
        for _ in range(reps):
            rt.forward_rows(sess.state, ids, slots, pos, want, prof)
        parts = {k: round(1e3 * v / reps, 3) for k, v in prof.items()}
        step = float(np.median(times))
        rows.append({"batch": B, "step_ms": round(step, 3), "ms_per_token": round(step / B, 3),
                     "tokens_per_s": round(1e3 * B / step, 1), "x_batch1_loop": round(b1_ms * B / step, 2),
                     "parts_ms": parts, "forward_ms": round(sum(parts.values()), 3)})
        print(json.dumps(rows[-1]), flush=True)
    # one prefill chunk: a new request's whole --context-token prompt in one step (what a joining request costs)
    sess = BatchSession(rt, 1, S, prefill_budget=a.context)
    ids = np.array(prompts[0], np.int64)
    slots = np.zeros(a.context, np.int64)
    pos = np.arange(a.context, dtype=np.int64)
    want = np.array([a.context - 1], np.int64)
    rt.forward_rows(sess.state, ids, slots, pos, want)
    prof, times = {}, []
    for _ in range(max(5, a.steps // 4)):
        t0 = time.perf_counter()
        rt.forward_rows(sess.state, ids, slots, pos, want, prof)
        times.append((time.perf_counter() - t0) * 1e3)
    chunk = {"rows": a.context, "step_ms": round(float(np.median(times)), 3),
             "parts_ms": {k: round(1e3 * v / len(times), 3) for k, v in prof.items()},
             "batch1_prefill_ms": round(ref.prefill_ms, 3)}
    print(json.dumps(chunk), flush=True)
    doc = {"cpu": cpu_name(), "cpu_tag": cpu_tag(), "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
           "deployment": str(a.deployment), "threads": rt.threads, "weights": rt.info().get("weights"),
           "formats": sorted({g["format"] for layer in rt.model.index["layers"] for g in layer.values()}),
           "context": a.context, "steps": a.steps, "batch1_loop_step_ms": round(b1_ms, 3), "rows": rows, "prefill_chunk": chunk,
           "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    stem = a.out or ROOT / "benchmarks" / "results" / f"batch_step_{cpu_tag()}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    names = ["embed", "norms", "qkv", "attention", "o", "up", "act", "down", "head"]
    md = [f"# Batched decode steps on the native engine — {doc['cpu']} ({doc['threads']} threads)", "",
          f"Deployment `{doc['deployment']}` ({doc['weights']}, formats {', '.join(doc['formats'])}); every sequence "
          f"{a.context} tokens in; median of {a.steps} steps. Batch-1 decode loop (KVSlots, `--max-batch 1`): "
          f"{doc['batch1_loop_step_ms']} ms/token. Load average at the end {doc['loadavg_at_end']}.", "",
          "| B | step (ms) | ms/token | tokens/s | × batch-1 loop | " + " | ".join(names) + " |",
          "|---:|---:|---:|---:|---:|" + "---:|" * len(names)]
    for r in rows:
        md.append(f"| {r['batch']} | {r['step_ms']} | {r['ms_per_token']} | {r['tokens_per_s']} | {r['x_batch1_loop']} | "
                  + " | ".join(str(r["parts_ms"].get(n, "")) for n in names) + " |")
    md.append(f"| prefill {a.context} rows | {chunk['step_ms']} | | | batch-1 loop: {chunk['batch1_prefill_ms']} ms "
              f"(token by token) | " + " | ".join(str(chunk["parts_ms"].get(n, "")) for n in names) + " |")
    md.append("")
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    stem.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {stem}.{{json,md}}")


if __name__ == "__main__":
    main()
