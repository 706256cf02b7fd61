"""Row-tiled sparse products for batched steps: Y [L, out] = X [L, in] W^T with W stored as CSR (or ELL), each
stored weight loaded once and multiplied into 8 rows of X at a time.

X comes transposed, Xt [in, Lp] (Lp = L rounded up to 8, the padding zero), so the 8 rows' inputs at one
column are 8 contiguous floats (64 rows at a time while 64 are left: four 16-float vectors per stored weight, then 16, then 8): per stored weight the inner loop is one broadcast, one 8-wide load and one
FMA, written as LLVM IR through `@intrinsic` (`csr_dot8`) because plain numba loops keep it scalar (8 separate
loads and FMAs: measured as slow per row as the batch-1 gather loop). Four accumulators take turns (one chain
of dependent FMAs would bound the loop), summed in a fixed order at the end. A weight's index and value bytes
are thus read once per 8 rows instead of once per row, which is where a batched decode step saves over B
batch-1 steps on the sparse formats. Same output conventions as kernels.py (bias, acc).

Prompt chunks of groups at most model.PANEL_IN_MAX wide run `csr_gemm_panels` instead: the input columns in
panels of 128 (a panel of X transposed, 128 x 64 rows, is 32 KiB: an L1 data cache), each thread walking its
weight rows panel by panel over a panel-major copy of the weights (`panel_major`: a thread's weights of one
panel lie one after another, so the walk streams them instead of hopping between rows). `dense_dot_rows*`
(a dense row against up to 8 rows, one transposed lane tree `lane_sums` for the 8 sums) scores cached keys in
kernels.attention_rows. (Every @intrinsic a kernel here inlines stays in this file: numba's on-disk cache of a
kernel is stamped by its own source file only.)
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

TILE = 8
UNROLL = 4
# How far ahead of a row's weight stream the single-token kernels (simd.bitmask_dot, lowbit's and int4's block
# kernels) prefetch. Intel's hardware stream prefetchers stop at each 4 KiB page and restart slowly; on a 2-core
# Intel Xeon (Sapphire/Emerald Rapids VM) the fp32 bitmask product at 7B shapes, cold, took 1.3-1.7x longer
# without it (4096x4096 at 70%: 1.70 -> 1.02 ms; 1024 or 2048 floats ahead measured alike, 256 worse).
# (A change here reaches the kernels that inline `prefetch` only once their own source files change: numba
# stamps its on-disk cache by a kernel's file.)
PREFETCH_BYTES = 4096
_OPTS = dict(parallel=True, fastmath=True, cache=True, nogil=True)


def _chained(builder, lo, hi, chains: int, one, accs) -> None:
    """one(j, accs[j's chain]) for every stored weight j in [lo, hi): `chains` consecutive weights take turns on
    their own accumulators (one chain of dependent FMAs would bound the loop), the remainder on the first."""
    i64 = ir.IntType(64)
    groups = builder.udiv(builder.sub(hi, lo), ir.Constant(i64, chains))
    with cgutils.for_range(builder, groups) as loop:
        first = builder.add(lo, builder.mul(loop.index, ir.Constant(i64, chains)))
        for u in range(chains):
            one(builder.add(first, ir.Constant(i64, u)), accs[u])
    rest = builder.add(lo, builder.mul(groups, ir.Constant(i64, chains)))
    with cgutils.for_range(builder, builder.sub(hi, rest)) as loop:
        one(builder.add(rest, loop.index), accs[0])


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

        _chained(builder, lo, hi, chains, one, accs)
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


@njit(cache=True, nogil=True)
def transpose_into(X, Xt):
    """Xt[:, :L] = X.T (X [L, m]) in blocks of 16 columns."""
    L, m = X.shape
    for c0 in range(0, m, 16):
        c1 = min(c0 + 16, m)
        for l in range(L):
            for c in range(c0, c1):
                Xt[c, l] = X[l, c]


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
def _put(out, r, s, bias, has_bias, acc):
    """out[r] = (or +=) s + bias[r]: every GEMV's output convention (kernels.py)."""
    if has_bias:
        s += bias[r]
    if acc:
        out[r] += s
    else:
        out[r] = s


@njit(cache=True, nogil=True, inline="always")
def _put1(Y, l, r, s, b, has_bias, acc):
    if has_bias:
        s += b
    if acc:
        Y[l, r] += s
    else:
        Y[l, r] = s


def prefetch(builder, base, index) -> None:
    """A read prefetch (into every cache level) of base[index], base a typed pointer: only a hint, so an
    address past the array's end is harmless (it never faults)."""
    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                        "llvm.prefetch.p0")
    builder.call(fn, [builder.bitcast(builder.gep(base, [index]), i8p), ir.Constant(i32, 0), ir.Constant(i32, 3),
                      ir.Constant(i32, 1)])


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


def _dense_tile(RW: int, T: int, name: str, ahead: int = 0):
    def typer(typingctx, w, r, x, l0):
        """(sum_j w[r + i, j] * x[l, j] for i < RW for l in l0 .. l0 + T - 1), weight row by weight row: each
        16-float chunk of the RW weight rows and of the T rows of x loaded once, RW x T FMAs (the last partial
        chunk by masked loads), one accumulator per pair, then one transposed lane tree (lane_sums).
        RW = 1: attention_rows (kernels.py) scores a cached key row against up to 8 queries; RW x T = 16:
        dense_gemm_rows' register tiles (RW + T loads per RW x T FMAs instead of 1 + T per T), which also
        prefetch (into L2) each weight chunk's twin `ahead` weight rows further on: the tiles walk a block's rows
        a few at a time, where the hardware's stream prefetchers expect one sequential stream."""
        ok = all(isinstance(a, types.Array) and a.dtype == types.float32 and a.ndim == 2 and a.layout == "C"
                 for a in (w, x))
        if not ok:
            return None
        sig = types.UniTuple(types.float32, RW * T)(w, types.int64, x, types.int64)

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
            i8p = ir.IntType(8).as_pointer()
            prefetch = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                                      "llvm.prefetch.p0")
            zero = ir.Constant(v16, [0.0] * 16)
            far = builder.mul(m, ir.Constant(i64, ahead))
            accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(T)] for _ in range(RW)]
            wrows = [builder.gep(wa.data, [builder.mul(builder.add(args[1], ir.Constant(i64, i)), m)]) for i in range(RW)]
            xrows = [builder.gep(xa.data, [builder.mul(builder.add(args[3], ir.Constant(i64, t)), xs)]) for t in range(T)]

            def chunk(j, load):
                wv = [load(builder.gep(wrows[i], [j])) for i in range(RW)]
                for i in range(RW if ahead else 0):
                    builder.call(prefetch, [builder.bitcast(builder.gep(wrows[i], [builder.add(j, far)]), i8p),
                                            ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
                for t in range(T):
                    xv = load(builder.gep(xrows[t], [j]))
                    for i in range(RW):
                        builder.store(builder.call(fma, [wv[i], xv, builder.load(accs[i][t])]), accs[i][t])

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
            sums = []
            flat = [builder.load(accs[i][t]) for i in range(RW) for t in range(T)]
            for k in range(0, len(flat), 16):
                part = flat[k:k + 16]
                n = len(part)
                while n & (n - 1):                       # lane_sums takes a power of two: zero vectors pad it
                    part.append(zero)
                    n += 1
                sums += lane_sums(builder, part)[:min(16, len(flat) - k)]
            return context.make_tuple(builder, signature.return_type, sums)

        return sig, codegen

    typer.__name__ = name
    return intrinsic(typer)


dense_dot_rows8, dense_dot_rows4, dense_dot_rows2, dense_dot_rows1 = (
    _dense_tile(1, 8, "dense_dot_rows8"), _dense_tile(1, 4, "dense_dot_rows4"), _dense_tile(1, 2, "dense_dot_rows2"),
    _dense_tile(1, 1, "dense_dot_rows1"))
dense_tile2x8, dense_tile4x4, dense_tile8x2, dense_tile16x1 = (
    _dense_tile(2, 8, "dense_tile2x8", 16), _dense_tile(4, 4, "dense_tile4x4", 16), _dense_tile(8, 2, "dense_tile8x2", 16),
    _dense_tile(16, 1, "dense_tile16x1", 16))
DENSE_BLOCK = 16     # weight rows per dense_gemm_rows work item (= the tiles' prefetch distance in weight rows)
# attention scores (kernels.attention_rows): 4 cached key rows x up to 4 queries per call
key_tile4x4, key_tile4x3, key_tile4x2, key_tile4x1 = (_dense_tile(4, 4, "key_tile4x4"), _dense_tile(4, 3, "key_tile4x3"),
                                                      _dense_tile(4, 2, "key_tile4x2"), _dense_tile(4, 1, "key_tile4x1"))


def _pv_tile(T: int):
    def typer(typingctx, sc, q0, v, d0, nc, tn, o, o0):
        """o[o0 + k, d0 : d0 + 16 nc] = sum_{t < tn} sc[q0 + k, t] * v[t, d0 : d0 + 16 nc] for k < T, nc <= 4
        (16-column chunks): the T x nc accumulators stay in registers over t (each value chunk loaded once for
        the T queries, each weight broadcast once), summed in t order. attention_rows' weighted sums of values."""
        ok = all(isinstance(a, types.Array) and a.dtype == types.float32 and a.ndim == 2 and a.layout == "C"
                 for a in (sc, v, o))
        if not ok:
            return None
        sig = types.void(sc, types.int64, v, types.int64, types.int64, types.int64, o, types.int64)

        def codegen(context, builder, signature, args):
            f32, i64 = ir.FloatType(), ir.IntType(64)
            i32 = ir.IntType(32)
            v16 = ir.VectorType(f32, 16)
            sa = context.make_array(signature.args[0])(context, builder, args[0])
            va = context.make_array(signature.args[2])(context, builder, args[2])
            oa = context.make_array(signature.args[6])(context, builder, args[6])
            q0, d0, nc, tn, o0 = args[1], args[3], args[4], args[5], args[7]
            ss = cgutils.unpack_tuple(builder, sa.shape, 2)[1]
            vs = cgutils.unpack_tuple(builder, va.shape, 2)[1]
            os_ = cgutils.unpack_tuple(builder, oa.shape, 2)[1]
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [v16, v16, v16]), "llvm.fma.v16f32")
            zero = ir.Constant(v16, [0.0] * 16)
            vptr = v16.as_pointer()
            srows = [builder.gep(sa.data, [builder.mul(builder.add(q0, ir.Constant(i64, k)), ss)]) for k in range(T)]
            for ncs in (4, 3, 2, 1):                       # one loop per chunk count: straight-line bodies
                with builder.if_then(builder.icmp_signed("==", nc, ir.Constant(i64, ncs))):
                    accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(ncs)] for _ in range(T)]
                    with cgutils.for_range(builder, tn) as loop:
                        t = loop.index
                        vrow = builder.gep(va.data, [builder.add(builder.mul(t, vs), d0)])
                        vv = [builder.load(builder.gep(builder.bitcast(vrow, vptr), [ir.Constant(i64, c)]), align=4)
                              for c in range(ncs)]
                        for k in range(T):
                            w = builder.load(builder.gep(srows[k], [t]))
                            wv = builder.insert_element(ir.Constant(v16, ir.Undefined), w, ir.Constant(i32, 0))
                            wv = builder.shuffle_vector(wv, wv, ir.Constant(ir.VectorType(i32, 16), [0] * 16))
                            for c in range(ncs):
                                builder.store(builder.call(fma, [wv, vv[c], builder.load(accs[k][c])]), accs[k][c])
                    for k in range(T):
                        orow = builder.gep(oa.data, [builder.add(builder.mul(builder.add(o0, ir.Constant(i64, k)), os_), d0)])
                        for c in range(ncs):
                            builder.store(builder.load(accs[k][c]),
                                          builder.gep(builder.bitcast(orow, vptr), [ir.Constant(i64, c)]), align=4)
            return context.get_dummy_value()

        return sig, codegen

    typer.__name__ = f"pv_tile{T}"
    return intrinsic(typer)


pv_tile4, pv_tile3, pv_tile2, pv_tile1 = _pv_tile(4), _pv_tile(3), _pv_tile(2), _pv_tile(1)


@njit(cache=True, nogil=True, inline="always")
def _put_tile(Y, l, r, s, T, b, has_bias, acc):
    """s: a tile's sums, weight row by weight row (T rows of Y each) -> Y[l + t, r + i]."""
    for k in range(len(s)):
        i = k // T
        t = k - i * T
        v = s[k] + b[r + i] if has_bias else s[k]
        if acc:
            Y[l + t, r + i] += v
        else:
            Y[l + t, r + i] = v


@njit(**_OPTS)
def dense_gemm_rows(W, X, bias, Y, acc):
    """X [L, in] (C-contiguous) -> Y [L, out] with W dense [out, in] (C-contiguous), in register tiles: each
    work item is a block of 16 weight rows, multiplied into 8 rows of X at a time as 2 x 8 tiles (dense_tile2x8:
    per 16 columns 2 + 8 vector loads for 16 FMAs, where one weight row against 8 rows of X needs 9 loads for
    8), then 4 rows as 4 x 4 tiles, 2 as 8 x 2, 1 as 16 x 1; rows past the last full block one weight row at a
    time. The weights of a block are read from memory once per call (a tied lm_head larger than the caches
    streams once per step) and from L1/L2 by the further row tiles. numpy's matmul would compete with numba's
    threads for the same cores (and single-threaded it measured slower: 21 ms for 8 rows of SmolLM2's
    49152 x 576 head)."""
    n, m = W.shape
    L = X.shape[0]
    has_bias = bias.shape[0] == n
    nb = n // DENSE_BLOCK
    for blk in prange(nb + 1):
        r0 = blk * DENSE_BLOCK
        if blk < nb:
            l = 0
            while l + 8 <= L:
                for i in range(0, DENSE_BLOCK, 2):
                    _put_tile(Y, l, r0 + i, dense_tile2x8(W, r0 + i, X, l), 8, bias, has_bias, acc)
                l += 8
            if l + 4 <= L:
                for i in range(0, DENSE_BLOCK, 4):
                    _put_tile(Y, l, r0 + i, dense_tile4x4(W, r0 + i, X, l), 4, bias, has_bias, acc)
                l += 4
            if l + 2 <= L:
                for i in range(0, DENSE_BLOCK, 8):
                    _put_tile(Y, l, r0 + i, dense_tile8x2(W, r0 + i, X, l), 2, bias, has_bias, acc)
                l += 2
            if l < L:
                _put_tile(Y, l, r0, dense_tile16x1(W, r0, X, l), 1, bias, has_bias, acc)
        else:
            for r in range(r0, n):
                l = 0
                while l + 8 <= L:
                    _put_tile(Y, l, r, dense_dot_rows8(W, r, X, l), 8, bias, has_bias, acc)
                    l += 8
                if l + 4 <= L:
                    _put_tile(Y, l, r, dense_dot_rows4(W, r, X, l), 4, bias, has_bias, acc)
                    l += 4
                if l + 2 <= L:
                    _put_tile(Y, l, r, dense_dot_rows2(W, r, X, l), 2, bias, has_bias, acc)
                    l += 2
                if l < L:
                    _put_tile(Y, l, r, dense_dot_rows1(W, r, X, l), 1, bias, has_bias, acc)


# ----------------------------------------------------------------------------- prompt chunks: column panels
PANEL = 128          # input columns per panel: 128 x 64 rows x 4 bytes = 32 KiB of X, an L1 data cache
PANEL_ROWS = 80      # rows per csr_gemm_panels call (five 16-float vectors per stored weight)


def _panel_codegen(nvec: int, chains: int):
    """Stored weights j in [lo, hi) of one weight row and panel into yt's row r (nvec 16-float vectors,
    loaded first and stored back): per weight its value broadcast once and FMA'd into the nvec vectors of
    xt's row cols[j] (xt [in, 16 nvec]); `chains` consecutive weights take turns on separate accumulators."""
    def codegen(context, builder, signature, args):
        f32, i64, i32 = ir.FloatType(), ir.IntType(64), ir.IntType(32)
        vt = ir.VectorType(f32, 16)
        va = context.make_array(signature.args[0])(context, builder, args[0])
        ca = context.make_array(signature.args[1])(context, builder, args[1])
        xa = context.make_array(signature.args[2])(context, builder, args[2])
        ya = context.make_array(signature.args[5])(context, builder, args[5])
        lo, hi, r = args[3], args[4], args[6]
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt, vt, vt]), "llvm.fma.v16f32")
        zero = ir.Constant(vt, [0.0] * 16)
        vptr = vt.as_pointer()
        xv0 = builder.bitcast(xa.data, vptr)
        yrow = builder.gep(builder.bitcast(ya.data, vptr), [builder.mul(r, ir.Constant(i64, nvec))])
        accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(nvec)] for _ in range(chains)]
        for k in range(nvec):
            builder.store(builder.load(builder.gep(yrow, [ir.Constant(i64, k)]), align=4), accs[0][k])
            for u in range(1, chains):
                builder.store(zero, accs[u][k])

        def one(j, acc):
            v = builder.load(builder.gep(va.data, [j]))
            c = builder.zext(builder.load(builder.gep(ca.data, [j])), i64)
            vv = builder.insert_element(ir.Constant(vt, ir.Undefined), v, ir.Constant(i32, 0))
            vv = builder.shuffle_vector(vv, vv, ir.Constant(ir.VectorType(i32, 16), [0] * 16))
            base = builder.mul(c, ir.Constant(i64, nvec))
            for k in range(nvec):
                xv = builder.load(builder.gep(xv0, [builder.add(base, ir.Constant(i64, k))]), align=4)
                builder.store(builder.call(fma, [vv, xv, builder.load(acc[k])]), acc[k])

        _chained(builder, lo, hi, chains, one, accs)
        for k in range(nvec):
            part = [builder.load(accs[u][k]) for u in range(chains)]
            while len(part) > 1:
                part = [builder.fadd(part[i], part[i + 1]) for i in range(0, len(part), 2)]
            builder.store(part[0], builder.gep(yrow, [ir.Constant(i64, k)]), align=4)
        return context.get_dummy_value()

    return codegen


def _panel_dot(nvec: int, chains: int):
    def typer(typingctx, vals, cols, xt, lo, hi, yt, r):
        """yt[r, :16 nvec] += sum_j vals[j] * xt[cols[j], :16 nvec] for j in [lo, hi) (xt, yt C-contiguous)."""
        if not (_typed(vals, cols, xt) and isinstance(yt, types.Array) and yt.dtype == types.float32
                and yt.layout == "C"):
            return None
        return types.void(vals, cols, xt, types.int64, types.int64, yt, types.int64), _panel_codegen(nvec, chains)

    typer.__name__ = f"panel_dot{nvec}"
    return intrinsic(typer)


panel_dot1, panel_dot2, panel_dot3, panel_dot4, panel_dot5 = (_panel_dot(1, 4), _panel_dot(2, 2), _panel_dot(3, 2),
                                                              _panel_dot(4, 2), _panel_dot(5, 2))


def panel_major(rowptr: np.ndarray, cols: np.ndarray, vals: np.ndarray, in_features: int):
    """(off, cols, vals): a CSR matrix's stored weights reordered panel by panel (columns PANEL p .. PANEL (p + 1)
    - 1), rows ascending within a panel and columns ascending within a row: row r's weights of panel p are
    [off[p * out + r], off[p * out + r + 1]) (off int64 [npanels * out + 1]). csr_gemm_panels walks each thread's
    rows one panel at a time; over row-major CSR that walk hops from row to row (a few cache lines each, a new
    stride every time, which the prefetchers do not follow), over this order it streams. Measured on AMD EPYC,
    2 threads, 64 rows, 30 distinct 3072 x 576 matrices at 60% (as a prompt chunk meets them: cold): 1.86 ms
    per matrix row-major against 1.25 panel-major; 576 x 1536: 0.84 against 0.51."""
    n = rowptr.shape[0] - 1
    npan = max(1, -(-int(in_features) // PANEL))
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(rowptr))
    key = cols.astype(np.int64) // PANEL * n + rows
    order = np.argsort(key, kind="stable")
    off = np.zeros(npan * n + 1, np.int64)
    np.cumsum(np.bincount(key, minlength=npan * n), out=off[1:])
    return off, np.ascontiguousarray(cols[order]), np.ascontiguousarray(vals[order])


@njit(**_OPTS)
def csr_gemm_panels(off, cols, vals, Xt, Yt, bias, Y, acc, nth):
    """Y [L, out] (+)= X W^T + bias for a prompt chunk (L <= PANEL_ROWS): Xt [in, 16 nvec] (X transposed,
    padding zero), Yt [out, 16 nvec] scratch; (off, cols, vals) from panel_major. Each thread takes a range of
    weight rows and walks the input columns panel by panel: while it works through its rows' weights of one panel, the
    panel's rows of Xt (PANEL x 16 nvec floats) stay in L1, where the whole Xt (in x 64 floats: 147 KiB at
    in = 576) would be read from L2 once per stored weight; partial sums wait in Yt's rows. Then Yt goes to
    Y in 16 x 16 blocks (one cache line of a Y row per 16 weight rows, not one per weight row and row of Y).
    nth: the number of row ranges (numba's thread count)."""
    n = Y.shape[1]
    npan = (off.shape[0] - 1) // n
    nvec = Xt.shape[1] // 16
    L = Y.shape[0]
    has_bias = bias.shape[0] == n
    for tid in prange(nth):
        r0 = n * tid // nth
        r1 = n * (tid + 1) // nth
        for r in range(r0, r1):
            for i in range(Yt.shape[1]):
                Yt[r, i] = 0
        for p in range(npan):
            for r in range(r0, r1):
                lo = off[p * n + r]
                hi = off[p * n + r + 1]
                if hi > lo:
                    if nvec == 4:
                        panel_dot4(vals, cols, Xt, lo, hi, Yt, r)
                    elif nvec == 5:
                        panel_dot5(vals, cols, Xt, lo, hi, Yt, r)
                    elif nvec == 3:
                        panel_dot3(vals, cols, Xt, lo, hi, Yt, r)
                    elif nvec == 2:
                        panel_dot2(vals, cols, Xt, lo, hi, Yt, r)
                    else:
                        panel_dot1(vals, cols, Xt, lo, hi, Yt, r)
        for rb in range(r0, r1, 16):
            re = min(rb + 16, r1)
            for l in range(L):
                for r in range(rb, re):
                    t = Yt[r, l] + bias[r] if has_bias else Yt[r, l]
                    if acc:
                        Y[l, r] += t
                    else:
                        Y[l, r] = t
