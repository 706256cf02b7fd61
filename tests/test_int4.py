"""int4 + bitmask products on the GPTQ grid (engine/native/int4.py): the encoder round-trips the quantiser's
codes / scales / zeros / keep mask exactly (and its dequantised matrix is the pipeline's, bit for bit); every
kernel equals numpy on the dequantised operands; the portable kernel as well as the intrinsic one (skipped
where this CPU lacks AVX-512 VNNI + VBMI + VBMI2)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sparsedeploy.engine.native import int4 as I4
from sparsedeploy.engine.native import lowbit as LB
from sparsedeploy.pipeline import quantize as Q

E = np.zeros(0, np.float32)
FAST = I4.has_vnni() and I4.has_vbmi() and I4.has_vbmi2()
FORCED = os.environ.get("SPARSEDEPLOY_LOWBIT_PORTABLE", "") not in ("", "0")


def _matrix(rows, cols, sparsity, seed):
    """Random weights with outliers, a fraction `sparsity` exactly 0; row 0 empty, row 1 full, row 2 a
    single kept weight, and (with columns enough) rows whose groups are one-sided (all positive) or flat."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((rows, cols)).astype(np.float32)
    W[rng.random(W.shape) < 0.01] *= 8
    W[rng.random(W.shape) < sparsity] = 0
    if rows > 2:
        W[0] = 0
        W[1] = rng.standard_normal(cols).astype(np.float32) + 0.5 * np.sign(rng.standard_normal(cols)).astype(np.float32)
        W[2] = 0
        W[2, cols // 2] = 1.5
    if rows > 4:
        W[3] = np.abs(W[3]) + 5                             # large float zero points (zero ~ -5 / scale)
        W[4] = np.where(W[4] != 0, np.float32(0.25), 0)    # one distinct value per group
    return W


def _act(cols, seed):
    rng = np.random.default_rng(seed + 100)
    x = rng.standard_normal(cols).astype(np.float32)
    x[rng.random(cols) < 0.02] *= 20                   # activation outliers
    if cols > 130:
        x[64:128] = 0                                  # an all-zero block (scale 0)
    return x


def _kernels():
    ks = [("portable", I4.int4_bitmask_gemv_portable)]
    if FAST:
        ks.append(("vnni", I4.int4_bitmask_gemv_vnni))
    ks.append(("dispatched", I4.int4_bitmask_gemv))
    return ks


def _call(k, enc, q, corr, s, bias, out, acc):
    k(enc["rowptr"], enc["masks"], enc["vals"], enc["scale"], enc["zero"], int(enc["group_size"][0]),
      q, corr, s, bias, out, acc)


def _check(out, enc, x, bias=None, act=256):
    """out == the dequantised product, within float32 rounding of the terms the kernel sums (its codes and
    its zero-point term separately: scale * (|c| + |zero|) * |x~| per kept weight)."""
    cols = x.shape[0]
    codes, scale, zero, keep = I4.decode_int4_bitmask(enc, cols)
    Wd = I4.dequantized_int4(enc, cols).astype(np.float64)
    xd = LB.dequantized_act(x, act).astype(np.float64)
    g = np.arange(cols) // int(enc["group_size"][0])
    terms = np.where(keep, np.abs(scale[:, g]).astype(np.float64) * (codes + np.abs(zero[:, g]).astype(np.float64)), 0)
    b = np.zeros(Wd.shape[0]) if bias is None else bias.astype(np.float64)
    ref = Wd @ xd + b
    np.testing.assert_array_less(np.abs(out - ref), 2e-6 * (terms @ np.abs(xd)) + 1e-6 * np.abs(b) + 1e-30)


# ----------------------------------------------------------------------------- encoder
@pytest.mark.parametrize("shape,gs", [((7, 200), 64), ((5, 320), 128), ((6, 70000), 128), ((3, 64), -1), ((4, 130), -1)])
def test_encoder_round_trips_given_codes_scales_zeros_and_mask(shape, gs):
    rows, cols = shape
    rng = np.random.default_rng(rows * cols)
    ng = 1 if gs == -1 else -(-cols // gs)
    codes = rng.integers(0, 16, shape).astype(np.uint8)
    keep = rng.random(shape) < 0.6
    keep[0] = False
    keep[1] = True
    scale = rng.random((rows, ng)).astype(np.float32) + 0.01
    zero = (rng.standard_normal((rows, ng)) * 20).astype(np.float32)
    codes_in = codes.copy()
    codes_in[~keep] = 9                                      # pruned positions' codes are not stored
    enc = I4.encode_int4_bitmask(codes_in, scale, zero, keep, gs)
    nblk = -(-cols // 64)
    # per row, per 64-column block, the block's kept codes two a byte in pack_bits' order (code 2k in the
    # low nibble), each block from a byte boundary; rowptr = byte offsets of the rows
    want, starts = [], [0]
    for r in range(rows):
        for b in range(nblk):
            blk = codes[r, 64 * b:64 * b + 64][keep[r, 64 * b:64 * b + 64]]
            if blk.size:
                want.append(Q.pack_bits(torch.from_numpy(blk[None, :].astype(np.int64)), 4).numpy()[0])
        starts.append(sum(w.size for w in want))
    want = np.concatenate(want) if want else np.zeros(0, np.uint8)
    assert enc["rowptr"].dtype == np.int64
    np.testing.assert_array_equal(enc["rowptr"], starts)
    assert enc["masks"].dtype == np.uint64 and enc["masks"].shape == (rows * nblk,)
    assert enc["vals"].dtype == np.uint8 and enc["vals"].shape == (want.size + I4.PAD,)
    np.testing.assert_array_equal(enc["vals"][:-I4.PAD], want)
    assert not enc["vals"][-I4.PAD:].any()
    # the masks say exactly which weights are kept, bit j of mask b = column 64 b + j
    bits = np.unpackbits(enc["masks"].view(np.uint8).reshape(rows, -1, 8), axis=2, bitorder="little").reshape(rows, -1)
    np.testing.assert_array_equal(bits[:, :cols].astype(bool), keep)
    assert not bits[:, cols:].any()
    c2, s2, z2, k2 = I4.decode_int4_bitmask(enc, cols)
    np.testing.assert_array_equal(k2, keep)
    np.testing.assert_array_equal(c2, np.where(keep, codes, 0))
    assert s2.dtype == z2.dtype == np.float32
    np.testing.assert_array_equal(s2, scale)
    np.testing.assert_array_equal(z2, zero)
    gsz = int(enc["group_size"][0])
    assert gsz % 64 == 0 and (gs == -1 or gsz == gs)
    g = np.arange(cols) // gsz
    want = np.where(keep, scale[:, g] * (codes.astype(np.float32) - zero[:, g]), 0).astype(np.float32)
    np.testing.assert_array_equal(I4.dequantized_int4(enc, cols), want)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("gs", [64, 128, -1])
def test_dequantised_matrix_is_the_pipelines_bit_for_bit(sym, gs):
    """From quantize_rtn's and gptq's results (the GPTQ stage), the dequantised int4_bitmask matrix is the
    stage's fake-quant weight exactly, with the same zeros."""
    W = _matrix(24, 320, 0.5, seed=3)
    res = Q.quantize_rtn(torch.from_numpy(W), 4, group_size=gs, sym=sym)
    X = torch.from_numpy(np.random.default_rng(4).standard_normal((64, 320)).astype(np.float32))
    res_g = Q.gptq(torch.from_numpy(W), 2 * X.T @ X / 64, 4, group_size=gs, sym=sym)
    for r in (res, res_g):
        enc = I4.encode_int4_bitmask(r.q.numpy(), r.scale.numpy(), r.zero.numpy(), r.keep.numpy(), gs)
        Wd = I4.dequantized_int4(enc, 320)
        np.testing.assert_array_equal(Wd, r.weight.numpy())
        np.testing.assert_array_equal(Wd == 0, W == 0)


@pytest.mark.parametrize("gs", [64, 128, -1])
def test_rtn_encoder_is_the_pipelines_rtn(gs):
    W = _matrix(24, 450, 0.6, seed=5)
    codes, scale, zero, keep = I4.rtn_int4(W, gs)
    res = Q.quantize_rtn(torch.from_numpy(W), 4, group_size=gs)
    np.testing.assert_array_equal(codes, res.q.numpy())
    np.testing.assert_array_equal(scale, res.scale.numpy())
    np.testing.assert_array_equal(zero, res.zero.numpy())
    np.testing.assert_array_equal(keep, res.keep.numpy())
    enc = I4.encode_int4_bitmask_from_weights(W, gs)
    np.testing.assert_array_equal(I4.dequantized_int4(enc, 450), res.weight.numpy())


def test_group_size_must_be_whole_blocks_and_shapes_must_agree():
    W = _matrix(6, 256, 0.5, seed=6)
    for gs in (32, 96, 100, 0, -2):
        with pytest.raises(ValueError, match="multiple of 64"):
            I4.encode_int4_bitmask_from_weights(W, gs)
    codes, scale, zero, keep = I4.rtn_int4(W, 128)
    with pytest.raises(ValueError, match="multiple of 64"):
        I4.encode_int4_bitmask(codes, scale, zero, keep, 192 // 2)
    with pytest.raises(ValueError):
        I4.encode_int4_bitmask(codes, scale[:, :1], zero, keep, 128)           # groups of 128 need 2 columns
    with pytest.raises(ValueError):
        I4.encode_int4_bitmask(codes, scale, zero, keep[:, :100], 128)
    bad = codes.copy()
    bad[keep] = 16
    with pytest.raises(ValueError, match="0..15"):
        I4.encode_int4_bitmask(bad, scale, zero, keep, 128)


# ----------------------------------------------------------------------------- kernels
SHAPES = [(33, 4096), (9, 11008), (40, 192), (17, 320), (6, 100), (3, 70000)]
SPARSITIES = [0.0, 0.5, 0.7, 0.9, 1.0]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("gs,act", [(64, 256), (128, 256), (256, 256), (-1, 256), (128, 64), (-1, 64)])
def test_int4_bitmask_kernels_equal_the_dequantised_product(shape, sparsity, gs, act):
    """Every chain length of the VNNI kernel (int4_chain: 1 with groups of 64 or activation scales per 64
    columns, 2 with groups of 128, 4 with 256 or whole rows of a multiple of 256 columns), with the blocks past
    the last whole chain one by one."""
    rows, cols = shape
    W = _matrix(rows, cols, sparsity, seed=rows + cols)
    x = _act(cols, rows)
    q, corr, s = LB.act_buffers(cols, act)
    LB.quantize_act(x, q, corr, s)
    enc = I4.encode_int4_bitmask_from_weights(W, gs)
    counts = np.unpackbits(enc["masks"].view(np.uint8), bitorder="little").reshape(-1, 64).sum(axis=1)
    assert counts.sum() == np.count_nonzero(W) and enc["rowptr"][-1] == ((counts + 1) // 2).sum()
    for name, k in _kernels():
        out = np.full(rows, np.nan, np.float32)
        _call(k, enc, q, corr, s, E, out, False)
        _check(out, enc, x, act=act)
        if sparsity == 1.0 or rows > 2:
            assert out[0] == 0                                   # the empty row



@pytest.mark.parametrize("shape", [(33, 4096), (9, 11008), (17, 320), (3, 70000)])
@pytest.mark.parametrize("sparsity", [0.0, 0.7, 0.9])
@pytest.mark.parametrize("gs,act", [(128, 256), (256, 256), (-1, 64)])
def test_float16_scales_kernels_equal_the_dequantised_product(shape, sparsity, gs, act):
    """Scales and zeros stored as float16 bits (uint16): the kernels widen them to exactly the float32 values the
    dequantised matrix uses, on every chain length; 4 bytes a group instead of 8."""
    rows, cols = shape
    W = _matrix(rows, cols, sparsity, seed=rows + cols + 1)
    x = _act(cols, rows)
    q, corr, s = LB.act_buffers(cols, act)
    LB.quantize_act(x, q, corr, s)
    enc = I4.encode_int4_bitmask_from_weights(W, gs, scales="fp16")
    ref32 = I4.encode_int4_bitmask_from_weights(W, gs)
    assert enc["scale"].dtype == np.uint16 and enc["zero"].dtype == np.uint16 and I4.scale_type(enc) == "fp16"
    assert enc["scale"].nbytes * 2 == ref32["scale"].nbytes
    for name, k in _kernels():
        out = np.full(rows, np.nan, np.float32)
        _call(k, enc, q, corr, s, E, out, False)
        _check(out, enc, x, act=act)


def test_float16_widening_is_exact_for_every_float16():
    """The portable kernel's integer conversion and the intrinsic's fpext give numpy's float16 -> float32 for
    all 65,536 bit patterns but NaNs (normal, subnormal, zero, +-inf), checked through one-row products."""
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    want = bits.view(np.float16).astype(np.float32)
    ok = np.isfinite(want) & (np.abs(want) < 1e4)
    got = np.array([I4._half_to_f32(b) for b in bits[ok][::37]], np.float32)
    np.testing.assert_array_equal(got, want[ok][::37])
    inf = np.array([I4._half_to_f32(np.uint16(0x7C00)), I4._half_to_f32(np.uint16(0xFC00))])
    assert inf[0] == np.inf and inf[1] == -np.inf and np.isnan(I4._half_to_f32(np.uint16(0x7E00)))
    # through the kernels: one row, one group of 64 kept weights with code 1 and zero 0, a single activation 1.0
    # (the int8 code 127 times its scale 1/127): the product is the widened scale
    cols = 64
    x = np.zeros(cols, np.float32)
    x[0] = 1.0
    q, corr, s = LB.act_buffers(cols, 64)
    LB.quantize_act(x, q, corr, s)
    sample = bits[ok & (np.abs(want) > 1e-3) & (np.abs(want) < 100)][::97]
    for h in sample:
        enc = I4.encode_int4_bitmask(np.ones((1, cols), np.uint8), np.zeros((1, 1), np.float32),
                                     np.zeros((1, 1), np.float32), np.ones((1, cols), bool), 64, scales="fp16")
        enc["scale"][...] = h
        wide = np.float32(h.view(np.float16))
        for _, k in _kernels():
            out = np.full(1, np.nan, np.float32)
            _call(k, enc, q, corr, s, E, out, False)
            np.testing.assert_allclose(out[0], wide * np.float32(127) * s[0], rtol=1e-6)


def test_rtn_float16_codes_fit_the_stored_grid():
    """With fp16 storage the round-to-nearest codes are chosen against the rounded scale and zero: every kept
    weight's error is at most half a (stored) step, the stored values are float16-exact, and no kept weight
    dequantises to 0."""
    W = _matrix(24, 512, 0.7, seed=8)
    codes, scale, zero, keep = I4.rtn_int4(W, 256, scales="fp16")
    np.testing.assert_array_equal(scale, scale.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(zero, zero.astype(np.float16).astype(np.float32))
    enc = I4.encode_int4_bitmask(codes, scale, zero, keep, 256, scales="fp16")
    Wd = I4.dequantized_int4(enc, 512)
    g = np.arange(512) // 256
    err = np.abs(Wd - W)[keep]
    step = scale[:, g][keep]
    inside = ((W / scale[:, g] + zero[:, g]) >= -0.5)[keep] & ((W / scale[:, g] + zero[:, g]) <= 15.5)[keep]
    assert (err[inside] <= 0.5 * step[inside] * (1 + 1e-5) + 1e-7).mean() > 0.99
    assert ((Wd != 0) == keep).all()
    with pytest.raises(ValueError, match="float16"):
        I4.encode_int4_bitmask(codes, scale * 1e6, zero, keep, 256, scales="fp16")
    with pytest.raises(ValueError, match="scale type"):
        I4.encode_int4_bitmask(codes, scale, zero, keep, 256, scales="bf16")

def test_chain_length_is_what_the_weight_groups_and_activation_scales_share():
    for nblk in (1, 9, 64):
        for act in (256, 64):
            corr_len = LB.act_buffers(64 * nblk, act)[1].shape[0]
            G = 4 if act == 256 and nblk > 1 else 1          # one block: one scale either way (group_blocks)
            for bpg in (1, 2, 3, 4, 6, 8, 64):
                want = max(c for c in (1, 2, 4) if bpg % c == 0 and G % c == 0)
                assert I4.int4_chain(bpg, nblk, corr_len) == want, (nblk, act, bpg)


@pytest.mark.parametrize("cols", [64, 192, 4096])
def test_every_nibble_alignment_and_group_count(cols):
    """Blocks with odd kept counts (a 0 high nibble before the next block), full 64-kept blocks (32 bytes),
    groups of one block and of the whole row."""
    rng = np.random.default_rng(cols)
    rows = 12
    W = rng.standard_normal((rows, cols)).astype(np.float32)
    for r in range(rows):
        k = (2 * r + 1) % cols
        W[r, rng.permutation(cols)[:k]] = 0                  # odd numbers of zeros, so odd kept counts too
    W[5] = 0
    W[5, 0] = 1.0                                            # one kept weight: rows 6.. start at odd offsets
    W[7] = rng.standard_normal(cols).astype(np.float32) + 3  # full and one-sided
    x = _act(cols, 1)
    q, corr, s = LB.act_buffers(cols)
    LB.quantize_act(x, q, corr, s)
    for gs in (64, 128, -1):
        enc = I4.encode_int4_bitmask_from_weights(W, gs)
        counts = np.unpackbits(enc["masks"].view(np.uint8), bitorder="little").reshape(-1, 64).sum(axis=1)
        assert (counts % 2 == 1).any() and (counts == 64).any()
        for _, k in _kernels():
            out = np.full(rows, np.nan, np.float32)
            _call(k, enc, q, corr, s, E, out, False)
            _check(out, enc, x)


def test_int4_product_is_close_to_fp32():
    """4-bit RTN per 128 columns over the kept Gaussian weights, int8 activations: within 10% of W x."""
    rng = np.random.default_rng(7)
    rows, cols = 256, 4096
    W = rng.standard_normal((rows, cols)).astype(np.float32)
    W[rng.random(W.shape) < 0.5] = 0
    x = rng.standard_normal(cols).astype(np.float32)
    q, corr, s = LB.act_buffers(cols)
    LB.quantize_act(x, q, corr, s)
    enc = I4.encode_int4_bitmask_from_weights(W, 128)
    exact = W.astype(np.float64) @ x
    for _, k in _kernels():
        out = np.zeros(rows, np.float32)
        _call(k, enc, q, corr, s, E, out, False)
        assert np.linalg.norm(out - exact) <= 0.1 * np.linalg.norm(exact)


def test_bias_and_accumulate():
    rows, cols = 40, 300
    W = _matrix(rows, cols, 0.7, seed=5)
    x = _act(cols, 5)
    bias = np.random.default_rng(3).standard_normal(rows).astype(np.float32)
    q, corr, s = LB.act_buffers(cols)
    LB.quantize_act(x, q, corr, s)
    enc = I4.encode_int4_bitmask_from_weights(W, 64)
    for _, k in _kernels():
        out = np.zeros(rows, np.float32)
        _call(k, enc, q, corr, s, bias, out, False)
        _check(out, enc, x, bias)
        plain = np.zeros(rows, np.float32)
        _call(k, enc, q, corr, s, E, plain, False)
        start = np.arange(rows, dtype=np.float32)
        acc = start.copy()
        _call(k, enc, q, corr, s, E, acc, True)
        np.testing.assert_allclose(acc, start + plain, rtol=1e-6, atol=1e-5)


def test_kernels_refuse_what_does_not_fit():
    W = _matrix(8, 200, 0.5, seed=1)
    enc = I4.encode_int4_bitmask_from_weights(W, 64)
    out = np.zeros(8, np.float32)
    q, corr, s = LB.act_buffers(300)                       # 5 blocks against the weights' 4
    q2, corr2, s2 = LB.act_buffers(200)
    for _, k in _kernels():
        with pytest.raises(ValueError):
            _call(k, enc, q, corr, s, E, out, False)
        a = (enc["rowptr"], enc["masks"], enc["vals"], enc["scale"], enc["zero"])
        for gs in (96, 128, 0):                             # not whole blocks; 128: 2 groups, not 4
            with pytest.raises(ValueError):
                k(*a, gs, q2, corr2, s2, E, out, False)
        with pytest.raises(ValueError):                     # the 64 bytes of padding cut off
            k(enc["rowptr"], enc["masks"], enc["vals"][:-1], enc["scale"], enc["zero"], 64, q2, corr2, s2, E, out, False)


def test_kernel_paths_name_this_cpu_and_the_portable_switch():
    paths = I4.kernel_paths()
    assert paths["int4_bitmask"] == ("avx512-vnni+vbmi+vbmi2" if FAST and not FORCED else "portable")
    assert (I4.int4_bitmask_gemv is I4.int4_bitmask_gemv_vnni) == (FAST and not FORCED)
    code = ("from sparsedeploy.engine.native import int4 as I; import json; "
            "print(json.dumps([I.kernel_paths(), I.int4_bitmask_gemv is I.int4_bitmask_gemv_portable]))")
    env = dict(os.environ, SPARSEDEPLOY_LOWBIT_PORTABLE="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got == [{"int4_bitmask": "portable"}, True]
