"""Batched products of the low-bit groups (int8 dense, int8 + bitmask, the 4-bit q4 head): X [L, in] -> Y [L, out]
reading each weight row once for all L rows of a batched step.

Each row of X is quantised exactly as `lowbit.quantize_act` quantises a single token (per 64 columns), and
each (weight row, token) product is the same dot the gemv kernels compute (the same VNNI intrinsic, or the same
portable loop), so a batched step gives bit for bit the values of L single-token calls; only the loop order
changes: weight rows outside (in parallel), tokens inside, so a row's bytes stay in L1 while the L tokens use it.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .lowbit import (BLOCK, LANES, _PATHS, _half, quantize_act, vnni_bitmask_dot, vnni_dense_dot,  # noqa: F401
                     vnni_q4_dot)

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


def act_buffers_rows(rows: int, in_features: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quantize_rows' buffers for up to `rows` rows of width in_features."""
    nblk = -(-int(in_features) // BLOCK)
    return (np.zeros((rows, nblk * BLOCK), np.int8), np.zeros((rows, nblk * LANES), np.int32),
            np.zeros((rows, nblk), np.float32))


@njit(cache=True, nogil=True)
def quantize_rows(X, Q, C, S):
    """quantize_act of every row of X [L, m] into Q/C/S [>= L, ...]."""
    for l in range(X.shape[0]):
        quantize_act(X[l], Q[l], C[l], S[l])


@njit(**_OPTS)
def int8_gemm_vnni(wq, wscale, Q, C, S, bias, Y, acc):
    n, stride = wq.shape
    nblk = stride // 64
    L = Y.shape[0]
    has_bias = bias.shape[0] == n
    for r in prange(n):
        for l in range(L):
            s = wscale[r] * vnni_dense_dot(wq, r * stride, Q[l], C[l], S[l], nblk)
            _store(Y, l, r, s, bias, has_bias, acc)


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
        for l in range(L):
            s = wscale[r] * vnni_bitmask_dot(vals, masks, rowptr[r], r * nblk, Q[l], C[l], S[l], nblk)
            _store(Y, l, r, s, bias, has_bias, acc)


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
