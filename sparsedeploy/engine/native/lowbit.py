"""Low-bit products of the native engine: int8 weights (per-row scale), dense, bitmask, ELL and CSR.

Decode on a CPU streams weights, so a product costs about its bytes over the memory bandwidth, and int8
values read a quarter of fp32's. Plain numba loops over int8 never use the integer dot-product instructions
(they multiply in scalar registers), so the two block formats are written as LLVM IR through `@intrinsic`:

  int8 (dense)    wq uint8 [out, 64 nblk] = w + 128 (padding columns hold 128, i.e. w = 0), wscale f32 [out]
  int8_bitmask    rowptr int64 [out+1], masks uint64 [out * nblk] (bit j of mask b = column 64 b + j),
                  vals uint8 [nnz] = w + 128 (each row's kept weights, packed, columns ascending), wscale [out]
  int8_ell        cols uint16/32 [out, k], vals int8 [out, k], wscale [out]      (fp32 activations)
  int8_csr        rowptr int64 [out+1], cols uint16/32 [nnz], vals int8 [nnz], wscale [out]   (fp32 activations)
  int8_perm       vecptr int64 [out+1], base uint16 [nvec], packed uint8 [nvec, 128], window int64 [1],
                  wscale [out]   (int8 activations; work per kept weight and window, not per 64 columns: below)

The two block formats multiply int8 activations (`quantize_act`: per group g of ACT_GROUP = 4 64-column blocks,
i.e. 256 columns as llama.cpp's Q8_K, symmetric, s_g = max|x_g| / 127, q = rint(x / s_g); scale[b] holds s_g
for each block b of the group). One 64-column block of a row is one AVX-512 VNNI instruction:

    acc_i = corr[16 b + i] + sum_{k<4} u8[4 i + k] * q[4 i + k]          vpdpbusd (u8 x s8 -> int32 lanes)

vpdpbusd multiplies *unsigned* bytes by signed bytes, so the weights are stored shifted, u8 = w + 128, and
the shift is taken out exactly in integers: `corr[16 b + i] = -128 * sum_k q[64 b + 4 i + k]`, computed once
per activation vector, is the accumulator the instruction starts from, so each int32 lane holds the exact
sum of w * q over its 4 columns (no large float correction subtracted at the end, so no cancellation).
The blocks of a whole group share its scale, so their vpdpbusd chain into one int32 accumulator started from
the group's correction lanes (stored after the blocks' lanes: corr[16 (nblk + g) + i], the sum of its blocks'
lanes i; |sum| <= 256 * 255 * 127, exact), then one conversion to float and one FMA with s_g per group, not
per block; the blocks past a row's last whole group go one by one with their own lanes. The int32 sums are the
per-block ones added, so a row is the same number to float rounding either way. Measured on AMD EPYC (Zen 4),
2 threads, 70% bitmask 4096 x 4096, cache-resident: 1.49-1.58 ns per block and thread with per-block scales
(the earlier form), 1.14-1.26 with group scales; from memory 1.75-1.82 against 1.65-1.76 (near the memory
bound there). What the coarser activation scale costs in perplexity: benchmarks/results/act_group_ppl_*.md;
a build may keep a scale per 64 columns instead (`compile --act-columns 64`, act_buffers(columns=64)): its corr
buffer then holds as many group lane sets as blocks, which is how quantize_act and the kernels tell
(group_blocks), and the kernels take the per-block loop.
One float horizontal sum per row (a fixed-order tree: results do not depend on the thread count);
out[r] = wscale[r] * sum (+ bias).

Wide rows (more than WIDE_BLOCKS blocks) do not load corr: each group computes its correction lanes again,
vpdpbusd chained over its blocks from 0 with the bytes 0x80 (= 128 * sum q), and subtracts them (the same
exact integers). With per-block lanes the loaded form kept q and corr (two 64-byte vectors per block) in the
L1 data cache beside the streamed weights, and at a 7B down projection's 11008 columns the weights evicted them
(4096 x 11008, one thread: 2.46 ns per block loaded, 1.64 recomputed); the group lanes are a quarter of that,
and loaded is now as fast or faster up to 16384 columns (2 threads, 70%: 4096 x 11008 1.16 / 1.68 ns hot /
cold against 1.31 / 1.73 recomputed; 2816 x 16384 1.48 / 2.32 against 1.49 / 2.24), hence WIDE_BLOCKS = 256.
(Intel: not measured.)

The bitmask format first puts a block's kept weights back in their lanes with one VBMI2 byte expand
(`llvm.masked.expandload.v64i8` with the block's 64-bit mask, lowered to vpexpandb); absent lanes get the
pass-through value 128, i.e. w = 0. Walking set bits one by one was 3-20x slower (issue 13).

int8_perm is for very sparse groups: its work follows the kept weights, not the 64-column blocks. A row's
kept weights are grouped by block, each block's run padded with w = 0 to whole 4-byte lanes (so an int32 lane
holds one block's products, exact, and gets its block's scale), and the runs fill 64-byte vectors in order:
64 index bytes (col % 64; the lane's block offset from the vector's first block in the top bits of its first
two bytes), then 64 values w + 128. A vector covers at most `window` consecutive blocks (chosen per matrix by
estimated work). Per vector (`vnni_window_dot`): the lanes' scales by one vpermps; per pair of blocks of its
window one VBMI `vpermi2b` of the pair's 128 activation bytes, kept in the bytes of that pair (vpcmpeqb) and
OR-ed in; then two vpdpbusd, one conversion, one FMA. 2 bytes per kept weight, plus padding and 2 per vector.

ELL and CSR are for very sparse groups too: int8 values and uint16 column indices (3 bytes per kept weight),
fp32 activations gathered 16 at a time (`gather_dot`: 512-bit vgatherdps where the CPU has AVX-512F;
numba's own loops stay at 256 bits there), or plain numba loops with unsigned 64-bit indices elsewhere.
`gather_dot` also takes fp32 values: kernels.csr_gemv / ell_gemv are `csr_gemv_avx512` / `ell_gemv_avx512`
here where the CPU has AVX-512F (on a 2-core Intel Xeon VM 1.1-1.4x faster than numba's 256-bit loop at 7B
shapes, cold: 20-25 -> 27-31 GB/s, the prefetch below included).

The block kernels and the gather loop prefetch their weight streams simd_rows.PREFETCH_BYTES ahead (Intel's
stream prefetchers stop at each 4 KiB page; int8 ELL at 11008x4096, 90%, cold: 0.83 -> 0.55 ms; int8 bitmask
at 70%: 0.95 -> 0.71 ms on that machine); the bitmask emitter prefetches its 8-byte masks as well (at 90% they
are most of its bytes: 11008x4096 cold 0.76 -> 0.45 ms).

Portable path: vpdpbusd exists only with AVX-512 VNNI and vpexpandb only with AVX-512 VBMI2, and LLVM
cannot compile the VNNI intrinsic for a CPU without it (vpermb: AVX-512 VBMI). So the names `int8_gemv` /
`int8_bitmask_gemv` / `int8_perm_gemv` are
bound at import to the intrinsic kernels where LLVM's host features have them, else to plain-numba kernels
computing the same integers (`kernel_paths()` says which one this CPU gets; SPARSEDEPLOY_LOWBIT_PORTABLE=1
forces the portable ones). Every kernel has the kernels.py conventions: it writes out[r] (acc: adds into it),
bias added when it has `out` rows.

Every @intrinsic stays in this file: numba's on-disk cache of a kernel is stamped by its source file (lowbit_batch.py
also emits the block emitters `dense_block_weights` / `bitmask_block_weights`: a change to them must touch
lowbit_batch.py too, or its cached kernels keep the old code).
"""
from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ...errors import check
from .simd_rows import PREFETCH_BYTES, _put, prefetch

BLOCK = 64                     # columns per activation block (one vpdpbusd: 64 bytes)
LANES = 16                     # int32 / float32 lanes of a 512-bit vector
UNROLL = 4                     # blocks per loop trip, each into its own float accumulator
ACT_GROUP = 4                  # 64-column blocks sharing one activation scale (256 columns, as llama.cpp's Q8_K)
WIDE_BLOCKS = 256              # rows of more blocks recompute their correction lanes (see the module doc)
_OPTS = dict(parallel=True, fastmath=True, cache=True, nogil=True)
_SERIAL = dict(fastmath=True, cache=True, nogil=True)


# ----------------------------------------------------------------------------- which path this CPU gets
def _features() -> dict:
    import llvmlite.binding as llvm

    return llvm.get_host_cpu_features()


def has_avx512f() -> bool:
    """AVX-512F: 16-lane gathers (the int8 ELL / CSR kernels)."""
    return bool(_features().get("avx512f", False))


def has_vnni() -> bool:
    """AVX-512 VNNI (vpdpbusd on 512-bit vectors): Intel since Cascade Lake, AMD Zen 4."""
    f = _features()
    return all(bool(f.get(k, False)) for k in ("avx512f", "avx512bw", "avx512vnni"))


def has_vbmi2() -> bool:
    """AVX-512 VBMI2 (vpexpandb): Intel since Ice Lake, AMD Zen 4."""
    f = _features()
    return all(bool(f.get(k, False)) for k in ("avx512f", "avx512bw", "avx512vbmi2"))


def has_vbmi() -> bool:
    """AVX-512 VBMI (vpermb): Intel since Ice Lake (and Cannon Lake), AMD Zen 4."""
    f = _features()
    return all(bool(f.get(k, False)) for k in ("avx512f", "avx512bw", "avx512vbmi"))


def _choose() -> dict[str, str]:
    forced = os.environ.get("SPARSEDEPLOY_LOWBIT_PORTABLE", "") not in ("", "0")
    vnni = has_vnni() and not forced
    avx512 = has_avx512f() and not forced
    return {"csr": "avx512" if avx512 else "portable", "ell": "avx512" if avx512 else "portable",
            "int8": "avx512-vnni" if vnni else "portable",
            "int8_bitmask": "avx512-vnni+vbmi2" if vnni and has_vbmi2() else "portable",
            "int8_ell": "avx512" if avx512 else "portable", "int8_csr": "avx512" if avx512 else "portable",
            "int8_perm": "avx512-vnni+vbmi" if vnni and has_vbmi() else "portable",
            "q4": "avx512-vnni" if vnni else "portable"}


_PATHS = _choose()


def kernel_paths() -> dict[str, str]:
    """Which kernel each int8 format (and fp32 CSR / ELL) runs on this CPU: 'avx512-vnni[+vbmi2]' / 'avx512'
    (intrinsics) or 'portable' (plain numba)."""
    return dict(_PATHS)


# ----------------------------------------------------------------------------- activations
ACT_COLUMNS = (64, 256)          # the activation scale widths a build may choose (1 or ACT_GROUP blocks)
DEFAULT_ACT_COLUMNS = BLOCK * ACT_GROUP


def act_group(columns: int) -> int:
    """64-column blocks per activation scale for a width of `columns` (64 -> 1, 256 -> ACT_GROUP)."""
    if int(columns) not in ACT_COLUMNS:
        raise ValueError(f"activation scale width {columns}: one of {ACT_COLUMNS}")
    return int(columns) // BLOCK


def act_buffers(in_features: int, columns: int = DEFAULT_ACT_COLUMNS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Buffers for `quantize_act` of a width-`in_features` vector with one scale per `columns` (64 or 256):
    q int8 [64 nblk], corr int32 [16 (nblk + ngrp)] (the blocks' correction lanes, then the groups'), scale
    float32 [nblk] (ngrp = ceil(nblk / G), G = columns / 64). The corr buffer's length is how quantize_act and
    the kernels know G: ngrp == nblk means a scale per block (G = 1), else G = ACT_GROUP."""
    G = act_group(columns)
    nblk = -(-int(in_features) // BLOCK)
    ngrp = -(-nblk // G)
    return (np.zeros(nblk * BLOCK, np.int8), np.zeros((nblk + ngrp) * LANES, np.int32), np.zeros(nblk, np.float32))


@njit(cache=True, nogil=True, inline="always")
def group_blocks(nblk, corr_len):
    """G of a (scale, corr) pair from act_buffers: 1 when corr holds as many group lanes as blocks, else
    ACT_GROUP (one block: 1, the same arithmetic either way). The intrinsics emit the same test (per_block_ir)."""
    if corr_len // 16 - nblk >= nblk:
        return 1
    return ACT_GROUP


@njit(cache=True, nogil=True, inline="always")
def acts_fit(nblk, q, corr, scale):
    """The activation buffers of quantize_act fit a weight row of nblk blocks (with ACT_GROUP's group lanes,
    the fewest any width needs)."""
    return scale.shape[0] == nblk and q.shape[0] >= nblk * 64 and corr.shape[0] >= (nblk + (nblk + ACT_GROUP - 1) // ACT_GROUP) * 16


def per_block_ir(builder, nact, corr_len):
    """group_blocks(...) == 1 as LLVM IR: an i1 that is true when the corr buffer (corr_len int32) holds a group
    lane set per activation block (nact blocks), i.e. a scale per block."""
    i64 = ir.IntType(64)
    nlanes = builder.udiv(corr_len, ir.Constant(i64, LANES))
    return builder.icmp_signed(">=", builder.sub(nlanes, nact), nact)


@njit(cache=True, nogil=True)
def quantize_act(x, q, corr, scale):
    """x float32 [m] -> q int8 [64 nblk] (zero past m), corr int32 [16 (nblk + ngrp)], scale float32 [nblk],
    with G = group_blocks(nblk, len(corr)) blocks per scale (act_buffers' `columns`).
    Group g (columns 64 G g .. 64 G (g + 1) - 1): s_g = max|x_g| / 127, q = rint(x * (127 / max|x_g|)) (0 for an
    all-zero group), and every block b of the group has scale[b] = s_g;
    corr[16 b + i] = -128 * (q[64 b + 4 i] + ... + q[64 b + 4 i + 3]) and the group's lanes
    corr[16 (nblk + g) + i] = the sum of its blocks' lanes i (see the module doc)."""
    m = x.shape[0]
    nblk = scale.shape[0]
    G = group_blocks(nblk, corr.shape[0])
    ngrp = (nblk + G - 1) // G
    if q.shape[0] < nblk * 64 or corr.shape[0] < (nblk + ngrp) * 16 or nblk * 64 < m:
        raise ValueError("quantize_act: buffers do not fit x (use act_buffers)")
    for g in range(ngrp):
        lo = g * G * 64
        hi = min(lo + G * 64, m)
        amax = np.float32(0.0)
        for j in range(lo, hi):
            a = abs(x[j])
            if a > amax:
                amax = a
        inv = np.float32(0.0)
        if amax > 0:
            inv = np.float32(127.0) / amax
        s = amax / np.float32(127.0)
        for i in range(16):
            corr[(nblk + g) * 16 + i] = 0
        for b in range(g * G, min(g * G + G, nblk)):
            scale[b] = s
            for i in range(16):
                t = 0
                for k in range(4):
                    j = b * 64 + 4 * i + k
                    v = 0
                    if j < hi:
                        v = int(np.rint(x[j] * inv))
                        if v > 127:
                            v = 127
                        elif v < -127:
                            v = -127
                    q[j] = v
                    t += v
                corr[b * 16 + i] = -128 * t
                corr[(nblk + g) * 16 + i] += -128 * t
    return nblk


# ----------------------------------------------------------------------------- intrinsics
def _vec_types():
    i8, i32, i64, f32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
    return i8, i32, i64, f32, ir.VectorType(i32, LANES), ir.VectorType(f32, LANES), ir.VectorType(i8, 64)


def _hsum(builder, total):
    """The 16 lanes of a <16 x float> summed in a fixed-order tree."""
    i32 = ir.IntType(32)
    lanes = [builder.extract_element(total, ir.Constant(i32, i)) for i in range(LANES)]
    while len(lanes) > 1:
        lanes = [builder.fadd(lanes[i], lanes[i + 1]) for i in range(0, len(lanes), 2)]
    return lanes[0]


def _unrolled(builder, nblk, block):
    """block(b, acc) for every b < nblk over UNROLL <16 x float> accumulators (b % UNROLL in the main loop,
    the first in the remainder); returns the accumulators' sum, reduced across lanes in a fixed order."""
    i8, i32, i64, f32, v16i, v16f, v64b = _vec_types()
    accs = [cgutils.alloca_once_value(builder, ir.Constant(v16f, [0.0] * LANES)) for _ in range(UNROLL)]
    groups = builder.udiv(nblk, ir.Constant(i64, UNROLL))
    with cgutils.for_range(builder, groups) as loop:
        base = builder.mul(loop.index, ir.Constant(i64, UNROLL))
        for u in range(UNROLL):
            block(builder.add(base, ir.Constant(i64, u)), accs[u])
    done = builder.mul(groups, ir.Constant(i64, UNROLL))
    with cgutils.for_range(builder, builder.sub(nblk, done)) as loop:
        block(builder.add(done, loop.index), accs[0])
    total = builder.load(accs[0])
    for a in accs[1:]:
        total = builder.fadd(total, builder.load(a))
    return _hsum(builder, total)


def _splat(builder, s):
    i8, i32, i64, f32, v16i, v16f, v64b = _vec_types()
    return builder.shuffle_vector(builder.insert_element(ir.Constant(v16f, ir.Undefined), s, ir.Constant(i32, 0)),
                                  ir.Constant(v16f, ir.Undefined), ir.Constant(v16i, [0] * LANES))


def _vnni_blocks(context, builder, nblk, qa, ca, sa, weights, corr=None, weight_scale=None, recompute=False,
                 grouped=False):
    """The shared loop: for each block b < nblk, int32 lanes = vpdpbusd(corr_b, weights(b), q_b), then
    float lanes += float(lanes) [* weight_scale(b)] * scale[b]; UNROLL accumulators; returns their fixed-order
    horizontal sum. weights(b) emits the block's 64 weight bytes as <16 x i32>; corr(c), when given, rewrites
    the loaded correction lanes (q4: -8·Σq instead of -128·Σq); weight_scale(b), when given, is a <16 x float>
    factor per lane (q4's per-half fp16 scales); recompute: corr is not read, the lanes are
    vpdpbusd(0, w, q) - vpdpbusd(0, 0x80 bytes, q) (wide rows: module doc).
    grouped (no corr / weight_scale hooks): when the activations have a scale per ACT_GROUP blocks (their corr
    buffer's length says so: group_blocks), the blocks of each whole group chain their vpdpbusd into one int32
    accumulator started from the group's correction lanes, then one conversion and one FMA per group, and the
    blocks past the last whole group go one by one; with a scale per block, the per-block loop."""
    i8, i32, i64, f32, v16i, v16f, v64b = _vec_types()
    mod = builder.module
    dpbusd = cgutils.get_or_insert_function(mod, ir.FunctionType(v16i, [v16i, v16i, v16i]), "llvm.x86.avx512.vpdpbusd.512")
    fma = cgutils.get_or_insert_function(mod, ir.FunctionType(v16f, [v16f, v16f, v16f]), "llvm.fma.v16f32")
    splat0 = ir.Constant(ir.VectorType(i32, LANES), [0] * LANES)
    shift = builder.bitcast(ir.Constant(v64b, [-128] * 64), v16i)          # 64 bytes 0x80 = 128 unsigned

    def qblock(b):
        return builder.load(builder.bitcast(builder.gep(qa.data, [builder.mul(b, ir.Constant(i64, BLOCK))]),
                                            v16i.as_pointer()), align=1)

    def corr_lanes(k):
        return builder.load(builder.bitcast(builder.gep(ca.data, [builder.mul(k, ir.Constant(i64, LANES))]),
                                            v16i.as_pointer()), align=4)

    def block(b, acc):
        w = weights(b)
        qv = qblock(b)
        if recompute:
            lanes = builder.sub(builder.call(dpbusd, [splat0, w, qv]), builder.call(dpbusd, [splat0, shift, qv]))
        else:
            c = corr_lanes(b)
            if corr is not None:
                c = corr(c)
            lanes = builder.call(dpbusd, [c, w, qv])
        dot = builder.sitofp(lanes, v16f)
        if weight_scale is not None:
            dot = builder.fmul(dot, weight_scale(b))
        s = builder.load(builder.gep(sa.data, [b]))
        builder.store(builder.call(fma, [dot, _splat(builder, s), builder.load(acc)]), acc)

    if not grouped:
        return _unrolled(builder, nblk, block)
    assert corr is None and weight_scale is None
    nact = builder.extract_value(sa.shape, 0)              # the activation's blocks: group lanes follow theirs
    per_block = per_block_ir(builder, nact, builder.extract_value(ca.shape, 0))
    result = cgutils.alloca_once(builder, f32)
    with builder.if_else(per_block) as (one, groups):
        with one:                                          # a scale per block: the per-block loop
            builder.store(_unrolled(builder, nblk, block), result)
        with groups:
            accs = [cgutils.alloca_once_value(builder, ir.Constant(v16f, [0.0] * LANES)) for _ in range(2)]
            G = ir.Constant(i64, ACT_GROUP)
            ngrp = builder.udiv(nblk, G)
            with cgutils.for_range(builder, ngrp) as loop:
                base = builder.mul(loop.index, G)
                if recompute:
                    lanes, cl = splat0, splat0
                else:
                    lanes = corr_lanes(builder.add(nact, loop.index))
                for u in range(ACT_GROUP):
                    b = builder.add(base, ir.Constant(i64, u))
                    qv = qblock(b)
                    lanes = builder.call(dpbusd, [lanes, weights(b), qv])
                    if recompute:
                        cl = builder.call(dpbusd, [cl, shift, qv])
                if recompute:
                    lanes = builder.sub(lanes, cl)
                s = builder.load(builder.gep(sa.data, [base]))
                builder.store(builder.call(fma, [builder.sitofp(lanes, v16f), _splat(builder, s),
                                                 builder.load(accs[0])]), accs[0])
            done = builder.mul(ngrp, G)
            with cgutils.for_range(builder, builder.sub(nblk, done)) as loop:
                block(builder.add(done, loop.index), accs[1])
            builder.store(_hsum(builder, builder.fadd(builder.load(accs[0]), builder.load(accs[1]))), result)
    return builder.load(result)


def _is(a, dtype, ndim=None):
    return isinstance(a, types.Array) and a.dtype == dtype and (ndim is None or a.ndim == ndim)


def dense_block_weights(builder, wa, woff):
    """weights(b) of a dense int8 row at flat offset woff of `wa` (a made array): its block b's 64 bytes as
    <16 x i32> (lowbit_batch's token tiles use it too)."""
    i8, i32, i64, f32, v16i, v16f, v64b = _vec_types()

    def weights(b):
        at = builder.add(woff, builder.mul(b, ir.Constant(i64, BLOCK)))
        prefetch(builder, wa.data, builder.add(at, ir.Constant(i64, PREFETCH_BYTES)))
        return builder.load(builder.bitcast(builder.gep(wa.data, [at]), v16i.as_pointer()), align=1)

    return weights


def bitmask_block_weights(builder, va, ma, voff, mstart):
    """weights(b) of an int8_bitmask row whose values start at voff and masks at mstart: block b's kept bytes
    expanded into their lanes (vpexpandb; absent lanes 0x80, i.e. w = 0), the value offset advancing by each
    mask's popcount, so the blocks must be asked for in order (lowbit_batch's token tiles use it too)."""
    i8, i32, i64, f32, v16i, v16f, v64b = _vec_types()
    m64 = ir.VectorType(ir.IntType(1), 64)
    mod = builder.module
    expand = cgutils.get_or_insert_function(mod, ir.FunctionType(v64b, [va.data.type, m64, v64b]),
                                            "llvm.masked.expandload.v64i8")
    ctpop = cgutils.get_or_insert_function(mod, ir.FunctionType(i64, [i64]), "llvm.ctpop.i64")
    absent = ir.Constant(v64b, [-128] * 64)           # the byte 0x80 = 128 = w + 128 for w = 0
    off = cgutils.alloca_once_value(builder, voff)

    def weights(b):
        mk = builder.load(builder.gep(ma.data, [builder.add(mstart, b)]))
        o = builder.load(off)
        v = builder.call(expand, [builder.gep(va.data, [o]), builder.bitcast(mk, m64), absent])
        prefetch(builder, va.data, builder.add(o, ir.Constant(i64, PREFETCH_BYTES)))
        prefetch(builder, ma.data, builder.add(builder.add(mstart, b), ir.Constant(i64, PREFETCH_BYTES // 8)))
        builder.store(builder.add(o, builder.call(ctpop, [mk])), off)
        return builder.bitcast(v, v16i)

    return weights


def _dense_dot(recompute: bool):
    @intrinsic
    def vnni_dense_dot(typingctx, wq, woff, q, corr, scale, nblk):
        """float32 sum over blocks b < nblk of scale[b] * sum_j (wq.flat[woff + 64 b + j] - 128) * q[64 b + j]."""
        if not (_is(wq, types.uint8) and _is(q, types.int8, 1) and _is(corr, types.int32, 1) and _is(scale, types.float32, 1)):
            return None
        sig = types.float32(wq, types.int64, q, corr, scale, types.int64)

        def codegen(context, builder, signature, args):
            wa, qa, ca, sa = (context.make_array(signature.args[k])(context, builder, args[k]) for k in (0, 2, 3, 4))
            return _vnni_blocks(context, builder, args[5], qa, ca, sa, dense_block_weights(builder, wa, args[1]),
                                recompute=recompute, grouped=True)

        return sig, codegen

    return vnni_dense_dot


def _bitmask_dot(recompute: bool):
    @intrinsic
    def vnni_bitmask_dot(typingctx, vals, masks, voff, mstart, q, corr, scale, nblk):
        """As vnni_dense_dot, with block b's weights expand(vals[off:], masks[mstart + b]) (absent: w = 0),
        off starting at voff and advancing by each mask's popcount."""
        if not (_is(vals, types.uint8, 1) and _is(masks, types.uint64, 1) and _is(q, types.int8, 1)
                and _is(corr, types.int32, 1) and _is(scale, types.float32, 1)):
            return None
        sig = types.float32(vals, masks, types.int64, types.int64, q, corr, scale, types.int64)

        def codegen(context, builder, signature, args):
            va, ma, qa, ca, sa = (context.make_array(signature.args[k])(context, builder, args[k]) for k in (0, 1, 4, 5, 6))
            weights = bitmask_block_weights(builder, va, ma, args[2], args[3])
            return _vnni_blocks(context, builder, args[7], qa, ca, sa, weights, recompute=recompute, grouped=True)

        return sig, codegen

    return vnni_bitmask_dot


vnni_dense_dot = _dense_dot(False)
vnni_dense_dot_wide = _dense_dot(True)        # the same sums, correction lanes recomputed (rows > WIDE_BLOCKS)
vnni_bitmask_dot = _bitmask_dot(False)
vnni_bitmask_dot_wide = _bitmask_dot(True)


@intrinsic
def vnni_q4_dot(typingctx, w4, woff, ws, soff, q, corr, scale, nblk):
    """Dense 4-bit (Q4_0-like) row: sum over 64-column blocks b of scale[b] * sum over its two 32-column
    halves h of ws[soff + 2 b + h] * sum_j (nibble_j - 8) * q_j, ws float16 bits as uint16 (numba has no
    float16 arrays). Block b's 32 bytes at
    w4.flat[woff + 32 b]: byte k holds column 64 b + k in its low nibble and column 64 b + 32 + k in its high
    one, so the two unpacked halves are the block's 64 bytes in order; corr >> 4 = -8 * sum q per lane."""
    if not (_is(w4, types.uint8) and _is(ws, types.uint16) and _is(q, types.int8, 1)
            and _is(corr, types.int32, 1) and _is(scale, types.float32, 1)):
        return None
    sig = types.float32(w4, types.int64, ws, types.int64, q, corr, scale, types.int64)

    def codegen(context, builder, signature, args):
        i8, i32, i64, f32, v16i, v16f, v64b = _vec_types()
        v32b = ir.VectorType(i8, 32)
        h2, f2 = ir.VectorType(ir.HalfType(), 2), ir.VectorType(f32, 2)
        wa = context.make_array(signature.args[0])(context, builder, args[0])
        wsa = context.make_array(signature.args[2])(context, builder, args[2])
        qa = context.make_array(signature.args[4])(context, builder, args[4])
        ca = context.make_array(signature.args[5])(context, builder, args[5])
        sa = context.make_array(signature.args[6])(context, builder, args[6])
        woff, soff = args[1], args[3]
        low = ir.Constant(v32b, [15] * 32)
        four8 = ir.Constant(v32b, [4] * 32)
        four32 = ir.Constant(v16i, [4] * LANES)
        cat = ir.Constant(ir.VectorType(i32, 64), list(range(64)))
        halves = ir.Constant(ir.VectorType(i32, LANES), [0] * 8 + [1] * 8)

        def weights(b):
            at = builder.add(woff, builder.mul(b, ir.Constant(i64, 32)))
            prefetch(builder, wa.data, builder.add(at, ir.Constant(i64, PREFETCH_BYTES)))
            raw = builder.load(builder.bitcast(builder.gep(wa.data, [at]), v32b.as_pointer()), align=1)
            return builder.bitcast(builder.shuffle_vector(builder.and_(raw, low), builder.lshr(raw, four8), cat), v16i)

        def weight_scale(b):
            hp = builder.gep(wsa.data, [builder.add(soff, builder.mul(b, ir.Constant(i64, 2)))])
            wsv = builder.fpext(builder.load(builder.bitcast(hp, h2.as_pointer()), align=2), f2)
            return builder.shuffle_vector(wsv, ir.Constant(f2, ir.Undefined), halves)

        return _vnni_blocks(context, builder, args[7], qa, ca, sa, weights,
                            corr=lambda c: builder.ashr(c, four32), weight_scale=weight_scale)

    return sig, codegen


@intrinsic
def gather_dot(typingctx, cols, vals, off, cnt, x):
    """float32 sum over j < cnt of float(vals.flat[off + j]) * x[cols.flat[off + j]], vals int8 or float32: 16
    lanes a step with 512-bit gathers (plain numba loops stay at 256 bits here), four accumulators, the tail
    under a lane mask, the index and value streams prefetched PREFETCH_BYTES ahead."""
    if not (isinstance(cols, types.Array) and cols.dtype in (types.uint16, types.uint32)
            and (_is(vals, types.int8) or _is(vals, types.float32)) and _is(x, types.float32, 1)):
        return None
    sig = types.float32(cols, vals, types.int64, types.int64, x)
    wide = cols.dtype == types.uint32
    f32vals = vals.dtype == types.float32

    def codegen(context, builder, signature, args):
        i8, i32, i64, f32, v16i, v16f, v64b = _vec_types()
        i16, i1 = ir.IntType(16), ir.IntType(1)
        m16 = ir.VectorType(i1, LANES)
        vi = ir.VectorType(i32 if wide else i16, LANES)
        v16b = v16f if f32vals else ir.VectorType(i8, LANES)
        vbytes = 4 if f32vals else 1
        ca = context.make_array(signature.args[0])(context, builder, args[0])
        va = context.make_array(signature.args[1])(context, builder, args[1])
        xa = context.make_array(signature.args[4])(context, builder, args[4])
        off, cnt = args[2], args[3]
        mod = builder.module
        ptr = ir.PointerType()
        gather = cgutils.get_or_insert_function(mod, ir.FunctionType(v16f, [v16f, ptr, v16i, m16, i32]),
                                                "llvm.x86.avx512.mask.gather.dps.512")
        mload_i = cgutils.get_or_insert_function(mod, ir.FunctionType(vi, [ptr, i32, m16, vi]),
                                                 f"llvm.masked.load.v16i{32 if wide else 16}.p0")
        mload_b = cgutils.get_or_insert_function(mod, ir.FunctionType(v16b, [ptr, i32, m16, v16b]),
                                                 "llvm.masked.load.v16f32.p0" if f32vals else "llvm.masked.load.v16i8.p0")
        fma = cgutils.get_or_insert_function(mod, ir.FunctionType(v16f, [v16f, v16f, v16f]), "llvm.fma.v16f32")
        zero = ir.Constant(v16f, [0.0] * LANES)
        ones = ir.Constant(m16, [1] * LANES)
        accs = [cgutils.alloca_once_value(builder, zero) for _ in range(UNROLL)]
        xp = builder.bitcast(xa.data, ptr)

        def step(j, acc, mask=None):
            cp = builder.bitcast(builder.gep(ca.data, [builder.add(off, j)]), ptr)
            vp = builder.bitcast(builder.gep(va.data, [builder.add(off, j)]), ptr)
            if mask is None:
                c = builder.load(builder.bitcast(cp, vi.as_pointer()), align=4 if wide else 2)
                v = builder.load(builder.bitcast(vp, v16b.as_pointer()), align=vbytes)
                mask = ones
            else:
                c = builder.call(mload_i, [cp, ir.Constant(i32, 4 if wide else 2), mask, ir.Constant(vi, [0] * LANES)])
                v = builder.call(mload_b, [vp, ir.Constant(i32, vbytes), mask, ir.Constant(v16b, [0] * LANES)])
            idx = c if wide else builder.zext(c, v16i)
            xg = builder.call(gather, [zero, xp, idx, mask, ir.Constant(i32, 4)])
            builder.store(builder.call(fma, [v if f32vals else builder.sitofp(v, v16f), xg, builder.load(acc)]), acc)

        chunk = LANES * UNROLL
        groups = builder.udiv(cnt, ir.Constant(i64, chunk))
        with cgutils.for_range(builder, groups) as loop:
            base = builder.mul(loop.index, ir.Constant(i64, chunk))
            at = builder.add(off, base)
            for u in range(UNROLL):
                if wide or u % 2 == 0:     # every 64-byte line of the indices, PREFETCH_BYTES ahead
                    prefetch(builder, ca.data, builder.add(at, ir.Constant(i64, PREFETCH_BYTES // (4 if wide else 2) + u * LANES)))
                if f32vals or u == 0:      # every 64-byte line of the values
                    prefetch(builder, va.data, builder.add(at, ir.Constant(i64, PREFETCH_BYTES // vbytes + u * LANES)))
                step(builder.add(base, ir.Constant(i64, u * LANES)), accs[u])
        done = builder.mul(groups, ir.Constant(i64, chunk))
        left = builder.sub(cnt, done)
        full = builder.udiv(left, ir.Constant(i64, LANES))
        with cgutils.for_range(builder, full) as loop:
            step(builder.add(done, builder.mul(loop.index, ir.Constant(i64, LANES))), accs[1])
        done = builder.add(done, builder.mul(full, ir.Constant(i64, LANES)))
        rem = builder.trunc(builder.sub(cnt, done), i32)
        with builder.if_then(builder.icmp_unsigned("!=", rem, ir.Constant(i32, 0))):
            lanes = ir.Constant(v16i, list(range(LANES)))
            rv = builder.shuffle_vector(builder.insert_element(ir.Constant(v16i, ir.Undefined), rem, ir.Constant(i32, 0)),
                                        ir.Constant(v16i, ir.Undefined), ir.Constant(v16i, [0] * LANES))
            step(done, accs[2], builder.icmp_unsigned("<", lanes, rv))
        total = builder.load(accs[0])
        for a in accs[1:]:
            total = builder.fadd(total, builder.load(a))
        lanes_ = [builder.extract_element(total, ir.Constant(i32, i)) for i in range(LANES)]
        while len(lanes_) > 1:
            lanes_ = [builder.fadd(lanes_[i], lanes_[i + 1]) for i in range(0, len(lanes_), 2)]
        return lanes_[0]

    return sig, codegen


# ----------------------------------------------------------------------------- int8 dense
# wq uint8 [out, 64 nblk], wscale f32 [out]; q/corr/scale from quantize_act of x
@njit(**_OPTS)
def int8_gemv_vnni(wq, wscale, q, corr, scale, bias, out, acc):
    n, stride = wq.shape
    nblk = stride // 64
    if not acts_fit(nblk, q, corr, scale):
        raise ValueError("int8_gemv: activation blocks do not match the weights' width")
    has_bias = bias.shape[0] == n
    if nblk > WIDE_BLOCKS:
        for r in prange(n):
            s = wscale[r] * vnni_dense_dot_wide(wq, r * stride, q, corr, scale, nblk)
            _put(out, r, s, bias, has_bias, acc)
    else:
        for r in prange(n):
            s = wscale[r] * vnni_dense_dot(wq, r * stride, q, corr, scale, nblk)
            _put(out, r, s, bias, has_bias, acc)


@njit(**_OPTS)
def int8_gemv_portable(wq, wscale, q, corr, scale, bias, out, acc):
    n, stride = wq.shape
    nblk = stride // 64
    if not acts_fit(nblk, q, corr, scale):
        raise ValueError("int8_gemv: activation blocks do not match the weights' width")
    has_bias = bias.shape[0] == n
    for r in prange(n):
        s = np.float32(0.0)
        for b in range(nblk):
            t = np.int32(0)
            for j in range(b * 64, b * 64 + 64):
                t += (np.int32(wq[r, j]) - np.int32(128)) * np.int32(q[j])
            s += np.float32(t) * scale[b]
        s *= wscale[r]
        _put(out, r, s, bias, has_bias, acc)


# ----------------------------------------------------------------------------- int8 + bitmask
@njit(**_OPTS)
def int8_bitmask_gemv_vnni(rowptr, masks, vals, wscale, q, corr, scale, bias, out, acc):
    n = rowptr.shape[0] - 1
    nblk = masks.shape[0] // n if n else 0
    if not acts_fit(nblk, q, corr, scale):
        raise ValueError("int8_bitmask_gemv: activation blocks do not match the weights' width")
    has_bias = bias.shape[0] == n
    if nblk > WIDE_BLOCKS:
        for r in prange(n):
            s = wscale[r] * vnni_bitmask_dot_wide(vals, masks, rowptr[r], r * nblk, q, corr, scale, nblk)
            _put(out, r, s, bias, has_bias, acc)
    else:
        for r in prange(n):
            s = wscale[r] * vnni_bitmask_dot(vals, masks, rowptr[r], r * nblk, q, corr, scale, nblk)
            _put(out, r, s, bias, has_bias, acc)


@njit(**_OPTS)
def int8_bitmask_gemv_portable(rowptr, masks, vals, wscale, q, corr, scale, bias, out, acc):
    n = rowptr.shape[0] - 1
    nblk = masks.shape[0] // n if n else 0
    if not acts_fit(nblk, q, corr, scale):
        raise ValueError("int8_bitmask_gemv: activation blocks do not match the weights' width")
    has_bias = bias.shape[0] == n
    one = np.uint64(1)
    for r in prange(n):
        off = rowptr[r]
        s = np.float32(0.0)
        for b in range(nblk):
            m = masks[r * nblk + b]
            t = np.int32(0)
            for j in range(64):
                if (m >> np.uint64(j)) & one:
                    t += (np.int32(vals[off]) - np.int32(128)) * np.int32(q[b * 64 + j])
                    off += 1
            s += np.float32(t) * scale[b]
        s *= wscale[r]
        _put(out, r, s, bias, has_bias, acc)


# ----------------------------------------------------------------------------- int8 ELL / CSR, fp32 activations
@njit(**_OPTS)
def int8_ell_gemv_portable(cols, vals, wscale, x, bias, out, acc):
    n, k = vals.shape
    has_bias = bias.shape[0] == n
    for r in prange(n):
        s = np.float32(0.0)
        for j in range(np.uint64(k)):
            s += np.float32(vals[r, j]) * x[np.uint64(cols[r, j])]
        s *= wscale[r]
        _put(out, r, s, bias, has_bias, acc)


@njit(**_OPTS)
def int8_csr_gemv_portable(rowptr, cols, vals, wscale, x, bias, out, acc):
    n = rowptr.shape[0] - 1
    has_bias = bias.shape[0] == n
    for r in prange(n):
        lo = np.uint64(rowptr[r])
        hi = np.uint64(rowptr[r + 1])
        s = np.float32(0.0)
        for j in range(lo, hi):
            s += np.float32(vals[j]) * x[np.uint64(cols[j])]
        s *= wscale[r]
        _put(out, r, s, bias, has_bias, acc)


# ----------------------------------------------------------------------------- dense 4-bit reference (Q4_0-like)
# w4 uint8 [out, 32 nblk] (two nibbles a byte, see vnni_q4_dot), ws float16 bits as uint16 [out, 2 nblk] (one scale per 32
# weights): 0.5625 bytes per weight, llama.cpp's Q4_0. A measuring stick for the sparse int8 formats
# (benchmarks/lowbit_gemv.py), not an engine format; VNNI only.
@njit(**_OPTS)
def q4_gemv_vnni(w4, ws, q, corr, scale, bias, out, acc):
    n, stride = w4.shape
    nblk = stride // 32
    if scale.shape[0] != nblk or q.shape[0] < nblk * 64 or corr.shape[0] < nblk * 16 or ws.shape[1] != 2 * nblk:
        raise ValueError("q4_gemv: activation blocks do not match the weights' width")
    has_bias = bias.shape[0] == n
    for r in prange(n):
        s = vnni_q4_dot(w4, r * stride, ws, r * 2 * nblk, q, corr, scale, nblk)
        _put(out, r, s, bias, has_bias, acc)


@njit(cache=True, nogil=True, inline="always")
def _half(bits):
    """float16 bits (uint16) -> float32 (numba has no float16 arrays)."""
    h = np.int64(bits)
    sign = -1.0 if h & 0x8000 else 1.0
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        return np.float32(sign * m * 2.0 ** -24)
    if e == 31:
        return np.float32(sign * np.inf) if m == 0 else np.float32(np.nan)
    return np.float32(sign * (1.0 + m / 1024.0) * 2.0 ** (e - 15))


@njit(**_OPTS)
def q4_gemv_portable(w4, ws, q, corr, scale, bias, out, acc):
    """The plain-numba twin of q4_gemv_vnni: the same integer dots per 32-column half, the same scales."""
    n, stride = w4.shape
    nblk = stride // 32
    if scale.shape[0] != nblk or q.shape[0] < nblk * 64 or ws.shape[1] != 2 * nblk:
        raise ValueError("q4_gemv: activation blocks do not match the weights' width")
    has_bias = bias.shape[0] == n
    for r in prange(n):
        s = np.float32(0.0)
        for b in range(nblk):
            lo = 0
            hi = 0
            for k in range(32):
                byte = np.int32(w4[r, 32 * b + k])
                lo += ((byte & 15) - 8) * np.int32(q[64 * b + k])
                hi += ((byte >> 4) - 8) * np.int32(q[64 * b + 32 + k])
            s += scale[b] * (np.float32(lo) * _half(ws[r, 2 * b]) + np.float32(hi) * _half(ws[r, 2 * b + 1]))
        _put(out, r, s, bias, has_bias, acc)


q4_gemv = q4_gemv_vnni if _PATHS["q4"] != "portable" else q4_gemv_portable


@njit(**_OPTS)
def int8_ell_gemv_avx512(cols, vals, wscale, x, bias, out, acc):
    n, k = vals.shape
    has_bias = bias.shape[0] == n
    for r in prange(n):
        s = wscale[r] * gather_dot(cols, vals, r * k, k, x)
        _put(out, r, s, bias, has_bias, acc)


@njit(**_OPTS)
def ell_gemv_avx512(cols, vals, x, bias, out, acc):
    """fp32 ELL (kernels.ell_gemv's arguments) through gather_dot."""
    n, k = vals.shape
    has_bias = bias.shape[0] == n
    for r in prange(n):
        _put(out, r, gather_dot(cols, vals, r * k, k, x), bias, has_bias, acc)


@njit(**_OPTS)
def csr_gemv_avx512(rowptr, cols, vals, x, bias, out, acc):
    """fp32 CSR (kernels.csr_gemv's arguments) through gather_dot."""
    n = rowptr.shape[0] - 1
    has_bias = bias.shape[0] == n
    for r in prange(n):
        _put(out, r, gather_dot(cols, vals, rowptr[r], rowptr[r + 1] - rowptr[r], x), bias, has_bias, acc)


@njit(**_OPTS)
def int8_csr_gemv_avx512(rowptr, cols, vals, wscale, x, bias, out, acc):
    n = rowptr.shape[0] - 1
    has_bias = bias.shape[0] == n
    for r in prange(n):
        s = wscale[r] * gather_dot(cols, vals, rowptr[r], rowptr[r + 1] - rowptr[r], x)
        _put(out, r, s, bias, has_bias, acc)


# ----------------------------------------------------------------------------- int8 + byte indices in 64-column blocks (int8_perm)
@intrinsic
def vnni_window_dot(typingctx, packed, base, v0, nvec, window, q, scale):
    """int8_perm row (window layout): float32 sum over vectors v0 <= v < v0 + nvec of
    sum_i scale[b_i] * sum_{k<4} (packed[v, 64 + 4 i + k] - 128) * q[64 b_i + (packed[v, 4 i + k] & 63)],
    b_i = base[v] + r_i, lane i's block offset r_i (0..15) stored in the top bits of its first two index bytes.
    Per vector: the lanes' scales with one vpermps from the 16 scales at base[v]; per pair of blocks of the
    window one vpermi2b of the pair's 128 activation bytes (index bit 6: the lane's block parity), kept in the
    bytes whose lane is in that pair (vpcmpeqb) and OR-ed in (no chain through the permute's latency); then two
    vpdpbusd (products, and the +128 shift's correction), one conversion, one FMA. Measured on a Zen 4 core
    (issue 13): the window loop, not the permute, costs most (loads, compare, merge: ~6 cycles a pair)."""
    if not (_is(packed, types.uint8, 2) and _is(base, types.uint16, 1) and _is(q, types.int8, 1)
            and _is(scale, types.float32, 1)):
        return None
    sig = types.float32(packed, base, types.int64, types.int64, types.int64, q, scale)

    def codegen(context, builder, signature, args):
        i8, i32, i64, f32, v16i, v16f, v64b = _vec_types()
        m64, m16 = ir.VectorType(ir.IntType(1), 64), ir.VectorType(ir.IntType(1), LANES)
        pa = context.make_array(signature.args[0])(context, builder, args[0])
        ba = context.make_array(signature.args[1])(context, builder, args[1])
        qa = context.make_array(signature.args[5])(context, builder, args[5])
        sa = context.make_array(signature.args[6])(context, builder, args[6])
        v0, nvec, window = args[2], args[3], args[4]
        nblk = builder.extract_value(sa.shape, 0)
        mod = builder.module
        dpbusd = cgutils.get_or_insert_function(mod, ir.FunctionType(v16i, [v16i, v16i, v16i]), "llvm.x86.avx512.vpdpbusd.512")
        permps = cgutils.get_or_insert_function(mod, ir.FunctionType(v16f, [v16f, v16i]), "llvm.x86.avx512.permvar.sf.512")
        perm2 = cgutils.get_or_insert_function(mod, ir.FunctionType(v64b, [v64b, v64b, v64b]), "llvm.x86.avx512.vpermi2var.qi.512")
        mload = cgutils.get_or_insert_function(mod, ir.FunctionType(v16f, [ir.PointerType(), i32, m16, v16f]),
                                               "llvm.masked.load.v16f32.p0")
        fma = cgutils.get_or_insert_function(mod, ir.FunctionType(v16f, [v16f, v16f, v16f]), "llvm.fma.v16f32")
        zero = ir.Constant(v16f, [0.0] * LANES)
        zi = ir.Constant(v16i, [0] * LANES)
        zb = ir.Constant(v64b, [0] * 64)
        k128 = ir.Constant(v16i, [0x80808080 - (1 << 32)] * LANES)      # 64 bytes of 128
        rep = ir.Constant(ir.VectorType(i32, 64), [4 * (i // 4) for i in range(64)])
        acc = cgutils.alloca_once_value(builder, zero)
        qv_p = cgutils.alloca_once_value(builder, zb)
        npair = builder.lshr(builder.add(window, ir.Constant(i64, 1)), ir.Constant(i64, 1))
        tmax = builder.sub(nblk, builder.shl(npair, ir.Constant(i64, 1)))
        js_p = cgutils.alloca_once_value(builder, zb)
        splat0 = ir.Constant(v16i, [0] * LANES)

        with cgutils.for_range(builder, nvec) as loop:
            v = builder.add(v0, loop.index)
            row = builder.gep(pa.data, [builder.mul(v, ir.Constant(i64, 2 * BLOCK))])
            idx = builder.load(builder.bitcast(row, v64b.as_pointer()), align=1)
            w = builder.load(builder.bitcast(builder.gep(row, [ir.Constant(i64, BLOCK)]), v16i.as_pointer()), align=1)
            d = builder.bitcast(idx, v16i)
            r = builder.or_(builder.and_(builder.lshr(d, ir.Constant(v16i, [6] * LANES)), ir.Constant(v16i, [3] * LANES)),
                            builder.and_(builder.lshr(d, ir.Constant(v16i, [12] * LANES)), ir.Constant(v16i, [12] * LANES)))
            b0 = builder.zext(builder.load(builder.gep(ba.data, [v])), i64)
            # the window's tables start at t0 = min(b0, nblk - 2 npair) so that every table read lies inside q
            # (the caller guarantees nblk >= 2 npair); a lane's block is then t0 + r + (b0 - t0)
            t0 = builder.select(builder.icmp_unsigned("<=", b0, tmax), b0, tmax)
            sh = builder.trunc(builder.sub(b0, t0), i32)
            r = builder.add(r, builder.shuffle_vector(builder.insert_element(ir.Constant(v16i, ir.Undefined), sh, ir.Constant(i32, 0)),
                                                      ir.Constant(v16i, ir.Undefined), splat0))
            rb = builder.shuffle_vector(builder.bitcast(r, v64b), ir.Constant(v64b, ir.Undefined), rep)   # each byte: its lane's r
            # the 16 scales from block t0 on (masked past the last block)
            left = builder.sub(nblk, t0)
            full = builder.icmp_unsigned(">=", left, ir.Constant(i64, LANES))
            mbits = builder.select(full, ir.Constant(i64, 0xFFFF),
                                   builder.sub(builder.shl(ir.Constant(i64, 1), builder.select(full, ir.Constant(i64, 0), left)),
                                               ir.Constant(i64, 1)))
            smask = builder.bitcast(builder.trunc(mbits, ir.IntType(16)), m16)
            stbl = builder.call(mload, [builder.bitcast(builder.gep(sa.data, [t0]), ir.PointerType()), ir.Constant(i32, 4), smask, zero])
            sv = builder.call(permps, [stbl, r])
            builder.store(zb, qv_p)
            # blocks in pairs: one vpermi2b picks from the pair's 128 activation bytes (index bit 6: the lane's
            # block parity), the bytes whose lane is in that pair kept (vpcmpeqb on r >> 1)
            idx2 = builder.or_(builder.and_(idx, ir.Constant(v64b, [63] * 64)),
                               builder.shl(builder.and_(rb, ir.Constant(v64b, [1] * 64)), ir.Constant(v64b, [6] * 64)))
            rp = builder.lshr(rb, ir.Constant(v64b, [1] * 64))
            builder.store(zb, js_p)
            tp = builder.gep(qa.data, [builder.mul(t0, ir.Constant(i64, BLOCK))])
            with cgutils.for_range(builder, npair) as jl:
                lo = builder.gep(tp, [builder.mul(jl.index, ir.Constant(i64, 2 * BLOCK))])
                tlo = builder.load(builder.bitcast(lo, v64b.as_pointer()), align=1)
                thi = builder.load(builder.bitcast(builder.gep(lo, [ir.Constant(i64, BLOCK)]), v64b.as_pointer()), align=1)
                js = builder.load(js_p)
                m = builder.icmp_unsigned("==", rp, js)
                builder.store(builder.add(js, ir.Constant(v64b, [1] * 64)), js_p)
                builder.store(builder.or_(builder.load(qv_p), builder.select(m, builder.call(perm2, [tlo, idx2, thi]), zb)), qv_p)
            qv = builder.bitcast(builder.load(qv_p), v16i)
            dot = builder.sub(builder.call(dpbusd, [zi, w, qv]), builder.call(dpbusd, [zi, k128, qv]))
            builder.store(builder.call(fma, [builder.sitofp(dot, v16f), sv, builder.load(acc)]), acc)
        total = builder.load(acc)
        lanes = [builder.extract_element(total, ir.Constant(i32, i)) for i in range(LANES)]
        while len(lanes) > 1:
            lanes = [builder.fadd(lanes[i], lanes[i + 1]) for i in range(0, len(lanes), 2)]
        return lanes[0]

    return sig, codegen


@njit(**_OPTS)
def int8_perm_gemv_vnni(vecptr, base, packed, window, wscale, q, corr, scale, bias, out, acc):
    n = vecptr.shape[0] - 1
    if q.shape[0] < scale.shape[0] * 64:
        raise ValueError("int8_perm_gemv: activation blocks do not match the weights' width")
    has_bias = bias.shape[0] == n
    wn = window[0]
    if scale.shape[0] < 2 * ((wn + 1) // 2):
        raise ValueError("int8_perm_gemv: the window's block pairs reach past the activation blocks")
    for r in prange(n):
        s = wscale[r] * vnni_window_dot(packed, base, vecptr[r], vecptr[r + 1] - vecptr[r], wn, q, scale)
        _put(out, r, s, bias, has_bias, acc)


@njit(**_OPTS)
def int8_perm_gemv_portable(vecptr, base, packed, window, wscale, q, corr, scale, bias, out, acc):
    n = vecptr.shape[0] - 1
    if q.shape[0] < scale.shape[0] * 64:
        raise ValueError("int8_perm_gemv: activation blocks do not match the weights' width")
    has_bias = bias.shape[0] == n
    for r in prange(n):
        s = np.float32(0.0)
        for v in range(vecptr[r], vecptr[r + 1]):
            for lane in range(16):
                rl = (np.int64(packed[v, 4 * lane]) >> 6) | ((np.int64(packed[v, 4 * lane + 1]) >> 6) << 2)
                blk = np.int64(base[v]) + rl
                t = np.int32(0)
                for b in range(4 * lane, 4 * lane + 4):
                    t += (np.int32(packed[v, 64 + b]) - np.int32(128)) * np.int32(q[64 * blk + (np.int64(packed[v, b]) & 63)])
                s += np.float32(t) * scale[blk]
        s *= wscale[r]
        _put(out, r, s, bias, has_bias, acc)


int8_gemv = int8_gemv_vnni if _PATHS["int8"] != "portable" else int8_gemv_portable
int8_bitmask_gemv = int8_bitmask_gemv_vnni if _PATHS["int8_bitmask"] != "portable" else int8_bitmask_gemv_portable
int8_ell_gemv = int8_ell_gemv_avx512 if _PATHS["int8_ell"] != "portable" else int8_ell_gemv_portable
int8_csr_gemv = int8_csr_gemv_avx512 if _PATHS["int8_csr"] != "portable" else int8_csr_gemv_portable
int8_perm_gemv = int8_perm_gemv_vnni if _PATHS["int8_perm"] != "portable" else int8_perm_gemv_portable


# ----------------------------------------------------------------------------- encoding (numpy)
def _matrix(W) -> np.ndarray:
    W = np.asarray(W)
    check(W.ndim == 2, f"an int8 format needs a 2-D matrix, got shape {W.shape}")
    W = np.ascontiguousarray(W, dtype=np.float32)
    check(bool(np.isfinite(W).all()), "the matrix to quantise holds NaN or inf", "check the model's weights")
    return W


def quantize_rows(W) -> tuple[np.ndarray, np.ndarray]:
    """Per-row round-to-nearest int8: scale_r = max|W_r| / 127, wq = rint(W / scale_r) in [-127, 127]
    (an all-zero row: scale 0, codes 0). Dequantised: wq * scale[:, None]."""
    W = _matrix(W)
    amax = np.abs(W).max(axis=1) if W.shape[1] else np.zeros(W.shape[0], np.float32)
    scale = (amax / np.float32(127)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    wq = np.clip(np.rint(W / safe[:, None]), -127, 127).astype(np.int8)
    return wq, scale


def index_dtype(in_features: int):
    return np.uint16 if in_features <= 65536 else np.uint32


def encode_int8(W) -> dict[str, np.ndarray]:
    W = _matrix(W)
    wq, scale = quantize_rows(W)
    out_f, in_f = W.shape
    nblk = -(-in_f // BLOCK)
    u = np.full((out_f, nblk * BLOCK), 128, np.uint8)
    u[:, :in_f] = (wq.astype(np.int16) + 128).astype(np.uint8)
    return {"wq": u, "wscale": scale}


def _rows(W):
    nz = W != 0
    counts = nz.sum(axis=1)
    rowptr = np.zeros(W.shape[0] + 1, np.int64)
    np.cumsum(counts, out=rowptr[1:])
    return nz, counts, rowptr


def encode_int8_bitmask(W) -> dict[str, np.ndarray]:
    """Kept weights = the nonzeros of W (a kept weight that rounds to code 0 stays kept)."""
    W = _matrix(W)
    wq, scale = quantize_rows(W)
    out_f, in_f = W.shape
    nz, counts, rowptr = _rows(W)
    nblk = -(-in_f // BLOCK)
    bits = np.zeros((out_f, nblk * BLOCK), bool)
    bits[:, :in_f] = nz
    masks = np.packbits(bits.reshape(out_f, nblk, BLOCK), axis=2, bitorder="little")   # [out, nblk, 8] bytes
    masks = np.ascontiguousarray(masks).view("<u8").reshape(-1).astype(np.uint64)
    vals = (wq[nz].astype(np.int16) + 128).astype(np.uint8)
    return {"rowptr": rowptr, "masks": masks, "vals": vals, "wscale": scale}


def encode_int8_ell(W) -> dict[str, np.ndarray]:
    W = _matrix(W)
    wq, scale = quantize_rows(W)
    out_f, in_f = W.shape
    nz, counts, _ = _rows(W)
    k = int(counts[0]) if out_f else 0
    check(bool((counts == k).all()), "int8_ell needs the same nonzero count in every row", "use int8_csr")
    cols = np.nonzero(nz)[1].astype(index_dtype(in_f)).reshape(out_f, k)
    return {"cols": cols, "vals": wq[nz].reshape(out_f, k), "wscale": scale}


def encode_int8_csr(W) -> dict[str, np.ndarray]:
    W = _matrix(W)
    wq, scale = quantize_rows(W)
    nz, _, rowptr = _rows(W)
    return {"rowptr": rowptr, "cols": np.nonzero(nz)[1].astype(index_dtype(W.shape[1])), "vals": wq[nz], "wscale": scale}


PERM_BLOCKS = 65536            # int8_perm: a vector stores its first block in 16 bits


def _perm_runs(W):
    """[out, nblk]: per row and 64-column block the 4-byte lanes its kept weights fill, ceil(kept / 4)."""
    nz = W != 0
    out_f, in_f = W.shape
    nblk = -(-in_f // BLOCK)
    P = np.zeros((out_f, nblk * BLOCK), bool)
    P[:, :in_f] = nz
    cnt = P.reshape(out_f, nblk, BLOCK).sum(axis=2, dtype=np.int64)
    return -(-cnt // 4)                                              # [out, nblk] lanes per block


WINDOWS = (2, 4, 6, 8, 10, 12, 14, 16)


@njit(cache=True, nogil=True)
def _window_cut(lanes, window):
    """Greedy: each row's blocks in order, each block's lanes appended to the row's current vector while the
    block lies within `window` blocks of the vector's first; a vector closes at 16 lanes (a block split there
    goes on in the next) or at a block past its window. Returns per row its vector count, per vector its first
    block, per (row, block) the (vector, lane) of its run's start, per vector and lane the block offset."""
    out_f, nblk = lanes.shape
    cap = out_f
    for r in range(out_f):
        for b in range(nblk):
            cap += lanes[r, b]
    nvec_row = np.zeros(out_f, np.int64)
    base = np.zeros(cap, np.int64)
    lane_r = np.zeros((cap, 16), np.uint8)
    run_vec = np.full((out_f, nblk), -1, np.int64)
    run_lane = np.zeros((out_f, nblk), np.int64)
    v = -1
    for r in range(out_f):
        u = 16
        for b in range(nblk):
            left = lanes[r, b]
            if left > 0 and u < 16 and b - base[v] >= window:
                u = 16
            while left > 0:
                if u == 16:
                    v += 1
                    nvec_row[r] += 1
                    base[v] = b
                    u = 0
                if run_vec[r, b] < 0:
                    run_vec[r, b] = v
                    run_lane[r, b] = u
                t = min(left, 16 - u)
                for i in range(u, u + t):
                    lane_r[v, i] = np.uint8(b - base[v])
                u += t
                left -= t
    return nvec_row, base[:v + 1], run_vec, run_lane, lane_r[:v + 1]


@njit(cache=True, nogil=True)
def _window_count(lanes, window):
    """The vector count _window_cut would give (the same greedy walk, nothing stored)."""
    out_f, nblk = lanes.shape
    nv = 0
    for r in range(out_f):
        u = 16
        b0 = 0
        for b in range(nblk):
            left = lanes[r, b]
            if left > 0 and u < 16 and b - b0 >= window:
                u = 16
            while left > 0:
                if u == 16:
                    nv += 1
                    b0 = b
                    u = 0
                t = min(left, 16 - u)
                u += t
                left -= t
    return nv


def _window_choice(lanes) -> int:
    """Blocks a vector's window spans: the candidate with the least estimated work, vectors x (12 + 6 pairs
    of blocks) in cycles as measured on a Zen 4 core (per vector: loads, lane scales, two dot products, a
    conversion and an FMA; per pair of blocks of the window: two table loads, a compare, a permute, a merge)."""
    best = None
    for wn in [w for w in WINDOWS if w <= 2 * (lanes.shape[1] // 2)] or [2]:
        nv = int(_window_count(lanes, wn))
        cost = nv * (12 + 6 * (wn // 2))
        if best is None or cost < best[0]:
            best = (cost, wn)
    return best[1]


def encode_int8_perm(W, window: int | None = None) -> dict[str, np.ndarray]:
    """int8 values + byte indices within 64-column blocks (see vnni_window_dot). Each row's kept weights (the
    nonzeros of W) are grouped by block, each block's run padded with w = 0 to whole 4-byte lanes; the runs fill
    64-byte vectors in order, a vector holding blocks base .. base + window - 1 only (window: by the estimated
    work, _window_choice, unless given). Stored: vecptr int64 [out+1], base uint16 [nvec], packed uint8
    [nvec, 128] (64 index bytes col % 64, the lane's block offset in the top bits of its first two; 64 values
    w + 128), window int64 [1], wscale float32 [out]: 2 bytes per kept weight or padding slot + 2 per vector."""
    W = _matrix(W)
    wq, scale = quantize_rows(W)
    out_f, in_f = W.shape
    nblk = -(-in_f // BLOCK)
    check(nblk <= PERM_BLOCKS, f"int8_perm stores block numbers in 16 bits: a width of {in_f} columns is too wide "
          f"(at most {PERM_BLOCKS * BLOCK})", "use int8_bitmask or int8_csr for this matrix")
    check(nblk >= 2, f"int8_perm reads activation blocks in pairs: a width of {in_f} columns (one block) is too narrow",
          "use int8_bitmask or int8_csr for this matrix")
    lanes = _perm_runs(W)
    if window is None:
        window = _window_choice(lanes)
    check(1 <= int(window) <= 16, f"int8_perm windows span 1 to 16 blocks, not {window}", "use a window of 1 to 16")
    window = min(int(window), 2 * (nblk // 2))              # its block pairs stay inside the row's blocks
    nvec_row, base, run_vec, run_lane, lane_r = _window_cut(lanes, int(window))
    vecptr = np.zeros(out_f + 1, np.int64)
    np.cumsum(nvec_row, out=vecptr[1:])
    nvec = int(vecptr[-1])
    packed = np.zeros((nvec, 2 * BLOCK), np.uint8)
    packed[:, BLOCK:] = 128
    rows, cols = np.nonzero(W)
    blk = cols // BLOCK
    key = rows * nblk + blk
    first = np.ones(key.shape[0], bool)
    first[1:] = key[1:] != key[:-1]
    starts = np.nonzero(first)[0]
    pos = np.arange(key.shape[0]) - np.repeat(starts, np.diff(np.append(starts, key.shape[0])))
    flat = run_vec[rows, blk] * 64 + run_lane[rows, blk] * 4 + pos
    packed.reshape(-1)[(flat // 64) * 128 + flat % 64] = (cols % BLOCK).astype(np.uint8)
    packed.reshape(-1)[(flat // 64) * 128 + 64 + flat % 64] = (wq[rows, cols].astype(np.int16) + 128).astype(np.uint8)
    lr = lane_r.astype(np.uint8)
    packed[:, 0:64:4] |= (lr & 3) << 6
    packed[:, 1:64:4] |= ((lr >> 2) & 3) << 6
    return {"vecptr": vecptr, "base": base.astype(np.uint16), "packed": packed,
            "window": np.array([int(window)], np.int64), "wscale": scale}


def dequantized_int8_perm(enc, shape) -> np.ndarray:
    """The dense float32 matrix an int8_perm encoding stores (padding slots hold w = 0)."""
    out_f, in_f = int(shape[0]), int(shape[1])
    W = np.zeros((out_f, in_f), np.float32)
    vecptr, base, packed, scale = enc["vecptr"], enc["base"], enc["packed"], enc["wscale"]
    if base.shape[0] == 0:
        return W
    rows = np.repeat(np.arange(out_f), np.diff(vecptr))
    lr = (packed[:, 0:64:4] >> 6).astype(np.int64) | ((packed[:, 1:64:4] >> 6).astype(np.int64) << 2)
    blk = base.astype(np.int64)[:, None] + lr
    cols = np.repeat(blk, 4, axis=1) * BLOCK + (packed[:, :BLOCK] & 63).astype(np.int64)
    vals = (packed[:, BLOCK:].astype(np.float32) - 128) * scale[rows][:, None]
    keep = packed[:, BLOCK:] != 128
    r2 = np.broadcast_to(rows[:, None], cols.shape)
    W[r2[keep], cols[keep]] = vals[keep]
    return W


def dequantized(W) -> np.ndarray:
    """The matrix the int8 formats compute with: rint-quantised per row, nonzeros of W only (float32)."""
    wq, scale = quantize_rows(W)
    return wq.astype(np.float32) * scale[:, None]


def dequantized_act(x, columns: int = 256) -> np.ndarray:
    """The activation vector the int8 block formats compute with (quantize_act with one scale per `columns`,
    dequantised; float32)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    q, corr, s = act_buffers(x.shape[0], columns)
    quantize_act(x, q, corr, s)
    return (q.reshape(-1, BLOCK).astype(np.float32) * s[:, None]).reshape(-1)[:x.shape[0]]


def encode_q4(W) -> dict[str, np.ndarray]:
    """Q4_0-like: per 32 columns d = (the value of largest magnitude) / -8, codes rint(w / d) + 8 in [0, 15]."""
    W = _matrix(W)
    out_f, in_f = W.shape
    nblk = -(-in_f // BLOCK)
    P = np.zeros((out_f, nblk * BLOCK), np.float32)
    P[:, :in_f] = W
    G = P.reshape(out_f, 2 * nblk, 32)
    idx = np.abs(G).argmax(axis=2)
    m = np.take_along_axis(G, idx[..., None], axis=2)[..., 0]
    d = (m / np.float32(-8)).astype(np.float16)
    df = d.astype(np.float32)
    safe = np.where(df != 0, df, np.float32(1))
    codes = np.clip(np.rint(G / safe[..., None]) + 8, 0, 15).astype(np.uint8)
    codes[df == 0] = 8
    C = codes.reshape(out_f, nblk, 2, 32)
    w4 = (C[:, :, 0, :] | (C[:, :, 1, :] << 4)).reshape(out_f, nblk * 32)
    return {"w4": np.ascontiguousarray(w4), "ws": np.ascontiguousarray(d).view(np.uint16)}


def dequantized_q4(enc, in_features) -> np.ndarray:
    w4, ws = enc["w4"], enc["ws"].view(np.float16).astype(np.float32)
    out_f = w4.shape[0]
    nblk = w4.shape[1] // 32
    B = w4.reshape(out_f, nblk, 32)
    codes = np.stack([B & 15, B >> 4], axis=2).astype(np.float32) - 8      # [out, nblk, 2, 32]
    return (codes * ws.reshape(out_f, nblk, 2)[..., None]).reshape(out_f, nblk * 64)[:, :in_features]
