"""Batched products of the low-bit groups (int8 dense, int8 + bitmask, the 4-bit q4 head): X [L, in] -> Y [L, out]
reading each weight row once for all L rows of a batched step.

Each row of X is quantised exactly as `lowbit.quantize_act` quantises a single token (one scale per 64 or 256 columns), and
each (weight row, token) product is the same dot the gemv kernels compute (the same integer VNNI blocks and
scales, or the same portable loop); only the loop order changes: weight rows outside (in parallel), tokens
inside, so a row's bytes stay in L1 while the L tokens use it. The portable build gives bit for bit the values
of L single-token calls; the VNNI token tiles (below) give them to float rounding (numba's fastmath lets LLVM
reorder the float sums of each build its own way).

Token tiles (VNNI builds of int8 and int8_bitmask): a weight row's block is loaded (or expanded) once and
multiplied into 8, 4 or 2 tokens' blocks in turn, and the tile's horizontal sums are one transposed tree
(simd_rows.lane_sums: adjacent lanes of two tokens' vectors summed by one even/odd shuffle pair, so a 16-lane
reduction costs about 3 vector operations per token instead of 31 scalar ones). As in the gemv, each token
chains the vpdpbusd of a whole activation group's 4 blocks into one int32 accumulator from its group lanes, then
one conversion and one FMA into its float accumulator (8 tokens: 16 live vectors). The weight blocks come from
lowbit's block emitters, so they prefetch their streams (values and masks) as the gemv does (simd_rows.PREFETCH_BYTES
ahead).
Where a step's time goes: benchmarks/batch_step.py ('head').
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .lowbit import (ACT_GROUP, BLOCK, LANES, UNROLL, _PATHS, _half, _is, _splat, _vec_types, act_group, bitmask_block_weights, per_block_ir,  # noqa: F401
                     dense_block_weights, quantize_act,
                     vnni_bitmask_dot, vnni_dense_dot, vnni_q4_dot)
from .simd_rows import lane_sums

_OPTS = dict(parallel=True, fastmath=True, cache=True, nogil=True)


@njit(cache=True, nogil=True, inline="always")
def _store(Y, l, r, s, bias, has_bias, acc):
    """Y[l, r] = (or +=) s + bias[r]: the gemv kernels' output convention, per (token, weight row)."""
    if has_bias:
        s += bias[r]
    if acc:
        Y[l, r] += s
    else:
        Y[l, r] = s


def _vnni_rows(context, builder, nblk, l0, qa, ca, sa, T, weights):
    """_vnni_blocks (lowbit.py, grouped) for the T tokens l0 .. l0 + T - 1 of Q/C/S [L, ...] (C-contiguous) at
    once; returns the T sums. weights(b) emits block b's 64 weight bytes, once per block for all T tokens, the
    blocks in order. With a scale per ACT_GROUP blocks (the corr rows' length says so), per whole group each
    token chains its blocks' vpdpbusd into one int32 accumulator started from its group lanes, then one
    conversion and one FMA (T int32 + T float vectors live), and the blocks past the last whole group go one by
    one with their own lanes; with a scale per block, every block so."""
    i8, i32, i64, f32, v16i, v16f, v64b = _vec_types()
    mod = builder.module
    dpbusd = cgutils.get_or_insert_function(mod, ir.FunctionType(v16i, [v16i, v16i, v16i]), "llvm.x86.avx512.vpdpbusd.512")
    fma = cgutils.get_or_insert_function(mod, ir.FunctionType(v16f, [v16f, v16f, v16f]), "llvm.fma.v16f32")
    zero = ir.Constant(v16f, [0.0] * LANES)
    rows = [builder.add(l0, ir.Constant(i64, t)) for t in range(T)]
    qs, cs, ss = (cgutils.unpack_tuple(builder, a.shape, 2)[1] for a in (qa, ca, sa))
    nact = cgutils.unpack_tuple(builder, sa.shape, 2)[1]          # the activations' blocks: group lanes follow

    def lanes_at(t, k):
        p = builder.gep(ca.data, [builder.add(builder.mul(rows[t], cs), builder.mul(k, ir.Constant(i64, LANES)))])
        return builder.load(builder.bitcast(p, v16i.as_pointer()), align=4)

    def qblock(t, b):
        p = builder.gep(qa.data, [builder.add(builder.mul(rows[t], qs), builder.mul(b, ir.Constant(i64, BLOCK)))])
        return builder.load(builder.bitcast(p, v16i.as_pointer()), align=1)

    def add_scaled(t, lanes, b, acc):
        s = builder.load(builder.gep(sa.data, [builder.add(builder.mul(rows[t], ss), b)]))
        builder.store(builder.call(fma, [builder.sitofp(lanes, v16f), _splat(builder, s), builder.load(acc)]), acc)

    accs = [cgutils.alloca_once_value(builder, zero) for _ in range(T)]

    def one_by_one(start):
        with cgutils.for_range(builder, builder.sub(nblk, start)) as loop:
            b = builder.add(start, loop.index)
            wv = weights(b)
            for t in range(T):
                add_scaled(t, builder.call(dpbusd, [lanes_at(t, b), wv, qblock(t, b)]), b, accs[t])

    per_block = per_block_ir(builder, nact, cgutils.unpack_tuple(builder, ca.shape, 2)[1])
    with builder.if_else(per_block) as (one, groups):
        with one:                                          # a scale per block
            one_by_one(ir.Constant(i64, 0))
        with groups:
            G = ir.Constant(i64, ACT_GROUP)
            ngrp = builder.udiv(nblk, G)
            with cgutils.for_range(builder, ngrp) as loop:
                base = builder.mul(loop.index, G)
                lanes = [lanes_at(t, builder.add(nact, loop.index)) for t in range(T)]
                for u in range(ACT_GROUP):
                    b = builder.add(base, ir.Constant(i64, u))
                    wv = weights(b)
                    lanes = [builder.call(dpbusd, [lanes[t], wv, qblock(t, b)]) for t in range(T)]
                for t in range(T):
                    add_scaled(t, lanes[t], base, accs[t])
            one_by_one(builder.mul(ngrp, G))
    return lane_sums(builder, [builder.load(a) for a in accs])


def _rows_typed(q, corr, scale) -> bool:
    return (_is(q, types.int8, 2) and _is(corr, types.int32, 2) and _is(scale, types.float32, 2)
            and q.layout == corr.layout == scale.layout == "C")


def _dense_rows(T: int):
    def typer(typingctx, wq, woff, q, corr, scale, nblk, l0):
        """(vnni_dense_dot(wq, woff, q[l], corr[l], scale[l], nblk) for l in l0 .. l0 + T - 1), the weight row's
        blocks loaded once for the T tokens."""
        if not (_is(wq, types.uint8) and _rows_typed(q, corr, scale)):
            return None
        sig = types.UniTuple(types.float32, T)(wq, types.int64, q, corr, scale, types.int64, types.int64)

        def codegen(context, builder, signature, args):
            wa, qa, ca, sa = (context.make_array(signature.args[k])(context, builder, args[k]) for k in (0, 2, 3, 4))
            weights = dense_block_weights(builder, wa, args[1])
            lanes = _vnni_rows(context, builder, args[5], args[6], qa, ca, sa, T, weights)
            return context.make_tuple(builder, signature.return_type, lanes)

        return sig, codegen

    typer.__name__ = f"vnni_dense_rows{T}"
    return intrinsic(typer)


def _bitmask_rows(T: int):
    def typer(typingctx, vals, masks, voff, mstart, q, corr, scale, nblk, l0):
        """(vnni_bitmask_dot(vals, masks, voff, mstart, q[l], corr[l], scale[l], nblk) for l in l0 .. l0 + T - 1),
        each block expanded once for the T tokens (the blocks are walked in order)."""
        if not (_is(vals, types.uint8, 1) and _is(masks, types.uint64, 1) and _rows_typed(q, corr, scale)):
            return None
        sig = types.UniTuple(types.float32, T)(vals, masks, types.int64, types.int64, q, corr, scale, types.int64,
                                               types.int64)

        def codegen(context, builder, signature, args):
            va, ma, qa, ca, sa = (context.make_array(signature.args[k])(context, builder, args[k]) for k in (0, 1, 4, 5, 6))
            weights = bitmask_block_weights(builder, va, ma, args[2], args[3])
            lanes = _vnni_rows(context, builder, args[7], args[8], qa, ca, sa, T, weights)
            return context.make_tuple(builder, signature.return_type, lanes)

        return sig, codegen

    typer.__name__ = f"vnni_bitmask_rows{T}"
    return intrinsic(typer)


vnni_dense_rows8, vnni_dense_rows4, vnni_dense_rows2 = _dense_rows(8), _dense_rows(4), _dense_rows(2)
vnni_bitmask_rows8, vnni_bitmask_rows4, vnni_bitmask_rows2 = _bitmask_rows(8), _bitmask_rows(4), _bitmask_rows(2)


@njit(cache=True, nogil=True, inline="always")
def _store_tile(Y, l, r, s, w, bias, has_bias, acc):
    """Y[l + i, r] = w * s[i] (+ bias[r]; acc: added) for the tile's sums s."""
    for i in range(len(s)):
        _store(Y, l + i, r, w * s[i], bias, has_bias, acc)


def act_buffers_rows(rows: int, in_features: int, columns: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quantize_rows' buffers for up to `rows` rows of width in_features, one scale per `columns` (as
    lowbit.act_buffers)."""
    nblk = -(-int(in_features) // BLOCK)
    ngrp = -(-nblk // act_group(columns))
    return (np.zeros((rows, nblk * BLOCK), np.int8), np.zeros((rows, (nblk + ngrp) * LANES), np.int32),
            np.zeros((rows, nblk), np.float32))


@njit(cache=True, nogil=True)
def quantize_rows(X, Q, C, S):
    """quantize_act of every row of X [L, m] into Q/C/S [>= L, ...]."""
    for l in range(X.shape[0]):
        quantize_act(X[l], Q[l], C[l], S[l])


@njit(**_OPTS)
def int8_gemm_vnni(wq, wscale, Q, C, S, bias, Y, acc):
    """Tiles of 8, 4, 2 tokens (vnni_dense_rows*), a last token alone (the gemv's dot)."""
    n, stride = wq.shape
    nblk = stride // 64
    L = Y.shape[0]
    has_bias = bias.shape[0] == n
    for r in prange(n):
        w = wscale[r]
        off = r * stride
        l = 0
        while l + 8 <= L:
            _store_tile(Y, l, r, vnni_dense_rows8(wq, off, Q, C, S, nblk, l), w, bias, has_bias, acc)
            l += 8
        if l + 4 <= L:
            _store_tile(Y, l, r, vnni_dense_rows4(wq, off, Q, C, S, nblk, l), w, bias, has_bias, acc)
            l += 4
        if l + 2 <= L:
            _store_tile(Y, l, r, vnni_dense_rows2(wq, off, Q, C, S, nblk, l), w, bias, has_bias, acc)
            l += 2
        if l < L:
            _store(Y, l, r, w * vnni_dense_dot(wq, off, Q[l], C[l], S[l], nblk), bias, has_bias, acc)


@njit(**_OPTS)
def int8_gemm_portable(wq, wscale, Q, C, S, bias, Y, acc):
    n, stride = wq.shape
    nblk = stride // 64
    L = Y.shape[0]
    has_bias = bias.shape[0] == n
    for r in prange(n):
        for l in range(L):
            s = np.float32(0.0)
            for b in range(nblk):
                t = np.int32(0)
                for j in range(b * 64, b * 64 + 64):
                    t += (np.int32(wq[r, j]) - np.int32(128)) * np.int32(Q[l, j])
                s += np.float32(t) * S[l, b]
            s *= wscale[r]
            _store(Y, l, r, s, bias, has_bias, acc)


@njit(**_OPTS)
def int8_bitmask_gemm_vnni(rowptr, masks, vals, wscale, Q, C, S, bias, Y, acc):
    n = rowptr.shape[0] - 1
    nblk = masks.shape[0] // n if n else 0
    L = Y.shape[0]
    has_bias = bias.shape[0] == n
    for r in prange(n):
        w = wscale[r]
        l = 0
        while l + 8 <= L:
            _store_tile(Y, l, r, vnni_bitmask_rows8(vals, masks, rowptr[r], r * nblk, Q, C, S, nblk, l), w, bias,
                        has_bias, acc)
            l += 8
        if l + 4 <= L:
            _store_tile(Y, l, r, vnni_bitmask_rows4(vals, masks, rowptr[r], r * nblk, Q, C, S, nblk, l), w, bias,
                        has_bias, acc)
            l += 4
        if l + 2 <= L:
            _store_tile(Y, l, r, vnni_bitmask_rows2(vals, masks, rowptr[r], r * nblk, Q, C, S, nblk, l), w, bias,
                        has_bias, acc)
            l += 2
        if l < L:
            _store(Y, l, r, w * vnni_bitmask_dot(vals, masks, rowptr[r], r * nblk, Q[l], C[l], S[l], nblk), bias,
                   has_bias, acc)


@njit(**_OPTS)
def int8_bitmask_gemm_portable(rowptr, masks, vals, wscale, Q, C, S, bias, Y, acc):
    n = rowptr.shape[0] - 1
    nblk = masks.shape[0] // n if n else 0
    L = Y.shape[0]
    has_bias = bias.shape[0] == n
    one = np.uint64(1)
    for r in prange(n):
        for l in range(L):
            off = rowptr[r]
            s = np.float32(0.0)
            for b in range(nblk):
                m = masks[r * nblk + b]
                t = np.int32(0)
                for j in range(64):
                    if (m >> np.uint64(j)) & one:
                        t += (np.int32(vals[off]) - np.int32(128)) * np.int32(Q[l, b * 64 + j])
                        off += 1
                s += np.float32(t) * S[l, b]
            s *= wscale[r]
            _store(Y, l, r, s, bias, has_bias, acc)


@njit(**_OPTS)
def q4_gemm_vnni(w4, ws, Q, C, S, bias, Y, acc):
    n, stride = w4.shape
    nblk = stride // 32
    L = Y.shape[0]
    has_bias = bias.shape[0] == n
    for r in prange(n):
        for l in range(L):
            s = vnni_q4_dot(w4, r * stride, ws, r * 2 * nblk, Q[l], C[l], S[l], nblk)
            _store(Y, l, r, s, bias, has_bias, acc)


@njit(**_OPTS)
def q4_gemm_portable(w4, ws, Q, C, S, bias, Y, acc):
    n, stride = w4.shape
    nblk = stride // 32
    L = Y.shape[0]
    has_bias = bias.shape[0] == n
    for r in prange(n):
        for l in range(L):
            s = np.float32(0.0)
            for b in range(nblk):
                lo = 0
                hi = 0
                for k in range(32):
                    byte = np.int32(w4[r, 32 * b + k])
                    lo += ((byte & 15) - 8) * np.int32(Q[l, 64 * b + k])
                    hi += ((byte >> 4) - 8) * np.int32(Q[l, 64 * b + 32 + k])
                s += S[l, b] * (np.float32(lo) * _half(ws[r, 2 * b]) + np.float32(hi) * _half(ws[r, 2 * b + 1]))
            _store(Y, l, r, s, bias, has_bias, acc)


GEMM = {"int8": int8_gemm_vnni if _PATHS["int8"] != "portable" else int8_gemm_portable,
        "int8_bitmask": int8_bitmask_gemm_vnni if _PATHS["int8_bitmask"] != "portable" else int8_bitmask_gemm_portable,
        "q4": q4_gemm_vnni if _PATHS["q4"] != "portable" else q4_gemm_portable}
PORTABLE = {"int8": int8_gemm_portable, "int8_bitmask": int8_bitmask_gemm_portable, "q4": q4_gemm_portable}
