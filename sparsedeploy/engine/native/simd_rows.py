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
weight rows panel by panel (`panel_pointers`: where each row's weights of each panel start). `dense_dot_rows*`
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
        """(sum_j w[r, j] * x[l, j] for l in l0 .. l0 + T - 1): each 16-float chunk of w's row r loaded once
        and FMA'd into the T rows' accumulators (the last partial chunk by masked loads), then one transposed
        lane tree (lane_sums). attention_rows (kernels.py) scores a cached key row against up to 8 queries."""
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


@njit(**_OPTS)
def dense_gemm_rows(W, X, bias, Y, acc):
    """X [L, in] -> Y [L, out] with W dense [out, in]: each weight row, loaded once, is multiplied into the rows of
    X eight at a time (eight reductions over the same weight vector: one weight load per eight FMAs; a W larger
    than the caches, such as a tied lm_head, then streams from memory once per 8 rows, not once per 4), then
    four, then one. numpy's matmul would be faster alone, but its BLAS threads compete with numba's for the
    same cores (and single-threaded it measured slower: 21 ms for 8 rows of SmolLM2's 49152 x 576 head against
    10-15 here, AMD EPYC, busy machine)."""
    n, m = W.shape
    L = X.shape[0]
    has_bias = bias.shape[0] == n
    for r in prange(n):
        b = bias[r] if has_bias else np.float32(0.0)
        l = 0
        while l + 8 <= L:
            s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
            for j in range(m):
                w = W[r, j]
                s0 += w * X[l, j]
                s1 += w * X[l + 1, j]
                s2 += w * X[l + 2, j]
                s3 += w * X[l + 3, j]
                s4 += w * X[l + 4, j]
                s5 += w * X[l + 5, j]
                s6 += w * X[l + 6, j]
                s7 += w * X[l + 7, j]
            _put1(Y, l, r, s0, b, has_bias, acc)
            _put1(Y, l + 1, r, s1, b, has_bias, acc)
            _put1(Y, l + 2, r, s2, b, has_bias, acc)
            _put1(Y, l + 3, r, s3, b, has_bias, acc)
            _put1(Y, l + 4, r, s4, b, has_bias, acc)
            _put1(Y, l + 5, r, s5, b, has_bias, acc)
            _put1(Y, l + 6, r, s6, b, has_bias, acc)
            _put1(Y, l + 7, r, s7, b, has_bias, acc)
            l += 8
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

        n = builder.sub(hi, lo)
        groups = builder.udiv(n, ir.Constant(i64, chains))
        with cgutils.for_range(builder, groups) as loop:
            first = builder.add(lo, builder.mul(loop.index, ir.Constant(i64, chains)))
            for u in range(chains):
                one(builder.add(first, ir.Constant(i64, u)), accs[u])
        rest = builder.add(lo, builder.mul(groups, ir.Constant(i64, chains)))
        with cgutils.for_range(builder, builder.sub(hi, rest)) as loop:
            one(builder.add(rest, loop.index), accs[0])
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


def panel_pointers(rowptr: np.ndarray, cols: np.ndarray, in_features: int) -> np.ndarray:
    """pptr [out, npanels + 1] int64: row r's stored weights in panel p (columns PANEL p .. PANEL (p + 1) - 1)
    are [pptr[r, p], pptr[r, p + 1]) (a row's columns ascend, as CSR and ELL store them)."""
    n = rowptr.shape[0] - 1
    npan = max(1, -(-int(in_features) // PANEL))
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(rowptr))
    cnt = np.bincount(rows * npan + cols.astype(np.int64) // PANEL, minlength=n * npan).reshape(n, npan)
    pptr = np.empty((n, npan + 1), np.int64)
    pptr[:, 0] = rowptr[:-1]
    np.cumsum(cnt, axis=1, out=pptr[:, 1:])
    pptr[:, 1:] += rowptr[:-1, None]
    return pptr


@njit(**_OPTS)
def csr_gemm_panels(pptr, cols, vals, Xt, Yt, bias, Y, acc, nth):
    """Y [L, out] (+)= X W^T + bias for a prompt chunk (L <= PANEL_ROWS): Xt [in, 16 nvec] (X transposed,
    padding zero), Yt [out, 16 nvec] scratch. Each thread takes a range of weight rows and walks the input
    columns panel by panel (panel_pointers): while it works through its rows' weights of one panel, the
    panel's rows of Xt (PANEL x 16 nvec floats) stay in L1, where the whole Xt (in x 64 floats: 147 KiB at
    in = 576) would be read from L2 once per stored weight; partial sums wait in Yt's rows. Then Yt goes to
    Y in 16 x 16 blocks (one cache line of a Y row per 16 weight rows, not one per weight row and row of Y).
    nth: the number of row ranges (numba's thread count)."""
    n = pptr.shape[0]
    npan = pptr.shape[1] - 1
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
                lo = pptr[r, p]
                hi = pptr[r, p + 1]
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
