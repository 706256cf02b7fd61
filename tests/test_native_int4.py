"""int4 native deployments (`compile --engine native --weights int4`): 4-bit codes on the GPTQ grid over a keep
bitmask (engine/native/int4.py) built into the engine: stored groups against an independent round-to-nearest,
greedy tokens against PyTorch on the same weights and activations, bytes, and the key."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def deployments(tmp_path_factory, tiny_model_dir, corpus_file):
    """Dense and magnitude-pruned 70% deployments of the tiny models."""
    from sparsedeploy.export.stage import export
    from sparsedeploy.pipeline import stages

    root = tmp_path_factory.mktemp("native-int4")
    calib = stages.CalibConfig(str(tiny_model_dir), f"file:{corpus_file}", 8, 48, 0, None, "cpu")
    out = {"dense": export(str(tiny_model_dir), seqlen=64, out=root / "dense")}
    run = root / "magnitude"
    stages.prune(stages.RunDir(run), stages.PruneConfig(str(tiny_model_dir), 0.7, "uniform", "magnitude", calib=calib,
                                                        device="cpu"))
    out["magnitude"] = export(str(run), seqlen=64)
    return out


@pytest.mark.parametrize("which,crossover", [("magnitude", None), ("dense", 0.55)])
def test_int4_deployment_tokens_equal_pytorch_on_the_same_weights_and_activations(deployments, which, crossover):
    from sparsedeploy.bench.bench import compile_deployment

    rec = compile_deployment(deployments[which], "native", cores=2, crossover=crossover, force=True, weights="int4")
    n = rec["native"]
    assert n["weights"] == "int4" and "round-to-nearest" in n["quantization"] and "checkpoint" not in n["quantization"]
    assert set(n["formats"]) == {"int4_bitmask"}
    assert rec["tokens_match_pytorch"] is True          # the check that raises when they differ
    assert isinstance(rec["tokens_equal_pytorch_fp32"], bool)
    wb = n["weight_bytes"]
    # 1/2 byte a kept weight + 1/8 (mask) + 8/128 (scale, zero) + per row and block overheads that the tiny
    # models' short rows magnify (a row pointer, byte-aligned blocks): well under int8's 1 and fp32's 4 bytes
    limit = 0.6 if which == "magnitude" else 0.95
    assert wb["decoder_linears"] < limit / 4 * wb["decoder_linears_dense"]


def test_the_rounding_tie_check_accepts_pytorchs_own_path_and_refuses_other_tokens(deployments):
    """lowbit_reference_tokens' teacher-forced check (what lets a low-bit engine's greedy path differ from
    PyTorch's at an activation rounding tie): PyTorch's own greedy tokens are its argmax at every step (gap 0);
    tokens that are not near its best are refused."""
    import numpy as np

    from sparsedeploy.bench.bench import _read_deployment
    from sparsedeploy.export.native import TIE_SHARE, ensure_native, lowbit_reference_tokens

    meta = _read_deployment(deployments["dense"])
    index = ensure_native(meta, crossover=0.55, weights="int4")
    ids = meta["verified"]["prompt_ids"]
    own = lowbit_reference_tokens(meta, index, ids, 8)["weights_and_activations"]
    tf = lowbit_reference_tokens(meta, index, ids, 8, engine_tokens=own)["teacher_forced"]
    assert tf["max_gap_share"] == 0 and tf["steps_not_argmax"] == 0 and tf["within_ties"] is True
    rng = np.random.default_rng(0)
    other = [int(t) for t in rng.integers(0, int(index["config"]["vocab_size"]), 8)]
    tf = lowbit_reference_tokens(meta, index, ids, 8, engine_tokens=other)["teacher_forced"]
    assert tf["within_ties"] is False and tf["max_gap_share"] > TIE_SHARE and tf["steps_not_argmax"] >= 1


def test_int4_groups_store_an_independent_rtn_of_the_source_and_the_key_holds_the_value_type(deployments):
    from safetensors.numpy import load_file

    from sparsedeploy.engine.native.pack import INT4_GROUP
    from sparsedeploy.engine.native.runtime import NativeRuntime
    from sparsedeploy.export.native import ensure_native, is_current
    from sparsedeploy.export.onnx_kv import read_deployment

    meta = read_deployment(deployments["magnitude"])
    index = ensure_native(meta, crossover=0.55, force=True, weights="int4")
    assert index["weights"] == "int4" and index["key"]["weights"] == "int4" and index["head"] == "int8"
    assert {g["codes"] for layer in index["layers"] for g in layer.values()} == {"rtn"}
    assert ensure_native(meta, cores=None, keep_fixed=True)["key"] == index["key"] and is_current(meta)
    rt = NativeRuntime(meta["onnx"], cache_len=int(meta["seqlen"]))
    assert set(rt.info()["lowbit_kernels"]) == {"int4_bitmask"}
    src_dir = Path(meta["export_key"]["source"]) / "model"
    src = load_file(str(next(src_dir.glob("*.safetensors"))))
    arch = rt.model.arch
    for i, layer in enumerate(rt.model.layers):
        for g, names in arch.stacks().items():
            W = np.concatenate([src[f"{arch.layers}.{i}.{n}.weight"] for n in names], 0).astype(np.float32)
            got = layer[g].dense()
            assert ((got == 0) == (W == 0)).all()                       # exactly the pruned zeros, no new ones
            # the grid, by hand: per row and group of 128 kept weights, levels min + k (max - min) / 15
            for r in range(0, W.shape[0], 7):
                for g0 in range(0, W.shape[1], INT4_GROUP):
                    w, q = W[r, g0:g0 + INT4_GROUP], got[r, g0:g0 + INT4_GROUP]
                    k = w != 0
                    if not k.any():
                        continue
                    lo, hi = w[k].min(), w[k].max()
                    if hi == lo:
                        continue
                    step = (hi - lo) / 15
                    err = np.abs(q[k] - w[k])
                    far = err > step / 2 * (1 + 1e-4) + 1e-7    # only a level that would be exactly 0 moves one up
                    assert far.sum() <= 1 and (err <= 1.5 * step * (1 + 1e-4)).all()
                    # every stored value is on one of the 16 levels
                    lev = np.rint((q[k] - lo) / step)
                    assert ((lev >= 0) & (lev <= 15)).all()
                    np.testing.assert_allclose(q[k], lo + lev * step, rtol=1e-4, atol=1e-6)
    c = ensure_native(meta, crossover=0.55)                             # compile without --weights: fp32 again
    assert c["weights"] == "fp32"


@pytest.mark.parametrize("sym,group_size", [(False, 64), (True, -1)])
def test_int4_from_a_gptq_run_uses_its_codes_bit_exact_and_decodes_its_tokens(tiny_llama_dir, corpus_file, tmp_path,
                                                                              sym, group_size):
    """`compile --weights int4` of a deployment exported from a 4-bit GPTQ RUN builds its groups from the
    checkpoint's codes: the stored matrices equal RUN/model's fake-quant weights bit for bit (no re-quantisation),
    and the engine's greedy tokens equal PyTorch's on those weights with the activations quantised as it does."""
    from safetensors.numpy import load_file

    from sparsedeploy.bench.bench import compile_deployment
    from sparsedeploy.engine.native.runtime import NativeRuntime
    from sparsedeploy.export.onnx_kv import read_deployment
    from sparsedeploy.export.stage import export
    from sparsedeploy.pipeline import stages

    run = stages.RunDir(tmp_path / "run")
    calib = stages.CalibConfig(str(tiny_llama_dir), f"file:{corpus_file}", 8, 48, 0, None, "cpu")
    stages.prune(run, stages.PruneConfig(str(tiny_llama_dir), 0.6, "uniform", "wanda", calib=calib, device="cpu"))
    stages.quantize(run, stages.QuantConfig(bits=4, group_size=group_size, sym=sym, device="cpu"))
    dep = export(str(run.path), seqlen=64)
    rec = compile_deployment(dep, "native", cores=2, crossover=0.55, force=True, weights="int4")
    n = rec["native"]
    assert "GPTQ checkpoint's codes" in n["quantization"] and "round-to-nearest" not in n["quantization"]
    assert rec["tokens_match_pytorch"] is True
    meta = read_deployment(dep)
    rt = NativeRuntime(meta["onnx"], cache_len=int(meta["seqlen"]))
    assert {g["codes"] for layer in rt.model.index["layers"] for g in layer.values()} == {"gptq"}
    fake = load_file(str(next((run.path / "model").glob("*.safetensors"))))
    arch = rt.model.arch
    for i, layer in enumerate(rt.model.layers):
        for g, names in arch.stacks().items():
            W = np.concatenate([fake[f"{arch.layers}.{i}.{nm}.weight"] for nm in names], 0).astype(np.float32)
            assert np.array_equal(layer[g].dense().view(np.uint32), W.view(np.uint32)), (i, g)


def test_native_only_int4_export_of_a_gptq_run_uses_its_codes(tiny_llama_dir, corpus_file, tmp_path):
    """`export RUN/model --format native --weights int4` (the streamed, full-depth path) builds the groups from
    RUN/quantized's codes too: bit for bit RUN/model's fake-quant weights; magnitude pruning on top is refused."""
    from safetensors.numpy import load_file

    from sparsedeploy.engine.native.model import NativeModel
    from sparsedeploy.errors import UserError
    from sparsedeploy.export.native import export_native_only
    from sparsedeploy.pipeline import stages

    run = stages.RunDir(tmp_path / "run")
    calib = stages.CalibConfig(str(tiny_llama_dir), f"file:{corpus_file}", 8, 48, 0, None, "cpu")
    stages.prune(run, stages.PruneConfig(str(tiny_llama_dir), 0.6, "uniform", "wanda", calib=calib, device="cpu"))
    stages.quantize(run, stages.QuantConfig(bits=4, group_size=64, device="cpu"))
    res = export_native_only(run.path / "model", tmp_path / "dep", weights="int4", crossover=0.55, seqlen=64,
                             progress=False)
    model = NativeModel(tmp_path / "dep" / "native")
    assert {g["codes"] for layer in res["index"]["layers"] for g in layer.values()} == {"gptq"}
    fake = load_file(str(next((run.path / "model").glob("*.safetensors"))))
    arch = model.arch
    for i, layer in enumerate(model.layers):
        for g, names in arch.stacks().items():
            W = np.concatenate([fake[f"{arch.layers}.{i}.{nm}.weight"] for nm in names], 0).astype(np.float32)
            assert np.array_equal(layer[g].dense().view(np.uint32), W.view(np.uint32)), (i, g)
    with pytest.raises(UserError, match="prune-magnitude"):
        export_native_only(run.path / "model", tmp_path / "dep2", weights="int4", magnitude=0.5, progress=False)
    assert not (tmp_path / "dep2").exists()
    with pytest.raises(UserError, match="would round a GPTQ checkpoint's float32 scales") as e:
        export_native_only(run.path / "model", tmp_path / "dep3", weights="int4", int4_scales="fp16", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "dep3").exists()


def test_int4_refuses_a_3_bit_run_in_one_line(tiny_llama_dir, corpus_file, tmp_path):
    from sparsedeploy.errors import UserError
    from sparsedeploy.export.native import ensure_native
    from sparsedeploy.export.onnx_kv import read_deployment
    from sparsedeploy.export.stage import export
    from sparsedeploy.pipeline import stages

    run = stages.RunDir(tmp_path / "run")
    calib = stages.CalibConfig(str(tiny_llama_dir), f"file:{corpus_file}", 8, 48, 0, None, "cpu")
    stages.prune(run, stages.PruneConfig(str(tiny_llama_dir), 0.5, "uniform", "magnitude", calib=calib, device="cpu"))
    stages.quantize(run, stages.QuantConfig(bits=3, group_size=64, sym=False, device="cpu"))
    meta = read_deployment(export(str(run.path), seqlen=64))
    with pytest.raises(UserError, match="3-bit GPTQ codes.*re-quantize the RUN with --bits 4") as e:
        ensure_native(meta, crossover=0.55, weights="int4")
    assert "\n" not in str(e.value)


def test_int4_float16_scales_in_groups_of_256_decode_pytorchs_tokens_in_fewer_bytes(deployments):
    """`compile --weights int4 --int4-group 256 --int4-scales fp16`: the groups store float16 scales and zeros
    (uint16 bits) on the grid of 256 columns, the engine's tokens equal PyTorch's on exactly those weights, the
    decoder bytes fall below the default (128, fp32) build's, and the storage is part of the key (kept by
    keep_fixed, replaced by an explicit default)."""
    from sparsedeploy.bench.bench import compile_deployment
    from sparsedeploy.engine.native.runtime import NativeRuntime
    from sparsedeploy.export.native import ensure_native, is_current
    from sparsedeploy.export.onnx_kv import read_deployment

    base = compile_deployment(deployments["magnitude"], "native", cores=2, crossover=0.55, force=True, weights="int4")
    rec = compile_deployment(deployments["magnitude"], "native", cores=2, crossover=0.55, weights="int4",
                             int4_group=256, int4_scales="fp16")
    n = rec["native"]
    assert "float16" in n["quantization"] and "groups of 256" in n["quantization"]
    assert rec["tokens_match_pytorch"] is True
    assert n["weight_bytes"]["decoder_linears"] < base["native"]["weight_bytes"]["decoder_linears"]
    meta = read_deployment(deployments["magnitude"])
    index = ensure_native(meta, cores=None, keep_fixed=True)
    assert index["int4"] == {"group_size": 256, "scales": "fp16"} and index["key"]["int4"] == [256, "fp16"]
    assert is_current(meta)
    rt = NativeRuntime(meta["onnx"], cache_len=int(meta["seqlen"]))
    for layer in rt.model.layers:
        for lin in (v for v in layer.values() if not isinstance(v, tuple)):      # (the norms are tuples)
            assert lin.d.dtype == np.uint16 and lin.e.dtype == np.uint16 and lin.gs >= 256
    again = ensure_native(meta, crossover=0.55, weights="int4", int4_group=128, int4_scales="fp32")
    assert again["int4"] == {"group_size": 128, "scales": "fp32"} and "int4" not in again["key"]


def test_int4_storage_options_refuse_bad_input_in_one_line(deployments, tiny_llama_dir, corpus_file, tmp_path):
    from sparsedeploy.errors import UserError
    from sparsedeploy.export.native import ensure_native
    from sparsedeploy.export.onnx_kv import read_deployment

    meta = read_deployment(deployments["dense"])
    for kw, msg in (({"weights": "int8", "int4_scales": "fp16"}, "are for int4 builds"),
                    ({"weights": "int4", "int4_group": 96}, "multiple of 64"),
                    ({"weights": "int4", "int4_scales": "bf16"}, "storage of the int4 scales")):
        with pytest.raises(UserError, match=msg) as e:
            ensure_native(meta, crossover=0.55, **kw)
        assert "\n" not in str(e.value)
