"""Typer CLI: parse arguments into stage or workflow configs, call the stage or workflow, print with rich.

Bad input anywhere becomes one line on stderr and exit code 2 (see errors.UserError).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from . import ui
from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prune a causal LM with layerwise sparsity (uniform / OWL / DLP) and deploy it for sparse CPU inference.")

DEFAULT_RUN = Path("runs/default")
STREAM_HELP = ("read decoder layers one at a time from the safetensors and write the output shard by shard, in the "
               "input's dtype (default: only for models above 4 GiB in fp32)")
DETAILS_HELP = "print every column per model (memory, overhead, layer time, bandwidth bound) and the engines side by side"


def _stages():
    from .pipeline import stages  # heavy imports (torch, transformers) only when a command runs
    return stages


# ------------------------------------------------------------------------------------------------ commands
@app.command()
def calibrate(
    model: str = typer.Argument(..., help="HF folder, .gguf file, RUN dir, hub id, or 'smollm2-135m'"),
    out: Path = typer.Option(..., "--out", help="RUN directory"),
    calib: str = typer.Option("wikipedia-summaries", help="wikipedia-summaries | wikitext2 | c4 | file:PATH"),
    nsamples: int = typer.Option(128, help="calibration windows"),
    seqlen: int = typer.Option(2048, help="tokens per window"),
    seed: int = typer.Option(0),
    data_file: Optional[str] = typer.Option(None, help="local copy of the text source (e.g. wiki.test.raw)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    allow_pickle: bool = typer.Option(False, help="allow loading pickle (.bin) weights — only for trusted models"),
    stream: Optional[bool] = typer.Option(None, "--stream/--no-stream", help=STREAM_HELP),
    force: bool = typer.Option(False, help="recompute even if up to date"),
):
    """Run calibration text through the dense model, layer by layer; save windows and column norms."""
    st = _stages()
    cfg = st.CalibConfig(model, calib, nsamples, seqlen, seed, data_file, device, allow_pickle, stream)
    path = st.calibrate(st.RunDir(out), cfg, force=force)
    _print_synthetic(out)
    ui.out.print(f"calibration statistics: {path}")


@app.command()
def allocate(
    run: Path = typer.Argument(..., help="RUN directory (calibrated)"),
    sparsity: float = typer.Option(..., help="target sparsity p in (0, 1)"),
    allocator: str = typer.Option("dlp", help="uniform | owl | dlp"),
    alpha: Optional[float] = typer.Option(None, help="DLP α (default: the paper's table for p)"),
    dlp_stat: str = typer.Option("median", help="median (paper) | mean (authors' code)"),
    owl_m: float = typer.Option(5.0, help="OWL outlier threshold M"),
    owl_lambda: Optional[float] = typer.Option(None, help="OWL λ (default 0.08, lowered where ratios would leave [0, 1))"),
    force: bool = typer.Option(False),
):
    """Per-decoder-layer sparsity ratios → RUN/ratios.json (+ ratios.png)."""
    st = _stages()
    doc = st.allocate(st.RunDir(run), st.AllocConfig(sparsity, allocator, alpha, dlp_stat, owl_m, owl_lambda), force=force)
    _print_ratios(doc)


@app.command()
def prune(
    model: str = typer.Argument(..., help="HF folder, .gguf file, hub id, or 'smollm2-135m'"),
    out: Path = typer.Option(..., "--out", help="RUN directory"),
    sparsity: float = typer.Option(..., help="target sparsity p in (0, 1)"),
    allocator: str = typer.Option("dlp", help="uniform | owl | dlp"),
    method: str = typer.Option("wanda", help="magnitude | wanda | sparsegpt"),
    pattern: str = typer.Option("unstructured", help="unstructured | 2:4 | 4:8 | N:M"),
    alpha: Optional[float] = typer.Option(None, help="DLP α (default: the paper's table for p)"),
    dlp_stat: str = typer.Option("median", help="median | mean"),
    owl_m: float = typer.Option(5.0),
    owl_lambda: Optional[float] = typer.Option(None, help="OWL λ (default 0.08)"),
    calib: str = typer.Option("wikipedia-summaries"),
    nsamples: int = typer.Option(128),
    seqlen: int = typer.Option(2048),
    seed: int = typer.Option(0),
    data_file: Optional[str] = typer.Option(None),
    sequential: bool = typer.Option(False, help="prune a layer's linear groups one after another"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    allow_pickle: bool = typer.Option(False),
    bits: Optional[int] = typer.Option(None, help="joint path (--method sparsegpt only): quantize to 2–8 bits inside "
                                                  "SparseGPT's column loop; packed checkpoint in RUN/quantized/"),
    group_size: int = typer.Option(128, help="with --bits: input columns per scale/zero point (-1: one per row)"),
    act_order: bool = typer.Option(False, help="with --bits: not supported on the joint path (use `quantize`)"),
    sym: bool = typer.Option(False, help="with --bits: symmetric grid (no zero points stored)"),
    stream: Optional[bool] = typer.Option(None, "--stream/--no-stream", help=STREAM_HELP),
    force: bool = typer.Option(False),
):
    """Calibrate (if needed), allocate and prune; save the pruned model to RUN/model/."""
    st = _stages()
    cfg = st.PruneConfig(model, sparsity, allocator, method, pattern, alpha, dlp_stat, owl_m, owl_lambda,
                         st.CalibConfig(model, calib, nsamples, seqlen, seed, data_file, device, allow_pickle, stream),
                         sequential, device, allow_pickle, bits, group_size, act_order, sym, stream)
    runp = st.RunDir(out)
    path = st.prune(runp, cfg, force=force)
    _print_ratios(st.read_json(out / st.RATIOS))
    _print_synthetic(out)
    ui.out.print(f"pruned model: {path}")


@app.command()
def quantize(
    run: Path = typer.Argument(..., help="RUN directory (pruned, or calibrated for a dense quantization)"),
    bits: int = typer.Option(4, help="bits per weight, 2–8"),
    group_size: int = typer.Option(128, help="input columns per scale/zero point; -1: one per output row; "
                                             "a last group shorter than this is allowed (no padding)"),
    act_order: bool = typer.Option(False, help="quantize columns by decreasing Hessian diagonal (stores g_idx)"),
    sym: bool = typer.Option(False, help="symmetric grid (no zero points stored)"),
    percdamp: float = typer.Option(0.01, help="damping, fraction of the mean Hessian diagonal"),
    true_sequential: bool = typer.Option(False, help="quantize a layer's linear groups one after another, each on the "
                                                     "outputs of the quantized ones before it (GPTQ's --true-sequential)"),
    calib: str = typer.Option("wikipedia-summaries", help="only for RUNs without calibration windows"),
    nsamples: int = typer.Option(128), seqlen: int = typer.Option(2048), seed: int = typer.Option(0),
    data_file: Optional[str] = typer.Option(None),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    stream: Optional[bool] = typer.Option(None, "--stream/--no-stream", help=STREAM_HELP),
    force: bool = typer.Option(False),
):
    """GPTQ that keeps every pruned zero → RUN/quantized/ (packed) and RUN/model/ (fake-quant float weights)."""
    st = _stages()
    cfg = st.QuantConfig(bits, group_size, act_order, sym, percdamp, true_sequential=true_sequential,
                         calib=st.CalibConfig("", calib, nsamples, seqlen, seed, data_file, device), device=device,
                         stream=stream)
    path = st.quantize(st.RunDir(run), cfg, force=force)
    doc = st.read_json(path / "quantize.json")
    b = doc["bytes"]
    ui.out.print(f"quantized {len(doc['quantized_linears'])} linears to {doc['bits']} bits (group {doc['group_size']}"
                 f"{', act-order' if doc['act_order'] else ''}{', sym' if doc['sym'] else ''}), weight sparsity "
                 f"{doc['sparsity']:.1%} kept; packed checkpoint {b['checkpoint'] / 1e6:.1f} MB = "
                 f"{doc['ratio_vs_fp32']:.1%} of fp32, {doc['ratio_vs_fp16']:.1%} of fp16: {path}")


@app.command("eval")
def eval_(
    model_or_run: str = typer.Argument(..., help="RUN directory, HF folder, .gguf, or 'smollm2-135m'"),
    data: Optional[str] = typer.Option(None, help="wikitext2 | wikipedia-summaries-heldout | file:PATH | c4 (default: wikitext2 if found)"),
    seqlen: int = typer.Option(2048),
    max_windows: Optional[int] = typer.Option(None, help="evaluate only the first K windows"),
    data_file: Optional[str] = typer.Option(None, help="path of wiki.test.raw"),
    device: str = typer.Option("auto"),
    force: bool = typer.Option(False),
    engine: Optional[str] = typer.Option(None, help="score a deployment folder (or RUN) through this engine "
                                         "(native | deepsparse | onnxruntime) instead of PyTorch"),
    cores: Optional[int] = typer.Option(None, help="with --engine: cores for the engine (default: all)"),
):
    """Perplexity (non-overlapping windows, exp of mean token NLL); --engine: through the deployed engine."""
    if engine is not None:
        from .bench.quality import deployment_perplexity
        doc = deployment_perplexity(model_or_run, engine, data=data, seqlen=seqlen, max_windows=max_windows,
                                    data_file=data_file, cores=cores)
        ui.out.print(f"perplexity {doc['perplexity']:.2f} through {doc['engine']} on {doc['data']} "
                     f"({doc['windows']}×{doc['seqlen']} tokens, {doc['seconds']:.0f} s)")
        return
    st = _stages()
    doc = st.evaluate(model_or_run, st.EvalConfig(data, seqlen, max_windows, data_file, device), force=force)
    ui.out.print(f"perplexity {doc['perplexity']:.2f} on {doc['data']} ({doc['windows']}×{doc['seqlen']} tokens, "
                 f"weight sparsity {doc['sparsity']:.1%})")


@app.command()
def export(
    run_or_model: str = typer.Argument(..., help="RUN directory, HF folder, .gguf, or 'smollm2-135m'"),
    seqlen: int = typer.Option(512, help="ONNX: total context S the deployment is compiled for (prompt + generated)"),
    out: Optional[Path] = typer.Option(None, "--out", help="deployment folder (default RUN/deployment); GGUF: the "
                                       ".gguf file (default RUN/deployment-gguf/model-TYPE.gguf)"),
    format: str = typer.Option("onnx", "--format", help="onnx (DeepSparse / ONNX Runtime / native) | gguf (llama.cpp) | "
                               "native (native engine only, streamed layer by layer: no graph)"),
    type_: Optional[str] = typer.Option(None, "--type", help="GGUF: f32 | f16 | q8_0 | q4_0 | q4_1 (default f32)"),
    cores: Optional[int] = typer.Option(None, help="GGUF: threads for llama.cpp's check (default: all); native: the tuner's"),
    weights: str = typer.Option("int8", help="native: value type of the decoder weights: int8 | int4 | fp32"),
    head: Optional[str] = typer.Option(None, help="native, low-bit: lm_head int8 (default) | q4"),
    act_columns: Optional[int] = typer.Option(None, "--act-columns", help="native, low-bit: columns per int8 activation scale: 256 (default; four 64-column dot products chained in integers: faster) | 64 (+0.4% perplexity over fp32 activations on SmolLM2 int8, against +1.7% for 256)"),
    int4_group: Optional[int] = typer.Option(None, "--int4-group", help="native, --weights int4: input columns per scale / zero point of the round-to-nearest groups: 128 (default) | 64 | 256 | ... | -1 (one per row); a GPTQ RUN keeps its own"),
    int4_scales: Optional[str] = typer.Option(None, "--int4-scales", help="native, --weights int4: storage of the scales and zero points: fp32 (default; a GPTQ RUN's codes bit-exact) | fp16 (4 instead of 8 bytes a group: with --int4-group 256, 0.296 bytes a weight at 70%)"),
    crossover: Optional[float] = typer.Option(None, help="native: fixed format rule instead of timing each layer's groups"),
    prune_magnitude: Optional[float] = typer.Option(None, "--prune-magnitude", help="native: magnitude-prune every "
                                                    "decoder linear to this sparsity while streaming (SYNTHETIC speed tables)"),
    force: bool = typer.Option(False),
):
    """KV-cache ONNX export → a deployment folder, verified (tokens = PyTorch's, sparsity = the plan);
    --format gguf: a GGUF file for llama.cpp, verified (read back; llama.cpp's tokens where it is built);
    --format native: a native-only deployment of a model folder, streamed one decoder layer at a time (--out needed)."""
    fmt = format.lower()
    if fmt not in ("onnx", "gguf", "native"):
        raise UserError(f"unknown export format '{format}'", "use --format onnx, gguf or native")
    if fmt == "native":
        from .export.native import export_native_only
        from .pipeline.models import resolve
        if out is None:
            raise UserError("--format native needs --out DIR", "add --out, e.g. --out RUN/deployment-native")
        res = export_native_only(Path(resolve(run_or_model).path), out, weights=weights, head=head, crossover=crossover, cores=cores,
                                 magnitude=prune_magnitude, seqlen=seqlen, act_columns=act_columns,
                                 int4_group=int4_group, int4_scales=int4_scales)
        ui.out.print(f"native-only deployment {res['dir']}: {res['bytes'] / 1e9:.2f} GB on disk, built in "
                     f"{res['seconds']:.0f} s, peak RSS {res['peak_rss_mb'] or 0:.0f} MB")
        _warn_busy_tuning(res["index"].get("tuning"), "sparsedeploy export MODEL --format native --out DIR")
        return
    if (weights != "int8" or head is not None or crossover is not None or prune_magnitude is not None or act_columns is not None
            or int4_group is not None or int4_scales is not None):
        raise UserError("--weights/--head/--act-columns/--int4-group/--int4-scales/--crossover/--prune-magnitude apply "
                        "to --format native",
                        "add --format native")
    if fmt == "gguf":
        from .export.gguf import check_type, export_gguf
        path = export_gguf(run_or_model, qtype=check_type(type_ or "f32"), out=out, force=force, cores=cores)
        _print_gguf(path)
        return
    if type_ is not None:
        raise UserError("--type applies to --format gguf", "drop --type, or add --format gguf")
    from .export.stage import export as export_stage
    dep = export_stage(run_or_model, seqlen=seqlen, out=out, force=force)
    _print_export(dep)


@app.command("compile")
def compile_(
    deployment: Path = typer.Argument(..., help="deployment folder (from `sparsedeploy export`)"),
    engine: str = typer.Option("deepsparse", help="deepsparse | onnxruntime | native"),
    cores: Optional[int] = typer.Option(None, help="cores for the engine (default: all)"),
    crossover: Optional[float] = typer.Option(None, help="native: a fixed rule instead of measuring: dense below this sparsity, ELL/CSR above (default: each group's format is timed on this CPU)"),
    force: bool = typer.Option(False, help="native: rebuild DEPLOYMENT/native/"),
    weights: Optional[str] = typer.Option(None, help="native: value type of the decoder weights: fp32 (default) | int8 (per-row round-to-nearest at compile time) | int4 (4-bit codes over a bitmask: a 4-bit GPTQ RUN's own codes, else round-to-nearest in groups of 128)"),
    head: Optional[str] = typer.Option(None, help="native, low-bit builds: the lm_head's storage: int8 per row (default) | q4 (4-bit, a float16 scale per 32 columns)"),
    act_columns: Optional[int] = typer.Option(None, "--act-columns", help="native, low-bit: columns per int8 activation scale: 256 (default; four 64-column dot products chained in integers: faster) | 64 (+0.4% perplexity over fp32 activations on SmolLM2 int8, against +1.7% for 256)"),
    int4_group: Optional[int] = typer.Option(None, "--int4-group", help="native, --weights int4: input columns per scale / zero point of the round-to-nearest groups: 128 (default) | 64 | 256 | ... | -1 (one per row); a GPTQ RUN keeps its own"),
    int4_scales: Optional[str] = typer.Option(None, "--int4-scales", help="native, --weights int4: storage of the scales and zero points: fp32 (default; a GPTQ RUN's codes bit-exact) | fp16 (4 instead of 8 bytes a group: with --int4-group 256, 0.296 bytes a weight at 70%)"),
):
    """Compile one decode step on the engine (in its own process, on a copy) and check its tokens."""
    from .bench.bench import compile_deployment
    rec = compile_deployment(deployment, engine, cores, crossover=crossover, force=force, weights=weights, head=head,
                             act_columns=act_columns, int4_group=int4_group, int4_scales=int4_scales)
    note = f" (fallback: {rec['fallback_reason']})" if rec.get("fallback_reason") else ""
    match = {True: "equal PyTorch's", False: "DIFFER from PyTorch's", None: "not checked"}[rec.get("tokens_equal_pytorch")]
    if rec.get("tokens_equal_pytorch") is False and rec.get("tokens_match_pytorch"):
        tf = rec["tokens_teacher_forced"]
        match = (f"equal PyTorch's up to an activation rounding tie (on its own prefix, step {tf['step']} is "
                 f"{100 * tf['max_gap_share']:.2f}% of the logit range below PyTorch's best)")
    ui.out.print(f"{rec['engine']}{note}: compiled in {rec['compile_s']:.2f} s, greedy tokens {match}, "
                 f"peak RSS {rec['peak_rss_mb'] or 0:.0f} MB, model.onnx unchanged: {rec['onnx_unchanged']}")
    if rec.get("native"):
        n = rec["native"]
        wb = n["weight_bytes"]
        how = (f"measured on {n['tuning']['cpu']} with {n['tuning']['threads']} threads" if n.get("tuning")
               else f"fixed crossover {n['crossover']:g}")
        if n.get("weights", "fp32") != "fp32":
            ui.out.print(f"native weights: {n['weights']} ({n['quantization']}); kernels: {n.get('lowbit_kernels')}; greedy "
                         f"tokens equal fp32 PyTorch's: {rec.get('tokens_equal_pytorch_fp32')}, PyTorch's on the "
                         f"quantised weights alone: {rec.get('tokens_equal_pytorch_quantized_weights_only')}")
        ui.out.print(f"native: {n['threads']} threads ({n['threading_layer']}), stored groups {n['formats']} ({how}); "
                     f"decoder linears {wb['decoder_linears'] / 2**20:.1f} MB "
                     f"({4 * wb['decoder_linears'] / max(wb['decoder_linears_dense'], 1):.3f} bytes a weight; "
                     f"dense fp32 {wb['decoder_linears_dense'] / 2**20:.1f} MB), all weights {wb['total'] / 2**20:.1f} MB")
        _warn_busy_tuning(n.get("tuning"))
        for g in n.get("measured") or []:
            ms = ", ".join(f"{f} {v:.2f}" for f, v in g["ms_all_layers"].items())
            ui.out.print(f"  {g['group']:>4} {g['shape'][0]}x{g['shape'][1]} at {g['sparsity'][0]:.0%}-{g['sparsity'][1]:.0%}: "
                         f"chose {g['chosen']}; ms summed over layers: {ms}")


def _warn_busy_tuning(tuning: dict | None, redo: str = "sparsedeploy compile DEPLOYMENT --engine native --force") -> None:
    """The native tuner's formats were not chosen on an idle machine: say what that means and how to redo it."""
    from .engine.native.tune import BUSY_LOAD

    tuning = tuning or {}
    busy = tuning.get("other_load")
    if tuning.get("fallback"):
        ui.out.print(f"warning: the native formats were chosen by bytes, not by time ({tuning['fallback']}) — "
                     f"to time them, rerun on an idle machine: {redo}")
    elif busy is not None and busy > BUSY_LOAD:
        ui.out.print(f"warning: other processes used {busy:.0%} of the CPU while the formats were timed, so the "
                     f"choice may be wrong — rerun on an idle machine: {redo}")


def _bench_config(engine, cores, prompt_tokens, new_tokens, rounds, group_size, ort_baseline, prefill_chunk=0,
                  gguf_type="f32"):
    from .bench.bench import BenchConfig
    return BenchConfig(engine=engine, cores=cores, prompt_tokens=prompt_tokens, new_tokens=new_tokens, rounds=rounds,
                       group_size=group_size, ort_baseline=ort_baseline, prefill_chunk=prefill_chunk,
                       gguf_type=gguf_type)


@app.command()
def bench(
    deployments: list[Path] = typer.Argument(..., help="deployment folders (dense + pruned copies of one model)"),
    engine: str = typer.Option("deepsparse", help="deepsparse | onnxruntime | native | llamacpp, several comma-separated, or all"),
    cores: Optional[int] = typer.Option(None),
    prompt_tokens: int = typer.Option(64),
    new_tokens: int = typer.Option(128),
    rounds: int = typer.Option(3, help="interleaved rounds (latencies pooled)"),
    group_size: Optional[int] = typer.Option(None, help="pruned models alive at once (each group re-runs the dense model)"),
    ort_baseline: bool = typer.Option(True, help="also time the dense model on ONNX Runtime"),
    prefill_chunk: int = typer.Option(0, help="0: prefill token by token; L: a second engine for L-token chunks"),
    gguf_type: str = typer.Option("f32", help="llamacpp: decode DEPLOYMENT/model-TYPE.gguf or RUN/deployment-gguf/model-TYPE.gguf"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the full results here"),
    out: Optional[Path] = typer.Option(None, help="also write OUT.{json,csv,md,png}"),
    details: bool = typer.Option(False, "--details", help=DETAILS_HELP),
):
    """Decode latency, throughput and speedup vs dense: Table 5."""
    from .bench import bench as bench_mod, report
    cfg = _bench_config(engine, cores, prompt_tokens, new_tokens, rounds, group_size, ort_baseline, prefill_chunk,
                        gguf_type)
    doc = bench_mod.bench(deployments, cfg, json_out=json_out)
    if out is not None:
        report.write_reports(doc, out)
    _print_bench(doc, details)


@app.command()
def synth(
    preset: str = typer.Argument("llama2-7b", help="llama2-7b | smollm2-135m | llama-tiny (real layer shapes)"),
    out: Path = typer.Option(..., "--out", help="new folder for the Hugging Face model"),
    layers: Optional[int] = typer.Option(None, help="decoder layers (default: the preset's depth, 32 for llama2-7b)"),
    dtype: str = typer.Option("bf16", help="bf16 | fp16 | fp32"),
    tokenizer: str = typer.Option("smollm2-135m", help="model whose tokenizer to ship (sets the vocabulary size)"),
    seed: int = typer.Option(0),
    shard_gb: float = typer.Option(2.0, help="largest safetensors shard, in GB"),
):
    """Write a SYNTHETIC model (random weights, real layer shapes, outlier channels) layer by layer, sharded."""
    from .workflows.synth import SynthConfig, synth as synth_wf
    doc = synth_wf(SynthConfig(preset, layers, dtype, tokenizer, seed, int(shard_gb * 1e9)), out)
    ui.out.print(f"SYNTHETIC {preset} ({doc['synthetic']['layers']} layers, {dtype}): {doc['parameters'] / 1e9:.2f}B "
                 f"parameters, {doc['bytes'] / 1e9:.2f} GB in {doc['shards']} shard(s) → {doc['out']}")


@app.command()
def sweep(
    model: str = typer.Argument("smollm2-135m", help="model to prune (ignored with --synthetic)"),
    out: Path = typer.Option(..., "--out", help="sweep directory (resumable)"),
    sparsities: str = typer.Option("0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"),
    allocator: str = typer.Option("dlp"),
    method: str = typer.Option("wanda"),
    synthetic: Optional[str] = typer.Option(None, help="llama2-7b: random weights with real layer shapes"),
    layers: int = typer.Option(2, help="decoder layers of the synthetic model"),
    nsamples: int = typer.Option(32), calib_seqlen: int = typer.Option(256),
    seqlen: int = typer.Option(256, help="deployment context S"),
    engine: str = typer.Option("deepsparse", help="deepsparse | onnxruntime | native | llamacpp, several comma-separated, or all"),
    cores: Optional[int] = typer.Option(None),
    prompt_tokens: int = typer.Option(64), new_tokens: int = typer.Option(128),
    rounds: int = typer.Option(3), group_size: Optional[int] = typer.Option(None),
    ort_baseline: bool = typer.Option(True),
    prepare_only: bool = typer.Option(False, help="prune and export only; bench later (e.g. on an idle machine)"),
    details: bool = typer.Option(False, "--details", help=DETAILS_HELP),
):
    """Prune at every sparsity, export each, bench them together: Table 5 (+ JSON/CSV/MD/PNG in OUT)."""
    from .workflows.sweep import SweepConfig, parse_sparsities, sweep as sweep_stage
    if synthetic and method == "wanda":
        method = "magnitude"
    cfg = SweepConfig(model, parse_sparsities(sparsities), allocator, method, nsamples, calib_seqlen, seqlen, synthetic,
                      layers, prepare_only, _bench_config(engine, cores, prompt_tokens, new_tokens, rounds, group_size,
                                                          ort_baseline))
    doc = sweep_stage(cfg, out)
    if prepare_only:
        ui.out.print(f"prepared {len(doc['deployments'])} deployments in {out}; rerun without --prepare-only to bench")
        return
    _print_bench(doc, details)
    ui.out.print(f"reports: {out / 'table5'}.{{json,csv,md,png}}")


@app.command()
def search(
    model: str = typer.Argument("smollm2-135m", help="model to prune (HF folder, .gguf, hub id or 'smollm2-135m')"),
    ppl_budget: Optional[float] = typer.Option(None, help="fastest configuration with perplexity <= this × dense "
                                                          "(1.10: at most 10% worse)"),
    latency_ms: Optional[float] = typer.Option(None, help="most accurate configuration decoding in <= X ms/token"),
    engines: str = typer.Option("native,deepsparse,onnxruntime", help="engines to measure, comma-separated "
                                "(llamacpp: a peer on GGUF exports, shown but not chosen)"),
    sparsities: str = typer.Option("0,0.5,0.6,0.7,0.8,0.9", help="the sweep's sparsities (dense is always included)"),
    allocator: str = typer.Option("dlp"),
    method: str = typer.Option("wanda"),
    out: Path = typer.Option(Path("runs/search"), "--out", help="sweep directory (resumable; a sweep's OUT is reused)"),
    max_windows: Optional[int] = typer.Option(64, help="perplexity on the first K windows only"),
    eval_data: Optional[str] = typer.Option(None, help="default: wikitext2 if found locally, else held-out Wikipedia"),
    eval_seqlen: int = typer.Option(256),
    data_file: Optional[str] = typer.Option(None),
    cores: Optional[int] = typer.Option(None, help="cores for the engines (default: all)"),
    nsamples: int = typer.Option(32), calib_seqlen: int = typer.Option(256),
    seqlen: int = typer.Option(256, help="deployment context S"),
    prompt_tokens: int = typer.Option(64), new_tokens: int = typer.Option(128), rounds: int = typer.Option(3),
    gguf_type: str = typer.Option("f32", help="llamacpp: the GGUF type it decodes (f32 | f16 | q8_0 | q4_0 | q4_1)"),
    device: str = typer.Option("auto", help="for the perplexity: auto | cpu | cuda"),
):
    """The fastest configuration within a perplexity budget, or the most accurate within a latency budget,
    from a sweep (reused); prints the frontier and leaves the choice ready to serve."""
    from .workflows.search import SearchConfig, search as search_workflow
    from .workflows.sweep import parse_sparsities
    cfg = SearchConfig(model=model, ppl_budget=ppl_budget, latency_ms=latency_ms, engines=engines,
                       sparsities=parse_sparsities(sparsities), allocator=allocator, method=method, nsamples=nsamples,
                       calib_seqlen=calib_seqlen, export_seqlen=seqlen, eval_data=eval_data, eval_seqlen=eval_seqlen,
                       max_windows=max_windows, data_file=data_file, device=device, cores=cores,
                       prompt_tokens=prompt_tokens, new_tokens=new_tokens, rounds=rounds, gguf_type=gguf_type)
    res = search_workflow(cfg, out, on_step=lambda step, r: _print_frontier(r))
    ui.out.print(f"ready to serve: {res.serve}")


def _ms(ms: float) -> str:
    """Two decimals, or three significant digits below 1 ms (tiny test models)."""
    return f"{ms:.2f}" if ms >= 1 else f"{ms:.3g}"


def _print_frontier(res) -> None:
    b = res.budget
    within = (f"perplexity <= {b['value']:g} × dense = {b['max_ppl']:.2f}" if b["kind"] == "ppl"
              else f"<= {b['value']:g} ms/token")
    table = Table(title=f"perplexity vs decode latency: the frontier ({len(res.frontier)} of {len(res.points)} "
                        f"configurations), budget {within}")
    for col in ("", "engine", "model", "ms/token", "perplexity", "× dense", "kind"):
        table.add_column(col, justify="left" if col in ("", "engine", "model", "kind") else "right")
    rows = list(res.frontier)
    if res.choice is not None and not any(p is res.choice for p in rows):   # dominated by a llama.cpp peer
        rows = sorted(rows + [res.choice], key=lambda p: (p["ms"], p["ppl"]))
    for p in rows:
        mark = "◀ chosen" if p is res.choice else ""
        table.add_row(mark, p["engine"], p["label"], _ms(p["ms"]), f"{p['ppl']:.2f}",
                      f"{p['ppl'] / res.dense_ppl:.3f}", p.get("kind", ""))
    ui.out.print(table)
    m = res.machine or {}
    ui.out.print(f"{m.get('cpu')}, {m.get('cores')} cores; perplexity on {b.get('data')}; all points: {res.json}")
    if res.choice is not None:
        c = res.choice
        ui.out.print(f"chosen: {c['engine']} {c['label']} — {_ms(c['ms'])} ms/token, perplexity {c['ppl']:.2f} "
                     f"({c['ppl'] / res.dense_ppl:.3f}× dense {res.dense_ppl:.2f}): {c['deployment']}")
    if res.peer_better is not None:
        p = res.peer_better
        ui.out.print(f"note: the llama.cpp peer {p['label']} would do better within this budget ({_ms(p['ms'])} ms/token, "
                     f"perplexity {p['ppl']:.2f}); sparsedeploy serves only its own deployments")


@app.command()
def run(
    model: str = typer.Option("smollm2-135m", help="model to prune (default: the embedded SmolLM2-135M)"),
    out: Path = typer.Option(DEFAULT_RUN, "--out"),
    sparsity: float = typer.Option(0.6),
    allocator: str = typer.Option("dlp"),
    method: str = typer.Option("wanda"),
    nsamples: int = typer.Option(32, help="calibration windows (the papers use 128×2048; this default fits 2 cores)"),
    seqlen: int = typer.Option(256),
    eval_data: Optional[str] = typer.Option(None, help="default: wikitext2 if found locally, else held-out Wikipedia"),
    eval_seqlen: int = typer.Option(256),
    max_windows: Optional[int] = typer.Option(64),
    data_file: Optional[str] = typer.Option(None),
    device: str = typer.Option("auto"),
    deploy: bool = typer.Option(True, help="then export, compile and bench dense vs pruned"),
    engine: str = typer.Option("auto", help="auto (the fastest on a short probe) | deepsparse | onnxruntime | native"),
    cores: Optional[int] = typer.Option(None, help="cores for the engines (default: all)"),
    export_seqlen: int = typer.Option(256),
    prompt_tokens: int = typer.Option(64),
    new_tokens: int = typer.Option(128),
    force: bool = typer.Option(False),
    details: bool = typer.Option(False, "--details", help=DETAILS_HELP),
):
    """The main job: prune the default model with DLP + Wanda, compare perplexity with the dense model's,
    then export both, compile them and print the Table 5 decode benchmark."""
    from .workflows.run import RunConfig, run as run_workflow
    cfg = RunConfig(model=model, out=out, sparsity=sparsity, allocator=allocator, method=method, nsamples=nsamples,
                    seqlen=seqlen, eval_data=eval_data, eval_seqlen=eval_seqlen, max_windows=max_windows,
                    data_file=data_file, device=device, deploy=deploy, engine=engine, cores=cores,
                    export_seqlen=export_seqlen, prompt_tokens=prompt_tokens, new_tokens=new_tokens, force=force)
    run_workflow(cfg, on_step=lambda step, res: _print_run_step(step, cfg, res, details))


def _print_run_step(step: str, cfg, res, details: bool) -> None:
    """Print what the run workflow's `step` just added to its result `res`."""
    if step == "evaluated":
        _print_ratios(res.plan)
        dense, pruned = res.dense, res.pruned
        table = Table(title=f"{cfg.model}: dense vs {cfg.allocator.upper()} + {cfg.method} at {cfg.sparsity:.0%} "
                            f"({pruned['data']}, {pruned['windows']}×{pruned['seqlen']} tokens)")
        for col in ("model", "weight sparsity", "perplexity"):
            table.add_column(col, justify="right" if col != "model" else "left")
        table.add_row("dense", f"{dense['sparsity']:.1%}", f"{dense['perplexity']:.2f}")
        table.add_row(f"{cfg.allocator}+{cfg.method}", f"{pruned['sparsity']:.1%}", f"{pruned['perplexity']:.2f}")
        ui.out.print(table)
        ui.out.print(f"pruned model: {res.model_dir}   ratios: {res.ratios}   figure: {res.figure}")
    elif step == "exported":
        _print_export(res.deployment)
    elif step == "picked":
        ui.out.print(f"engine: {res.engine} — {res.engine_why}")
    elif step == "compiled":
        ui.out.print(f"compiled on {res.compiled['engine']} in {res.compiled['compile_s']:.2f} s; its greedy tokens equal PyTorch's")
    elif step == "benched":
        _print_bench(res.bench, details)
        peer = [r for r in res.bench["engines"].get("llamacpp", []) if r["sparsity"] < 0.005]
        ours = [r for r in res.bench["engines"].get(res.engine, []) if r["sparsity"] >= 0.005]
        if peer and ours:
            x = peer[0]["latency_ms"] / ours[0]["latency_ms"]       # > 1: the pruned model decodes faster
            ui.out.print(f"the peer: llama.cpp on the dense model as Q4_0 takes {peer[0]['latency_ms']:.1f} ms/token; the "
                         f"pruned model on {res.engine} {ours[0]['latency_ms']:.1f} ms/token: "
                         + (f"{x:.2f}× faster than the peer" if x >= 1 else f"{1 / x:.2f}× slower than the peer"))
        ui.out.print(f"bench reports: {res.reports}.{{json,csv,md,png}}")


@app.command()
def serve(
    deployment: Path = typer.Argument(..., help="deployment folder (from `sparsedeploy export`)"),
    engine: str = typer.Option("deepsparse", help="the engine the worker runs (as for compile/bench)"),
    cores: Optional[int] = typer.Option(None, help="cores for the engine (default: all)"),
    host: str = typer.Option("127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network, e.g. in a container)"),
    port: int = typer.Option(8000),
    max_prompt_tokens: Optional[int] = typer.Option(None, help="longest prompt accepted (default: seqlen - 1)"),
    max_new_tokens: Optional[int] = typer.Option(None, help="largest max_tokens accepted (default: seqlen - 1)"),
    queue_size: int = typer.Option(16, help="requests waiting for the engine (behind the running batch); beyond: 429 at once"),
    timeout_s: float = typer.Option(60.0, help="per-request limit (queue wait included): 504 after it"),
    prefill_chunk: int = typer.Option(0, help="0: prompt token by token; L: a prefill engine for L-token chunks"),
    max_batch: int = typer.Option(8, help="continuous batching: up to N requests decoded together, new ones join at "
                                          "the next step (native: one batched forward per step, each weight read once "
                                          "for all; onnxruntime, deepsparse: the same scheduler over sequential "
                                          "batch-1 steps; llamacpp: one sequence at a time); 1: one request at a "
                                          "time"),
    batch_prefill: int = typer.Option(64, help="with --max-batch > 1: prompt tokens fed per step (chunked prefill)"),
):
    """Serve the deployment over HTTP: OpenAI-style /v1/completions, /v1/chat/completions (+ streaming), /health, /metrics."""
    from .serve.app import Settings, serve as serve_app
    serve_app(Settings(str(deployment), engine=engine, cores=cores, host=host, port=port,
                       max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens, queue_size=queue_size,
                       timeout_s=timeout_s, prefill_chunk=prefill_chunk, max_batch=max_batch,
                       batch_prefill=batch_prefill))


def _print_export(dep: Path) -> None:
    from .pipeline.rundir import read_json
    meta = read_json(Path(dep) / "sparsedeploy.json")
    v = meta.get("verified") or {}
    ui.out.print(f"deployment: {dep}  (seqlen {meta['seqlen']}, weight sparsity {meta.get('sparsity', 0):.1%}; "
                 f"{len(v.get('tokens', []))} greedy tokens on {v.get('engine', '-')} equal PyTorch's; "
                 f"sparsity per layer equals {v.get('plan_from', '-')})")


def _print_gguf(path: Path) -> None:
    from .pipeline.rundir import read_json
    rec = read_json(path.with_suffix(".json"))
    lc = rec.get("llamacpp") or {}
    if "skipped" in lc:
        check = f"llama.cpp check skipped: {lc['skipped']}"
    elif lc:
        check = (f"llama.cpp's {len(lc['tokens'])} greedy tokens "
                 + ("equal PyTorch's" if lc["tokens_equal"] else f"agree with PyTorch's on {lc['agree']}"))
    else:
        check = "not verified"
    ppl = rec.get("perplexity") or {}
    if ppl.get("pytorch_fp32") is not None:
        check += (f"; perplexity {ppl.get('llamacpp') or '-'} (llama.cpp, {rec['type']}) vs {ppl['pytorch_fp32']:.3f} "
                  f"(PyTorch fp32), {ppl['chunks']} windows of {ppl['n_ctx']}")
    rb = rec.get("readback") or {}
    ui.out.print(f"gguf: {path}  ({rec['type']}, {rec['bytes'] / 2**20:.1f} MB; {rb.get('tensors', '?')} tensors read back "
                 f"within {rb.get('max_rel_error', float('nan')):.2g} of the weights; {check})")


def _print_bench(doc: dict, details: bool = False) -> None:
    """Table 5 per engine, then one short line per model and engine (fits 100 columns); with `details` every
    column per engine (a column per model) and the engines side by side instead (the report files hold it all)."""
    from .bench import report
    for name, rows in doc["engines"].items():
        if len(rows) > 1:   # an engine that only ran the dense baseline shows up as "vs dense ORT"
            ui.out.print(report.table5(rows, f"{doc['title']} ({name})"))
        if details:
            ui.out.print(report.details_by_model(rows, f"{name}: details", doc.get("dense_ort_ms")))
    if details:
        sbs = report.side_by_side(doc["engines"], f"{doc['title']}: engines side by side")
        if sbs is not None:
            ui.out.print(sbs)
    else:
        ui.out.print(report.summary_table(doc["engines"], "per model and engine (--details: every column)"))
    m = doc["machine"]
    ui.out.print(f"{m['cpu']}, {m['cores']} cores, {' '.join(m['isa'])}; measured memory bandwidth {m['bandwidth']['gbs']:.1f} GB/s"
                 + ("; SYNTHETIC WEIGHTS" if doc.get("synthetic") else ""), width=None if details else 100)
    if doc.get("dense_tokens_agree_across_engines") is not None:
        ui.out.print(f"dense greedy tokens equal across engines: {doc['dense_tokens_agree_across_engines']}")


def _print_synthetic(run: Path) -> None:
    """A RUN of a `sparsedeploy synth` model says so in everything it prints."""
    recs = _stages().RunDir(run).manifest()["stages"].values()
    label = next((r["synthetic"] for r in recs if r.get("synthetic")), None)
    if label:
        ui.out.print(f"SYNTHETIC model ({label.get('preset')} shapes, {label.get('layers')} layers, random weights): "
                     "speed and memory are real, quality figures are meaningless")


def _print_ratios(doc: dict) -> None:
    from .pipeline.plots import ratios_table
    alpha = f", α={doc['alpha']:.4g}" if doc.get("alpha") is not None else ""
    title = f"{doc['allocator']} allocation, target {doc['target_sparsity']:.0%}{alpha}, realized {doc['realized_sparsity']:.2%}"
    ui.out.print(ratios_table(doc["layers"], title))


def main() -> None:
    try:
        app(standalone_mode=False)
    except UserError as e:
        ui.console.print(f"error: {e}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        ui.console.print("interrupted")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # usage errors (typer's bundled click) arrive here with standalone_mode=False
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            ui.console.print(f"error: {e.format_message()}", highlight=False, markup=False, soft_wrap=True)
            sys.exit(2)
        if type(e).__name__ == "Abort":
            sys.exit(130)
        raise

if __name__ == "__main__":
    main()
