"""Decode-benchmark reports: the DLP paper's Table 5 layout, a details table, JSON/CSV/Markdown/PNG files,
machine facts and a STREAM-like memory-bandwidth probe with a byte-count latency bound.

Row dicts (one per model) carry "label", "sparsity" (a fraction in [0, 1]) and "latency_ms" (median decode
ms/token); optional keys: "throughput_tps", "latency_p90_ms", "prefill_ms", "compile_s", "peak_rss_mb",
"overhead_ms", "layer_ms", "bound_ms", "dense_ort_ms". Missing values show as "–".
No torch import here: the module only needs numpy and rich (matplotlib for the plot).
"""
from __future__ import annotations

import csv
import importlib.metadata as _md
import json
import math
import os
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from rich.table import Table

DASH = "–"
T5_ROWS = ("Latency (ms)", "Throughput (tokens/sec)", "Speedup")
_ISA = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "fma", "neon", "asimd")
_PKGS = {"numpy": ("numpy",), "onnx": ("onnx",), "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
         "deepsparse": ("deepsparse", "deepsparse-nightly"), "torch": ("torch",)}
_DETAIL_COLS = ("Model", "Sparsity", "Median ms", "p90 ms", "Tokens/s", "Prefill ms", "Compile s", "Peak RSS MB",
                "Weights MB", "Loop overhead", "Speedup", "Engine-only speedup", "vs dense ORT", "Layer speedup", "Layer ms", "Layer/own bound", "Bound ms",
                "BW use", "Bound speedup", "Of bound")
_SUMMARY_COLS = ("Model", "Engine", "ms/token", "Tokens/s", "Speedup", "Weights MB")   # fits 100 columns


# ----------------------------------------------------------------------------------------- machine facts

def machine_info() -> dict:
    """CPU model, core count, interesting ISA flags, platform and package versions (nothing imported)."""
    cpu, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, val = line.partition(":")
            key = key.strip().lower()
            if key == "model name" and not cpu:
                cpu = val.strip()
            elif key in ("flags", "features") and not flags:
                flags = set(val.split())
    except OSError:
        pass
    versions = {}
    for name, dists in _PKGS.items():
        for dist in dists:
            try:
                versions[name] = _md.version(dist)
                break
            except _md.PackageNotFoundError:
                continue
    return {"cpu": cpu or platform.processor() or "unknown", "cores": os.cpu_count(),
            "isa": sorted(f for f in _ISA if f in flags), "machine": platform.machine(),
            "python": platform.python_version(), "versions": versions}


def measure_bandwidth(threads: int | None = None, mbytes: int = 256, repeats: int = 5) -> dict:
    """Measured memory bandwidth: STREAM-like kernels over float32 arrays of `mbytes` MiB each, one contiguous
    slice per thread: add (a = b + c), copy (a = b), and two read-only ones, sum (of b) and dot (b . c), the
    closest to what a decode step does (it reads weights and writes almost nothing). Best of `repeats` timed
    runs after one warm-up each; GB/s = 1e9 bytes/s. `gbs` is the best of the four: a *measured* rate that a
    byte count turns into a reference time, not a bound an engine cannot beat (caches, prefetchers and the
    probe's own overheads differ)."""
    threads = max(1, threads or os.cpu_count() or 1)
    n = max(threads, mbytes * (1 << 20) // 4)
    a, b, c = np.empty(n, np.float32), np.full(n, 1.0, np.float32), np.full(n, 2.0, np.float32)
    edges = np.linspace(0, n, threads + 1).astype(int)
    slices = [slice(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:])]

    def best(kernel) -> float:
        times = []
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for _ in range(max(1, repeats) + 1):
                t0 = time.perf_counter()
                list(pool.map(kernel, slices))
                times.append(time.perf_counter() - t0)
        return min(times[1:])

    nb = a.nbytes
    rates = {"add_gbs": 3 * nb / best(lambda s: np.add(b[s], c[s], out=a[s])),
             "copy_gbs": 2 * nb / best(lambda s: np.copyto(a[s], b[s])),
             "sum_gbs": nb / best(lambda s: np.add.reduce(b[s])),
             "dot_gbs": 2 * nb / best(lambda s: np.dot(b[s], c[s]))}
    out = {k: round(v / 1e9, 3) for k, v in rates.items()}
    best_kernel = max(out, key=out.get)
    return {**out, "gbs": out[best_kernel], "best_kernel": best_kernel[:-4], "threads": threads, "mbytes": mbytes}


# ---------------------------------------------------------------------------------------- byte bounds

def step_bytes(linears: list[dict], dense_bytes: int, kv_bytes: int, value_bytes: int = 4) -> dict:
    """Bytes one decode step reads: each linear in the cheaper of dense or values + presence bitmask."""
    weights = sum(min(l["numel"] * value_bytes, l["nnz"] * value_bytes + math.ceil(l["numel"] / 8))
                  for l in linears)
    return {"weights": int(weights), "dense": int(dense_bytes), "kv": int(kv_bytes),
            "total": int(weights + dense_bytes + kv_bytes)}


def bound_ms(total_bytes: float, gbs: float) -> float:
    """Time (ms) to stream `total_bytes` at `gbs` GB/s."""
    return total_bytes / (gbs * 1e9) * 1e3


# -------------------------------------------------------------------------------------- derived fields

def _num(v) -> float | None:
    """v as a finite float, else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _ratio(num, den) -> float | None:
    num, den = _num(num), _num(den)
    return num / den if num is not None and den else None


def _dense_index(rows: list[dict], baseline: str = "dense") -> int | None:
    """The baseline row: label equal to `baseline` (any case), else the first with sparsity 0."""
    for i, r in enumerate(rows):
        if str(r.get("label", "")).lower() == baseline.lower():
            return i
    for i, r in enumerate(rows):
        if _num(r.get("sparsity")) == 0:
            return i
    return None


def _ordered(rows: list[dict], baseline: str = "dense") -> list[dict]:
    """Dense row first, the others by sparsity; ValueError when there is no dense row."""
    d = _dense_index(rows, baseline)
    if d is None:
        labels = [r.get("label") for r in rows]
        raise ValueError(f"no dense baseline row (label {baseline!r} or sparsity 0) among {labels}")
    rest = sorted((r for i, r in enumerate(rows) if i != d), key=lambda r: _num(r.get("sparsity")) or 0.0)
    return [rows[d], *rest]


def derived(rows: list[dict], dense_ort_ms: float | None = None, *, baseline: str = "dense") -> list[dict]:
    """Copies of rows (same order) plus throughput_tps (if missing), speedup, speedup_vs_ort, layer_speedup,
    bound_speedup, bound_fraction and overhead_pct; None where an input is missing or there is no dense row."""
    d = _dense_index(rows, baseline)
    dense = rows[d] if d is not None else {}
    out = []
    for r in rows:
        r = dict(r)
        lat = _num(r.get("latency_ms"))
        if _num(r.get("throughput_tps")) is None:
            r["throughput_tps"] = _ratio(1000.0, lat)
        # A row may carry its own baseline (the dense model timed in the same group of rounds): "in_group".
        base = r.get("in_group") or dense
        r["speedup"] = _ratio(base.get("latency_ms"), lat)
        ort = r.get("dense_ort_ms")
        r["speedup_vs_ort"] = _ratio(dense_ort_ms if ort is None else ort, lat)
        r["layer_speedup"] = _ratio(base.get("layer_ms"), r.get("layer_ms"))
        r["engine_speedup"] = _ratio(base.get("engine_ms"), r.get("engine_ms"))
        r["bandwidth_use"] = _ratio(r.get("bound_ms"), lat)
        r["bound_speedup"] = _ratio(dense.get("bound_ms"), r.get("bound_ms"))
        r["bound_fraction"] = _ratio(r["speedup"], r["bound_speedup"])
        over = _num(r.get("overhead_ms"))
        r["overhead_pct"] = None if over is None else _ratio(100.0 * over, lat)
        out.append(r)
    return out


# ----------------------------------------------------------------------------------------- table cells

def _fmt(v, spec: str = ".2f", suffix: str = "") -> str:
    v = _num(v)
    return DASH if v is None else f"{v:{spec}}{suffix}"


def _fmt_lat(v) -> str:
    v = _num(v)
    return DASH if v is None else f"{v:.2f}" if v < 10 else f"{v:.1f}"


def _table5_cells(rows: list[dict], baseline: str = "dense") -> tuple[list[str], list[list[str]]]:
    rows = derived(_ordered(rows, baseline), baseline=baseline)
    header = ["Sparsity", *(str(r.get("label", DASH)) for r in rows)]
    body = [[T5_ROWS[0], *(_fmt_lat(r.get("latency_ms")) for r in rows)],
            [T5_ROWS[1], *(_fmt(r.get("throughput_tps")) for r in rows)],
            [T5_ROWS[2], *(_fmt(r.get("speedup"), ".2f", "x") for r in rows)]]
    return header, body


def _in_order(rows: list[dict], dense_ort_ms: float | None = None, baseline: str = "dense") -> list[dict]:
    """derived() rows, dense first then by sparsity (only by sparsity when there is no dense row)."""
    try:
        rows = _ordered(rows, baseline)
    except ValueError:
        rows = sorted(rows, key=lambda r: _num(r.get("sparsity")) or 0.0)
    return derived(rows, dense_ort_ms, baseline=baseline)


def _details_cells(rows: list[dict], dense_ort_ms: float | None = None,
                   baseline: str = "dense") -> tuple[list[str], list[list[str]]]:
    body = []
    for r in _in_order(rows, dense_ort_ms, baseline):
        s = _num(r.get("sparsity"))
        body.append([str(r.get("label", DASH)), _fmt(None if s is None else 100 * s, ".1f", "%"),
                     _fmt_lat(r.get("latency_ms")), _fmt_lat(r.get("latency_p90_ms")), _fmt(r.get("throughput_tps")),
                     _fmt(r.get("prefill_ms"), ".1f"), _fmt(r.get("compile_s"), ".1f"),
                     _fmt(r.get("peak_rss_mb"), ".0f"), _fmt(r.get("weight_mb"), ".0f"),
                     _fmt(r.get("overhead_pct"), ".1f", "%"),
                     _fmt(r.get("speedup"), ".2f", "x"), _fmt(r.get("engine_speedup"), ".2f", "x"),
                     _fmt(r.get("speedup_vs_ort"), ".2f", "x"),
                     _fmt(r.get("layer_speedup"), ".2f", "x"), _fmt(r.get("layer_ms"), ".2f"),
                     _fmt(r.get("layer_of_bound"), ".2f", "x"), _fmt_lat(r.get("bound_ms")),
                     _fmt(r.get("bandwidth_use"), ".0%"),
                     _fmt(r.get("bound_speedup"), ".2f", "x"), _fmt(r.get("bound_fraction"), ".0%")])
    return list(_DETAIL_COLS), body


def _summary_cells(engines: dict[str, list[dict]]) -> tuple[list[str], list[list[str]]]:
    """One short line per model and engine: decode latency, throughput, speedup vs that engine's dense model,
    resident weights (native rows only)."""
    body = [[str(r.get("label", DASH)), engine, _fmt_lat(r.get("latency_ms")), _fmt(r.get("throughput_tps")),
             _fmt(r.get("speedup"), ".2f", "x"), _fmt(r.get("weight_mb"), ".0f")]
            for engine, rows in engines.items() for r in _in_order(rows)]
    return list(_SUMMARY_COLS), body


def _rich(title: str, header: list[str], body: list[list[str]]) -> Table:
    t = Table(title=title)
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for row in body:
        t.add_row(*row)
    return t


def _markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def table5(rows: list[dict], title: str, *, baseline: str = "dense") -> Table:
    """The paper's Table 5: one column per model (Dense first), rows latency / throughput / speedup."""
    return _rich(title, *_table5_cells(rows, baseline))


def details_table(rows: list[dict], title: str, dense_ort_ms: float | None = None, *,
                  baseline: str = "dense") -> Table:
    """One line per model with timings, memory, overhead, speedups and the bandwidth bound."""
    return _rich(title, *_details_cells(rows, dense_ort_ms, baseline))


def details_by_model(rows: list[dict], title: str, dense_ort_ms: float | None = None, *,
                     baseline: str = "dense") -> Table:
    """details_table on its side, a column per model as in Table 5: its 20 columns as rows, so that every
    header and value stays whole on a terminal (the wide layout truncates them even at 230 columns)."""
    header, body = _details_cells(rows, dense_ort_ms, baseline)
    return _rich(title, [header[0], *(r[0] for r in body)], [[h, *(r[i] for r in body)] for i, h in enumerate(header) if i])


def summary_table(engines: dict[str, list[dict]], title: str) -> Table:
    """The console's default view: one line per model and engine, narrow enough for an 80-column terminal
    (details_by_model and the report files keep every column)."""
    return _rich(title, *_summary_cells(engines))


def render(doc: dict) -> list[Table]:
    """Console tables: Table 5 (when the engine has a dense row) and the details, per engine."""
    tables = []
    for engine, rows in doc.get("engines", {}).items():
        title = f"{doc.get('title', 'Decode benchmark')} ({engine})"
        if _dense_index(rows) is not None:
            tables.append(table5(rows, title))
        tables.append(details_table(rows, f"{title}: details", doc.get("dense_ort_ms")))
    return tables


# ---------------------------------------------------------------------------------------------- files

def _atomic(path: Path, write) -> Path:
    """Call write(tmp) on a temp name next to `path`, then move it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, str)) or x is None:
        return x
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return _num(x)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    return str(x)


def _csv_text(engines: dict[str, list[dict]], path: Path) -> None:
    keys: list[str] = []
    for rows in engines.values():
        for r in rows:
            keys += [k for k, v in r.items() if k not in keys and _num(v) is not None]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["engine", "label", *keys])
        for engine, rows in engines.items():
            for r in rows:
                w.writerow([engine, r.get("label", ""), *("" if _num(r.get(k)) is None else r[k] for k in keys)])


def _side_by_side_cells(engines: dict[str, list[dict]]) -> tuple[list[str], list[list[str]]] | None:
    """One line per sparsity, one latency column per engine (ms/token, in-group speedup vs that engine's dense
    in brackets), and the first engine's speedup over each other one (their latency / its latency; > 1: the first
    is faster). None with fewer than two engines."""
    if len(engines) < 2:
        return None
    names = sorted(engines, key=lambda e: e != "native")          # the native engine first, when present
    def key(r):                     # two models may share a label (e.g. 50% in fp32 and 4-bit): key by folder
        return r.get("deployment") or r.get("label")

    by = {e: {key(r): r for r in derived(rows, None)} for e, rows in engines.items()}
    first_rows = engines[names[0]]
    counts: dict = {}
    for r in first_rows:
        counts[r.get("label")] = counts.get(r.get("label"), 0) + 1
    labels = [key(r) for r in first_rows]
    shown = {key(r): (str(r.get("label")) if counts[r.get("label")] == 1 or not r.get("deployment")
                      else f"{r.get('label')} ({Path(r['deployment']).parent.name}/{Path(r['deployment']).name})")
             for r in first_rows}
    header = ["Sparsity"] + [f"{e} ms (speedup)" for e in names] + [f"{names[0]} speedup over {e}" for e in names[1:]]
    body = []
    for lab in labels:
        cells = [shown[lab]]
        for e in names:
            r = by[e].get(lab)
            cells.append(DASH if r is None else f"{_fmt_lat(r.get('latency_ms'))} ({_fmt(r.get('speedup'), '.2f', 'x')})")
        first = by[names[0]].get(lab)
        for e in names[1:]:
            r = by[e].get(lab)
            cells.append(_fmt(_ratio(r.get("latency_ms") if r else None, first.get("latency_ms") if first else None),
                              ".2f", "x"))
        body.append(cells)
    return header, body


def side_by_side(engines: dict[str, list[dict]], title: str) -> Table | None:
    cells = _side_by_side_cells(engines)
    return _rich(title, *cells) if cells else None


def _md_text(doc: dict, engines: dict[str, list[dict]]) -> str:
    title = doc.get("title", "Decode benchmark")
    out = [f"# {title}", ""]
    if doc.get("synthetic"):
        out += ["**SYNTHETIC WEIGHTS (random, real layer shapes)**", ""]
    out += [f"_{n}_\n" for n in doc.get("notes") or []]
    sbs = _side_by_side_cells(engines)
    if sbs:
        out += ["## Engines side by side (ms/token; speedup vs the same engine's dense model)", "", _markdown(*sbs), ""]
    for engine, rows in engines.items():
        out += [f"## {engine}", "", "### Table 5", ""]
        try:
            out += [_markdown(*_table5_cells(rows)), ""]
        except ValueError as e:
            out += [f"_Table 5 not available: {e}_", ""]
        out += ["### Details", "", _markdown(*_details_cells(rows, doc.get("dense_ort_ms"))), ""]
    m = doc.get("machine", {}) or {}
    b = m.get("bandwidth") if isinstance(m.get("bandwidth"), dict) else m
    bw = ", ".join(f"{k[:-4]} {b[k]} GB/s" for k in ("add_gbs", "copy_gbs", "sum_gbs", "dot_gbs") if k in b)
    out += ["## Machine", "", f"- cpu: {m.get('cpu', DASH)}", f"- cores: {m.get('cores', DASH)}",
            f"- isa: {', '.join(m.get('isa') or []) or DASH}",
            f"- measured bandwidth (STREAM-like; bounds use the best): {bw or DASH}" + (f" ({b['threads']} threads, {b['mbytes']} MiB arrays)"
                                            if bw and "threads" in b and "mbytes" in b else "")]
    if m.get("versions"):
        out.append("- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    if doc.get("synthetic"):
        out.append("- SYNTHETIC WEIGHTS (random, real layer shapes)")
    if doc.get("settings"):
        out += ["", "## Settings", "", *(f"- {k}: {v}" for k, v in doc["settings"].items())]
    return "\n".join(out) + "\n"


def _plot(doc: dict, engines: dict[str, list[dict]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    ax_lat, ax_sp = fig.subplots(1, 2)
    for i, (engine, rows) in enumerate(engines.items()):
        rows = sorted(rows, key=lambda r: _num(r.get("sparsity")) or 0.0)
        x = [100 * (_num(r.get("sparsity")) or 0.0) for r in rows]
        val = lambda k: [np.nan if _num(r.get(k)) is None else r[k] for r in rows]  # noqa: E731
        color = f"C{i}"
        ax_lat.plot(x, val("latency_ms"), "o-", color=color, label=engine)
        ax_sp.plot(x, val("speedup"), "o-", color=color, label=engine)
        if any(_num(r.get("bound_speedup")) is not None for r in rows):
            ax_sp.plot(x, val("bound_speedup"), "--", color=color, label=f"{engine} bound")
    ax_lat.set(xlabel="sparsity (%)", ylabel="decode latency (ms/token)", title="Latency")
    ax_sp.set(xlabel="sparsity (%)", ylabel="speedup vs dense", title="Speedup")
    for ax in (ax_lat, ax_sp):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    title = doc.get("title", "Decode benchmark")
    fig.suptitle(f"{title} (synthetic weights)" if doc.get("synthetic") else title)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)


def write_reports(doc: dict, out_stem: str | Path) -> list[Path]:
    """Write <stem>.json/.csv/.md/.png (each atomically) and return their paths."""
    stem = Path(out_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    engines = {e: derived(rows, doc.get("dense_ort_ms")) for e, rows in (doc.get("engines") or {}).items()}
    full = json.dumps(_jsonable({**doc, "engines": engines}), indent=2, allow_nan=False) + "\n"
    path = lambda ext: stem.with_name(stem.name + ext)  # noqa: E731
    return [_atomic(path(".json"), lambda p: p.write_text(full, encoding="utf-8")),
            _atomic(path(".csv"), lambda p: _csv_text(engines, p)),
            _atomic(path(".md"), lambda p: p.write_text(_md_text(doc, engines), encoding="utf-8")),
            _atomic(path(".png"), lambda p: _plot(doc, engines, p))]
