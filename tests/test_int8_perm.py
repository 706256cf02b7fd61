"""int8_perm (engine/native/lowbit.py): int8 values + byte indices within 64-column blocks, activation bytes
picked with vpermi2b per pair of blocks of a vector's window. The product equals the dense product of the dequantised weights with the
engine's int8 activations (portable twin and VNNI+VBMI kernel), on random matrices with empty and full rows,
rows whose kept weights lie in one block, runs split across vectors, widths > 65,536; a too-wide matrix is a
one-line error; a deployment stored in int8_perm decodes PyTorch's tokens on the same quantised weights."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from sparsedeploy.engine.native import lowbit as LB
from sparsedeploy.errors import UserError

from .test_lowbit import _act, _check, _matrix

E = np.zeros(0, np.float32)
FAST = LB.has_vnni() and LB.has_vbmi()


def _kernels():
    ks = [LB.int8_perm_gemv_portable, LB.int8_perm_gemv]
    if FAST:
        ks.append(LB.int8_perm_gemv_vnni)
    return ks


def _run(k, enc, x, bias=E, out=None, acc=False):
    q, corr, s = LB.act_buffers(x.shape[0])
    LB.quantize_act(x, q, corr, s)
    rows = enc["vecptr"].shape[0] - 1
    out = np.full(rows, np.nan, np.float32) if out is None else out
    k(enc["vecptr"], enc["base"], enc["packed"], enc["window"], enc["wscale"], q, corr, s, bias, out, acc)
    return out


def _odd_rows(W):
    """Rows whose kept weights sit in one block, fill a block, or make runs that straddle vectors."""
    W = W.copy()
    rows, cols = W.shape
    rng = np.random.default_rng(rows)
    if rows > 5 and cols >= 256:
        W[2] = 0
        W[2, 64:128] = rng.standard_normal(64)                 # one full block: 16 lanes, one vector
        W[3] = 0
        W[3, 130:133] = rng.standard_normal(3)                 # three weights in one block
        W[4] = 0
        W[4, 5:10] = 1.0
        W[4, 70:134] = rng.standard_normal(64)                 # 2 lanes, then a block that splits across vectors
        W[5] = 0
        W[5, ::64] = 2.0                                       # one weight in every block: one lane each
    return W


@pytest.mark.parametrize("shape", [(33, 200), (64, 65), (17, 1000), (8, 4096), (3, 70000)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.97])
def test_int8_perm_equals_the_dequantised_product(shape, sparsity):
    rows, cols = shape
    W = _odd_rows(_matrix(rows, cols, sparsity, seed=rows + cols + 1))
    x = _act(cols, rows)
    for window in (None, 1, 2, 5, 16):
        enc = LB.encode_int8_perm(W, window)
        assert enc["packed"].shape[1] == 128 and enc["base"].dtype == np.uint16 and 1 <= enc["window"][0] <= 16
        assert 2 * ((enc["window"][0] + 1) // 2) <= -(-cols // 64)      # block pairs inside the row
        lanes = LB._perm_runs(W)
        assert LB._window_count(lanes, int(enc["window"][0])) == enc["base"].shape[0]
        assert enc["packed"].shape[0] == enc["base"].shape[0] == enc["vecptr"][-1]
        # the encoding stores exactly the row-quantised kept weights
        ref = LB.dequantized(W)
        ref[W == 0] = 0
        np.testing.assert_array_equal(LB.dequantized_int8_perm(enc, W.shape), ref)
        for k in _kernels():
            _check(_run(k, enc, x), W, x, True)


def test_int8_perm_bias_accumulate_and_empty_matrix():
    W = _odd_rows(_matrix(40, 300, 0.85, seed=9))
    x = _act(300, 9)
    bias = np.random.default_rng(3).standard_normal(40).astype(np.float32)
    enc = LB.encode_int8_perm(W)
    for k in _kernels():
        _check(_run(k, enc, x, bias=bias), W, x, True, bias)
        plain = _run(k, enc, x)
        start = np.arange(40, dtype=np.float32)
        acc = _run(k, enc, x, out=start.copy(), acc=True)
        np.testing.assert_allclose(acc, start + plain, rtol=1e-6, atol=1e-5)
    Z = np.zeros((5, 130), np.float32)
    enc = LB.encode_int8_perm(Z)
    assert enc["base"].shape[0] == 0
    for k in _kernels():
        np.testing.assert_array_equal(_run(k, enc, _act(130, 1)), np.zeros(5, np.float32))


def test_int8_perm_bytes_follow_the_kept_weights():
    """At 90% about 2 bytes a kept weight plus padding and segments: below dense int8, near int8_bitmask."""
    W = _matrix(256, 4096, 0.9, seed=4)
    enc = LB.encode_int8_perm(W)
    per_weight = sum(a.nbytes for a in enc.values()) / W.size
    assert per_weight < 0.4
    assert LB.encode_int8_perm(_matrix(256, 4096, 0.97, seed=4))["packed"].nbytes < 0.7 * enc["packed"].nbytes


def test_int8_perm_refuses_a_matrix_too_wide_for_its_block_numbers_and_a_bad_window(monkeypatch):
    W = np.zeros((2, 64 * 40 + 1), np.float32)
    W[0, -1] = 1.0
    monkeypatch.setattr(LB, "PERM_BLOCKS", 40)                 # (the real limit, 65,536 blocks, is 4M columns)
    with pytest.raises(UserError, match="too wide"):
        LB.encode_int8_perm(W)
    monkeypatch.undo()
    with pytest.raises(UserError, match="window"):
        LB.encode_int8_perm(W, 17)
    with pytest.raises(UserError, match="too narrow"):
        LB.encode_int8_perm(np.ones((3, 64), np.float32))
    from sparsedeploy.engine.native import pack

    monkeypatch.setattr(pack, "PERM_MAX_WIDTH", 64 * 40)
    S = _matrix(2, 64 * 40 + 1, 0.95, seed=2)
    assert "int8_perm" not in pack.candidates(S, "int8")      # the tuner never tries it there
    monkeypatch.undo()
    candidates = pack.candidates
    S = _matrix(8, 256, 0.9, seed=1)
    assert "int8_perm" in candidates(S, "int8") and "int8_perm" not in candidates(_matrix(8, 256, 0.5, seed=1), "int8")


def test_int8_perm_linear_and_paths(tmp_path):
    from sparsedeploy.engine.native.model import Linear
    from sparsedeploy.engine.native.pack import encode

    W = _odd_rows(_matrix(12, 300, 0.9, seed=6))
    lin = Linear("int8_perm", encode(W, "int8_perm"), None, W.shape)
    ref = LB.dequantized(W)
    ref[W == 0] = 0
    np.testing.assert_array_equal(lin.dense(), ref)
    x = _act(300, 6)
    out = np.zeros(12, np.float32)
    lin.vec(x, out, False)
    _check(out, W, x, True)
    assert LB.kernel_paths()["int8_perm"] == ("avx512-vnni+vbmi" if FAST else "portable")
    assert (LB.int8_perm_gemv is LB.int8_perm_gemv_vnni) == FAST
    code = ("from sparsedeploy.engine.native import lowbit as L; "
            "print(L.kernel_paths()['int8_perm'], L.int8_perm_gemv is L.int8_perm_gemv_portable)")
    env = dict(os.environ, SPARSEDEPLOY_LOWBIT_PORTABLE="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["portable", "True"]


@pytest.fixture(scope="module")
def sparse_deployment(tmp_path_factory, tiny_model_dir, corpus_file):
    from sparsedeploy.export.stage import export
    from sparsedeploy.pipeline import stages

    root = tmp_path_factory.mktemp("native-int8-perm")
    calib = stages.CalibConfig(str(tiny_model_dir), f"file:{corpus_file}", 8, 48, 0, None, "cpu")
    run = root / "magnitude"
    stages.prune(stages.RunDir(run), stages.PruneConfig(str(tiny_model_dir), 0.85, "uniform", "magnitude", calib=calib,
                                                        device="cpu"))
    return export(str(run), seqlen=64)


def test_an_int8_perm_deployment_decodes_pytorchs_tokens_on_the_quantised_weights(sparse_deployment):
    from sparsedeploy.engine.decode import greedy_decode
    from sparsedeploy.engine.native.runtime import NativeRuntime
    from sparsedeploy.export.native import ensure_native, lowbit_reference_tokens
    from sparsedeploy.export.onnx_kv import read_deployment

    meta = read_deployment(sparse_deployment)
    index = ensure_native(meta, force=True, formats=("int8_perm",), weights="int8")
    fmts = {g["format"] for layer in index["layers"] for g in layer.values() if g["shape"][1] > 64}
    assert fmts == {"int8_perm"}             # (a group one block wide cannot be int8_perm: dense int8 there)
    rt = NativeRuntime(meta["onnx"], cache_len=int(meta["seqlen"]))
    v = meta["verified"]
    res = greedy_decode(rt, v["prompt_ids"], len(v["tokens"]), prefill=rt)
    ref = lowbit_reference_tokens(meta, index, v["prompt_ids"], len(v["tokens"]))
    assert res.tokens == ref["weights_and_activations"]
    assert "int8_perm" in set(rt.info()["lowbit_kernels"])
    for layer in rt.model.layers:
        for g in ("qkv", "o", "up", "down"):
            if g in layer and layer[g].cols_in > 64:
                assert layer[g].fmt == "int8_perm"
