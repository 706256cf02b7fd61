"""Wide-vector building blocks that plain numba loops never emit, written as LLVM IR through `@intrinsic`.

`bitmask_dot(vals, masks, x, voff, mstart, nblk)` is the inner loop of the bitmask format (kernels.py): a row
stores one 16-bit mask per 16 input columns and only its nonzero values, packed. Per block it

    v  = expandload(vals + off, mask)        # vexpandps zmm{k}{z}: the block's values put back in their lanes
    xv = maskedload(x + 16 b, mask)          # vmovups zmm{k}{z}: lanes without a weight are never read
    acc = fma(v, xv, acc);  off += popcount(mask)

so a weight costs its 4 value bytes plus one mask bit (1/8 byte), against 4 + 2 for CSR's uint16 column
index, and no gather is needed (the input block is contiguous). Once per UNROLL blocks it also prefetches the values
simd_rows.PREFETCH_BYTES further on (Intel's stream prefetchers stop at every 4 KiB page). The masked load of x also makes the last,
partial block safe: bits past the row's width are zero, so nothing past the end of x is read.

LLVM lowers the generic `llvm.masked.expandload` / `llvm.masked.load` intrinsics to single AVX-512
instructions where the CPU has AVX-512F (Intel Xeon since Skylake-SP, AMD Zen 4) and to a correct scalar
sequence elsewhere, so the kernel runs on every x86-64 CPU; `has_avx512()` says which one this CPU gets
(benchmarks/native_asm_check.py checks the emitted instructions). The horizontal sum at the end is a
fixed-order tree, so results do not depend on the thread count.

`bitmask_gemm_rows` is the same format for a batched step of a few rows (model.BITMASK_ROWS): per block one
expand, then one masked load and FMA per row, one accumulator per row, and the rows' horizontal sums as one
transposed tree (simd_rows.lane_sums); its float sums are ordered differently from bitmask_gemv's, so rows
agree with single-row calls to rounding.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .simd_rows import PREFETCH_BYTES, _put, lane_sums, prefetch

LANES = 16
_OPTS = dict(parallel=True, fastmath=True, cache=True, nogil=True)   # as kernels.py; kept here so that
# numba's on-disk cache, stamped by this file, is invalidated when the intrinsic changes
UNROLL = 4


def has_avx512() -> bool:
    """Whether LLVM compiles for AVX-512F on this CPU (then the bitmask loop is one expand + one FMA a block)."""
    import llvmlite.binding as llvm

    feats = llvm.get_host_cpu_features()
    return bool(feats.get("avx512f", False))


def _made(context, builder, signature, args):
    """The (vals, masks, x) array arguments of a bitmask intrinsic, made accessible (their data pointers)."""
    return [context.make_array(signature.args[k])(context, builder, args[k]) for k in range(3)]


def _expanded_blocks(builder, va, ma, voff, mstart):
    """For a bitmask row (values from voff, masks from mstart): expanded(b) -> (block b's values in their lanes,
    absent 0; its mask as <16 x i1>), the value offset advancing by each mask's popcount (ask in order); and the
    masked-load and FMA functions and the zero vector the products use."""
    f32, i64, i16, i32 = ir.FloatType(), ir.IntType(64), ir.IntType(16), ir.IntType(32)
    v16 = ir.VectorType(f32, LANES)
    m16 = ir.VectorType(ir.IntType(1), LANES)
    mod = builder.module
    ptr = va.data.type
    expand = cgutils.get_or_insert_function(mod, ir.FunctionType(v16, [ptr, m16, v16]), "llvm.masked.expandload.v16f32")
    mload = cgutils.get_or_insert_function(mod, ir.FunctionType(v16, [ptr, i32, m16, v16]), "llvm.masked.load.v16f32.p0")
    ctpop = cgutils.get_or_insert_function(mod, ir.FunctionType(i16, [i16]), "llvm.ctpop.i16")
    fma = cgutils.get_or_insert_function(mod, ir.FunctionType(v16, [v16, v16, v16]), "llvm.fma.v16f32")
    zero = ir.Constant(v16, [0.0] * LANES)
    off = cgutils.alloca_once_value(builder, voff)

    def expanded(b, ahead=False):
        """ahead: also prefetch the values PREFETCH_BYTES on (once per UNROLL blocks is enough: see simd_rows)."""
        mk = builder.load(builder.gep(ma.data, [builder.add(mstart, b)]))
        mvec = builder.bitcast(mk, m16)
        o = builder.load(off)
        v = builder.call(expand, [builder.gep(va.data, [o]), mvec, zero])
        if ahead:
            prefetch(builder, va.data, builder.add(o, ir.Constant(i64, PREFETCH_BYTES // 4)))
        builder.store(builder.add(o, builder.zext(builder.call(ctpop, [mk]), i64)), off)
        return v, mvec

    return expanded, mload, fma, zero


@intrinsic
def bitmask_dot(typingctx, vals, masks, x, voff, mstart, nblk):
    """float32 sum over blocks b < nblk of expand(vals[voff:], masks[mstart + b]) * x[16 b : 16 b + 16]."""
    if not (isinstance(vals, types.Array) and vals.dtype == types.float32 and isinstance(masks, types.Array)
            and masks.dtype == types.uint16 and isinstance(x, types.Array) and x.dtype == types.float32):
        return None
    sig = types.float32(vals, masks, x, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        i64, i32 = ir.IntType(64), ir.IntType(32)
        va, ma, xa = _made(context, builder, signature, args)
        nblk = args[5]
        expanded, mload, fma, zero = _expanded_blocks(builder, va, ma, args[3], args[4])
        accs = [cgutils.alloca_once_value(builder, zero) for _ in range(UNROLL)]

        def block(b, acc, ahead=False):
            v, mvec = expanded(b, ahead)
            xv = builder.call(mload, [builder.gep(xa.data, [builder.mul(b, ir.Constant(i64, LANES))]),
                                      ir.Constant(i32, 4), mvec, zero])
            builder.store(builder.call(fma, [v, xv, builder.load(acc)]), acc)

        # UNROLL blocks per trip, each into its own accumulator: one chain of dependent FMAs (4 cycles each on
        # current cores) would otherwise bound the loop, not the loads.
        groups = builder.udiv(nblk, ir.Constant(i64, UNROLL))
        with cgutils.for_range(builder, groups) as loop:
            base = builder.mul(loop.index, ir.Constant(i64, UNROLL))
            for u in range(UNROLL):
                block(builder.add(base, ir.Constant(i64, u)), accs[u], u == 0)
        with cgutils.for_range(builder, builder.sub(nblk, builder.mul(groups, ir.Constant(i64, UNROLL)))) as loop:
            block(builder.add(builder.mul(groups, ir.Constant(i64, UNROLL)), loop.index), accs[0])
        acc = accs[0]
        total = builder.load(accs[0])
        for a_ in accs[1:]:
            total = builder.fadd(total, builder.load(a_))
        builder.store(total, acc)
        a = builder.load(acc)
        lanes = [builder.extract_element(a, ir.Constant(i32, i)) for i in range(LANES)]
        while len(lanes) > 1:                                   # fixed-order pairwise sum
            lanes = [builder.fadd(lanes[i], lanes[i + 1]) for i in range(0, len(lanes), 2)]
        return lanes[0]

    return sig, codegen


PAIR_UNROLL = 2


@intrinsic
def bitmask_dot2(typingctx, vals, masks, x, voff0, voff1, mstart, nblk):
    """(bitmask_dot of row r, of row r + 1) in one loop: the rows' masks at mstart and mstart + nblk, their values
    from voff0 and voff1. Per block both rows' values are expanded and FMA'd into one masked load of x (the
    union of the two masks); PAIR_UNROLL blocks a trip, an accumulator per (row, block of the trip). Two value
    streams per core: on a 2-core Intel Xeon VM 1.1-1.4x faster than one row at a time at 7B shapes, cold, at
    50-80% (4096x11008 at 50%: 4.68 -> 3.38 ms). The float sums are ordered differently from bitmask_dot's
    (fewer accumulators), so a row agrees with it to rounding."""
    if not (isinstance(vals, types.Array) and vals.dtype == types.float32 and isinstance(masks, types.Array)
            and masks.dtype == types.uint16 and isinstance(x, types.Array) and x.dtype == types.float32):
        return None
    sig = types.UniTuple(types.float32, 2)(vals, masks, x, types.int64, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        i64, i32 = ir.IntType(64), ir.IntType(32)
        va, ma, xa = _made(context, builder, signature, args)
        mstart, nblk = args[5], args[6]
        rows = [_expanded_blocks(builder, va, ma, args[3], mstart),
                _expanded_blocks(builder, va, ma, args[4], builder.add(mstart, nblk))]
        mload, fma, zero = rows[0][1], rows[0][2], rows[0][3]
        accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(PAIR_UNROLL)] for _ in rows]

        def block(b, u, ahead=False):
            got = [row[0](b, ahead) for row in rows]
            xv = builder.call(mload, [builder.gep(xa.data, [builder.mul(b, ir.Constant(i64, LANES))]),
                                      ir.Constant(i32, 4), builder.or_(got[0][1], got[1][1]), zero])
            for k, (v, _) in enumerate(got):
                builder.store(builder.call(fma, [v, xv, builder.load(accs[k][u])]), accs[k][u])

        groups = builder.udiv(nblk, ir.Constant(i64, PAIR_UNROLL))
        with cgutils.for_range(builder, groups) as loop:
            base = builder.mul(loop.index, ir.Constant(i64, PAIR_UNROLL))
            for u in range(PAIR_UNROLL):
                block(builder.add(base, ir.Constant(i64, u)), u, u == 0)
        done = builder.mul(groups, ir.Constant(i64, PAIR_UNROLL))
        with cgutils.for_range(builder, builder.sub(nblk, done)) as loop:
            block(builder.add(done, loop.index), 0)
        totals = []
        for row_accs in accs:
            t = builder.load(row_accs[0])
            for a_ in row_accs[1:]:
                t = builder.fadd(t, builder.load(a_))
            totals.append(t)
        return context.make_tuple(builder, signature.return_type, lane_sums(builder, totals))

    return sig, codegen


# The bitmask products (kernels.py re-exports them). Same conventions as the other products there.
@njit(**_OPTS)
def bitmask_gemv(rowptr, masks, vals, x, bias, out, acc):
    """Rows in pairs (bitmask_dot2), a last odd row alone (bitmask_dot)."""
    n = rowptr.shape[0] - 1
    nblk = masks.shape[0] // n if n else 0
    has_bias = bias.shape[0] == n
    for p in prange((n + 1) // 2):
        r = 2 * p
        if r + 1 < n:
            s0, s1 = bitmask_dot2(vals, masks, x, rowptr[r], rowptr[r + 1], r * nblk, nblk)
            _put(out, r, s0, bias, has_bias, acc)
            _put(out, r + 1, s1, bias, has_bias, acc)
        else:
            _put(out, r, bitmask_dot(vals, masks, x, rowptr[r], r * nblk, nblk), bias, has_bias, acc)


@njit(**_OPTS)
def bitmask_gemm(rowptr, masks, vals, X, bias, Y, acc):
    """Row by row, every token: a row's values and masks stay in L1 while the L tokens reuse them."""
    n = rowptr.shape[0] - 1
    L = X.shape[0]
    nblk = masks.shape[0] // n if n else 0
    has_bias = bias.shape[0] == n
    for r in prange(n):
        for l in range(L):
            t = bitmask_dot(vals, masks, X[l], rowptr[r], r * nblk, nblk)
            if has_bias:
                t += bias[r]
            if acc:
                Y[l, r] += t
            else:
                Y[l, r] = t



# X [L, in] -> Y [L, out]; same acc/bias convention.


def _bitmask_rows(T: int):
    def typer(typingctx, vals, masks, x, voff, mstart, nblk, l0):
        """(bitmask_dot(vals, masks, x[l], voff, mstart, nblk) for l in l0 .. l0 + T - 1): each block's values
        expanded once (one vexpandps) and FMA'd into the T rows' masked loads, one accumulator per row, then one
        transposed lane tree (simd_rows.lane_sums)."""
        if not (isinstance(vals, types.Array) and vals.dtype == types.float32 and isinstance(masks, types.Array)
                and masks.dtype == types.uint16 and isinstance(x, types.Array) and x.dtype == types.float32
                and x.ndim == 2 and x.layout == "C"):
            return None
        sig = types.UniTuple(types.float32, T)(vals, masks, x, types.int64, types.int64, types.int64, types.int64)

        def codegen(context, builder, signature, args):
            i64, i32 = ir.IntType(64), ir.IntType(32)
            va, ma, xa = _made(context, builder, signature, args)
            nblk, l0 = args[5], args[6]
            xs = cgutils.unpack_tuple(builder, xa.shape, 2)[1]
            expanded, mload, fma, zero = _expanded_blocks(builder, va, ma, args[3], args[4])
            accs = [cgutils.alloca_once_value(builder, zero) for _ in range(T)]
            rows = [builder.gep(xa.data, [builder.mul(builder.add(l0, ir.Constant(i64, t)), xs)]) for t in range(T)]
            with cgutils.for_range(builder, nblk) as loop:
                b = loop.index
                v, mvec = expanded(b)
                col = builder.mul(b, ir.Constant(i64, LANES))
                for t in range(T):
                    xv = builder.call(mload, [builder.gep(rows[t], [col]), ir.Constant(i32, 4), mvec, zero])
                    builder.store(builder.call(fma, [v, xv, builder.load(accs[t])]), accs[t])
            sums = lane_sums(builder, [builder.load(a) for a in accs])
            return context.make_tuple(builder, signature.return_type, sums)

        return sig, codegen

    typer.__name__ = f"bitmask_dot_rows{T}"
    return intrinsic(typer)


bitmask_dot_rows8, bitmask_dot_rows4, bitmask_dot_rows2 = _bitmask_rows(8), _bitmask_rows(4), _bitmask_rows(2)


@njit(cache=True, nogil=True, inline="always")
def _put_rows(Y, l, r, s, b, has_bias, acc):
    for i in range(len(s)):
        t = s[i] + b if has_bias else s[i]
        if acc:
            Y[l + i, r] += t
        else:
            Y[l + i, r] = t


@njit(**_OPTS)
def bitmask_gemm_rows(rowptr, masks, vals, X, bias, Y, acc):
    """X [L, in] (C-contiguous) -> Y [L, out] for a batched step's few rows, on the bitmask format itself: per
    weight row, tiles of 8, 4, 2 rows (bitmask_dot_rows*: a block's values expanded once for the tile's rows),
    a last row alone (bitmask_dot). Reads a stored weight's 4 value bytes + 1/8 mask byte once per step, where
    the row-tiled CSR product (simd_rows) reads its CSR twin's 6."""
    n = rowptr.shape[0] - 1
    L = X.shape[0]
    nblk = masks.shape[0] // n if n else 0
    has_bias = bias.shape[0] == n
    for r in prange(n):
        b = bias[r] if has_bias else np.float32(0.0)
        lo = rowptr[r]
        ms = r * nblk
        l = 0
        while l + 8 <= L:
            _put_rows(Y, l, r, bitmask_dot_rows8(vals, masks, X, lo, ms, nblk, l), b, has_bias, acc)
            l += 8
        if l + 4 <= L:
            _put_rows(Y, l, r, bitmask_dot_rows4(vals, masks, X, lo, ms, nblk, l), b, has_bias, acc)
            l += 4
        if l + 2 <= L:
            _put_rows(Y, l, r, bitmask_dot_rows2(vals, masks, X, lo, ms, nblk, l), b, has_bias, acc)
            l += 2
        if l < L:
            t = bitmask_dot(vals, masks, X[l], lo, ms, nblk)
            _put_rows(Y, l, r, (t,), b, has_bias, acc)
