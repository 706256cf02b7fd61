"""Perplexity vs decode latency on this CPU, against the peer a user would pick instead (issue 12).

(a) SmolLM2-135M: WikiText-2 perplexity and decode ms/token of
      - llama.cpp on dense GGUF files: F32, F16, Q8_0, Q4_0, Q4_1 (our exports of the dense model) and the Q4_1
        file the default model ships as;
      - sparsedeploy's dense and Wanda + DLP {50,60,70,80,90}% deployments on native, DeepSparse, ONNX Runtime.
    Every latency in one run: groups of deployments, each group with llama.cpp Q4_0 and Q8_0 in its rounds.
    Perplexity: the same WikiText-2 windows for every point (256 tokens, first 64 windows), computed by PyTorch
    on each model's weights — a GGUF's dequantised weights for llama.cpp's points (llama.cpp itself also
    quantises activations to 8 bits in its products; its own perplexity on a few windows of the same text is
    recorded by the export beside PyTorch's on those windows, and is copied into the table's notes).
(b) LLaMA2-7B layer shapes (synthetic random weights, 2 decoder layers + embedding/lm_head): latency only,
    native (and whatever --engines names) at 0/50/70/90% against llama.cpp on GGUFs of the same dense weights.

Results: benchmarks/results/pareto_<name>.{json,md,png}. Resumable (sweep artifacts, GGUFs, perplexities).
While timing, /tmp/sparsedeploy-quiet exists (cooperating jobs on this machine wait for it to go). Run on an
otherwise idle machine:

    .venv/bin/python benchmarks/pareto.py [--only smollm2|synthetic] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsedeploy import ui  # noqa: E402
from sparsedeploy.bench import pareto  # noqa: E402
from sparsedeploy.engine.cpuinfo import cpu_tag  # noqa: E402
from sparsedeploy.bench.bench import BenchConfig, _read_deployment  # noqa: E402
from sparsedeploy.pipeline.rundir import read_json, write_json  # noqa: E402
from sparsedeploy.workflows.sweep import SweepConfig, parse_sparsities, sweep  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
QUIET = Path("/tmp/sparsedeploy-quiet")
TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")
GGUF_BPW = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32}   # bytes per weight


def peer_label(t: str) -> str:
    return f"Dense {t.upper()} (llama.cpp)"


@contextmanager
def quiet():
    QUIET.write_text("timing in progress\n")
    try:
        yield
    finally:
        QUIET.unlink(missing_ok=True)


def weight_view(meta: dict, weights: str, root: Path) -> dict:
    """A second view of a deployment whose native/ folder holds `weights` builds (the other files are links to
    the original's), so that the fp32 and the low-bit native builds of one model run side by side."""
    src = Path(meta["dir"])
    view = root / f"{src.parent.name}-{weights}"
    view.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "native" and not f.name.startswith(".") and not (view / f.name).exists():
            (view / f.name).symlink_to(f.resolve())
    return _read_deployment(view)


def split_weights(w: str) -> dict:
    """'int8' -> the value type with its default head; 'int8+q4' -> int8 groups and a 4-bit lm_head;
    'int4:256:fp16+q4' -> int4 groups in round-to-nearest groups of 256 with float16 scales (--int4-group,
    --int4-scales) and a 4-bit lm_head."""
    weights, _, head = w.partition("+")
    weights, *storage = weights.split(":")
    out = {"weights": weights, "head": head or None}
    if storage:
        out.update(int4_group=int(storage[0]), int4_scales=storage[1] if len(storage) > 1 else None)
    return out


def lowbit_perplexity(meta: dict, index: dict, ecfg, cache: Path, act_width: int | None = None) -> float:
    """PyTorch's perplexity on a low-bit build's arithmetic (its weights dequantised incl. the int8 lm_head, int8
    activations per 256 columns where the kernels take them, or per `act_width` columns; 0: fp32 activations), on
    the eval stage's windows."""
    import torch

    from sparsedeploy.export.native import default_act_columns, lowbit_reference_model
    from sparsedeploy.pipeline.data import eval_windows, load_text
    from sparsedeploy.pipeline.evaluate import perplexity

    key = {"native_key": index.get("key"), "formats": [{g: v["format"] for g, v in lg.items()} for lg in index["layers"]],
           "data": ecfg.data, "seqlen": ecfg.seqlen, "max_windows": ecfg.max_windows,
           "act_width": (index.get("act_columns") or default_act_columns()) if act_width is None else act_width}
    if cache.is_file() and read_json(cache).get("key") == key:
        return read_json(cache)["perplexity"]
    model, tok, quantise_activations = lowbit_reference_model(meta, index)
    windows = eval_windows(tok, load_text(ecfg.data), ecfg.seqlen, ecfg.max_windows)
    hooks = quantise_activations(act_width) if act_width != 0 else []
    try:
        ppl = perplexity(model, windows)
    finally:
        for h in hooks:
            h.remove()
    write_json(cache, {"key": key, "perplexity": ppl})
    return ppl


def llama_bench(ggufs: list[dict], prompt: int, new: int, cores: int | None, reps: int = 3) -> dict[str, dict]:
    """llama.cpp's own figure for each GGUF: `llama-bench -p 0 -n NEW -d PROMPT` (tg at the same depth as our
    decode), ms/token = 1000 / avg t/s, beside the binding's per-token time that the table uses."""
    import os
    import subprocess

    from sparsedeploy.engine.llamacpp import tool

    exe = tool("llama-bench")
    if exe is None:
        return {}
    out = {}
    for g in ggufs:
        cmd = [str(exe), "-m", g["gguf"], "-p", "0", "-n", str(new), "-d", str(prompt), "-r", str(reps),
               "-t", str(cores or os.cpu_count()), "-o", "json"]
        try:
            doc = json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True).stdout)
            ts = float(doc[0]["avg_ts"])
            out[g["label"]] = {"ms": 1000.0 / ts, "tokens_per_s": ts, "stddev_ts": float(doc[0].get("stddev_ts", 0.0)),
                               "command": " ".join(cmd[1:])}
        except (subprocess.SubprocessError, ValueError, KeyError, IndexError) as e:
            out[g["label"]] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
    return out


def _bench_notes(lb: dict[str, dict], pts: list[dict]) -> list[str]:
    ms = {p["label"]: p["ms"] for p in pts if p["engine"] == "llamacpp"}
    lines = []
    for label, r in lb.items():
        if "ms" in r:
            lines.append(f"{label}: llama-bench tg at the same depth {r['ms']:.2f} ms/token ({r['tokens_per_s']:.1f} ± "
                         f"{r['stddev_ts']:.1f} t/s) vs the binding's {ms.get(label, float('nan')):.2f} (the table's figure)")
        else:
            lines.append(f"{label}: llama-bench failed ({r['error']})")
    return lines


def gptq_views(work: Path, a, ecfg, ppl: dict) -> list[dict]:
    """The GPTQ variants: each sweep RUN at `--gptq` sparsities copied and quantised to 4 bits (group 128,
    asymmetric, keeping every zero), exported, and built with `--weights int4` from the checkpoint's own codes.
    Perplexity: PyTorch on the engine's arithmetic (the RUN's fake-quant weights, int8 lm_head, int8
    activations per 256 columns)."""
    import shutil

    from sparsedeploy.export.native import ensure_native
    from sparsedeploy.export.stage import export
    from sparsedeploy.pipeline import stages
    from sparsedeploy.pipeline.rundir import RunDir
    from sparsedeploy.workflows.sweep import _tag

    views = []
    for p in parse_sparsities(a.gptq):
        src, dst = work / "sweep_smollm2" / _tag(p), work / "gptq_smollm2" / _tag(p)
        if not (dst / "quantized" / "quantize.json").is_file():
            ui.info(f"GPTQ 4-bit: {src}")
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("deployment"))
            stages.quantize(RunDir(dst), stages.QuantConfig(bits=4, group_size=128, sym=False, device="cpu"))
        with quiet():
            dep = _read_deployment(export(str(dst), seqlen=256))
        name = f"Wanda+DLP {round(p * 100)}% GPTQ-4bit"
        v = weight_view(dep, "int4", work / "views_smollm2_gptq")
        with quiet():
            index = ensure_native(v, cores=a.cores, weights="int4")
        check = {g.get("codes") for layer in index["layers"] for g in layer.values()}
        if check != {"gptq"}:
            sys.exit(f"error: the int4 build of {dst} did not read the GPTQ codes ({check})")
        v.update(config=f"{name} int4", label=f"{name} int4", engines=["native"])
        ppl[v["config"]] = lowbit_perplexity(v, index, ecfg, work / "ppl" / f"gptq-{_tag(p)}-int4.json")
        views.append(v)
    return views


def smollm2(work: Path, a) -> None:
    from sparsedeploy.engine.llamacpp import LlamaCppRuntime
    from sparsedeploy.export.gguf import export_gguf, gguf_perplexity
    from sparsedeploy.export.native import ensure_native
    from sparsedeploy.pipeline.models import ALIASES, _package_file
    from sparsedeploy.pipeline.stages import EvalConfig, evaluate

    why = LlamaCppRuntime.unavailable()
    if why:
        sys.exit(f"error: {why} — build it: scripts/build-llamacpp.sh")
    engines = a.engines
    cfg = SweepConfig("smollm2-135m", allocator="dlp", method="wanda", nsamples=32, calib_seqlen=256,
                      sparsities=parse_sparsities(a.sparsities), export_seqlen=256, prepare_only=True,
                      bench=BenchConfig(engine=engines, ort_baseline=False))
    deps = [_read_deployment(d) for d in sweep(cfg, work / "sweep_smollm2")["deployments"]]
    # perplexity: the same windows for every point
    ecfg = EvalConfig(data="wikitext2", seqlen=256, max_windows=64)
    ppl, configs = {}, {}
    for d in deps:
        run = Path(d["dir"]).parent
        name = "Dense (fp32)" if d["sparsity"] < 0.005 else f"Wanda+DLP {round(d['sparsity'] * 100)}%"
        d["config"] = d["label"] = name
        out = work / "ppl" / "dense.json" if d["sparsity"] < 0.005 else None
        src = "smollm2-135m" if d["sparsity"] < 0.005 else str(run)
        ui.info(f"perplexity: {name}")
        ppl[name] = evaluate(src, ecfg, out=out)["perplexity"]
    ggufs, bpw, llama_ppl, checks = [], {}, {}, []
    for t in TYPES:
        path = export_gguf("smollm2-135m", qtype=t, out=work / "gguf" / f"model-{t}.gguf", cores=a.cores)
        rec = read_json(path.with_suffix(".json"))
        name = peer_label(t)
        ggufs.append(dict(deps[0], gguf=str(path), label=name, config=name))
        bpw[name] = GGUF_BPW[t]
        ppl[name] = gguf_perplexity(path, "smollm2-135m", ecfg)["perplexity"]
        if isinstance(rec.get("perplexity"), dict) and rec["perplexity"].get("llamacpp") is not None:
            llama_ppl[name] = rec["perplexity"]
    shipped = _package_file(*ALIASES["smollm2-135m"])
    name = "Dense Q4_1 as shipped (llama.cpp)"
    ggufs.append(dict(deps[0], gguf=str(shipped), label=name, config=name))
    ppl[name] = ppl["Dense (fp32)"]    # the default model is this file, dequantised: the same weights
    bpw[name] = GGUF_BPW["q4_1"]
    lowbit = [w for w in a.native_weights.split(",") if w != "fp32"]
    views = []
    with quiet():
        if "native" in engines:
            for d in deps:
                ensure_native(d, cores=a.cores, weights="fp32")
                for w in lowbit:
                    v = weight_view(d, w, work / "views_smollm2")
                    v.update(config=f"{d['config']} {w}", label=f"{d['config']} {w}", engines=["native"],
                             index=ensure_native(v, cores=a.cores, **split_weights(w)))
                    views.append(v)
    views += gptq_views(work, a, ecfg, ppl) if a.gptq and "native" in engines else []
    for v in views:
        if v["config"] in ppl:
            continue
        ppl[v["config"]] = lowbit_perplexity(v, v.pop("index"), ecfg, work / "ppl" / f"{Path(v['dir']).name}.json")
    if views:    # the check behind those numbers: perplexity through the engine itself, on the first windows
        from sparsedeploy.bench.quality import engine_perplexity, windows_for
        from sparsedeploy.pipeline.stages import EvalConfig as EC

        half = [v for v in views if abs(float(v["sparsity"]) - 0.5) < 0.01]     # each value type at 50%
        for v in half or views[:2]:
            win = windows_for(v["dir"], "wikitext2", 256, 4)
            with quiet():
                got = engine_perplexity(v["onnx"], "native", win, cores=a.cores, cache_len=int(v["seqlen"]))
            ref = lowbit_perplexity(dict(v), ensure_native(v, cores=a.cores, keep_fixed=True), EC("wikitext2", 256, 4),
                                  work / "ppl" / f"{Path(v['dir']).name}-4w.json")
            checks.append(f"{v['config']}: perplexity through the native engine {got['perplexity']:.3f} vs PyTorch on the "
                          f"same low-bit weights and activations {ref:.3f} (first 4 windows; "
                          f"{100 * (got['perplexity'] / ref - 1):+.3f}%)")
    name = "pareto_smollm2"
    if a.gptq_only:          # only the low-bit native builds at the GPTQ sparsities, against the 4/8-bit peers
        keep = {round(float(x) * 100) for x in a.gptq.split(",")}
        deps = [v for v in views if round(float(v["sparsity"]) * 100) in keep]
        ggufs = [g for g in ggufs if g["label"] in (peer_label("q4_0"), peer_label("q8_0"), peer_label("q4_1"))]
        name = "pareto_smollm2_gptq"
    else:
        deps = deps + views
    with quiet():
        pcfg = pareto.ParetoConfig(bench=BenchConfig(engine=engines, cores=a.cores, prompt_tokens=64, new_tokens=128,
                                                     rounds=a.rounds, ort_baseline=False),
                                   group_size=a.group_size, anchors=(peer_label("q4_0"), peer_label("q8_0")))
        doc = pareto.measure(deps, ggufs, pcfg)
        doc["llama_bench"] = llama_bench(ggufs, 64, 128, a.cores)
    pts = pareto.points(doc, ppl, bpw)
    notes = [
        "Perplexity: WikiText-2 test, first 64 non-overlapping 256-token windows, computed by PyTorch on each point's "
        "weights (llama.cpp points: the GGUF's dequantised weights; llama.cpp also rounds activations to 8 bits in "
        "its quantised products, so its own perplexity differs slightly — see below).",
        "Decode: 64-token prompt then 128 new tokens, greedy, " + f"{pcfg.bench.cores or doc['machine']['cores']} threads, "
        f"{a.rounds} interleaved rounds per group (order rotated), median ms/token. Groups of {a.group_size} "
        "deployments × engines, each with llama.cpp Q4_0 and Q8_0 in the same rounds; '× vs' columns are against "
        "those anchors timed in the same group (>1: faster than the peer).",
        "'Dense (fp32)' is the default model as we load it: the shipped Q4_1 GGUF dequantised to fp32, so 'Q4_1 as "
        "shipped' has the same weights (and perplexity); our Q4_1 export re-quantises them.",
        "Decoder bytes/weight: what the engine stores per decoder-linear weight (native: its measured format choice "
        "incl. indices; llama.cpp: the GGUF type's block size; DeepSparse/ORT: not reported).",
        "llama.cpp build: " + _llamacpp_build(),
    ]
    notes += _bench_notes(doc["llama_bench"], pts) + checks
    if views:
        notes.append("'… int8' rows: the same pruned model on the native engine with int8 weights (per output row, "
                     "round-to-nearest at compile time; lm_head int8 too; activations int8 per 256 columns in the int8 "
                     "dense/bitmask products); '… int4' rows: 4-bit codes of the kept weights over a bitmask "
                     "(round-to-nearest on the GPTQ grid, groups of 128, lm_head int8, activations int8 per 64 "
                     "columns); '+q4': the lm_head 4-bit (Q4_0-like) instead of int8; '… GPTQ-4bit int4': the pruned RUN "
                     "quantised by GPTQ (4 bits, group 128, every zero kept) and built from the checkpoint's own codes. "
                     "Their perplexity is PyTorch's on exactly that arithmetic.")
    for gguf, rec in llama_ppl.items():      # not `name`: that is the report's stem
        notes.append(f"{gguf}: llama-perplexity {rec['llamacpp']:.2f} vs PyTorch (fp32 model) {rec['pytorch_fp32']:.2f} "
                     f"on {rec['chunks']}×{rec['n_ctx']} tokens, llama-perplexity's protocol for both")
    _publish(doc, pts, name, "SmolLM2-135M: WikiText-2 perplexity vs decode latency (llama.cpp dense GGUF "
             "vs sparsedeploy Wanda+DLP)", pcfg, notes)


def _llamacpp_build() -> str:
    from sparsedeploy.engine.llamacpp import build_info

    return " ".join((build_info() or "unknown").split())[:300]


def synthetic(work: Path, a) -> None:
    from sparsedeploy.export.gguf import export_gguf
    from sparsedeploy.workflows.sweep import _synthetic_pruned, synthetic_tokenizer, SYNTHETIC

    engines = a.synthetic_engines
    cfg = SweepConfig(synthetic="llama2-7b", layers=2, method="magnitude", allocator="uniform", export_seqlen=256,
                      sparsities=parse_sparsities(a.synthetic_sparsities), prepare_only=True,
                      bench=BenchConfig(engine=engines, ort_baseline=False))
    out = work / "sweep_synthetic_llama2_7b"
    with quiet():          # native weights are tuned (timed) as they are built
        deps = [_read_deployment(d) for d in sweep(cfg, out)["deployments"]]
    tok = synthetic_tokenizer(SYNTHETIC["llama2-7b"]["vocab_size"])
    dense_model = None
    ggufs, bpw = [], {}
    for t in a.synthetic_types.split(","):
        path = work / "gguf_synthetic" / f"model-{t}.gguf"
        if not path.is_file():
            dense_model = dense_model or _synthetic_pruned(cfg, 0.0)
            export_gguf("synthetic-llama2-7b-2L", qtype=t, out=path, model=dense_model, tokenizer=tok,
                        verify=False, force=True)
        name = peer_label(t)
        ggufs.append(dict(deps[0], gguf=str(path), label=name, config=name))
        bpw[name] = GGUF_BPW[t]
    del dense_model
    for d in deps:
        d["config"] = d["label"] = "Dense (fp32)" if d["sparsity"] < 0.005 else f"magnitude {round(d['sparsity'] * 100)}%"
    lowbit = [w for w in a.native_weights.split(",") if w != "fp32"]
    views = []
    if "native" in engines and lowbit:
        from sparsedeploy.engine.native.pack import check_int4, read_index
        from sparsedeploy.export.native import build_from_model

        for p, d in zip(cfg.sparsities, deps):         # the sweep returns them in this order
            for w in lowbit:
                v = weight_view(d, w, work / "views_synthetic")
                idx = read_index(Path(v["dir"]) / "native")
                sw = split_weights(w)
                g4, s4 = check_int4(sw.get("int4_group"), sw.get("int4_scales"), sw["weights"])
                want4 = {"group_size": g4, "scales": s4} if sw["weights"] == "int4" else None
                if (idx is None or idx.get("weights") != sw["weights"] or idx.get("head") != (sw["head"] or "int8")
                        or idx.get("int4") != want4):
                    with quiet():
                        build_from_model(_synthetic_pruned(cfg, p), v, cores=a.cores, **sw)
                v.update(config=f"{d['config']} {w}", label=f"{d['config']} {w}", engines=["native"])
                views.append(v)
    if "fp32" not in a.native_weights.split(","):      # only the low-bit views (and any other --synthetic-engines)
        deps = [dict(d, engines=[e for e in d.get("engines", engines.split(",")) if e != "native"]) for d in deps]
        deps = [d for d in deps if d["engines"]]
    deps = deps + views
    pcfg = pareto.ParetoConfig(bench=BenchConfig(engine=engines, cores=a.cores, prompt_tokens=16, new_tokens=64,
                                                 rounds=a.rounds, ort_baseline=False),
                               group_size=1, anchors=(peer_label("q4_0"), peer_label("q8_0")))
    with quiet():
        doc = pareto.measure(deps, ggufs, pcfg)
        doc["llama_bench"] = llama_bench(ggufs, 16, 64, a.cores)
    pts = pareto.points(doc, {}, bpw)
    notes = ["SYNTHETIC weights (random, LLaMA2-7B layer shapes: hidden 4096, MLP 11008, 32 heads, vocabulary 32000), "
             "2 decoder layers + full embedding and lm_head; magnitude pruning per output row. Latency only.",
             "llama.cpp decodes GGUF exports of the same dense weights (Q4_0/Q4_1 store the embedding and lm_head as "
             "Q8_0; our engines keep them fp32).",
             "Decode: 16-token prompt then 64 new tokens, " f"{a.rounds} interleaved rounds; one deployment per group, each "
             "group with llama.cpp Q4_0 and Q8_0 in its rounds; '× vs' columns against those.",
             "Native '… int8' / '… int4' rows: int8 values per row / 4-bit codes over a bitmask (round-to-nearest), "
             "lm_head int8 ('+q4': 4-bit, Q4_0-like), activations int8 per 256 columns.",
             "llama.cpp build: " + _llamacpp_build()] + _bench_notes(doc["llama_bench"], pts)
    _publish(doc, pts, "pareto_synthetic_llama2_7b_2layers", "SYNTHETIC LLaMA2-7B shapes, 2 layers: decode latency, "
             "sparsedeploy vs llama.cpp dense GGUF", pcfg, notes)



_SUFFIX = ""        # --suffix: a run that must not replace an earlier result of the same kind


def _publish(doc: dict, pts: list[dict], name: str, title: str, pcfg, notes: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"{name}{_SUFFIX}_{cpu_tag()}"
    doc = dict(doc, points=pts, frontier=[(p["label"], p["engine"]) for p in pareto.frontier(pts)], notes=notes,
               title=title)
    write_json(RESULTS / f"{name}.json", json.loads(json.dumps(doc, default=str)))
    md = pareto.markdown(pts, title=title, machine=doc["machine"], anchors=pcfg.anchors, notes=notes)
    (RESULTS / f"{name}.md").write_text(md)
    pareto.plot(pts, RESULTS / f"{name}.png", title=title, machine=doc["machine"])
    print(md)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["smollm2", "synthetic"], action="append")
    ap.add_argument("--work", default=str(ROOT / "runs"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cores", type=int, default=None)
    ap.add_argument("--engines", default="native,deepsparse,onnxruntime")
    ap.add_argument("--sparsities", default="0,0.5,0.6,0.7,0.8,0.9")
    ap.add_argument("--group-size", type=int, default=2)
    ap.add_argument("--synthetic-sparsities", default="0,0.5,0.7,0.9")
    ap.add_argument("--synthetic-types", default="f16,q8_0,q4_0")
    ap.add_argument("--synthetic-engines", default="native,deepsparse")
    ap.add_argument("--gptq", default="0.5,0.6", help="SmolLM2 sparsities also quantised with GPTQ 4-bit and run "
                    "as native int4 from the checkpoint's codes ('' for none)")
    ap.add_argument("--gptq-only", action="store_true", help="SmolLM2: time only the native low-bit builds at the "
                    "--gptq sparsities (RTN int8/int4 and GPTQ int4) against llama.cpp Q4_0/Q4_1/Q8_0 "
                    "-> pareto_smollm2_gptq_<cpu>")
    ap.add_argument("--native-weights", default="fp32,int8,int4", help="native value types to time (each beyond fp32 "
                    "in a view of the deployment with its own native build); 'int8+q4': int8 with a 4-bit lm_head; without 'fp32' "
                    "the synthetic fp32 deployments are not timed on native")
    ap.add_argument("--suffix", default="", help="added to the result names (e.g. _int8perm), so that a partial "
                    "run does not replace the committed full one")
    a = ap.parse_args()
    global _SUFFIX
    _SUFFIX = a.suffix
    work = Path(a.work)
    todo = a.only or ["smollm2", "synthetic"]
    if "smollm2" in todo:
        smollm2(work, a)
    if "synthetic" in todo:
        synthetic(work, a)


if __name__ == "__main__":
    main()
