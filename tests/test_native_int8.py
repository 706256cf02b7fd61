"""int8 native deployments (`compile --engine native --weights int8`): stored groups, the key, greedy tokens
against PyTorch on the same fake-quantised weights (and activations), and bad input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from .cli_helpers import run_cli as _cli

INT8 = {"int8", "int8_ell", "int8_csr", "int8_bitmask", "int8_perm"}


@pytest.fixture(scope="module")
def deployments(tmp_path_factory, tiny_model_dir, corpus_file):
    """Dense and magnitude-pruned 80% (uneven rows) deployments of the tiny models."""
    from sparsedeploy.export.stage import export
    from sparsedeploy.pipeline import stages

    root = tmp_path_factory.mktemp("native-int8")
    calib = stages.CalibConfig(str(tiny_model_dir), f"file:{corpus_file}", 8, 48, 0, None, "cpu")
    out = {"dense": export(str(tiny_model_dir), seqlen=64, out=root / "dense")}
    run = root / "magnitude"
    stages.prune(stages.RunDir(run), stages.PruneConfig(str(tiny_model_dir), 0.8, "uniform", "magnitude", calib=calib,
                                                        device="cpu"))
    out["magnitude"] = export(str(run), seqlen=64)
    return out


@pytest.mark.parametrize("which,crossover,formats", [("dense", 0.9, {"int8"}), ("magnitude", 0.0, {"int8_csr"}),
                                                     ("magnitude", None, None), ("dense", None, None)])
def test_int8_deployment_tokens_equal_pytorch_on_the_quantised_model(deployments, which, crossover, formats):
    from sparsedeploy.bench.bench import compile_deployment

    rec = compile_deployment(deployments[which], "native", cores=2, crossover=crossover, force=True, weights="int8")
    n = rec["native"]
    assert n["weights"] == "int8" and "round-to-nearest" in n["quantization"]
    assert set(n["formats"]) <= INT8
    if formats is not None:
        assert set(n["formats"]) == formats
    else:
        assert n["tuning"]["weights"] == "int8"
        for g in n["measured"]:
            assert set(g["ms_all_layers"]) <= INT8 | {f + "/serial" for f in INT8}
    print(f"\n[int8 tokens] {which} crossover={crossover} formats={n['formats']}: emulated={rec['tokens_equal_pytorch']} "
          f"weights-only={rec['tokens_equal_pytorch_quantized_weights_only']} fp32={rec['tokens_equal_pytorch_fp32']}")
    # the engine's tokens equal PyTorch's on the same int8 weights and activations (the check that raises)
    assert rec["tokens_match_pytorch"] is True
    assert isinstance(rec["tokens_equal_pytorch_fp32"], bool)
    assert isinstance(rec["tokens_equal_pytorch_quantized_weights_only"], bool)
    wb = n["weight_bytes"]
    assert wb["decoder_linears"] < wb["decoder_linears_dense"]
    if formats == {"int8"}:                                 # 1 byte + 1/64 of the padding, against fp32's 4
        assert wb["decoder_linears"] < 0.3 * wb["decoder_linears_dense"]


@pytest.mark.parametrize("fmt", ["int8_bitmask", "int8_csr", "int8"])
def test_int8_groups_store_the_rtn_weights_and_decode_in_process(deployments, fmt):
    from safetensors.numpy import load_file

    from sparsedeploy.engine.decode import greedy_decode
    from sparsedeploy.engine.native.lowbit import quantize_rows
    from sparsedeploy.engine.native.runtime import NativeRuntime
    from sparsedeploy.export.native import ensure_native, lowbit_reference_tokens
    from sparsedeploy.export.onnx_kv import read_deployment

    meta = read_deployment(deployments["magnitude"])
    index = ensure_native(meta, force=True, formats=(fmt,), weights="int8")
    assert {g["format"] for layer in index["layers"] for g in layer.values()} == {fmt}
    assert index["weights"] == "int8" and index["key"]["weights"] == "int8"
    rt = NativeRuntime(meta["onnx"], cache_len=int(meta["seqlen"]))
    v = meta["verified"]
    res = greedy_decode(rt, v["prompt_ids"], len(v["tokens"]), prefill=rt)
    ref = lowbit_reference_tokens(meta, index, v["prompt_ids"], len(v["tokens"]))
    assert res.tokens == ref["weights_and_activations"]
    if fmt == "int8_csr":                                    # fp32 activations: the weights alone are the reference
        assert ref["weights"] == ref["weights_and_activations"]
    src_dir = Path(meta["export_key"]["source"])
    src = load_file(str(next((src_dir / "model").glob("*.safetensors")) if (src_dir / "model").is_dir()
                        else next(src_dir.glob("*.safetensors"))))
    arch = rt.model.arch
    for i, layer in enumerate(rt.model.layers):
        for g, names in arch.stacks().items():
            W = np.concatenate([src[f"{arch.layers}.{i}.{n}.weight"] for n in names], 0)
            wq, s = quantize_rows(W)
            np.testing.assert_allclose(layer[g].dense(), wq.astype(np.float32) * s[:, None], rtol=1e-6, atol=0)
            assert (layer[g].dense()[W == 0] == 0).all()
    info = rt.info()
    assert set(info["lowbit_kernels"]) == {fmt}


def test_the_value_type_is_in_the_key_and_kept_by_bench(deployments):
    from sparsedeploy.export.native import ensure_native, is_current
    from sparsedeploy.export.onnx_kv import read_deployment

    meta = read_deployment(deployments["magnitude"])
    a = ensure_native(meta, crossover=0.55, force=True, weights="int8")
    assert a["weights"] == "int8" and is_current(meta)
    b = ensure_native(meta, cores=None, keep_fixed=True)              # bench / run / sweep keep what was built
    assert b["key"] == a["key"]
    c = ensure_native(meta, crossover=0.55)                          # compile without --weights: fp32 again
    assert c["weights"] == "fp32" and "weights" not in c["key"] and is_current(meta)
    assert {g["format"] for layer in c["layers"] for g in layer.values()} <= {"dense", "ell", "csr"}


@pytest.mark.parametrize("argv,needle", [
    (["compile", "{dep}", "--engine", "native", "--weights", "int3"], "--weights 'int3'"),
    (["compile", "{dep}", "--engine", "onnxruntime", "--weights", "int8"], "native engine only"),
    (["compile", "{dep}", "--engine", "native", "--weights", "int8", "--act-columns", "128"], "--act-columns 128"),
    (["compile", "{dep}", "--engine", "native", "--act-columns", "64"], "is for low-bit builds"),
    (["compile", "{dep}", "--engine", "onnxruntime", "--act-columns", "64"], "native engine only"),
    (["compile", "{dep}", "--engine", "native", "--weights", "int8", "--int4-scales", "fp16"], "are for int4 builds"),
    (["compile", "{dep}", "--engine", "native", "--weights", "int4", "--int4-group", "100"], "--int4-group 100"),
    (["compile", "{dep}", "--engine", "onnxruntime", "--int4-scales", "fp16"], "native engine only"),
    (["export", "{dep}", "--int4-group", "256"], "apply to --format native"),
])
def test_bad_weights_option_is_one_line(deployments, monkeypatch, capsys, argv, needle):
    argv = [a.replace("{dep}", str(deployments["magnitude"])) for a in argv]
    code, out, err = _cli(argv, monkeypatch, capsys)
    assert code == 2 and err.startswith("error:") and needle in err and len(err.strip().splitlines()) == 1


def test_a_worker_loads_the_native_build_beside_the_graph_it_was_given_not_beside_the_link_target(deployments, tmp_path):
    """A second view of a deployment (its files symlinked, its own native/ folder with int8 weights) must run its
    own build: a worker that resolved the graph's path would run the original's fp32 build instead."""
    from sparsedeploy.engine.worker import WorkerRuntime
    from sparsedeploy.export.native import ensure_native
    from sparsedeploy.export.onnx_kv import read_deployment

    src = Path(deployments["dense"])
    ensure_native(read_deployment(src), crossover=0.55, weights="fp32")
    view = tmp_path / "view"
    view.mkdir()
    for f in src.iterdir():
        if f.name != "native":
            (view / f.name).symlink_to(f.resolve())
    built = ensure_native(read_deployment(view), crossover=0.55, weights="int8")
    assert built["weights"] == "int8"
    meta = read_deployment(view)
    w = WorkerRuntime("native", meta["onnx"], cores=1, seq_len=1, cache_len=int(meta["seqlen"]))
    try:
        got = w.engine_info["weight_bytes"]
    finally:
        w.close()
    from sparsedeploy.engine.native.model import NativeModel

    assert got == NativeModel(view / "native").weight_bytes()
    assert got != NativeModel(src / "native").weight_bytes()


def test_bench_labels_carry_the_native_value_type(deployments, tmp_path):
    from sparsedeploy.bench.bench import BenchConfig, time_jobs
    from sparsedeploy.export.native import ensure_native
    from sparsedeploy.export.onnx_kv import read_deployment

    meta = read_deployment(deployments["magnitude"])
    ensure_native(meta, crossover=0.55, force=True, weights="int8")
    rows = time_jobs([(meta, "native")], BenchConfig(engine=["native"], cores=1, prompt_tokens=4, new_tokens=4,
                                                     rounds=1, ort_baseline=False), list(range(4, 8)), None)
    assert rows[0]["weights"] == "int8" and rows[0]["label"].endswith(" int8")
    ensure_native(meta, crossover=0.55, weights="fp32")
    rows = time_jobs([(meta, "native")], BenchConfig(engine=["native"], cores=1, prompt_tokens=4, new_tokens=4,
                                                     rounds=1, ort_baseline=False), list(range(4, 8)), None)
    assert rows[0]["weights"] == "fp32" and not rows[0]["label"].endswith("int8")


def test_a_4_bit_lm_head_decodes_pytorchs_tokens_on_the_same_weights_and_is_kept(deployments):
    """`compile --weights int8 --head q4`: the lm_head stored Q4_0-like (4-bit, float16 scale per 32 columns);
    greedy tokens equal PyTorch's with that head dequantised (compile raises otherwise); bench keeps it."""
    from sparsedeploy.bench.bench import compile_deployment
    from sparsedeploy.engine.native.model import NativeModel
    from sparsedeploy.export.native import ensure_native, is_current
    from sparsedeploy.export.onnx_kv import read_deployment

    dep = deployments["magnitude"]
    rec = compile_deployment(dep, "native", cores=2, crossover=0.55, force=True, weights="int8", head="q4")
    assert rec["tokens_match_pytorch"] is True and "lm_head 4-bit" in rec["native"]["quantization"]
    meta = read_deployment(dep)
    q4 = NativeModel(Path(dep) / "native")
    assert q4.index["head"] == "q4" and q4.lm_head.fmt == "q4" and q4.index["key"]["head"] == "q4"
    assert ensure_native(meta, keep_fixed=True, crossover=0.55)["head"] == "q4" and is_current(meta)
    int8 = ensure_native(meta, crossover=0.55, weights="int8")               # no --head: the int8 default again
    assert int8["head"] == "int8" and "head" not in int8["key"]
    i8 = NativeModel(Path(dep) / "native")
    assert q4.lm_head.nbytes < 0.6 * i8.lm_head.nbytes
    np.testing.assert_allclose(q4.lm_head.dense(), i8.lm_head.dense(), atol=float(np.abs(i8.lm_head.dense()).max()) / 7)


@pytest.mark.parametrize("argv,needle", [
    (["compile", "{dep}", "--engine", "native", "--head", "q4"], "--head q4 is for low-bit builds"),
    (["compile", "{dep}", "--engine", "native", "--weights", "int8", "--head", "q2"], "--head 'q2'"),
])
def test_bad_head_option_is_one_line(deployments, monkeypatch, capsys, argv, needle):
    argv = [a.replace("{dep}", str(deployments["magnitude"])) for a in argv]
    code, out, err = _cli(argv, monkeypatch, capsys)
    assert code == 2 and err.startswith("error:") and needle in err and len(err.strip().splitlines()) == 1


def test_a_build_with_a_scale_per_64_columns_decodes_pytorchs_tokens_and_is_kept(deployments):
    """`compile --weights int8 --act-columns 64`: the build records it (index, key, quantization), its Linears
    quantise per 64 columns, its greedy tokens match PyTorch's with activations quantised per 64 columns
    (compile raises otherwise), bench keeps it, and a plain --weights int8 goes back to 256."""
    from sparsedeploy.bench.bench import compile_deployment
    from sparsedeploy.engine.native.model import NativeModel
    from sparsedeploy.export.native import ensure_native, is_current
    from sparsedeploy.export.onnx_kv import read_deployment

    dep = deployments["magnitude"]
    rec = compile_deployment(dep, "native", cores=2, crossover=0.55, force=True, weights="int8", act_columns=64)
    assert rec["tokens_match_pytorch"] is True and "per 64 columns" in rec["native"]["quantization"]
    assert "per 64 columns" in rec["pytorch_reference"]
    m = NativeModel(Path(dep) / "native")
    assert m.index["act_columns"] == 64 and m.index["key"]["act_columns"] == 64
    lin = m.lm_head                                           # int8 per row: quantises its input
    assert lin.act_columns == 64 and lin.qbuf[1].shape[0] == 2 * 16 * lin.qbuf[2].shape[0]     # a lane set per block
    meta = read_deployment(dep)
    assert ensure_native(meta, keep_fixed=True, crossover=0.55)["act_columns"] == 64 and is_current(meta)
    back = ensure_native(meta, crossover=0.55, weights="int8")
    assert back["act_columns"] == 256 and "act_columns" not in back["key"]
