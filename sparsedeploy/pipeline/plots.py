"""Presentation of allocations: a rich table for the terminal and a PNG in the style of the DLP
paper's Figure 3 (bars: layer importance; lines: per-layer sparsity of each allocator).

Uses matplotlib's object API with the Agg canvas directly (no pyplot, no global backend switch),
so it is safe to call from any thread and never opens a window.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from rich.table import Table

_COLORS = {"uniform": "#7f7f7f", "owl": "#1f77b4", "dlp": "#d62728"}
_LABELS = {"uniform": "Uniform", "owl": "OWL", "dlp": "DLP"}


def _weighted_mean(layers: list[dict], sizes: list[int] | None) -> tuple[float, bool]:
    """(mean sparsity, weighted?) — weighted by `sizes`, else by each layer's "params", else plain."""
    ratios = [float(layer["sparsity"]) for layer in layers]
    if sizes is None and layers and all(layer.get("params") for layer in layers):
        sizes = [layer["params"] for layer in layers]
    if sizes is not None and len(sizes) == len(ratios) and sum(sizes) > 0:
        return sum(r * s for r, s in zip(ratios, sizes)) / sum(sizes), True
    return (sum(ratios) / len(ratios) if ratios else float("nan")), False


def _fmt(x, spec: str) -> str:
    return "–" if x is None else format(float(x), spec)


def ratios_table(layers: list[dict], title: str, sizes: list[int] | None = None) -> Table:
    """One row per decoder layer: index, score, importance, sparsity. The caption gives the mean
    sparsity, weighted by parameter count (from `sizes` or the layers' "params") when known."""
    mean, weighted = _weighted_mean(layers, sizes)
    caption = f"{'parameter-weighted' if weighted else 'unweighted'} mean sparsity {mean:.4%} over {len(layers)} layers"
    table = Table(title=title, caption=caption)
    table.add_column("layer", justify="right")
    table.add_column("score", justify="right")
    table.add_column("importance", justify="right")
    table.add_column("sparsity", justify="right")
    for layer in layers:
        table.add_row(str(layer["index"]), _fmt(layer.get("score"), ".6g"), _fmt(layer.get("importance"), ".6g"),
                      _fmt(layer["sparsity"], ".2%"))
    return table


def plot_allocation(path, allocations: dict[str, list[dict]], title: str) -> Path:
    """Write a PNG to `path`: bars = per-layer importance (from the "dlp" allocation when present,
    else from the first allocation that has importances, e.g. OWL's outlier ratio), lines = per-layer
    sparsity of every allocation given, on a second y-axis when bars are drawn. Written to a temporary
    file in the same folder and moved into place with os.replace. Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    if not allocations:
        raise ValueError("plot_allocation needs at least one allocation")
    bar_name = "dlp" if "dlp" in allocations else None
    if bar_name is None or any(layer.get("importance") is None for layer in allocations[bar_name]):
        bar_name = next((name for name, layers in allocations.items()
                         if layers and all(layer.get("importance") is not None for layer in layers)), None)

    fig = Figure(figsize=(10, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    line_ax = ax
    if bar_name is not None:
        layers = allocations[bar_name]
        xs = [layer["index"] for layer in layers]
        imp = [float(layer["importance"]) for layer in layers]
        label = "layer importance (DLP)" if bar_name == "dlp" else f"{_LABELS.get(bar_name, bar_name)} outlier ratio"
        ax.bar(xs, imp, color="#9ecae1", edgecolor="#6baed6", label=label, zorder=1)
        lo, hi = min(imp), max(imp)
        pad = 0.15 * (hi - lo) if hi > lo else max(abs(hi) * 0.01, 1e-6)
        ax.set_ylim(lo - pad, hi + pad)  # importances sit close together; zoom in on their spread
        ax.set_ylabel(label)
        line_ax = ax.twinx()
    for name, layers in allocations.items():
        xs = [layer["index"] for layer in layers]
        ys = [float(layer["sparsity"]) * 100 for layer in layers]
        line_ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.6, color=_COLORS.get(name),
                     label=f"{_LABELS.get(name, name)} sparsity", zorder=3)
    line_ax.set_ylabel("sparsity (%)")
    ax.set_xlabel("decoder layer")
    ax.set_title(title)
    handles, labels = [], []
    for a in {id(ax): ax, id(line_ax): line_ax}.values():
        h, lab = a.get_legend_handles_labels()
        handles += h
        labels += lab
    line_ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=len(labels),
                   fontsize="small", frameon=False)
    fig.tight_layout()

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", bbox_inches="tight")
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
