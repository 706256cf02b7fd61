"""Table 5 at full depth: a SYNTHETIC 32-layer LLaMA2-7B-shaped model on the native engine and the llama.cpp peer.

From one synthetic bf16 model folder (`sparsedeploy synth llama2-7b --layers 32 --dtype bf16`, made here when
--model does not exist), per sparsity:
  1. a native-only deployment streamed from the folder (`sparsedeploy export MODEL --format native --weights int8
     --head q4 --prune-magnitude P`: one decoder layer at a time read, magnitude-pruned, encoded, written; no ONNX),
     in its own process: wall time, peak RSS (wait4), bytes on disk;
  2. decode timed (bench.time_jobs: each engine in its own worker, `--rounds` interleaved rounds of a
     `--prompt-tokens` prompt + `--new-tokens` tokens) together with llama.cpp on a dense GGUF of the same weights
     (written streamed once, `--peer q4_0[,q8_0]`), so every "× vs Q4_0" is against the peer in the same rounds;
     the worker's RSS, the engine's resident weights per value type, and the byte bound of one step (bytes it
     reads / the measured memory bandwidth);
  3. the deployment deleted (disk), the next sparsity built.
Builds run under a shared lock on --lock, every timing group under an exclusive one (waits for the other jobs on
the machine); --lock '' for none. The 2-layer numbers of earlier runs (benchmarks/results/*2layers*.json) and the
paper's speedups are printed beside, labelled as such; everything else is measured in this run.

Usage (idle 2-core machine, about 15 min per sparsity, a few more for the GGUF; needs ~14 GB for the synthetic
model unless it exists, + the largest deployment and the GGUFs: ~8 + 4 (+7 with q8_0) GB under --work):
    .venv/bin/python benchmarks/full_depth_7b.py [--model /work/runs/synth7b] [--sparsities 0,0.5,0.7,0.9]
Writes benchmarks/results/full_depth_7b_<cpu>.{md,json} (--tag NAME adds _NAME, e.g. for a smoke run).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsedeploy.engine.native.tune import cpu_name, cpu_tag  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PAPER = {0.7: 2.8, 0.8: 3.5, 0.9: 3.7}          # the DLP paper's Table 5 speedups (LLaMA2-7B, DeepSparse, 32 layers)
TWO_LAYER_PARETO = RESULTS / "pareto_synthetic_llama2_7b_2layers_int8perm_amd_epyc.json"
TWO_LAYER_TABLE5 = RESULTS / "native_table5_synthetic_llama2_7b_2layers.json"


@contextmanager
def cpu_lock(path: str, exclusive: bool):
    if not path:
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run(argv: list[str]) -> dict:
    """A command in its own process: wall seconds and peak RSS (wait4's ru_maxrss)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"failed ({status}): {' '.join(argv)}")
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024)}


def f0(v) -> str:
    return "–" if v is None else f"{v:.0f}"


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def header_sizes(path: Path) -> dict[str, int]:
    """{tensor: bytes} of a safetensors file, from its header."""
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        head = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in head.items() if k != "__metadata__"}


def native_step_bytes(dep: Path, meta: dict, kv_slots: float) -> dict:
    """Bytes one decode step of the native engine reads: every decoder array (linears, norms), the lm_head and
    final norm, one embedding row, and the key/value rows it attends to (fp32, `kv_slots` occupied on average)."""
    layers = sum(header_sizes(dep / "native" / "weights.safetensors").values())
    shared = header_sizes(dep / "native" / "shared.safetensors")
    hidden = int(meta["hidden_size"])
    rest = sum(b for k, b in shared.items() if k != "embed") + hidden * 4
    kv = 2 * int(meta["num_layers"]) * int(meta["num_kv_heads"]) * int(meta["head_dim"]) * 4 * kv_slots
    return {"decoder": layers, "head_and_rest": rest, "kv": int(kv), "total": int(layers + rest + kv)}


def gguf_step_bytes(path: Path, meta: dict, kv_slots: float) -> dict:
    """The same for llama.cpp on a GGUF: every tensor but the embedding table (one row of it), f16 keys/values."""
    import gguf

    r = gguf.GGUFReader(str(path))
    sizes = {t.name: int(t.n_bytes) for t in r.tensors}
    emb = sizes.pop("token_embd.weight")
    row = emb // int(meta["vocab_size"])
    dec = sum(b for k, b in sizes.items() if k.startswith("blk."))
    rest = sum(b for k, b in sizes.items() if not k.startswith("blk.")) + row
    kv = 2 * int(meta["num_layers"]) * int(meta["num_kv_heads"]) * int(meta["head_dim"]) * 2 * kv_slots
    return {"decoder": dec, "head_and_rest": rest, "kv": int(kv), "total": int(dec + rest + kv)}


def reusable(dep: Path, model: Path, p: float, weights: str, head: str) -> dict | None:
    """A deployment already in --work built from the same folder with the same options (a resumed or --keep run):
    its build record (from its sparsedeploy.json), else None."""
    try:
        meta = json.loads((dep / "sparsedeploy.json").read_text())
        index = json.loads((dep / "native" / "native.json").read_text())
    except (OSError, ValueError):
        return None
    same = (meta.get("source") == str(model.resolve()) and (meta.get("magnitude_pruned") or 0) == p
            and index.get("weights") == weights and index.get("head") == head)
    if not same:
        return None
    b = meta.get("build") or {}
    return {"wall_s": b.get("seconds"), "peak_rss_mb": round(b["peak_rss_mb"]) if b.get("peak_rss_mb") else None,
            "reused": True}


def tuned(t: dict | None) -> str:
    """How the build's tuner chose the formats: timed (with the other processes' CPU share) or by bytes."""
    if not t:
        return ""
    if t.get("fallback"):
        return f" (chosen by bytes: {t['fallback']})"
    load = t.get("other_load")
    return f" (timed at build{'' if load is None else f'; other processes {load:.0%} of the CPU'})"


def two_layer_reference() -> dict:
    """Earlier runs' 2-layer numbers (committed results; not measured here)."""
    ref = {}
    if TWO_LAYER_PARETO.is_file():
        d = json.loads(TWO_LAYER_PARETO.read_text())
        ref["pareto"] = {"file": TWO_LAYER_PARETO.name, "finished": d.get("finished"),
                         "points": [{"label": p["label"], "ms": round(p["ms"], 2),
                                     "x_vs_q4_0": round(p["vs"].get("Dense Q4_0 (llama.cpp)", float("nan")), 2)}
                                    for p in d["points"]]}
    if TWO_LAYER_TABLE5.is_file():
        d = json.loads(TWO_LAYER_TABLE5.read_text())
        rows = d["engines"]["native"]
        dense = next(r["latency_ms"] for r in rows if r["sparsity"] < 0.005)
        ref["table5_fp32"] = {"file": TWO_LAYER_TABLE5.name, "finished": d.get("finished"),
                              "rows": [{"label": r["label"], "ms": round(r["latency_ms"], 2),
                                        "speedup": round(dense / r["latency_ms"], 2)} for r in rows]}
    return ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("/work/runs/synth7b"))
    ap.add_argument("--sparsities", default="0,0.5,0.7,0.9")
    ap.add_argument("--weights", default="int8")
    ap.add_argument("--head", default="q4")
    ap.add_argument("--peer", default="q4_0", help="GGUF types for llama.cpp, comma-separated ('' for none)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/full_depth_7b"))
    ap.add_argument("--cores", type=int, default=None)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--lock", default="/work/notes/cpu.lock" if Path("/work/notes").is_dir() else "")
    ap.add_argument("--tag", default="")
    ap.add_argument("--load-ab", action="store_true", help="also time the first sparsity's weights memory-mapped "
                    "and copied (SPARSEDEPLOY_NATIVE_LOAD) side by side in its group")
    ap.add_argument("--keep", action="store_true", help="keep the deployments and GGUFs (a rerun reuses them)")
    ap.add_argument("--keep-peers", action="store_true", help="keep (and reuse) only the GGUFs")
    ap.add_argument("--merge", type=Path, default=None, help="an earlier run's JSON: its rows of sparsities this run "
                    "does not measure are kept in the table, marked with that run's time")
    ap.add_argument("--ram-share", type=float, default=0.75, help="a group's weights (deployment + GGUFs, all mapped "
                    "at once) stay under this share of RAM: the largest GGUFs leave the group otherwise")
    a = ap.parse_args()

    from sparsedeploy.bench import report
    from sparsedeploy.bench.bench import BenchConfig, prompt_ids, time_jobs
    from sparsedeploy.engine.deployment import read_deployment
    from sparsedeploy.engine.llamacpp import build_info
    from sparsedeploy.engine import unavailable
    from sparsedeploy.workflows.sweep import parse_sparsities

    sparsities = parse_sparsities(a.sparsities)
    peers = [t.strip() for t in a.peer.split(",") if t.strip()]
    if peers and unavailable("llamacpp") is not None:
        print(f"note: {unavailable('llamacpp')}; timing the native engine alone")
        peers = []
    py = sys.executable
    made_model = None
    if not (a.model / "config.json").is_file():
        with cpu_lock(a.lock, False):
            made_model = run([py, "-m", "sparsedeploy.cli", "synth", "llama2-7b", "--layers", "32", "--dtype", "bf16",
                              "--out", str(a.model)])
    conf = json.loads((a.model / "config.json").read_text())
    label = conf.get("sparsedeploy_synthetic")
    if not label:
        raise SystemExit(f"{a.model} is not a synthetic model folder (config.json has no sparsedeploy_synthetic)")
    a.work.mkdir(parents=True, exist_ok=True)
    cfg = BenchConfig(engine="native,llamacpp" if peers else "native", cores=a.cores, prompt_tokens=a.prompt_tokens,
                      new_tokens=a.new_tokens, rounds=a.rounds, ort_baseline=False)
    kv_slots = a.prompt_tokens + a.new_tokens / 2
    ggufs, gguf_rec = {}, {}
    for t in peers:          # dense weights, streamed: llama.cpp's peer of every sparsity
        path = a.work / f"dense-{t}.gguf"
        if path.is_file() and (a.keep or a.keep_peers):
            ggufs[t] = path
            gguf_rec[t] = {"wall_s": None, "peak_rss_mb": None, "bytes": path.stat().st_size, "reused": True}
            continue
        with cpu_lock(a.lock, False):
            rec = run([py, "-c", "import sys; from sparsedeploy.export.gguf import write_gguf_from_folder as w; "
                       f"print(w(sys.argv[1], sys.argv[2], '{t}'))", str(a.model), str(path)])
        ggufs[t] = path
        gguf_rec[t] = {**rec, "bytes": path.stat().st_size}
    bw, load_ab = None, None
    rows, peer_rows = [], []
    if a.merge:                          # an earlier run's other sparsities, each with its own peers' rounds
        old = json.loads(a.merge.read_text())
        keep = [r for r in old["rows"] if r["sparsity"] not in sparsities]
        for r in keep:                   # a row merged before keeps the run it was measured in
            r["from_run"] = r.get("from_run") or old["finished"]
        rows += keep
        peer_rows += [dict(p, from_run=p.get("from_run") or old["finished"]) for p in old["peer_rows"]
                      if p["group"] not in sparsities]
    try:
        for p in sparsities:
            dep = a.work / f"p{round(p * 100):02d}"
            argv = [py, "-m", "sparsedeploy.cli", "export", str(a.model), "--format", "native", "--weights", a.weights,
                    "--head", a.head, "--seqlen", str(a.seqlen), "--out", str(dep)]
            if p > 0:
                argv += ["--prune-magnitude", str(p)]
            if a.cores:
                argv += ["--cores", str(a.cores)]
            build = reusable(dep, a.model, p, a.weights, a.head)
            if build is None:
                with cpu_lock(a.lock, False):
                    build = run(argv)
            meta = read_deployment(dep)
            index = json.loads((dep / "native" / "native.json").read_text())
            fmts: dict[str, int] = {}
            for layer in index["layers"]:
                for g in layer.values():
                    f = g["format"] + ("/serial" if g.get("serial") else "/portable" if g.get("portable") else "")
                    fmts[f] = fmts.get(f, 0) + 1
            tn = index.get("tuning") or {}
            tuning = {"other_load": tn.get("other_load"), "fallback": tn.get("fallback"), "attempts": tn.get("attempts")}
            name = f"magnitude {p:.0%} {a.weights}+{a.head}" if p > 0 else f"dense {a.weights}+{a.head}"
            jobs = [(dict(meta, label=name), "native")]
            if a.load_ab and p == sparsities[0]:      # the same weights loaded the other way, in the same rounds
                jobs += [(dict(meta, label=f"{name} ({mode})", env={"SPARSEDEPLOY_NATIVE_LOAD": mode}), "native")
                         for mode in ("mmap", "copy")]
                jobs = jobs[1:]
            # every engine of a group stays loaded through its rounds: weights beyond RAM would be paged in and
            # out between turns and slow all of them, so the largest GGUFs sit out a group that would not fit
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            group_peers, total = [], du(dep / "native")
            for t in sorted(peers, key=lambda t: ggufs[t].stat().st_size):
                if total + ggufs[t].stat().st_size <= a.ram_share * ram:
                    group_peers.append(t)
                    total += ggufs[t].stat().st_size
            left_out = [t for t in peers if t not in group_peers]
            if left_out:
                print(f"{name}: {', '.join(t.upper() for t in left_out)} left out of this group "
                      f"(deployment + GGUFs above {a.ram_share:.0%} of RAM)", flush=True)
            jobs += [(dict(meta, label=f"dense {t.upper()} GGUF", gguf=str(ggufs[t]), sparsity=0.0), "llamacpp")
                     for t in group_peers]
            prompt = prompt_ids(meta, a.prompt_tokens)
            with cpu_lock(a.lock, True):     # the bandwidth probe inside the first timing window
                bw = bw or report.measure_bandwidth(threads=a.cores, mbytes=256)
                timed = time_jobs(jobs, cfg, prompt, None)
            nat = timed[0]
            if a.load_ab and p == sparsities[0]:
                load_ab = [{"load": r["native_bytes"]["load"], "ms": r["latency_ms"], "startup_s": r["compile_s"],
                            "rss_mb": r["rss_mb"], "peak_rss_mb": r["peak_rss_mb"]} for r in timed[:2]]
                timed, jobs = timed[:1] + timed[2:], jobs[:1] + jobs[2:]      # the table's row: mmap
            nb = native_step_bytes(dep, meta, kv_slots)
            row = {"sparsity": p, "label": name, "realized_sparsity": meta["sparsity"], "ms": nat["latency_ms"],
                   "p90_ms": nat["latency_p90_ms"], "rss_mb": nat["rss_mb"], "peak_rss_mb": nat["peak_rss_mb"],
                   "startup_s": nat["compile_s"], "native_bytes": nat["native_bytes"], "disk_bytes": du(dep),
                   "build": {**build, "stage_peak_rss_mb": meta.get("build", {}).get("peak_rss_mb")},
                   "formats": fmts, "tuning": tuning, "step_bytes": nb, "peers_left_out": left_out, "bound_ms": report.bound_ms(nb["total"], bw["gbs"]),
                   "decoder_bytes_per_weight": index["bytes"]["decoder_linears"] / (index["bytes"]["decoder_linears_dense"] / 4),
                   "steps_timed": nat["steps_timed"], "peers": {}}
            for (m, _), r in zip(jobs[1:], timed[1:]):
                t = Path(m["gguf"]).stem.split("-")[-1]
                row["peers"][t] = r["latency_ms"]
                gb = gguf_step_bytes(Path(m["gguf"]), meta, kv_slots)
                peer_rows.append({"type": t, "group": p, "ms": r["latency_ms"], "rss_mb": r["rss_mb"],
                                  "peak_rss_mb": r["peak_rss_mb"], "step_bytes": gb,
                                  "bound_ms": report.bound_ms(gb["total"], bw["gbs"])})
            rows.append(row)
            print(f"{name}: {row['ms']:.1f} ms/token"
                  + "".join(f", {t.upper()} {v:.1f}" for t, v in row["peers"].items())
                  + f"; build {f0(build['wall_s'])} s, peak RSS {build['peak_rss_mb']} MB; {row['disk_bytes'] / 1e9:.2f} GB",
                  flush=True)
            if not a.keep:
                shutil.rmtree(dep, ignore_errors=True)
            write(a, rows, peer_rows, gguf_rec, bw, label, made_model, build_info(), sparsities, load_ab)   # so far
    finally:
        if not (a.keep or a.keep_peers):
            for p in ggufs.values():
                p.unlink(missing_ok=True)
    write(a, rows, peer_rows, gguf_rec, bw, label, made_model, build_info(), sparsities, load_ab)


def write(a, rows, peer_rows, gguf_rec, bw, label, made_model, llamacpp_build, sparsities, load_ab=None) -> None:
    rows = sorted(rows, key=lambda r: r["sparsity"])
    dense = next((r for r in rows if r["sparsity"] == 0), None)
    for r in rows:
        r["speedup_vs_dense_native"] = dense["ms"] / r["ms"] if dense else None
        for t, v in r["peers"].items():
            r[f"x_vs_{t}"] = v / r["ms"]
    conf = json.loads((a.model / "config.json").read_text())
    shape = (f"{label.get('preset')} shapes, {conf['num_hidden_layers']} decoder layers (hidden {conf['hidden_size']}, "
             f"MLP {conf['intermediate_size']}, {conf['num_attention_heads']} heads)")
    doc = {"title": f"SYNTHETIC {label.get('preset')} shapes, {conf['num_hidden_layers']} decoder layers: native-only "
                    f"{a.weights} deployments (streamed build) vs llama.cpp dense GGUF — decode ms/token",
           "cpu": cpu_name(), "cpu_tag": cpu_tag(), "cores": os.cpu_count(), "bandwidth": bw,
           "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
           "synthetic": label, "model": str(a.model), "synth_run": made_model,
           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
           "sparsities": list(sparsities), "rows": rows, "peer_rows": peer_rows, "ggufs": gguf_rec,
           "llamacpp_build": llamacpp_build, "load_ab": load_ab, "reference_2_layers": two_layer_reference(),
           "reference_paper_speedups": {f"{int(k * 100)}%": v for k, v in PAPER.items()},
           "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"full_depth_7b_{cpu_tag()}" + (f"_{a.tag}" if a.tag else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(doc, indent=2))
    lines = [f"# {doc['title']}", "",
             f"**SYNTHETIC weights** (random, {shape}; vocabulary {label.get('vocab_size')} from the "
             f"{label.get('tokenizer')} tokenizer; {label.get('dtype')} folder `{a.model}`): speed, memory "
             "and bytes are real, model quality is meaningless. Magnitude pruning (the synthetic sweep's pruner: the "
             "smallest |w| of each whole matrix) applied while streaming.",
             f"CPU: {doc['cpu']} ({doc['cores']} logical CPUs, {doc['ram_gib']} GiB RAM), memory bandwidth probe "
             f"{bw['gbs']:.1f} GB/s; finished {doc['finished']}; decode: {a.prompt_tokens}-token prompt + "
             f"{a.new_tokens} new tokens, {a.rounds} interleaved rounds per group, each sparsity one group with "
             f"llama.cpp {', '.join(t.upper() for t in gguf_rec) or '(not built: none)'} in its rounds.",
             f"Native: `{a.weights}` decoder groups (formats timed per layer kind on this CPU at build, or chosen by bytes where the machine was busy: see below), lm_head "
             f"`{a.head}`, embedding fp32; weights memory-mapped or copied as `load` says. "
             + (f"llama.cpp: {llamacpp_build.splitlines()[0]}." if llamacpp_build else ""), ""]
    peers = list(gguf_rec)
    head = ["configuration", "ms/token", "× vs dense (native)"] + [f"× vs {t.upper()}" for t in peers] + [
        "bound ms", "of bound", "decoder B/weight", "disk GB", "RSS MB", "load", "start s", "build s", "build peak RSS MB"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        nb = r["native_bytes"] or {}
        cells = [r["label"] + (f" (run of {r['from_run']})" if r.get("from_run") else ""), f"{r['ms']:.1f}",
                 f"{r['speedup_vs_dense_native']:.2f}" if r["speedup_vs_dense_native"] else "–"]
        cells += [f"{r[f'x_vs_{t}']:.2f}" if f"x_vs_{t}" in r else "– (left out: RAM)" for t in peers]
        cells += [f"{r['bound_ms']:.1f}", f"{r['bound_ms'] / r['ms']:.0%}", f"{r['decoder_bytes_per_weight']:.3f}",
                  f"{r['disk_bytes'] / 1e9:.2f}", f"{r['rss_mb']:.0f}", str(nb.get("load", "?")),
                  f"{r['startup_s']:.1f}", f0(r['build']['wall_s']) + (" (earlier run)" if r["build"].get("reused") else ""),
                  str(r["build"]["peak_rss_mb"])]
        lines.append("| " + " | ".join(cells) + " |")
    for t in peers:
        pr = [x for x in peer_rows if x["type"] == t]
        if pr:
            ms = sorted(x["ms"] for x in pr)
            med = ms[len(ms) // 2]
            cells = [f"dense {t.upper()} GGUF (llama.cpp), median of {len(pr)} groups", f"{med:.1f}", "–"]
            cells += ["1.00" if u == t else "–" for u in peers]
            bound = pr[0]["step_bytes"]["total"] / (bw["gbs"] * 1e6) if bw else pr[0]["bound_ms"]  # this run's bandwidth
            cells += [f"{bound:.1f}", f"{bound / med:.0%}", "–",
                      f"{gguf_rec[t]['bytes'] / 1e9:.2f}", f"{max(x['rss_mb'] for x in pr):.0f}", "mmap", "–",
                      f0(gguf_rec[t]['wall_s']), str(gguf_rec[t]["peak_rss_mb"])]
            lines.append("| " + " | ".join(cells) + " |")
    merged = sorted({r["from_run"] for r in rows if r.get("from_run")})
    if merged:
        lines += ["", f"Rows marked 'run of …' were measured in an earlier run of this script ({', '.join(merged)}; "
                  "kept with --merge: each sparsity is its own group, timed with its own llama.cpp rounds, so its "
                  "'× vs Q4_0' / '× vs Q8_0' are from that run; its '× vs dense' is against the dense row of this table, whichever run measured it)."]
    lines += ["", "Resident weights of the native engine per value type (MB):", ""]
    for r in rows:
        bvt = (r["native_bytes"] or {}).get("by_value_type") or {}
        lines.append(f"- {r['label']}: " + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in sorted(bvt.items()))
                     + f"; formats {r['formats']}" + tuned(r.get("tuning")))
    if load_ab:
        lines += ["", f"Loading the {rows[0]['label']} weights both ways, same rounds: " + "; ".join(
            f"{x['load']} {x['ms']:.1f} ms/token, start {x['startup_s']:.1f} s, RSS {x['rss_mb']:.0f} MB "
            f"(peak {x['peak_rss_mb']:.0f})" for x in load_ab) + " (the table's row: mmap)."]
    lines += ["", "Bound: bytes one step reads (native: every decoder array, lm_head and norms, one embedding row, "
              "fp32 keys/values of the occupied slots; llama.cpp: every tensor but the embedding table, one row of "
              "it, f16 keys/values) / the bandwidth probe. RSS: the engine worker's after decoding (memory-mapped "
              "weights count as they are touched). Build: `sparsedeploy export MODEL --format native` in its own "
              "process (wall s, peak RSS by wait4)."]
    ref = doc["reference_2_layers"]
    lines += ["", "## For reference (not measured in this run)", "",
              "The DLP paper's Table 5 (LLaMA2-7B, 32 layers, DeepSparse, speedup vs dense): "
              + ", ".join(f"{k} {v}×" for k, v in doc["reference_paper_speedups"].items()) + "."]
    if "table5_fp32" in ref:
        t = ref["table5_fp32"]
        lines.append(f"2 decoder layers, native fp32 ({t['file']}, {t['finished']}): "
                     + ", ".join(f"{x['label']} {x['ms']} ms ({x['speedup']}×)" for x in t["rows"]) + ".")
    if "pareto" in ref:
        t = ref["pareto"]
        lines.append(f"2 decoder layers, native low-bit vs llama.cpp ({t['file']}, {t['finished']}): "
                     + ", ".join(f"{x['label']} {x['ms']} ms ({x['x_vs_q4_0']}× vs Q4_0)" for x in t["points"]) + ".")
    lines.append("")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
