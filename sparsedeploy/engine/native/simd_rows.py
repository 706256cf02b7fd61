"""Row-tiled sparse products for batched steps: Y [L, out] = X [L, in] W^T with W stored as CSR (or ELL), each
stored weight loaded once and multiplied into 8 rows of X at a time.

X comes transposed, Xt [in, Lp] (Lp = L rounded up to 8, the padding zero), so the 8 rows' inputs at one
column are 8 contiguous floats (64 rows at a time while 64 are left: four 16-float vectors per stored weight, then 16, then 8): per stored weight the inner loop is one broadcast, one 8-wide load and one
FMA, written as LLVM IR through `@intrinsic` (`csr_dot8`) because plain numba loops keep it scalar (8 separate
loads and FMAs: measured as slow per row as the batch-1 gather loop). Four accumulators take turns (one chain
of dependent FMAs would bound the loop), summed in a fixed order at the end. A weight's index and value bytes
are thus read once per 8 rows instead of once per row, which is where a batched decode step saves over B
batch-1 steps on the sparse formats. Same output conventions as kernels.py (bias, acc).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

TILE = 8
UNROLL = 4
_OPTS = dict(parallel=True, fastmath=True, cache=True, nogil=True)


def _dot_codegen(width: int, tiles: int = 1, chains: int = UNROLL):
    """Per stored weight j in [lo, hi): its value broadcast once into `tiles` consecutive vectors of `width`
    rows (an FMA each, against xt's `width` floats at column cols[j]); `chains` consecutive weights take turns on
    separate accumulators (one chain of dependent FMAs would bound the loop), summed in a fixed order."""
    def codegen(context, builder, signature, args):
        f32, i64, i32 = ir.FloatType(), ir.IntType(64), ir.IntType(32)
        vt = ir.VectorType(f32, width)
        va = context.make_array(signature.args[0])(context, builder, args[0])
        ca = context.make_array(signature.args[1])(context, builder, args[1])
        xa = context.make_array(signature.args[2])(context, builder, args[2])
        lo, hi, lp, t = args[3], args[4], args[5], args[6]
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt, vt, vt]), f"llvm.fma.v{width}f32")
        zero = ir.Constant(vt, [0.0] * width)
        accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(tiles)] for _ in range(chains)]
        vptr = vt.as_pointer()

        def one(j, accrow):
            v = builder.load(builder.gep(va.data, [j]))
            c = builder.zext(builder.load(builder.gep(ca.data, [j])), i64)
            base = builder.add(builder.mul(c, lp), t)
            vv = builder.insert_element(ir.Constant(vt, ir.Undefined), v, ir.Constant(i32, 0))
            vv = builder.shuffle_vector(vv, vv, ir.Constant(ir.VectorType(i32, width), [0] * width))
            for k in range(tiles):
                p = builder.gep(xa.data, [builder.add(base, ir.Constant(i64, k * width))])
                xv = builder.load(builder.bitcast(p, vptr), align=4)
                builder.store(builder.call(fma, [vv, xv, builder.load(accrow[k])]), accrow[k])

        n = builder.sub(hi, lo)
        groups = builder.udiv(n, ir.Constant(i64, chains))
        with cgutils.for_range(builder, groups) as loop:
            first = builder.add(lo, builder.mul(loop.index, ir.Constant(i64, chains)))
            for u in range(chains):
                one(builder.add(first, ir.Constant(i64, u)), accs[u])
        rest = builder.add(lo, builder.mul(groups, ir.Constant(i64, chains)))
        with cgutils.for_range(builder, builder.sub(hi, rest)) as loop:
            one(builder.add(rest, loop.index), accs[0])
        lanes = []
        for k in range(tiles):                  # pairwise: ((a0 + a1) + (a2 + a3)) for 4 chains
            part = [builder.load(accs[u][k]) for u in range(chains)]
            while len(part) > 1:
                part = [builder.fadd(part[i], part[i + 1]) for i in range(0, len(part), 2)]
            total = part[0]
            lanes += [builder.extract_element(total, ir.Constant(i32, i)) for i in range(width)]
        return context.make_tuple(builder, signature.return_type, lanes)

    return codegen


def _typed(vals, cols, xt) -> bool:
    return (isinstance(vals, types.Array) and vals.dtype == types.float32 and isinstance(cols, types.Array)
            and cols.dtype in (types.uint16, types.uint32) and isinstance(xt, types.Array)
            and xt.dtype == types.float32)


WIDE = 4 * 2 * TILE          # rows per csr_dot64 call


@intrinsic
def csr_dot64(typingctx, vals, cols, xt, lo, hi, lp, t):
    """As csr_dot16 for 64 rows (four 16-row vectors per stored weight, two weights in turn: 8 FMA chains):
    prompt chunks."""
    if not _typed(vals, cols, xt):
        return None
    sig = types.UniTuple(types.float32, WIDE)(vals, cols, xt, types.uint64, types.uint64, types.uint64, types.uint64)
    return sig, _dot_codegen(2 * TILE, tiles=4, chains=2)


@intrinsic
def csr_dot8(typingctx, vals, cols, xt, lo, hi, lp, t):
    """(sum_j vals[j] * xt.flat[cols[j] * lp + t + i] for j in [lo, hi)) for i < 8, as a tuple of 8 float32."""
    if not _typed(vals, cols, xt):
        return None
    sig = types.UniTuple(types.float32, TILE)(vals, cols, xt, types.uint64, types.uint64, types.uint64, types.uint64)
    return sig, _dot_codegen(TILE)


@intrinsic
def csr_dot16(typingctx, vals, cols, xt, lo, hi, lp, t):
    """As csr_dot8 for 16 rows (one AVX-512 vector; two AVX2 ones elsewhere): prefill chunks and big batches."""
    if not _typed(vals, cols, xt):
        return None
    sig = types.UniTuple(types.float32, 2 * TILE)(vals, cols, xt, types.uint64, types.uint64, types.uint64, types.uint64)
    return sig, _dot_codegen(2 * TILE)


@njit(cache=True, nogil=True, inline="always")
def _put8(Y, t, r, s, b, acc):
    L = np.uint64(Y.shape[0])
    for i in range(len(s)):
        l = t + np.uint64(i)
        if l < L:
            if acc:
                Y[l, r] += s[i] + b
            else:
                Y[l, r] = s[i] + b


@njit(cache=True, nogil=True, inline="always")
def _tiles(vals, cols, Xt, lo, hi, Lp, Y, r, b, acc):
    """Weight row r (stored weights [lo, hi)) into every row of Y: 64 rows at a time, then 16, then 8."""
    t = np.uint64(0)
    while t + np.uint64(WIDE) <= Lp:
        _put8(Y, t, r, csr_dot64(vals, cols, Xt, lo, hi, Lp, t), b, acc)
        t += np.uint64(WIDE)
    while t + np.uint64(2 * TILE) <= Lp:
        _put8(Y, t, r, csr_dot16(vals, cols, Xt, lo, hi, Lp, t), b, acc)
        t += np.uint64(2 * TILE)
    if t < Lp:
        _put8(Y, t, r, csr_dot8(vals, cols, Xt, lo, hi, Lp, t), b, acc)


@njit(**_OPTS)
def csr_gemm_t(rowptr, cols, vals, Xt, bias, Y, acc):
    """Xt [in, Lp] (X transposed, Lp a multiple of 8, padding zero) -> Y [L, out]; W as CSR."""
    n = rowptr.shape[0] - 1
    Lp = np.uint64(Xt.shape[1])
    has_bias = bias.shape[0] == n
    for r in prange(n):
        b = bias[r] if has_bias else np.float32(0.0)
        _tiles(vals, cols, Xt, np.uint64(rowptr[r]), np.uint64(rowptr[r + 1]), Lp, Y, r, b, acc)


@njit(**_OPTS)
def ell_gemm_t(cols, vals, Xt, bias, Y, acc):
    """As csr_gemm_t with W as ELL (cols/vals [out, k])."""
    n, k = vals.shape
    Lp = np.uint64(Xt.shape[1])
    has_bias = bias.shape[0] == n
    cf = cols.reshape(-1)
    vf = vals.reshape(-1)
    for r in prange(n):
        b = bias[r] if has_bias else np.float32(0.0)
        lo = np.uint64(r) * np.uint64(k)
        _tiles(vf, cf, Xt, lo, lo + np.uint64(k), Lp, Y, r, b, acc)


@njit(cache=True, nogil=True, inline="always")
def _put1(Y, l, r, s, b, has_bias, acc):
    if has_bias:
        s += b
    if acc:
        Y[l, r] += s
    else:
        Y[l, r] = s


@njit(**_OPTS)
def dense_gemm_rows(W, X, bias, Y, acc):
    """X [L, in] -> Y [L, out] with W dense [out, in]: each weight row, loaded once, is multiplied into the rows of
    X four at a time (four reductions over the same weight vector: one weight load per four FMAs) while it sits
    in L1. numpy's matmul would be faster alone, but its BLAS threads compete with numba's for the same cores."""
    n, m = W.shape
    L = X.shape[0]
    has_bias = bias.shape[0] == n
    for r in prange(n):
        b = bias[r] if has_bias else np.float32(0.0)
        l = 0
        while l + 4 <= L:
            s0 = s1 = s2 = s3 = np.float32(0.0)
            for j in range(m):
                w = W[r, j]
                s0 += w * X[l, j]
                s1 += w * X[l + 1, j]
                s2 += w * X[l + 2, j]
                s3 += w * X[l + 3, j]
            _put1(Y, l, r, s0, b, has_bias, acc)
            _put1(Y, l + 1, r, s1, b, has_bias, acc)
            _put1(Y, l + 2, r, s2, b, has_bias, acc)
            _put1(Y, l + 3, r, s3, b, has_bias, acc)
            l += 4
        while l < L:
            s0 = np.float32(0.0)
            for j in range(m):
                s0 += W[r, j] * X[l, j]
            _put1(Y, l, r, s0, b, has_bias, acc)
            l += 1
