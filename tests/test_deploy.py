"""The deployment CLI on tiny random Llama (GQA) and OPT models: prune → export → compile → bench → sweep.

References: PyTorch's own greedy tokens (recorded and checked at export), torch's zero counts per layer,
file hashes of model.onnx before and after the engines ran.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from .cli_helpers import run_cli

from sparsedeploy import cli
from sparsedeploy.engine import unavailable

DS = unavailable("deepsparse") is None
ENGINE = "deepsparse" if DS else "onnxruntime"


_cli = run_cli


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, tiny_model_dir, corpus_file):
    """A dense and a 50% Wanda+DLP deployment of the tiny model (Llama and OPT)."""
    from sparsedeploy.export.stage import export
    from sparsedeploy.pipeline import stages

    root = tmp_path_factory.mktemp("deploy")
    run = root / "run"
    calib = stages.CalibConfig(str(tiny_model_dir), f"file:{corpus_file}", 8, 48, 0, None, "cpu")
    stages.prune(stages.RunDir(run), stages.PruneConfig(str(tiny_model_dir), 0.5, "dlp", "wanda", calib=calib, device="cpu"))
    dense = export(str(tiny_model_dir), seqlen=64, out=root / "dense")
    pruned = export(str(run), seqlen=64)
    return {"root": root, "run": run, "dense": dense, "pruned": pruned}


def test_export_writes_a_verified_deployment_that_matches_the_plan(deployed):
    run, dep = deployed["run"], deployed["pruned"]
    assert dep == run / "deployment"
    for name in ("model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "head.onnx", "sparsedeploy.json"):
        assert (dep / name).is_file(), name
    meta = json.loads((dep / "sparsedeploy.json").read_text())
    plan = json.loads((run / "ratios.json").read_text())
    v = meta["verified"]
    assert v["plan_from"] == "ratios.json" and len(v["tokens"]) == 16
    # every layer's exported zero fraction is the realized one from the torch weights, and near R_l
    for layer in plan["layers"]:
        key = next(k for k in v["layer_sparsity"] if k.endswith(f"layers.{layer['index']}"))
        assert v["layer_sparsity"][key] == pytest.approx(layer["realized"], abs=1e-6)
        assert abs(v["layer_sparsity"][key] - layer["sparsity"]) < 1 / 64 + 1e-6
    assert meta["sparsity"] == pytest.approx(plan["realized_sparsity"], abs=1e-9)


def test_export_skips_when_up_to_date_and_refuses_a_wrong_plan(deployed, monkeypatch, capsys):
    from sparsedeploy.export.stage import export

    dep = deployed["pruned"]
    before = sha(dep / "model.onnx")
    code, out, err = _cli(["export", deployed["run"], "--seqlen", 64], monkeypatch, capsys)
    assert code == 0 and "up to date" in err and sha(dep / "model.onnx") == before
    # a plan the weights do not follow: the export fails in one line and leaves the old deployment alone
    ratios = deployed["run"] / "ratios.json"
    saved = ratios.read_text()
    doc = json.loads(saved)
    doc["layers"][0]["sparsity"] = 0.9
    ratios.write_text(json.dumps(doc))
    try:
        code, out, err = _cli(["export", deployed["run"], "--seqlen", 64, "--force"], monkeypatch, capsys)
    finally:
        ratios.write_text(saved)
    assert code == 2 and err.startswith("error:") and "planned 0.9" in err and len(err.strip().splitlines()) == 1
    assert sha(dep / "model.onnx") == before
    assert not [p for p in dep.parent.iterdir() if p.name.startswith(".deployment")]


def test_export_resumes_with_the_run_key_scheme(deployed, tmp_path, monkeypatch, capsys):
    """sparsedeploy.json holds the RunDir scheme's key (args + inputs); same key: skipped, changed: rebuilt."""
    from sparsedeploy.export.stage import export
    from sparsedeploy.pipeline.rundir import is_current, stage_key

    meta_path = deployed["pruned"] / "sparsedeploy.json"
    saved = meta_path.read_text()
    meta = json.loads(saved)
    assert meta["args"] == {"seqlen": 64, "head": True} and meta["inputs"]["source"] == str(deployed["run"].resolve())
    assert is_current(meta, stage_key(meta["args"], meta["inputs"]))
    assert meta["export_key"] == {**meta["inputs"], **meta["args"]}      # the flat form native.py reads
    # a deployment exported before the shared key (export_key only) is still up to date
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k not in ("args", "inputs")}))
    try:
        code, out, err = _cli(["export", deployed["run"], "--seqlen", 64], monkeypatch, capsys)
    finally:
        meta_path.write_text(saved)
    assert code == 0 and "up to date" in err, err
    # another argument rebuilds the deployment; the same one again skips it
    dep = export(str(deployed["run"]), seqlen=48, out=tmp_path / "dep")
    stamp = (dep / "model.onnx").stat().st_mtime_ns
    assert json.loads((dep / "sparsedeploy.json").read_text())["args"]["seqlen"] == 48
    export(str(deployed["run"]), seqlen=48, out=dep)
    assert (dep / "model.onnx").stat().st_mtime_ns == stamp
    export(str(deployed["run"]), seqlen=56, out=dep)
    assert json.loads((dep / "sparsedeploy.json").read_text())["args"]["seqlen"] == 56


def test_compile_checks_tokens_and_never_touches_model_onnx(deployed, monkeypatch, capsys):
    dep = deployed["pruned"]
    before = sha(dep / "model.onnx")
    code, out, err = _cli(["compile", dep, "--engine", ENGINE, "--cores", 1], monkeypatch, capsys)
    assert code == 0, err
    rec = json.loads((dep / f"compile-{ENGINE}.json").read_text())
    assert rec["engine"] == ENGINE and rec["tokens_equal_pytorch"] is True and rec["onnx_unchanged"] is True
    assert rec["compile_s"] > 0
    assert sha(dep / "model.onnx") == before


def test_bench_table5_and_report_files(deployed, monkeypatch, capsys, tmp_path):
    deps = [deployed["pruned"], deployed["dense"]]
    before = {d: sha(d / "model.onnx") for d in deps}
    js = tmp_path / "b.json"
    code, out, err = _cli(["bench", *deps, "--engine", ENGINE, "--cores", 1, "--prompt-tokens", 8, "--new-tokens", 12,
                           "--rounds", 2, "--json", js, "--out", tmp_path / "t5"], monkeypatch, capsys)
    assert code == 0, err
    for row in ("Latency (ms)", "Throughput (tokens/sec)", "Speedup", "Dense"):
        assert row in out
    # by default: Table 5 and one short line per model and engine, readable on a 120-column terminal
    assert max(len(line) for line in out.splitlines()) <= 120, out
    assert "ms/token" in out and "Weights MB" in out and "Loop overhead" not in out and "Of bound" not in out
    doc = json.loads(js.read_text())
    rows = doc["engines"][ENGINE]
    assert [r["label"] for r in rows][0] == "Dense" and len(rows) == 2
    for r in rows:
        assert r["steps_timed"] == 2 * 11
        assert r["latency_p90_ms"] >= r["latency_ms"] > 0
        assert r["overhead_ms"] >= 0 and r["engine_ms"] <= r["latency_ms"]
        assert r["step_bytes"]["total"] > 0 and r["bound_ms"] > 0
    # the pruned model's step must read fewer bytes in the compact encoding than the dense one
    assert rows[1]["step_bytes"]["weights"] < rows[0]["step_bytes"]["weights"]
    if ENGINE == "deepsparse":
        assert doc["dense_ort_ms"] > 0 and doc["dense_tokens_agree_across_engines"] is True
    assert doc["machine"]["bandwidth"]["gbs"] > 0
    for ext in ("json", "csv", "md", "png"):
        assert (tmp_path / f"t5.{ext}").is_file()
    assert all(sha(d / "model.onnx") == h for d, h in before.items())


def test_bench_details_shows_every_column(deployed, monkeypatch, capsys):
    code, out, err = _cli(["bench", deployed["dense"], deployed["pruned"], "--engine", "onnxruntime", "--cores", 1,
                           "--prompt-tokens", 4, "--new-tokens", 4, "--rounds", 1, "--details"], monkeypatch, capsys)
    assert code == 0, err
    for name in ("Latency (ms)", "Peak RSS MB", "Loop overhead", "Engine-only speedup", "vs dense ORT",
                 "Layer/own bound", "Bound ms", "BW use", "Of bound"):
        assert name in out, name


def test_bench_bad_input_is_one_line(deployed, monkeypatch, capsys, tmp_path, tiny_tokenizer):
    dep = deployed["dense"]
    cases = [
        (["bench", tmp_path / "nope"], "does not exist"),
        (["bench", dep, "--prompt-tokens", 60, "--new-tokens", 10], "exceed"),
        (["bench", dep, "--engine", "tensorrt"], "unknown engine"),
        (["bench", dep, "--cores", 999], "--cores"),
        (["compile", deployed["root"]], "missing"),
        (["bench", tmp_path / "fresh-run"], f"{tmp_path / 'fresh-run'} has no deployment yet — export it first: "
                                            f"sparsedeploy export {tmp_path / 'fresh-run'}"),
        (["bench", deployed["run"]], f"is a RUN directory, not a deployment — pass its deployment: {deployed['pruned']}"),
        (["export", deployed["run"], "--seqlen", 2], "--seqlen"),
        (["sweep", "x", "--out", tmp_path / "s", "--sparsities", "0,1.5"], "outside"),
        (["sweep", "x", "--out", tmp_path / "s", "--synthetic", "gpt5"], "unknown synthetic"),
    ]
    (tmp_path / "fresh-run").mkdir()
    (tmp_path / "fresh-run" / "manifest.json").write_text('{"stages": {}}')
    for argv, needle in cases:
        code, out, err = _cli(argv, monkeypatch, capsys)
        assert code == 2 and err.startswith("error:") and needle in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
    # a corrupt model.onnx in a copy of the deployment
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(dep, bad)
    (bad / "model.onnx").write_bytes(b"garbage" * 10)
    code, out, err = _cli(["bench", bad], monkeypatch, capsys)
    assert code == 2 and "model.onnx" in err and len(err.strip().splitlines()) == 1


def test_sweep_resumes_and_reuses_calibration(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", tiny_llama_dir, "--out", out, "--sparsities", "0,0.5", "--nsamples", 4, "--calib-seqlen", 32,
            "--seqlen", 48, "--engine", ENGINE, "--cores", 1, "--prompt-tokens", 8, "--new-tokens", 8, "--rounds", 1]
    code, out1, err = _cli(argv, monkeypatch, capsys)
    assert code == 0, err
    assert (out / "p50" / "deployment" / "model.onnx").is_file() and (out / "dense" / "deployment").is_dir()
    for ext in ("json", "csv", "md", "png"):
        assert (out / f"table5.{ext}").is_file()
    calib = (out / "base" / "calib_stats.safetensors").read_bytes()
    assert (out / "p50" / "calib_stats.safetensors").read_bytes() == calib
    stamp = (out / "p50" / "deployment" / "model.onnx").stat().st_mtime_ns
    code, out2, err = _cli(argv, monkeypatch, capsys)
    assert code == 0, err
    assert "reusing" in err and "up to date" in err
    assert (out / "p50" / "deployment" / "model.onnx").stat().st_mtime_ns == stamp


def test_parse_sparsities_and_synthetic_shapes():
    from sparsedeploy.workflows.sweep import SYNTHETIC, parse_sparsities

    assert parse_sparsities("0.5, 0,0.9,0.5") == (0.0, 0.5, 0.9)
    shapes = SYNTHETIC["llama2-7b"]
    assert (shapes["hidden_size"], shapes["intermediate_size"], shapes["num_attention_heads"], shapes["vocab_size"]) == \
        (4096, 11008, 32, 32000)


def test_run_goes_from_model_to_table5(tiny_llama_dir, corpus_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    code, stdout, err = _cli(["run", "--model", tiny_llama_dir, "--out", out, "--nsamples", 4, "--seqlen", 32,
                              "--eval-data", f"file:{corpus_file}", "--eval-seqlen", 32, "--max-windows", 2,
                              "--export-seqlen", 48, "--prompt-tokens", 8, "--new-tokens", 8, "--device", "cpu",
                              "--engine", ENGINE, "--cores", 1], monkeypatch, capsys)
    assert code == 0, err
    assert "perplexity" in stdout and "Latency (ms)" in stdout and "Speedup" in stdout
    doc = json.loads((out / "table5.json").read_text())
    rows = doc["engines"][ENGINE]
    assert [r["label"] for r in rows][0] == "Dense" and len(rows) == 2
    assert abs(rows[1]["sparsity"] - 0.6) < 1 / 64 and rows[1]["label"] == f"{round(100 * rows[1]['sparsity'])}%"
    assert (out / "deployment" / "model.onnx").is_file() and (out / "dense-deployment" / "model.onnx").is_file()
    assert json.loads((out / "deployment" / f"compile-{ENGINE}.json").read_text())["tokens_equal_pytorch"] is True


def test_synthetic_sweep_is_labelled_and_pruned_as_planned(tmp_path, monkeypatch, capsys):
    out = tmp_path / "syn"
    code, stdout, err = _cli(["sweep", "--synthetic", "llama-tiny", "--layers", 2, "--method", "magnitude", "--out", out,
                              "--sparsities", "0,0.5,0.9", "--seqlen", 32, "--engine", ENGINE, "--cores", 1,
                              "--prompt-tokens", 4, "--new-tokens", 8, "--rounds", 1, "--group-size", 1],
                             monkeypatch, capsys)
    assert code == 0, err
    assert "SYNTHETIC" in stdout
    doc = json.loads((out / "table5.json").read_text())
    assert doc["synthetic"] is True and "SYNTHETIC" in doc["title"]
    assert "SYNTHETIC" in (out / "table5.md").read_text()
    rows = doc["engines"][ENGINE]
    assert [r["label"] for r in rows] == ["Dense", "50%", "90%"]
    assert sorted({r["group"] for r in doc["engines"][ENGINE]}) == [0, 1]   # group size 1: two groups, dense in both
    meta = json.loads((out / "p90" / "deployment" / "sparsedeploy.json").read_text())
    assert meta["verified"]["plan_from"] == "uniform 0.9"
    assert all(abs(v - 0.9) < 1 / 64 for v in meta["verified"]["layer_sparsity"].values())


def test_a_pruned_model_folder_exports_with_its_own_zeros(deployed, tmp_path):
    """A pruned model saved outside a RUN (no ratios.json) exports; the ONNX must hold exactly its zeros."""
    from sparsedeploy.export.stage import export

    dep = export(str(deployed["run"] / "model"), seqlen=64, out=tmp_path / "dep")
    meta = json.loads((dep / "sparsedeploy.json").read_text())
    run_meta = json.loads((deployed["pruned"] / "sparsedeploy.json").read_text())
    assert meta["verified"]["plan_from"].startswith("the model's own zeros")
    assert meta["weights"] == run_meta["weights"] and meta["sparsity"] == pytest.approx(run_meta["sparsity"])


def test_token_agreement_leaves_out_a_quantised_gguf_peer():
    """bench's "dense greedy tokens equal across engines": the llama.cpp peer on a Q4_0 GGUF decodes other weights,
    so its tokens are not compared; an f32 GGUF's are, and a real disagreement still shows."""
    from sparsedeploy.bench.bench import BenchConfig, assemble

    def row(engine, tokens, gguf=None):
        return {"engine": engine, "sparsity": 0.0, "group": 0, "tokens": tokens, "latency_ms": 1.0, "gguf": gguf,
                "step_bytes": {"total": 1000, "kv": 0}}

    machine = {"bandwidth": {"gbs": 10.0}}
    same, other = [1, 2, 3], [4, 5, 6]
    rows = [row("native", same), row("onnxruntime", same), row("llamacpp", other, "d/model-q4_0.gguf")]
    assert assemble(rows, BenchConfig(), machine, title=None, synthetic=False)["dense_tokens_agree_across_engines"] is True
    rows[2] = row("llamacpp", other, "d/model-f32.gguf")
    assert assemble(rows, BenchConfig(), machine, title=None, synthetic=False)["dense_tokens_agree_across_engines"] is False
