"""int8 low-bit products (engine/native/lowbit.py): every kernel against numpy on the dequantised operands,
and within the quantisation error bound of the fp32 product; the portable kernels as well as the
intrinsic ones (the latter skipped where this CPU lacks AVX-512 VNNI / VBMI2)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from sparsedeploy.engine.native import lowbit as LB
from sparsedeploy.errors import UserError

E = np.zeros(0, np.float32)
VNNI = pytest.mark.skipif(not LB.has_vnni(), reason="this CPU has no AVX-512 VNNI")
VBMI2 = pytest.mark.skipif(not (LB.has_vnni() and LB.has_vbmi2()), reason="this CPU has no AVX-512 VNNI + VBMI2")


def _matrix(rows, cols, sparsity, seed, equal_rows=False):
    """Random weights with outliers; row 0 empty, row 1 full (when there are rows enough)."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((rows, cols)).astype(np.float32)
    W[rng.random(W.shape) < 0.01] *= 8
    if equal_rows:
        k = int(round((1 - sparsity) * cols))
        keep = np.argsort(rng.random((rows, cols)), axis=1)[:, :k]
        M = np.zeros_like(W, dtype=bool)
        np.put_along_axis(M, keep, True, axis=1)
        W[~M] = 0
        return W
    W[rng.random(W.shape) < sparsity] = 0
    if rows > 2:
        W[0] = 0
        W[1] = rng.standard_normal(cols).astype(np.float32) + 0.5 * np.sign(rng.standard_normal(cols)).astype(np.float32)
    return W


def _act(cols, seed):
    rng = np.random.default_rng(seed + 100)
    x = rng.standard_normal(cols).astype(np.float32)
    x[rng.random(cols) < 0.02] *= 20                   # activation outliers
    if cols > 130:
        x[64:128] = 0                                  # an all-zero block
    if cols > 600:
        x[256:512] = 0                                 # an all-zero activation group (scale 0)
    return x


def _reference_act(x, columns=256):
    """numpy: the activation quantisation quantize_act must compute (one scale per `columns` // 64 blocks,
    repeated per block; the blocks' correction lanes, then each group's sum of its blocks' lanes)."""
    m = x.shape[0]
    nblk = -(-m // 64)
    G = columns // 64
    ngrp = -(-nblk // G)
    xp = np.zeros(ngrp * G * 64, np.float32)
    xp[:m] = x
    xg = xp.reshape(ngrp, G * 64)
    amax = np.abs(xg).max(axis=1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.clip(np.rint(xg * inv[:, None]), -127, 127).astype(np.int8).reshape(-1)[:nblk * 64]
    lanes = (-128 * q.astype(np.int32).reshape(nblk, 16, 4).sum(axis=2)).astype(np.int32)
    padded = np.zeros((ngrp * G, 16), np.int32)
    padded[:nblk] = lanes
    group = padded.reshape(ngrp, G, 16).sum(axis=1).astype(np.int32)
    scale = np.repeat((amax / np.float32(127)).astype(np.float32), G)[:nblk]
    return q, np.concatenate([lanes.reshape(-1), group.reshape(-1)]), scale


def _check(out, W, x, quantised_act, bias=None):
    """out == dequantised product (tight), and within the quantisation error bound of W x."""
    wq, ws = LB.quantize_rows(W)
    Wd = wq.astype(np.float64) * ws[:, None].astype(np.float64)
    Wd[W == 0] = 0
    if quantised_act:
        xd = LB.dequantized_act(x).astype(np.float64)
    else:
        xd = x.astype(np.float64)
    ref = Wd @ xd
    scale = np.abs(Wd) @ np.abs(xd)                    # the size of the terms summed in float32
    b = np.zeros(W.shape[0]) if bias is None else bias.astype(np.float64)
    ref += b
    np.testing.assert_array_less(np.abs(out - ref), 2e-6 * scale + 1e-6 * np.abs(b) + 1e-30)
    # quantisation error bound: |w - w~| <= s_r / 2, |x - x~| <= s_b / 2 per element
    exact = W.astype(np.float64) @ x.astype(np.float64) + b
    bound = (ws.astype(np.float64) / 2)[:, None] * (W != 0) @ np.abs(x.astype(np.float64))
    if quantised_act:
        nblk = -(-x.shape[0] // 64)
        _, _, s = _reference_act(x)
        per_col = np.repeat(s.astype(np.float64) / 2, 64)[:x.shape[0]]
        bound += np.abs(Wd) @ per_col
    np.testing.assert_array_less(np.abs(out - exact), bound * (1 + 1e-5) + 2e-6 * scale + 1e-6)


def test_int8_products_are_close_to_fp32_on_gaussian_weights():
    """Without outliers, per-row int8 weights and per-block int8 activations stay within 2% of W x."""
    rng = np.random.default_rng(7)
    rows, cols = 256, 4096
    W = rng.standard_normal((rows, cols)).astype(np.float32)
    keep = np.argsort(rng.random((rows, cols)), axis=1)[:, :cols // 2]
    Ws = np.zeros_like(W)
    np.put_along_axis(Ws, keep, np.take_along_axis(W, keep, axis=1), axis=1)
    x = rng.standard_normal(cols).astype(np.float32)
    q, corr, s = LB.act_buffers(cols)
    LB.quantize_act(x, q, corr, s)
    out = np.zeros(rows, np.float32)
    for M in (W, Ws):
        exact = M.astype(np.float64) @ x
        d, bm, e = LB.encode_int8(M), LB.encode_int8_bitmask(M), LB.encode_int8_ell(M)
        LB.int8_gemv(d["wq"], d["wscale"], q, corr, s, E, out, False)
        assert np.linalg.norm(out - exact) <= 0.02 * np.linalg.norm(exact)
        LB.int8_bitmask_gemv(bm["rowptr"], bm["masks"], bm["vals"], bm["wscale"], q, corr, s, E, out, False)
        assert np.linalg.norm(out - exact) <= 0.02 * np.linalg.norm(exact)
        LB.int8_ell_gemv(e["cols"], e["vals"], e["wscale"], x, E, out, False)
        assert np.linalg.norm(out - exact) <= 0.02 * np.linalg.norm(exact)


@pytest.mark.parametrize("columns", [256, 64])
def test_quantize_act_equals_numpy_and_pads_with_zero(columns):
    for cols in (1, 64, 100, 300, 4096, 70001):
        x = _act(cols, cols)
        q, corr, s = LB.act_buffers(cols, columns)
        q[:] = 99
        corr[:] = 7
        LB.quantize_act(x, q, corr, s)
        rq, rc, rs = _reference_act(x, columns)
        np.testing.assert_array_equal(q, rq)
        np.testing.assert_array_equal(corr, rc)
        np.testing.assert_array_equal(s, rs)
        assert (q[cols:] == 0).all()
        assert np.abs(q).max() <= 127


@pytest.mark.parametrize("sparsity", [0.0, 0.7])
def test_a_scale_per_64_columns_gives_the_per_64_product(sparsity):
    """Buffers made for 64-column scales (act_buffers(cols, 64)) take every kernel and the batched tiles to
    the per-block path: the product of the weights with the per-64 dequantised activations, which differs
    from the per-256 one."""
    from sparsedeploy.engine.native import lowbit_batch as LBB

    rows, cols = 37, 1000
    W = _matrix(rows, cols, sparsity, seed=5)
    X = np.stack([_act(cols, 7 + l) for l in range(11)])
    Wd = LB.dequantized(W).astype(np.float64)
    for columns in (64, 256):
        ref = np.stack([Wd @ LB.dequantized_act(x, columns).astype(np.float64) for x in X])
        Q, C, S = LBB.act_buffers_rows(X.shape[0], cols, columns)
        LBB.quantize_rows(X, Q, C, S)
        d, bm = LB.encode_int8(W), LB.encode_int8_bitmask(W)
        for fmt, args in (("int8", (d["wq"], d["wscale"])),
                          ("int8_bitmask", (bm["rowptr"], bm["masks"], bm["vals"], bm["wscale"]))):
            Y = np.zeros((X.shape[0], rows), np.float32)
            LBB.GEMM[fmt](*args, Q, C, S, np.zeros(0, np.float32), Y, False)
            np.testing.assert_allclose(Y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
            q, corr, s = LB.act_buffers(cols, columns)
            LB.quantize_act(X[0], q, corr, s)
            y = np.zeros(rows, np.float32)
            (LB.int8_gemv if fmt == "int8" else LB.int8_bitmask_gemv)(*args, q, corr, s, np.zeros(0, np.float32), y, False)
            np.testing.assert_allclose(y, ref[0], rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert not np.allclose(LB.dequantized_act(X[0], 64), LB.dequantized_act(X[0], 256))
    with pytest.raises(ValueError):
        LB.act_buffers(cols, 128)


def test_quantize_act_refuses_buffers_that_do_not_fit():
    q, corr, s = LB.act_buffers(64)
    with pytest.raises(ValueError):
        LB.quantize_act(np.ones(65, np.float32), q, corr, s)


SHAPES = [(33, 200), (64, 64), (17, 1000), (3, 70000)]
SPARSITIES = [0.0, 0.5, 0.7, 0.9]


def _block_kernels():
    ks = [("portable", LB.int8_gemv_portable, LB.int8_bitmask_gemv_portable)]
    if LB.has_vnni():
        ks.append(("vnni", LB.int8_gemv_vnni, LB.int8_bitmask_gemv_vnni if LB.has_vbmi2() else None))
    ks.append(("dispatched", LB.int8_gemv, LB.int8_bitmask_gemv))
    return ks


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_int8_block_kernels_equal_the_dequantised_product(shape, sparsity):
    rows, cols = shape
    W = _matrix(rows, cols, sparsity, seed=rows + cols)
    x = _act(cols, rows)
    q, corr, s = LB.act_buffers(cols)
    LB.quantize_act(x, q, corr, s)
    d = LB.encode_int8(W)
    bm = LB.encode_int8_bitmask(W)
    assert d["wq"].shape == (rows, 64 * (-(-cols // 64))) and d["wq"].dtype == np.uint8
    assert bm["vals"].shape[0] == np.count_nonzero(W) and bm["masks"].dtype == np.uint64
    for name, dense_k, bitmask_k in _block_kernels():
        out = np.full(rows, np.nan, np.float32)
        dense_k(d["wq"], d["wscale"], q, corr, s, E, out, False)
        _check(out, W, x, True)
        if bitmask_k is not None:
            out = np.full(rows, np.nan, np.float32)
            bitmask_k(bm["rowptr"], bm["masks"], bm["vals"], bm["wscale"], q, corr, s, E, out, False)
            _check(out, W, x, True)


def _gather_kernels():
    ks = [(LB.int8_ell_gemv_portable, LB.int8_csr_gemv_portable), (LB.int8_ell_gemv, LB.int8_csr_gemv)]
    if LB.has_avx512f():
        ks.append((LB.int8_ell_gemv_avx512, LB.int8_csr_gemv_avx512))
    return ks


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_int8_ell_and_csr_equal_the_dequantised_product(shape, sparsity):
    rows, cols = shape
    x = _act(cols, rows)
    W = _matrix(rows, cols, sparsity, seed=rows * cols, equal_rows=True)
    e = LB.encode_int8_ell(W)
    assert e["cols"].dtype == (np.uint16 if cols <= 65536 else np.uint32) and e["vals"].dtype == np.int8
    Wc = _matrix(rows, cols, sparsity, seed=rows * cols + 1)
    c = LB.encode_int8_csr(Wc)
    for ell_k, csr_k in _gather_kernels():
        out = np.full(rows, np.nan, np.float32)
        ell_k(e["cols"], e["vals"], e["wscale"], x, E, out, False)
        _check(out, W, x, False)
        out = np.full(rows, np.nan, np.float32)
        csr_k(c["rowptr"], c["cols"], c["vals"], c["wscale"], x, E, out, False)
        _check(out, Wc, x, False)


def test_bias_and_accumulate_in_every_kernel():
    rows, cols = 40, 300
    W = _matrix(rows, cols, 0.7, seed=5, equal_rows=True)
    x = _act(cols, 5)
    bias = np.random.default_rng(3).standard_normal(rows).astype(np.float32)
    q, corr, s = LB.act_buffers(cols)
    LB.quantize_act(x, q, corr, s)
    d, bm, e, c = LB.encode_int8(W), LB.encode_int8_bitmask(W), LB.encode_int8_ell(W), LB.encode_int8_csr(W)
    calls = []
    for _, dense_k, bitmask_k in _block_kernels():
        calls.append((True, lambda b, o, a, k=dense_k: k(d["wq"], d["wscale"], q, corr, s, b, o, a)))
        if bitmask_k is not None:
            calls.append((True, lambda b, o, a, k=bitmask_k: k(bm["rowptr"], bm["masks"], bm["vals"], bm["wscale"], q, corr, s, b, o, a)))
    for ell_k, csr_k in _gather_kernels():
        calls.append((False, lambda b, o, a, k=ell_k: k(e["cols"], e["vals"], e["wscale"], x, b, o, a)))
        calls.append((False, lambda b, o, a, k=csr_k: k(c["rowptr"], c["cols"], c["vals"], c["wscale"], x, b, o, a)))
    for qa, call in calls:
        out = np.zeros(rows, np.float32)
        call(bias, out, False)
        _check(out, W, x, qa, bias)
        plain = np.zeros(rows, np.float32)
        call(E, plain, False)
        start = np.arange(rows, dtype=np.float32)
        acc = start.copy()
        call(E, acc, True)
        np.testing.assert_allclose(acc, start + plain, rtol=1e-6, atol=1e-5)


def test_kernels_refuse_activations_of_another_width():
    W = _matrix(8, 200, 0.5, seed=1)
    q, corr, s = LB.act_buffers(300)                      # 5 blocks against the weights' 4
    d, bm = LB.encode_int8(W), LB.encode_int8_bitmask(W)
    out = np.zeros(8, np.float32)
    for _, dense_k, bitmask_k in _block_kernels():
        with pytest.raises(ValueError):
            dense_k(d["wq"], d["wscale"], q, corr, s, E, out, False)
        if bitmask_k is not None:
            with pytest.raises(ValueError):
                bitmask_k(bm["rowptr"], bm["masks"], bm["vals"], bm["wscale"], q, corr, s, E, out, False)


def test_encoders_quantise_per_row_and_refuse_bad_input():
    W = _matrix(6, 130, 0.5, seed=2)
    wq, ws = LB.quantize_rows(W)
    assert ws[0] == 0 and (wq[0] == 0).all()                  # the empty row
    np.testing.assert_allclose(ws[1:], np.abs(W[1:]).max(axis=1) / 127, rtol=1e-6)
    assert (np.abs(wq[1:]).max(axis=1) == 127).all()
    assert np.abs(wq * ws[:, None] - W).max() <= ws.max() / 2 * (1 + 1e-5)
    bm = LB.encode_int8_bitmask(W)
    # the masks say exactly which weights are kept, bit j of mask b = column 64 b + j
    bits = np.unpackbits(bm["masks"].view(np.uint8).reshape(6, -1, 8), axis=2, bitorder="little").reshape(6, -1)
    np.testing.assert_array_equal(bits[:, :130].astype(bool), W != 0)
    assert not bits[:, 130:].any()
    with pytest.raises(UserError):
        LB.encode_int8(np.ones(5, np.float32))
    with pytest.raises(UserError):
        LB.encode_int8_ell(W)                                 # rows keep different counts
    bad = W.copy()
    bad[2, 3] = np.nan
    with pytest.raises(UserError):
        LB.encode_int8_bitmask(bad)


def test_kernel_paths_name_this_cpu_and_the_portable_switch(tmp_path):
    paths = LB.kernel_paths()
    assert paths["int8"] == ("avx512-vnni" if LB.has_vnni() else "portable")
    assert paths["int8_bitmask"] == ("avx512-vnni+vbmi2" if LB.has_vnni() and LB.has_vbmi2() else "portable")
    assert (LB.int8_gemv is LB.int8_gemv_vnni) == (paths["int8"] != "portable")
    assert paths["int8_ell"] == paths["int8_csr"] == ("avx512" if LB.has_avx512f() else "portable")
    assert (LB.int8_ell_gemv is LB.int8_ell_gemv_avx512) == (paths["int8_ell"] == "avx512")
    code = ("from sparsedeploy.engine.native import lowbit as L; import json; "
            "print(json.dumps([L.kernel_paths(), L.int8_gemv is L.int8_gemv_portable, "
            "L.int8_bitmask_gemv is L.int8_bitmask_gemv_portable, L.int8_ell_gemv is L.int8_ell_gemv_portable, "
            "L.int8_csr_gemv is L.int8_csr_gemv_portable]))")
    env = dict(os.environ, SPARSEDEPLOY_LOWBIT_PORTABLE="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert p.returncode == 0, p.stderr
    import json

    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(got[0].values()) == {"portable"} and all(got[1:])


@VNNI
@pytest.mark.parametrize("shape", [(9, 64), (33, 200), (5, 4096)])
def test_q4_reference_kernel_equals_its_dequantised_product(shape):
    rows, cols = shape
    W = _matrix(rows, cols, 0.0, seed=11)
    x = _act(cols, 11)
    q, corr, s = LB.act_buffers(cols)
    LB.quantize_act(x, q, corr, s)
    enc = LB.encode_q4(W)
    assert enc["w4"].nbytes + enc["ws"].nbytes == rows * (-(-cols // 64)) * (32 + 4)
    Wd = LB.dequantized_q4(enc, cols).astype(np.float64)
    assert np.abs(Wd - W).max() <= np.abs(W).max() / 8 * 1.01           # 4-bit steps
    xd = LB.dequantized_act(x).astype(np.float64)
    ref = Wd @ xd
    out = np.full(rows, np.nan, np.float32)
    LB.q4_gemv_vnni(enc["w4"], enc["ws"], q, corr, s, E, out, False)
    np.testing.assert_array_less(np.abs(out - ref), 2e-6 * (np.abs(Wd) @ np.abs(xd)) + 1e-6)


@pytest.mark.parametrize("shape", [(9, 64), (33, 200), (5, 4096)])
def test_q4_portable_kernel_equals_the_dequantised_product_and_the_vnni_one(shape):
    """The dense 4-bit kernel a low-bit build's lm_head may use (`--head q4`): the portable twin computes the
    same as the dequantised product (and as the VNNI kernel where the CPU has one)."""
    rows, cols = shape
    W = _matrix(rows, cols, 0.0, seed=12)
    W[0] = 0                                          # an all-zero row: scale 0, codes 8
    x = _act(cols, 12)
    q, corr, s = LB.act_buffers(cols)
    LB.quantize_act(x, q, corr, s)
    enc = LB.encode_q4(W)
    Wd = LB.dequantized_q4(enc, cols).astype(np.float64)
    xd = LB.dequantized_act(x).astype(np.float64)
    ref = Wd @ xd
    bias = np.arange(rows, dtype=np.float32)
    out = np.full(rows, np.nan, np.float32)
    LB.q4_gemv_portable(enc["w4"], enc["ws"], q, corr, s, bias, out, False)
    np.testing.assert_array_less(np.abs(out - (ref + bias)), 2e-6 * (np.abs(Wd) @ np.abs(xd)) + 1e-5)
    assert out[0] == bias[0]
    if LB.has_vnni():
        v = np.zeros(rows, np.float32)
        LB.q4_gemv_vnni(enc["w4"], enc["ws"], q, corr, s, bias, v, False)
        np.testing.assert_allclose(out, v, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not (LB.has_vnni() and LB.has_vbmi2()), reason="needs AVX-512 VNNI + VBMI2")
@pytest.mark.parametrize("sparsity", [0.0, 0.7])
def test_wide_rows_recompute_the_correction_to_the_same_bits(sparsity):
    """The wide-row intrinsics (correction lanes recomputed, not loaded) give the loaded form's sums bit for bit,
    and the kernels take them above WIDE_BLOCKS blocks (the dequantised product, as every kernel)."""
    from numba import njit

    rows, cols = 6, 64 * (LB.WIDE_BLOCKS + 3) - 5
    W = _matrix(rows, cols, sparsity, seed=11)
    x = _act(cols, 3)
    q, corr, s = LB.act_buffers(cols)
    LB.quantize_act(x, q, corr, s)
    d, bm = LB.encode_int8(W), LB.encode_int8_bitmask(W)
    nblk = s.shape[0]

    @njit
    def sums(wq, rowptr, masks, vals, q, corr, s, nblk):
        out = np.zeros((4, wq.shape[0]), np.float32)
        for r in range(wq.shape[0]):
            out[0, r] = LB.vnni_dense_dot(wq, r * wq.shape[1], q, corr, s, nblk)
            out[1, r] = LB.vnni_dense_dot_wide(wq, r * wq.shape[1], q, corr, s, nblk)
            out[2, r] = LB.vnni_bitmask_dot(vals, masks, rowptr[r], r * nblk, q, corr, s, nblk)
            out[3, r] = LB.vnni_bitmask_dot_wide(vals, masks, rowptr[r], r * nblk, q, corr, s, nblk)
        return out

    o = sums(d["wq"], bm["rowptr"], bm["masks"], bm["vals"], q, corr, s, nblk)
    np.testing.assert_array_equal(o[0], o[1])
    np.testing.assert_array_equal(o[2], o[3])
    np.testing.assert_array_equal(o[0], o[2])
    for k, args in ((LB.int8_gemv_vnni, (d["wq"], d["wscale"])),
                    (LB.int8_bitmask_gemv_vnni, (bm["rowptr"], bm["masks"], bm["vals"], bm["wscale"]))):
        out = np.full(rows, np.nan, np.float32)
        k(*args, q, corr, s, E, out, False)
        _check(out, W, x, True)
