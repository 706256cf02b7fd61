"""Report helpers: Table 5 layout and arithmetic, derived fields, byte bounds, report files, bandwidth probe."""
from __future__ import annotations

import csv
import json
import math
import os

import pytest
from rich.console import Console

from sparsedeploy.bench import report


def _text(table) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


def _cells(table) -> dict[str, list[str]]:
    return {col.header: list(col.cells) for col in table.columns}


ROWS = [  # deliberately unsorted
    {"label": "70%", "sparsity": 0.70, "latency_ms": 124.8, "bound_ms": 40.0, "layer_ms": 0.5, "overhead_ms": 1.248},
    {"label": "Dense", "sparsity": 0.0, "latency_ms": 353.0, "bound_ms": 100.0, "layer_ms": 2.0,
     "throughput_tps": 2.9, "overhead_ms": 3.53},
    {"label": "10%", "sparsity": 0.10, "latency_ms": 300.0, "bound_ms": 95.0},
]


def test_table5_layout_and_speedups():
    t = report.table5(ROWS, "Table 5")
    assert [c.header for c in t.columns] == ["Sparsity", "Dense", "10%", "70%"]
    cells = _cells(t)
    assert cells["Sparsity"] == ["Latency (ms)", "Throughput (tokens/sec)", "Speedup"]
    assert cells["Dense"] == ["353.0", "2.90", "1.00x"]            # given throughput is kept
    assert cells["10%"] == ["300.0", "3.33", "1.18x"]              # throughput computed as 1000 / latency
    assert cells["70%"] == ["124.8", "8.01", "2.83x"]
    text = _text(t)
    assert "Throughput (tokens/sec)" in text and "2.83x" in text


def test_table5_small_latency_two_decimals_and_baseline_by_sparsity():
    rows = [{"label": "50%", "sparsity": 0.5, "latency_ms": 4.0}, {"label": "d", "sparsity": 0.0, "latency_ms": 9.5}]
    cells = _cells(report.table5(rows, "t"))
    assert list(cells) == ["Sparsity", "d", "50%"]
    assert cells["d"][0] == "9.50" and cells["50%"] == ["4.00", "250.00", "2.38x"]


def test_table5_needs_dense_row():
    with pytest.raises(ValueError, match="dense"):
        report.table5([r for r in ROWS if r["label"] != "Dense"], "t")


def test_derived_arithmetic():
    out = {r["label"]: r for r in report.derived(ROWS, dense_ort_ms=400.0)}
    assert [r["label"] for r in report.derived(ROWS)] == ["70%", "Dense", "10%"]   # order kept
    assert "speedup" not in ROWS[0]                                                 # input untouched
    s = out["70%"]
    assert s["speedup"] == pytest.approx(353.0 / 124.8)
    assert s["speedup_vs_ort"] == pytest.approx(400.0 / 124.8)
    assert s["layer_speedup"] == pytest.approx(4.0)
    assert s["bound_speedup"] == pytest.approx(2.5)
    assert s["bound_fraction"] == pytest.approx(353.0 / 124.8 / 2.5)
    assert s["overhead_pct"] == pytest.approx(1.0)
    assert s["throughput_tps"] == pytest.approx(1000 / 124.8)
    assert out["Dense"]["speedup"] == 1.0 and out["Dense"]["throughput_tps"] == 2.9
    assert out["10%"]["layer_speedup"] is None and out["10%"]["overhead_pct"] is None
    assert report.derived(ROWS)[0]["speedup_vs_ort"] is None


def test_details_table_missing_values_dash():
    t = report.details_table(ROWS, "details", dense_ort_ms=400.0)
    cells = _cells(t)
    assert cells["Model"] == ["Dense", "10%", "70%"]
    assert cells["Sparsity"] == ["0.0%", "10.0%", "70.0%"]
    assert cells["Layer speedup"] == ["1.00x", "–", "4.00x"]
    assert cells["Compile s"] == ["–", "–", "–"]
    assert cells["Of bound"][2] == f"{353.0 / 124.8 / 2.5:.0%}"
    assert cells["vs dense ORT"][2] == "3.21x"


def test_step_bytes_encoding_choice():
    dense_like = {"numel": 64, "nnz": 63}    # compact: 63*4 + 8 = 260 > 256 -> dense
    sparse = {"numel": 64, "nnz": 16}        # compact: 16*4 + 8 = 72
    b = report.step_bytes([dense_like, sparse], dense_bytes=100, kv_bytes=10)
    assert b == {"weights": 256 + 72, "dense": 100, "kv": 10, "total": 256 + 72 + 110}
    assert report.step_bytes([{"numel": 9, "nnz": 0}], 0, 0, value_bytes=2)["weights"] == 2   # ceil(9/8)
    assert report.bound_ms(2e9, 10.0) == pytest.approx(200.0)


def _doc():
    return {"title": "SmolLM2 decode", "machine": {**report.machine_info(), "add_gbs": 20.0, "copy_gbs": 18.0,
                                                    "gbs": 20.0, "threads": 2, "mbytes": 8},
            "settings": {"prompt": 16, "new_tokens": 32}, "dense_ort_ms": 400.0, "synthetic": True,
            "engines": {"deepsparse": ROWS, "onnxruntime": [{"label": "Dense", "sparsity": 0.0, "latency_ms": 400.0},
                                                            {"label": "50%", "sparsity": 0.5, "latency_ms": 390.0}]}}


def test_write_reports(tmp_path):
    paths = report.write_reports(_doc(), tmp_path / "sub" / "table5")
    assert [p.name for p in paths] == ["table5.json", "table5.csv", "table5.md", "table5.png"]
    assert sorted(p.name for p in paths[0].parent.iterdir()) == sorted(p.name for p in paths)   # no temp files left
    doc = json.loads(paths[0].read_text())
    assert doc["synthetic"] is True and len(doc["engines"]["deepsparse"]) == 3
    row = next(r for r in doc["engines"]["deepsparse"] if r["label"] == "70%")
    assert row["speedup"] == pytest.approx(353.0 / 124.8)
    with open(paths[1], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and {"engine", "label", "latency_ms", "speedup", "bound_fraction"} <= set(rows[0])
    assert math.isclose(float(next(r for r in rows if r["label"] == "70%")["speedup"]), 353.0 / 124.8)
    md = paths[2].read_text()
    assert "| Sparsity | Dense | 10% | 70% |" in md and "| Sparsity | Dense | 50% |" in md
    assert "| Speedup | 1.00x | 1.18x | 2.83x |" in md
    assert "SYNTHETIC WEIGHTS (random, real layer shapes)" in md and "## Machine" in md and "20.0 GB/s" in md
    assert paths[3].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_reports_without_dense_row_still_writes(tmp_path):
    doc = {**_doc(), "synthetic": False, "engines": {"ort": [{"label": "50%", "sparsity": 0.5, "latency_ms": 5.0}]}}
    paths = report.write_reports(doc, tmp_path / "r")
    md = paths[2].read_text()
    assert "Table 5 not available" in md and "SYNTHETIC" not in md
    assert all(p.stat().st_size > 0 for p in paths)


def test_render():
    tables = report.render(_doc())
    assert len(tables) == 4 and tables[0].columns[0].header == "Sparsity"
    assert tables[1].columns[0].header == "Model" and tables[1].columns[-1].header == "Of bound"


def test_summary_and_details_by_model_keep_every_value():
    t = report.summary_table(_doc()["engines"], "summary")
    assert [c.header for c in t.columns] == ["Model", "Engine", "ms/token", "Tokens/s", "Speedup", "Weights MB"]
    cells = _cells(t)
    assert cells["Model"] == ["Dense", "10%", "70%", "Dense", "50%"] and cells["Engine"][-1] == "onnxruntime"
    assert cells["Speedup"][2] == f"{353.0 / 124.8:.2f}x" and cells["Weights MB"][0] == report.DASH
    wide = _cells(report.details_table(ROWS, "d", dense_ort_ms=400.0))
    tall = report.details_by_model(ROWS, "d", dense_ort_ms=400.0)
    assert [c.header for c in tall.columns] == ["Model", *wide["Model"]]
    rows = list(zip(*[list(c.cells) for c in tall.columns]))
    assert {r[0]: list(r[1:]) for r in rows} == {k: v for k, v in wide.items() if k != "Model"}


def test_cli_bench_output_fits_100_columns_unless_details(capsys):
    from sparsedeploy import cli

    rows = [dict(r, weight_mb=123.4) for r in ROWS]
    doc = {**_doc(), "title": "smollm2-135m: dense vs DLP+wanda — decode ms/token",
           "engines": {"native": rows, "deepsparse": ROWS, "onnxruntime": ROWS},
           "machine": {"cpu": "Intel(R) Xeon(R) Platinum 8488C CPU @ 2.40GHz", "cores": 64, "bandwidth": {"gbs": 12.3},
                       "isa": ["amx_tile", "avx2", "avx512_bf16", "avx512_vnni", "avx512bw", "avx512f", "fma"]}}
    cli._print_bench(doc)
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100, out
    assert "123" in out and "Of bound" not in out and "side by side" not in out
    cli._print_bench(doc, details=True)
    out = capsys.readouterr().out
    assert "Of bound" in out and "Layer/own bound" in out and "side by side" in out


def test_measure_bandwidth_small():
    bw = report.measure_bandwidth(threads=2, mbytes=8, repeats=2)
    kernels = ("add_gbs", "copy_gbs", "sum_gbs", "dot_gbs")
    for k in (*kernels, "gbs"):
        assert math.isfinite(bw[k]) and bw[k] > 0
    assert bw["gbs"] == max(bw[k] for k in kernels) == bw[bw["best_kernel"] + "_gbs"]
    assert bw["threads"] == 2 and bw["mbytes"] == 8


def test_machine_info_keys():
    info = report.machine_info()
    assert {"cpu", "cores", "isa", "machine", "python", "versions"} <= set(info)
    assert info["cpu"] and isinstance(info["isa"], list) and info["isa"] == sorted(info["isa"])
    assert "numpy" in info["versions"]


def test_side_by_side_keeps_models_that_share_a_label():
    from sparsedeploy.bench import report

    rows = lambda ms: [{"label": "Dense", "sparsity": 0.0, "latency_ms": ms[0], "deployment": "/r/dense/deployment"},  # noqa: E731
                       {"label": "50%", "sparsity": 0.5, "latency_ms": ms[1], "deployment": "/r/a/deployment"},
                       {"label": "50%", "sparsity": 0.5, "latency_ms": ms[2], "deployment": "/r/b/deployment"}]
    header, body = report._side_by_side_cells({"native": rows([10.0, 8.0, 5.0]), "deepsparse": rows([12.0, 16.0, 10.0])})
    assert len(body) == 3 and body[1][0] != body[2][0]
    assert body[1][-1] == "2.00x" and body[2][-1] == "2.00x"       # 16/8 and 10/5, not one row twice


def test_other_load_sees_a_busy_process_that_is_not_ours():
    import subprocess
    import sys
    import time

    from sparsedeploy.bench.bench import OtherLoad

    hog = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"])
    try:
        time.sleep(0.2)
        with OtherLoad([]) as busy:
            time.sleep(1.0)
        with OtherLoad([hog.pid]) as ours:          # the same process, counted as ours
            time.sleep(0.2)
    finally:
        hog.wait()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert busy.fraction is not None and busy.fraction > 0.6 / cores
    assert ours.fraction is not None
