"""numba kernels of the native engine: sparse and dense matrix-vector products and the small per-token ops.

Every kernel writes into an output array it is given (no allocation per token) and runs its outer loop
over output rows (or heads) with `prange`, so the thread count is numba's (`set_threads`). Two details
decide whether the sparse loops vectorise and reach memory bandwidth: row bounds and column indices are
cast to unsigned 64-bit inside the loop (signed indices keep bounds checks and wrap-around logic in the
inner loop), and `fastmath` lets the float32 reduction be reordered into SIMD lanes. Column indices are
uint16 when the input width fits (half the index traffic of int32), else uint32.

Formats (see pack.py): dense [out, in]; CSR (rowptr int64 [out+1], cols uint16/32 [nnz], vals f32 [nnz]);
ELL (cols [out, k], vals [out, k]) when every row keeps the same count k, as per-output-row pruners give;
bitmask (rowptr int64 [out+1], masks uint16 [out * ceil(in/16)], vals f32 [nnz]): one bit per weight and
the kept values packed, expanded in registers (simd.bitmask_dot), 4.125 bytes per kept weight + 1/8 byte per
weight against CSR's 6 per kept weight.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, set_num_threads, get_num_threads, config as numba_config, types
from numba.extending import intrinsic

from .simd import bitmask_gemm, bitmask_gemm_rows, bitmask_gemv  # noqa: F401  (with their intrinsic: one cache stamp)
from .simd_rows import (_put, dense_dot_rows1, dense_dot_rows2, dense_dot_rows4, dense_dot_rows8, key_tile4x1,
                        key_tile4x2, key_tile4x3, key_tile4x4, pv_tile1, pv_tile2, pv_tile3, pv_tile4)

_OPTS = dict(parallel=True, fastmath=True, cache=True, nogil=True)
_SERIAL = dict(fastmath=True, cache=True, nogil=True)


def physical_cores() -> int:
    """Cores this process may run on, counting SMT siblings once (Linux sysfs; else the logical count)."""
    import os

    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:
        allowed = list(range(os.cpu_count() or 1))
    seen = set()
    for cpu in allowed:
        try:
            base = f"/sys/devices/system/cpu/cpu{cpu}/topology"
            core = open(f"{base}/core_id").read().strip()
            pkg = open(f"{base}/physical_package_id").read().strip()
            seen.add((pkg, core))
        except OSError:
            seen.add(("?", cpu))
    return max(1, len(seen))


def default_threads(n: int | None = None) -> int:
    """`n` if given, else one thread per physical core (a second thread on an SMT sibling shares the core's
    load ports and only adds a barrier participant), capped by numba's pool."""
    want = int(n) if n else physical_cores()
    return max(1, min(want, numba_config.NUMBA_NUM_THREADS))


def set_threads(n: int | None) -> int:
    """Use `n` threads (None: one per physical core); returns the count in effect."""
    set_num_threads(default_threads(n))
    return get_num_threads()


def threading_layer() -> str:
    from numba import threading_layer as tl
    try:
        return tl()
    except ValueError:           # nothing ran in parallel yet
        return "not initialised"


# ----------------------------------------------------------------------------- products, one token (L = 1)
# out[r] = (acc ? out[r] : 0) + bias[r] (when bias has rows) + sum_j W[r, j] x[j]
@njit(**_OPTS)
def dense_gemv(W, x, bias, out, acc):
    """Two rows a trip (two weight streams per core; a last odd row alone): on a 2-core Intel Xeon VM 1.1-1.25x
    faster than one row a trip at LLaMA-7B shapes and the 32000-row head, cold (26-34 -> 33-37 GB/s)."""
    n, m = W.shape
    has_bias = bias.shape[0] == n
    for p in prange((n + 1) // 2):
        r = 2 * p
        if r + 1 < n:
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            for j in range(m):
                s0 += W[r, j] * x[j]
                s1 += W[r + 1, j] * x[j]
            _put(out, r, s0, bias, has_bias, acc)
            _put(out, r + 1, s1, bias, has_bias, acc)
        else:
            s = np.float32(0.0)
            for j in range(m):
                s += W[r, j] * x[j]
            _put(out, r, s, bias, has_bias, acc)


@njit(**_OPTS)
def csr_gemv_portable(rowptr, cols, vals, x, bias, out, acc):
    n = rowptr.shape[0] - 1
    has_bias = bias.shape[0] == n
    for r in prange(n):
        lo = np.uint64(rowptr[r])
        hi = np.uint64(rowptr[r + 1])
        s = np.float32(0.0)
        for j in range(lo, hi):
            s += vals[j] * x[np.uint64(cols[j])]
        _put(out, r, s, bias, has_bias, acc)


@njit(**_OPTS)
def ell_gemv_portable(cols, vals, x, bias, out, acc):
    n, k = vals.shape
    has_bias = bias.shape[0] == n
    for r in prange(n):
        s = np.float32(0.0)
        for j in range(k):
            s += vals[r, j] * x[np.uint64(cols[r, j])]
        _put(out, r, s, bias, has_bias, acc)


def _serial_build(f):
    """The same product as one serial loop (prange runs as range). A parallel region costs a fork and a join
    (microseconds) that a small product may not repay; the compile-time tuner times both builds per group.
    Renamed so numba's on-disk cache keeps the two builds apart."""
    import types as _types

    g = _types.FunctionType(f.py_func.__code__.replace(co_name=f.__name__ + "_serial"), f.py_func.__globals__,
                            f.__name__ + "_serial", f.py_func.__defaults__, f.py_func.__closure__)
    g.__qualname__ = f.__name__ + "_serial"
    return njit(**_SERIAL)(g)


from .lowbit import (int8_bitmask_gemv, int8_csr_gemv, int8_ell_gemv, int8_gemv, int8_perm_gemv,  # noqa: E402,F401
                     quantize_act, kernel_paths as _int8_paths)
from .int4 import int4_bitmask_gemv, kernel_paths as _int4_paths  # noqa: E402
from .lowbit import q4_gemv  # noqa: E402
from .lowbit import csr_gemv_avx512, ell_gemv_avx512  # noqa: E402

# fp32 CSR / ELL: 512-bit gathers with prefetch where the CPU has AVX-512F (lowbit.gather_dot), else the loops above.
# Where both exist the compile-time tuner times both ("csr" and "csr/portable") and records the faster one: the
# gather intrinsic measured 1.1-1.4x faster on an Intel Xeon; gathers cost differently on other cores.
csr_gemv = csr_gemv_avx512 if _int8_paths()["csr"] != "portable" else csr_gemv_portable
ell_gemv = ell_gemv_avx512 if _int8_paths()["ell"] != "portable" else ell_gemv_portable


def lowbit_paths() -> dict[str, str]:
    """Which build of each low-bit kernel this CPU runs (VNNI / VBMI2 / AVX-512 or portable)."""
    return {**_int8_paths(), **_int4_paths()}


GEMV = {"dense": dense_gemv, "csr": csr_gemv, "ell": ell_gemv, "bitmask": bitmask_gemv,
        "int8": int8_gemv, "int8_csr": int8_csr_gemv, "int8_ell": int8_ell_gemv, "int8_bitmask": int8_bitmask_gemv,
        "int8_perm": int8_perm_gemv, "int4_bitmask": int4_bitmask_gemv, "q4": q4_gemv}
GEMV_SERIAL = {k: _serial_build(f) for k, f in GEMV.items()}
# the plain-numba twins a build may record instead ("portable": true in the index), where they differ from GEMV's
GEMV_PORTABLE = {k: f for k, f in (("csr", csr_gemv_portable), ("ell", ell_gemv_portable)) if GEMV[k] is not f}


# ----------------------------------------------------------------------------- products, L tokens (prefill)
@njit(**_OPTS)
def csr_gemm(rowptr, cols, vals, X, bias, Y, acc):
    n = rowptr.shape[0] - 1
    L = X.shape[0]
    has_bias = bias.shape[0] == n
    for r in prange(n):
        lo = np.uint64(rowptr[r])
        hi = np.uint64(rowptr[r + 1])
        s = np.zeros(L, dtype=np.float32)
        for j in range(lo, hi):
            v = vals[j]
            c = np.uint64(cols[j])
            for l in range(L):
                s[l] += v * X[l, c]
        for l in range(L):
            t = s[l] + (bias[r] if has_bias else np.float32(0.0))
            if acc:
                Y[l, r] += t
            else:
                Y[l, r] = t


@njit(**_OPTS)
def ell_gemm(cols, vals, X, bias, Y, acc):
    n, k = vals.shape
    L = X.shape[0]
    has_bias = bias.shape[0] == n
    for r in prange(n):
        s = np.zeros(L, dtype=np.float32)
        for j in range(k):
            v = vals[r, j]
            c = np.uint64(cols[r, j])
            for l in range(L):
                s[l] += v * X[l, c]
        for l in range(L):
            t = s[l] + (bias[r] if has_bias else np.float32(0.0))
            if acc:
                Y[l, r] += t
            else:
                Y[l, r] = t


# ----------------------------------------------------------------------------- per-token ops
@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the low 32 bits of the integer `bits` (a bitcast: LLVM vectorises loops
    around it)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if v.type.width != 32:
            v = builder.trunc(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(bits), codegen


@njit(fastmath=True, cache=True, nogil=True, inline="always")
def fast_exp(x):
    """exp(x) in float32 within a few ulp, as straight-line code that LLVM vectorises (libm's expf is a call
    per element: SiLU over a 64-row prompt chunk of SmolLM2 spent 8 ms in it). x = n ln2 + r, |r| <= ln2 / 2;
    e^r by Cephes' degree-6 polynomial for expf; 2^n from the exponent bits. x is clamped to [-87, 88] (results
    below 2^-126 become e^-87 ~ 1.6e-38, above e^88 stay e^88: no inf, no denormals)."""
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    n = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    r = x - n * np.float32(0.693359375)
    r = r - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * (r * r) + r + np.float32(1.0)
    return p * _f32_from_bits((np.int64(n) + 127) << 23)


@njit(**_SERIAL)
def rms_norm(X, w, eps, out):
    L, m = X.shape
    for l in range(L):
        ss = np.float32(0.0)
        for j in range(m):
            ss += X[l, j] * X[l, j]
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(m) + np.float32(eps))
        for j in range(m):
            out[l, j] = w[j] * (X[l, j] * inv)


@njit(**_SERIAL)
def layer_norm(X, w, b, eps, out):
    L, m = X.shape
    for l in range(L):
        mu = np.float32(0.0)
        for j in range(m):
            mu += X[l, j]
        mu /= np.float32(m)
        var = np.float32(0.0)
        for j in range(m):
            d = X[l, j] - mu
            var += d * d
        inv = np.float32(1.0) / np.sqrt(var / np.float32(m) + np.float32(eps))
        for j in range(m):
            out[l, j] = (X[l, j] - mu) * inv * w[j] + b[j]


@njit(error_model="numpy", **_SERIAL)
def silu_mul(GU, inter, out):
    """GU [L, 2*inter] = gate | up  ->  out [L, inter] = silu(gate) * up. (error_model numpy: no zero-division
    check, whose branch kept the loop scalar; 1 + e^-g > 0 anyway.)"""
    L = GU.shape[0]
    for l in range(L):
        for j in range(inter):
            g = GU[l, j]
            out[l, j] = g / (np.float32(1.0) + fast_exp(-g)) * GU[l, inter + j]


@njit(**_SERIAL)
def relu_(X):
    L, m = X.shape
    for l in range(L):
        for j in range(m):
            if X[l, j] < 0:
                X[l, j] = 0


# ----------------------------------------------------------------------------- attention over the cache slots
@njit(**_OPTS)
def attention(QKV, H, Hkv, D, positions, cos, sin, rope, scale, past_k, past_v, mask, out, new_k, new_v, scratch):
    """One layer's attention for L new tokens.

    QKV [L, (H + 2 Hkv) D]: q | k | v projections of the new tokens (rotary not yet applied).
    positions [L]; cos/sin [max_pos, D/2] tables (rope=False: none, e.g. OPT's learned positions).
    past_k/past_v [Hkv, P, D]: the cache slots; mask [L, P + L]: 1 where token l may attend to slot/token.
    out [L, H D]; new_k/new_v [Hkv, L, D] receive the new keys (rotated) and values: the `present` rows.
    Grouped-query attention: head h reads kv head h // (H / Hkv); the cache is never repeated.
    scratch [>= H L, 2 D + P + L]: each (head, token) pair's rotated query, output and scores (no allocation
    inside the parallel loop).
    """
    L = QKV.shape[0]
    P = past_k.shape[1]
    half = D // 2
    rep = H // Hkv
    qoff = 0
    koff = H * D
    voff = koff + Hkv * D
    # new keys/values (rotate keys): a few hundred values, serial (a parallel region costs more than it saves)
    for g in range(Hkv):
        for l in range(L):
            p = positions[l]
            for i in range(D):
                new_v[g, l, i] = QKV[l, voff + g * D + i]
            if rope:
                for i in range(half):
                    a = QKV[l, koff + g * D + i]
                    b = QKV[l, koff + g * D + half + i]
                    new_k[g, l, i] = a * cos[p, i] - b * sin[p, i]
                    new_k[g, l, half + i] = b * cos[p, i] + a * sin[p, i]
            else:
                for i in range(D):
                    new_k[g, l, i] = QKV[l, koff + g * D + i]
    for hl in prange(H * L):
        h = hl // L
        l = hl % L
        g = h // rep
        p = positions[l]
        q = scratch[hl, :D]
        o = scratch[hl, D:2 * D]
        scores = scratch[hl, 2 * D:2 * D + P + L]
        if rope:
            for i in range(half):
                a = QKV[l, qoff + h * D + i]
                b = QKV[l, qoff + h * D + half + i]
                q[i] = a * cos[p, i] - b * sin[p, i]
                q[half + i] = b * cos[p, i] + a * sin[p, i]
        else:
            for i in range(D):
                q[i] = QKV[l, qoff + h * D + i]
        m = np.float32(-np.inf)
        for t in range(P + L):
            if mask[l, t] != 0:
                s = np.float32(0.0)
                if t < P:
                    for i in range(D):
                        s += q[i] * past_k[g, t, i]
                else:
                    for i in range(D):
                        s += q[i] * new_k[g, t - P, i]
                s *= scale
                scores[t] = s
                if s > m:
                    m = s
        total = np.float32(0.0)
        for t in range(P + L):
            if mask[l, t] != 0:
                e = fast_exp(scores[t] - m)
                scores[t] = e
                total += e
            else:
                scores[t] = 0
        for i in range(D):
            o[i] = 0
        if total > 0:
            inv = np.float32(1.0) / total
            for t in range(P + L):
                w = scores[t]
                if w != 0:
                    w *= inv
                    if t < P:
                        for i in range(D):
                            o[i] += w * past_v[g, t, i]
                    else:
                        for i in range(D):
                            o[i] += w * new_v[g, t - P, i]
        for i in range(D):
            out[l, h * D + i] = o[i]


@njit(cache=True, nogil=True)
def _row_blocks(slots, positions, starts, lens):
    """Runs of consecutive rows of one sequence (slot) at consecutive positions, cut to at most 8 rows:
    starts/lens receive them; returns how many."""
    R = slots.shape[0]
    n = 0
    r = 0
    while r < R:
        k = 1
        while k < 8 and r + k < R and slots[r + k] == slots[r] and positions[r + k] == positions[r] + k:
            k += 1
        starts[n] = r
        lens[n] = k
        n += 1
        r += k
    return n


@njit(**_OPTS)
def attention_rows(QKV, H, Hkv, D, slots, positions, cos, sin, rope, scale, cache_k, cache_v, out, qbuf, scores, obuf):
    """One layer's attention for R rows of a batched step, each row a token of its own sequence.

    Row r belongs to the sequence in cache slot slots[r], at position positions[r]; cache_k/cache_v
    [B, Hkv, S, D] hold each sequence's keys (rotated) and values at index = position. Every row's key and
    value are stored first, then row r attends over its slot's positions 0..positions[r] (a prefill chunk's
    rows of one sequence: causal among themselves). Work items, in parallel: a run of up to 8 consecutive rows
    of one sequence (_row_blocks) x one kv head g, i.e. the n <= 8 rep queries of the heads that share g
    (grouped-query attention): each cached key row is loaded once for all of them (simd_rows.dense_dot_rows*:
    one transposed lane tree per 8 scores instead of a horizontal sum per score), and each value row once per
    run. QKV [R, (H + 2 Hkv) D]; out [R, H D]; qbuf [Hkv, R H / Hkv, D], scores [Hkv, R H / Hkv, S] and
    obuf [Hkv, R H / Hkv, D]: the rotated queries, their scores and outputs (query (r, head g rep + u) at
    [g, r rep + u]).
    """
    R = QKV.shape[0]
    half = D // 2
    rep = H // Hkv
    koff = H * D
    voff = koff + Hkv * D
    for r in range(R):
        b = slots[r]
        p = positions[r]
        for g in range(Hkv):
            for i in range(D):
                cache_v[b, g, p, i] = QKV[r, voff + g * D + i]
            if rope:
                for i in range(half):
                    a = QKV[r, koff + g * D + i]
                    c = QKV[r, koff + g * D + half + i]
                    cache_k[b, g, p, i] = a * cos[p, i] - c * sin[p, i]
                    cache_k[b, g, p, half + i] = c * cos[p, i] + a * sin[p, i]
            else:
                for i in range(D):
                    cache_k[b, g, p, i] = QKV[r, koff + g * D + i]
    starts = np.empty(R, np.int64)
    lens = np.empty(R, np.int64)
    nb = _row_blocks(slots, positions, starts, lens)
    for item in prange(nb * Hkv):
        j = item // Hkv
        g = item - j * Hkv
        r0 = starts[j]
        nr = lens[j]
        b = slots[r0]
        nq = nr * rep
        q0 = r0 * rep
        Q = qbuf[g, q0:q0 + nq]
        for k in range(nr):
            r = r0 + k
            p = positions[r]
            for u in range(rep):
                h = g * rep + u
                qi = k * rep + u
                if rope:
                    for i in range(half):
                        a = QKV[r, h * D + i]
                        c = QKV[r, h * D + half + i]
                        Q[qi, i] = a * cos[p, i] - c * sin[p, i]
                        Q[qi, half + i] = c * cos[p, i] + a * sin[p, i]
                else:
                    for i in range(D):
                        Q[qi, i] = QKV[r, h * D + i]
        Km = cache_k[b, g]
        Vm = cache_v[b, g]
        pmax = positions[r0 + nr - 1]
        sc = scores[g]
        tn = pmax + 1
        t = 0
        while t + 4 <= tn:                              # 4 key rows x 4 (3, 2, 1) queries per call
            l = 0
            while l + 4 <= nq:
                s16 = key_tile4x4(Km, t, Q, l)
                for i in range(16):
                    sc[q0 + l + (i & 3), t + (i >> 2)] = s16[i] * scale
                l += 4
            if nq - l == 3:
                s12 = key_tile4x3(Km, t, Q, l)
                for i in range(12):
                    sc[q0 + l + i % 3, t + i // 3] = s12[i] * scale
            elif nq - l == 2:
                s8 = key_tile4x2(Km, t, Q, l)
                for i in range(8):
                    sc[q0 + l + (i & 1), t + (i >> 1)] = s8[i] * scale
            elif nq - l == 1:
                s4 = key_tile4x1(Km, t, Q, l)
                for i in range(4):
                    sc[q0 + l, t + i] = s4[i] * scale
            t += 4
        while t < tn:
            l = 0
            while l + 8 <= nq:
                s8 = dense_dot_rows8(Km, t, Q, l)
                for i in range(8):
                    sc[q0 + l + i, t] = s8[i] * scale
                l += 8
            if l + 4 <= nq:
                s4 = dense_dot_rows4(Km, t, Q, l)
                for i in range(4):
                    sc[q0 + l + i, t] = s4[i] * scale
                l += 4
            if l + 2 <= nq:
                s2 = dense_dot_rows2(Km, t, Q, l)
                for i in range(2):
                    sc[q0 + l + i, t] = s2[i] * scale
                l += 2
            if l < nq:
                sc[q0 + l, t] = dense_dot_rows1(Km, t, Q, l)[0] * scale
            t += 1
        O = obuf[g, q0:q0 + nq]
        vec = D % 16 == 0
        for qi in range(nq):
            p = positions[r0 + qi // rep]
            row = sc[q0 + qi]
            m = np.float32(-np.inf)
            for t in range(p + 1):
                if row[t] > m:
                    m = row[t]
            total = np.float32(0.0)
            for t in range(p + 1):
                e = fast_exp(row[t] - m)
                row[t] = e
                total += e
            inv = np.float32(1.0) / total
            for t in range(p + 1):
                row[t] *= inv
            for t in range(p + 1, tn):                  # a later row's positions weigh nothing (causal)
                row[t] = 0
            if not vec:
                for i in range(D):
                    O[qi, i] = 0
        if vec:                                         # O = weights @ V, accumulators in registers
            for d0 in range(0, D, 64):
                nc = min(4, (D - d0) // 16)
                k = 0
                while k + 4 <= nq:
                    pv_tile4(sc, q0 + k, Vm, d0, nc, tn, O, k)
                    k += 4
                if nq - k == 3:
                    pv_tile3(sc, q0 + k, Vm, d0, nc, tn, O, k)
                elif nq - k == 2:
                    pv_tile2(sc, q0 + k, Vm, d0, nc, tn, O, k)
                elif nq - k == 1:
                    pv_tile1(sc, q0 + k, Vm, d0, nc, tn, O, k)
        else:
            for t in range(tn):
                for qi in range(nq):
                    w = sc[q0 + qi, t]
                    for i in range(D):
                        O[qi, i] += w * Vm[t, i]
        for k in range(nr):
            for u in range(rep):
                for i in range(D):
                    out[r0 + k, (g * rep + u) * D + i] = O[k * rep + u, i]
