"""Typer CLI: parse arguments into stage configs, call the stage, print with rich.

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
    force: bool = typer.Option(False, help="recompute even if up to date"),
):
    """Run calibration text through the dense model, layer by layer; save windows and column norms."""
    st = _stages()
    cfg = st.CalibConfig(model, calib, nsamples, seqlen, seed, data_file, device, allow_pickle)
    path = st.calibrate(st.RunDir(out), cfg, force=force)
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
    force: bool = typer.Option(False),
):
    """Calibrate (if needed), allocate and prune; save the pruned model to RUN/model/."""
    st = _stages()
    cfg = st.PruneConfig(model, sparsity, allocator, method, pattern, alpha, dlp_stat, owl_m, owl_lambda,
                         st.CalibConfig(model, calib, nsamples, seqlen, seed, data_file, device, allow_pickle),
                         sequential, device, allow_pickle)
    runp = st.RunDir(out)
    path = st.prune(runp, cfg, force=force)
    _print_ratios(st.read_json(out / st.RATIOS))
    ui.out.print(f"pruned model: {path}")


@app.command("eval")
def eval_(
    model_or_run: str = typer.Argument(..., help="RUN directory, HF folder, .gguf, or 'smollm2-135m'"),
    data: Optional[str] = typer.Option(None, help="wikitext2 | wikipedia-summaries-heldout | file:PATH | c4 (default: wikitext2 if found)"),
    seqlen: int = typer.Option(2048),
    max_windows: Optional[int] = typer.Option(None, help="evaluate only the first K windows"),
    data_file: Optional[str] = typer.Option(None, help="path of wiki.test.raw"),
    device: str = typer.Option("auto"),
    force: bool = typer.Option(False),
):
    """Perplexity (non-overlapping windows, exp of mean token NLL)."""
    st = _stages()
    doc = st.evaluate(model_or_run, st.EvalConfig(data, seqlen, max_windows, data_file, device), force=force)
    ui.out.print(f"perplexity {doc['perplexity']:.2f} on {doc['data']} ({doc['windows']}×{doc['seqlen']} tokens, "
                 f"weight sparsity {doc['sparsity']:.1%})")


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
    force: bool = typer.Option(False),
):
    """The main job: prune the default model with DLP + Wanda and compare its perplexity with the dense model's."""
    st = _stages()
    cfg = st.PruneConfig(model, sparsity, allocator, method, "unstructured",
                         calib=st.CalibConfig(model, "wikipedia-summaries", nsamples, seqlen, 0, None, device),
                         device=device)
    runp = st.RunDir(out)
    st.prune(runp, cfg, force=force)
    ecfg = st.EvalConfig(eval_data, eval_seqlen, max_windows, data_file, device)
    dense = st.evaluate(model, ecfg, out=out / "eval_dense.json", force=force)
    pruned = st.evaluate(str(out), ecfg, force=force)
    plan = st.read_json(out / st.RATIOS)
    _print_ratios(plan)
    table = Table(title=f"{model}: dense vs {allocator.upper()} + {method} at {sparsity:.0%} "
                        f"({pruned['data']}, {pruned['windows']}×{pruned['seqlen']} tokens)")
    for col in ("model", "weight sparsity", "perplexity"):
        table.add_column(col, justify="right" if col != "model" else "left")
    table.add_row("dense", f"{dense['sparsity']:.1%}", f"{dense['perplexity']:.2f}")
    table.add_row(f"{allocator}+{method}", f"{pruned['sparsity']:.1%}", f"{pruned['perplexity']:.2f}")
    ui.out.print(table)
    ui.out.print(f"pruned model: {out / 'model'}   ratios: {out / st.RATIOS}   figure: {out / st.RATIOS_PNG}")


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
