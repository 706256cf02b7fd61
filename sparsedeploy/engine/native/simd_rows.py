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


def lane_sums(builder, vecs: list) -> list:
    """The horizontal sums of len(vecs) (a power of two, <= 16) <16 x float> vectors by pairwise trees, two
    vectors at a time: the even lanes of x || y plus their odd lanes hold x's and y's next level side by side
    (one shuffle pair and one add for both); when one vector is left, itself. About 3 vector operations per
    vector instead of 15 extracts and 15 scalar adds each."""
    i32 = ir.IntType(32)
    V = list(vecs)
    while len(V) > 1:
        ev = ir.Constant(ir.VectorType(i32, 16), list(range(0, 32, 2)))
        od = ir.Constant(ir.VectorType(i32, 16), list(range(1, 32, 2)))
        V = [builder.fadd(builder.shuffle_vector(V[i], V[i + 1], ev), builder.shuffle_vector(V[i], V[i + 1], od))
             for i in range(0, len(V), 2)]
    v, n = V[0], 16
    while n > len(vecs):
        ev = ir.Constant(ir.VectorType(i32, n // 2), list(range(0, n, 2)))
        od = ir.Constant(ir.VectorType(i32, n // 2), list(range(1, n, 2)))
        v = builder.fadd(builder.shuffle_vector(v, v, ev), builder.shuffle_vector(v, v, od))
        n //= 2
    return [builder.extract_element(v, ir.Constant(i32, t)) for t in range(len(vecs))]


def _dense_rows(T: int):
    def typer(typingctx, w, r, x, l0):
        """(sum_j w[r, j] * x[l, j] for l in l0 .. l0 + T - 1): each 16-float chunk of the weight row loaded
        once and FMA'd into the T rows' accumulators (the last partial chunk by masked loads), then one
        transposed lane tree (lane_sums)."""
        ok = all(isinstance(a, types.Array) and a.dtype == types.float32 and a.ndim == 2 and a.layout == "C"
                 for a in (w, x))
        if not ok:
            return None
        sig = types.UniTuple(types.float32, T)(w, types.int64, x, types.int64)

        def codegen(context, builder, signature, args):
            f32, i64, i32 = ir.FloatType(), ir.IntType(64), ir.IntType(32)
            v16 = ir.VectorType(f32, 16)
            m16 = ir.VectorType(ir.IntType(1), 16)
            wa = context.make_array(signature.args[0])(context, builder, args[0])
            xa = context.make_array(signature.args[2])(context, builder, args[2])
            m = cgutils.unpack_tuple(builder, wa.shape, 2)[1]
            xs = cgutils.unpack_tuple(builder, xa.shape, 2)[1]
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [v16, v16, v16]), "llvm.fma.v16f32")
            mload = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [v16.as_pointer(), i32, m16, v16]),
                                                   "llvm.masked.load.v16f32.p0")
            zero = ir.Constant(v16, [0.0] * 16)
            accs = [cgutils.alloca_once_value(builder, zero) for _ in range(T)]
            wrow = builder.gep(wa.data, [builder.mul(args[1], m)])
            xrows = [builder.gep(xa.data, [builder.mul(builder.add(args[3], ir.Constant(i64, t)), xs)]) for t in range(T)]

            def chunk(j, load):
                wv = load(builder.gep(wrow, [j]))
                for t in range(T):
                    builder.store(builder.call(fma, [wv, load(builder.gep(xrows[t], [j])), builder.load(accs[t])]), accs[t])

            full = builder.udiv(m, ir.Constant(i64, 16))
            with cgutils.for_range(builder, full) as loop:
                chunk(builder.mul(loop.index, ir.Constant(i64, 16)),
                      lambda p: builder.load(builder.bitcast(p, v16.as_pointer()), align=4))
            rem = builder.sub(m, builder.mul(full, ir.Constant(i64, 16)))
            with builder.if_then(builder.icmp_unsigned(">", rem, ir.Constant(i64, 0))):
                lanes = ir.Constant(ir.VectorType(i64, 16), list(range(16)))
                splat = builder.shuffle_vector(builder.insert_element(ir.Constant(ir.VectorType(i64, 16), ir.Undefined), rem,
                                                                      ir.Constant(i32, 0)),
                                               ir.Constant(ir.VectorType(i64, 16), ir.Undefined),
                                               ir.Constant(ir.VectorType(i32, 16), [0] * 16))
                mk = builder.icmp_unsigned("<", lanes, splat)
                chunk(builder.mul(full, ir.Constant(i64, 16)),
                      lambda p: builder.call(mload, [builder.bitcast(p, v16.as_pointer()), ir.Constant(i32, 4), mk, zero]))
            sums = lane_sums(builder, [builder.load(a) for a in accs])
            return context.make_tuple(builder, signature.return_type, sums)

        return sig, codegen

    typer.__name__ = f"dense_dot_rows{T}"
    return intrinsic(typer)


dense_dot_rows8, dense_dot_rows4, dense_dot_rows2, dense_dot_rows1 = (_dense_rows(8), _dense_rows(4), _dense_rows(2),
                                                                      _dense_rows(1))


@njit(cache=True, nogil=True, inline="always")
def _put_tile(Y, l, r, s, b, has_bias, acc):
    for i in range(len(s)):
        _put1(Y, l + i, r, s[i], b, has_bias, acc)


@njit(**_OPTS)
def dense_gemm_rows(W, X, bias, Y, acc):
    """X [L, in] -> Y [L, out] with W dense [out, in] (both C-contiguous): each weight row, loaded once, is
    multiplied into the rows of X eight at a time (dense_dot_rows8: one weight load per eight FMAs; a large W
    such as a tied lm_head streams from memory once per 8 rows), then 4, 2, 1. numpy's matmul would be faster
    alone, but its BLAS threads compete with numba's for the same cores (single-threaded it measured slower:
    21 ms for 8 rows of SmolLM2's 49152 x 576 head, AMD EPYC)."""
    n = W.shape[0]
    L = X.shape[0]
    has_bias = bias.shape[0] == n
    for r in prange(n):
        b = bias[r] if has_bias else np.float32(0.0)
        l = 0
        while l + 8 <= L:
            _put_tile(Y, l, r, dense_dot_rows8(W, r, X, l), b, has_bias, acc)
            l += 8
        if l + 4 <= L:
            _put_tile(Y, l, r, dense_dot_rows4(W, r, X, l), b, has_bias, acc)
            l += 4
        if l + 2 <= L:
            _put_tile(Y, l, r, dense_dot_rows2(W, r, X, l), b, has_bias, acc)
            l += 2
        if l < L:
            _put_tile(Y, l, r, dense_dot_rows1(W, r, X, l), b, has_bias, acc)
