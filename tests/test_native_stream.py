"""Native weights built streamed from a model folder (export --format native) and native-only deployments.

References: the in-memory packer's arrays for the same pruned weights (pack.build over the whole state dict),
the official safetensors reader for the files the streaming writer makes, and PyTorch's greedy tokens on the
same pruned weights for a deployment that has no ONNX graph.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from .cli_helpers import run_cli as _cli


def _pruned_state(model_dir: Path, sparsity: float) -> tuple[dict, dict]:
    """The folder's tensors with every decoder linear magnitude-pruned in memory (the sweep's way), and its config."""
    import torch
    from safetensors.torch import load_file

    from sparsedeploy.pipeline.arch import spec_for
    from sparsedeploy.pipeline.prune import prune_magnitude

    config = json.loads((model_dir / "config.json").read_text())
    spec = spec_for(config)
    sd = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    prunable = {f"{spec.layers}.{i}.{n}.weight" for i in range(config["num_hidden_layers"]) for n in spec.linears}
    out = {}
    for k, v in sd.items():
        v = v.to(torch.float32)
        out[k] = (prune_magnitude(v, None, sparsity) if k in prunable and sparsity else v).numpy()
    return out, config


@pytest.mark.parametrize("weights,head,crossover,sparsity", [("int8", "q4", 0.5, 0.6), ("int8", None, 0.9, 0.3),
                                                             ("fp32", None, 0.55, 0.7)])
def test_streamed_native_build_equals_the_in_memory_build(tiny_llama_dir, tmp_path, weights, head, crossover, sparsity):
    from safetensors.numpy import load_file

    from sparsedeploy.engine.native.pack import NATIVE_DIR, SHARED, WEIGHTS, build, map_arrays
    from sparsedeploy.export.native import export_native_only

    tensors, config = _pruned_state(tiny_llama_dir, sparsity)
    ref = tmp_path / "ref"
    index_ref = build(tensors, config, ref, key={}, crossover=crossover, weights=weights, head=head)
    res = export_native_only(tiny_llama_dir, tmp_path / "dep", weights=weights, head=head, crossover=crossover,
                             magnitude=sparsity, progress=False)
    got = Path(res["dir"]) / NATIVE_DIR
    index = json.loads((got / "native.json").read_text())
    assert index["layers"] == index_ref["layers"] and index["zeros"] == index_ref["zeros"]
    assert index["bytes"] == index_ref["bytes"] and index["shared_key"] == index_ref["shared_key"]
    assert {g["format"] for layer in index["layers"] for g in layer.values()} != set()
    for name in (WEIGHTS, SHARED):
        a, b = load_file(str(ref / name)), load_file(str(got / name))    # the official reader reads both
        mapped = map_arrays(got / name)
        assert set(a) == set(b) == set(mapped) and a
        for k in a:
            assert a[k].dtype == b[k].dtype == mapped[k].dtype and a[k].shape == b[k].shape == mapped[k].shape, k
            assert np.array_equal(a[k], b[k]) and np.array_equal(b[k], mapped[k]), k
            assert mapped[k].flags.writeable and mapped[k].flags.aligned, k
    z = index["zeros"]
    assert abs(sum(v[0] for v in z.values()) / sum(v[1] for v in z.values()) - sparsity) < 0.01


@pytest.fixture(scope="module")
def native_only(tiny_llama_dir, tmp_path_factory):
    from sparsedeploy.export.native import export_native_only

    out = tmp_path_factory.mktemp("native-only") / "dep"
    export_native_only(tiny_llama_dir, out, weights="fp32", crossover=0.55, magnitude=0.5, seqlen=64, progress=False)
    return out


@pytest.mark.parametrize("load", ["mmap", "copy"])
def test_native_only_deployment_decodes_pytorchs_tokens_without_onnx(native_only, tiny_llama_dir, monkeypatch, load):
    import torch
    from transformers import AutoModelForCausalLM

    from sparsedeploy.engine.deployment import read_deployment
    from sparsedeploy.engine.worker import WorkerRuntime
    from sparsedeploy.export.verify import greedy_torch

    assert not list(native_only.glob("*.onnx")) and not (native_only / "model.data").exists()
    meta = read_deployment(native_only)
    assert meta["native_only"] and 0.45 < meta["sparsity"] < 0.55
    tensors, _ = _pruned_state(tiny_llama_dir, 0.5)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
    prompt = [5, 17, 42, 99, 3, 250]
    want = greedy_torch(model, prompt, 10)
    with WorkerRuntime("native", meta["onnx"], cores=2, seq_len=1, cache_len=int(meta["seqlen"]),
                       env={"SPARSEDEPLOY_NATIVE_LOAD": load}) as w:          # this worker's load mode
        assert w.decode(prompt, 10).tokens == want
        info = w.engine_info
    wb = info["weight_bytes"]
    assert wb["load"] == load and sum(wb["by_value_type"].values()) == wb["total"] and set(wb["by_value_type"]) == {"fp32"}


def test_bench_runs_a_native_only_deployment_and_refuses_graph_engines(native_only):
    from sparsedeploy.bench.bench import BenchConfig, bench
    from sparsedeploy.errors import UserError

    doc = bench([native_only], BenchConfig(engine="native", prompt_tokens=4, new_tokens=4, rounds=1,
                                           ort_baseline=False, bandwidth_mbytes=16))
    rows = doc["engines"]["native"]
    assert list(doc["engines"]) == ["native"] and len(rows) == 1 and rows[0]["latency_ms"] > 0
    assert rows[0]["native_bytes"]["by_value_type"] and rows[0]["steps_timed"] >= 3
    from sparsedeploy.serve.app import read_deployment_light

    assert read_deployment_light(native_only)["native_only"]          # serve reads it too (with --engine native)
    with pytest.raises(UserError, match="native-only"):
        bench([native_only], BenchConfig(engine="onnxruntime", prompt_tokens=4, new_tokens=4, rounds=1))


@pytest.mark.parametrize("argv,needle", [
    (["export", "{model}", "--format", "native"], "--out"),
    (["export", "{model}", "--format", "native", "--out", "{new}", "--prune-magnitude", "1.5"], "outside"),
    (["export", "{model}", "--format", "native", "--out", "{new}", "--weights", "int3"], "value type"),
    (["export", "{model}", "--format", "native", "--out", "{new}", "--head", "q4", "--weights", "fp32"], "low-bit"),
    (["export", "{model}", "--out", "{new}", "--prune-magnitude", "0.5"], "--format native"),
    (["export", "{missing}", "--format", "native", "--out", "{new}"], "missing"),
    (["compile", "{dep}", "--engine", "onnxruntime"], "native-only"),
    (["bench", "{dep}", "--engine", "deepsparse"], "native-only"),
])
def test_native_only_cli_bad_input_is_one_line(native_only, tiny_llama_dir, tmp_path, monkeypatch, capsys, argv, needle):
    subs = {"{model}": str(tiny_llama_dir), "{new}": str(tmp_path / "new"), "{dep}": str(native_only),
            "{missing}": str(tmp_path / "missing")}
    argv = [subs.get(a, a) for a in argv]
    code, out, err = _cli(argv, monkeypatch, capsys)
    assert code == 2 and err.startswith("error:") and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_streamed_gguf_equals_the_in_memory_gguf_of_the_same_pruned_weights(tiny_llama_dir, tmp_path, qtype):
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsedeploy.export.gguf import write_gguf, write_gguf_from_folder

    tensors, _ = _pruned_state(tiny_llama_dir, 0.6)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
    ref, got = tmp_path / "ref.gguf", tmp_path / "streamed.gguf"
    write_gguf(model, AutoTokenizer.from_pretrained(tiny_llama_dir), ref, qtype, name="m")
    doc = write_gguf_from_folder(tiny_llama_dir, got, qtype, magnitude=0.6)
    assert doc["tensors"] == 2 + 1 + 9 * 3 and qtype in doc["types"]
    a, b = gguf.GGUFReader(str(ref)), gguf.GGUFReader(str(got))
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert list(ta) == list(tb)
    for n in ta:
        assert ta[n].tensor_type == tb[n].tensor_type and np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data)), n


@pytest.mark.parametrize("enc", ["encode_int8", "encode_q4"])
def test_row_blocked_head_encoding_equals_the_whole_matrix(enc):
    from sparsedeploy.engine.native import lowbit
    from sparsedeploy.engine.native.pack import _encode_rows

    W = np.random.default_rng(0).standard_normal((1000, 200)).astype(np.float32)
    whole, blocked = getattr(lowbit, enc)(W), _encode_rows(getattr(lowbit, enc), W, rows=128)
    assert set(whole) == set(blocked) and all(np.array_equal(whole[k], blocked[k]) for k in whole)


def test_streamed_build_times_each_kind_of_layer_once(tiny_llama_dir, tmp_path):
    """Formats measured while streaming: every group has its timings; a layer of the same shapes and sparsities as
    an earlier one takes that layer's choice (uniform pruning: one timing for the whole model)."""
    from sparsedeploy.export.native import export_native_only

    res = export_native_only(tiny_llama_dir, tmp_path / "dep", weights="int8", cores=2, progress=False)   # dense
    index = res["index"]
    assert index["tuning"]["per_layer"] and index["tuning"]["threads"] == 2
    first = index["layers"][0]
    for i, layer in enumerate(index["layers"]):
        for g, info in layer.items():
            assert info["measured_ms"] and info["format"] in ("int8", "int8_csr", "int8_ell", "int8_bitmask")
            assert info.get("measured_on_layer", i) == (0 if i else i)
            assert (info["format"], info["serial"]) == (first[g]["format"], first[g]["serial"])


def test_the_full_depth_route_on_a_bf16_run(tiny_llama_dir, corpus_file, tmp_path, monkeypatch, capsys):
    """Issue 14's pipeline at tiny scale: a bf16 sharded model, a streamed Wanda + DLP prune (RUN/model stays
    bf16), then `export RUN --format native` (streamed, no ONNX) and a native decode: PyTorch's greedy tokens on
    RUN/model (fp32 products: --weights fp32), and the deployment keeps the RUN's zeros."""
    import torch
    from transformers import AutoModelForCausalLM

    from sparsedeploy.engine.deployment import read_deployment
    from sparsedeploy.engine.worker import WorkerRuntime
    from sparsedeploy.export.verify import greedy_torch
    from sparsedeploy.pipeline import stages
    from sparsedeploy.pipeline.rundir import RunDir

    from .shard_helpers import save_bf16_shards

    src = save_bf16_shards(tiny_llama_dir, tmp_path / "bf16")
    run = RunDir(tmp_path / "run")
    calib = stages.CalibConfig(str(src), f"file:{corpus_file}", nsamples=4, seqlen=32, device="cpu")
    stages.prune(run, stages.PruneConfig(model=str(src), sparsity=0.7, allocator="dlp", method="wanda", calib=calib,
                                         device="cpu", stream=True))
    assert json.loads((run.path / "manifest.json").read_text())["stages"]["prune"]["streamed"]
    dep = tmp_path / "dep"
    code, out, err = _cli(["export", str(run.path), "--format", "native", "--weights", "fp32", "--seqlen", "64",
                           "--out", str(dep)], monkeypatch, capsys)
    assert code == 0, out + err
    meta = read_deployment(dep)
    assert meta["native_only"] and not list(dep.glob("*.onnx"))
    model = AutoModelForCausalLM.from_pretrained(run.path / "model", dtype=torch.float32).eval()
    lin = [m.weight for n, m in model.named_modules() if n.split(".")[-1] in ("q_proj", "up_proj", "down_proj")]
    zeros = sum(int((w == 0).sum()) for w in lin) / sum(w.numel() for w in lin)
    assert 0.6 < zeros < 0.8 and abs(meta["sparsity"] - 0.7) < 0.05
    prompt = [5, 17, 42, 99, 3, 250]
    want = greedy_torch(model, prompt, 10)
    with WorkerRuntime("native", meta["onnx"], cores=2, seq_len=1, cache_len=int(meta["seqlen"])) as w:
        assert w.decode(prompt, 10).tokens == want


def test_a_build_on_a_busy_machine_says_its_formats_were_chosen_by_bytes(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """The tuner's busy fallback (test_tune) reaches the index and the CLI: a warning line with the fix."""
    from sparsedeploy.engine.native import tune

    class Busy:
        def __init__(self, pids):
            self.fraction = None

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fraction = 0.7

    monkeypatch.setattr(tune, "OtherLoad", Busy)
    monkeypatch.setattr(tune, "RETRY_PAUSE_S", 0.0)
    dep = tmp_path / "dep"
    code, out, err = _cli(["export", str(tiny_llama_dir), "--format", "native", "--prune-magnitude", "0.6",
                           "--seqlen", "32", "--out", str(dep)], monkeypatch, capsys)
    assert code == 0, out + err
    index = json.loads((dep / "native" / "native.json").read_text())
    assert "70%" in index["tuning"]["fallback"] and index["tuning"]["attempts"] == tune.RETRIES + 1
    assert not any(g["serial"] for layer in index["layers"] for g in layer.values())
    flat = " ".join(out.split())
    assert "chosen by bytes" in flat and "export MODEL --format native" in flat


def test_auto_load_copies_what_fits_in_half_the_ram_and_maps_the_rest(native_only, monkeypatch):
    from sparsedeploy.engine.native import model as M

    monkeypatch.delenv(M.LOAD_ENV, raising=False)
    ndir = native_only / "native"
    assert M.load_mode(ndir) == "copy"
    size = sum((ndir / n).stat().st_size for n in (M.WEIGHTS, M.SHARED))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    monkeypatch.setattr(M, "COPY_RAM_SHARE", 0.9 * size / ram)
    assert M.load_mode(ndir) == "mmap"
    monkeypatch.setenv(M.LOAD_ENV, "copy")
    assert M.load_mode(ndir) == "copy"
