"""4-bit sparse products of the native engine: GPTQ-grid codes + a keep bitmask (issue 13, "low-bit sparse").

The GPTQ stage (pipeline/quantize.py) gives, per output row r and group g of `group_size` columns, a scale
and a float zero point; a KEPT weight is scale[r, g] * (c - zero[r, g]) with its code c in 0..15, a pruned one
is exactly 0 and has no code (the grid has no level at 0), so the format needs the mask:

  int4_bitmask  rowptr int64 [out+1]   byte offset of row r's codes in vals (rowptr[out] = their bytes)
                masks uint64 [out*nblk] bit j of mask r*nblk + b = column 64 b + j kept (nblk = ceil(in / 64))
                vals uint8 [rowptr[out] + 64]  per row, per block, the block's kept codes in column order, two
                               a byte: code k of the block in byte k >> 1, the low nibble when k is even
                               (pack_bits' order); each block starts on a byte (an odd count leaves a 0
                               high nibble: 1/4 byte per block on average), so a block is ceil(popcount / 2)
                               bytes; then 64 zero bytes, so a block may load 64 bytes from any offset
                scale, zero float32 [out, ngroups]   ngroups = ceil(in / group_size); or uint16 [out, ngroups],
                               the bits of their float16 rounding (SCALE_TYPES "fp16": 4 bytes a group
                               instead of 8), widened to float32 in registers (the intrinsic's fpext,
                               vcvtph2ps; the portable kernel's integer `_half_to_f32`)
                group_size int64 [1]   a multiple of 64 (a group is whole 64-column blocks); the GPTQ
                               stage's -1 (one group per row) is stored as the row width rounded up to 64

about 0.5 byte per kept weight + 1/8 byte per weight (mask) + 8 / group_size bytes per weight (scale, zero;
4 / group_size as float16) + 1/256 byte per weight (block alignment): at 70% with groups of 128 and float32
scales 0.343 bytes a weight, with groups of 256 and float16 ones 0.296. Byte-aligned blocks spare the kernel a variable 4-bit shift of the
nibble offsets (a broadcast and an add a block).

Activations are the int8 blocks of `lowbit.quantize_act` (s_b = max|x| / 127 over the block's 256-column
activation group). Per row

    out[r] = sum_b s_b * scale[r, g(b)] * (dot_b - zero[r, g(b)] * msum_b),
    dot_b  = sum over kept j of block b of c_j * q_j,      msum_b = sum over kept j of q_j

both exact int32 (|dot_b| <= 64 * 15 * 127). One 64-column block of the VNNI kernel:

    raw   = 64 bytes at vals + o                       o = the row's running byte offset
    dup   = vpermd(raw): qword L of dup = raw bytes 4L .. 4L+7
    nib   = vpmultishiftqb(dup, 4 i) & 15              byte 8L + i = nibble 8L + i of the block (VBMI)
    w     = vpexpandb(nib, mask_b), zeroing             the kept codes back in their columns (VBMI2)
    ones  = mask_b ? 1 : 0 (a masked byte move)
    o    += (popcount(mask_b) + 1) >> 1
    dot   = vpdpbusd(dot, w, q_b)    codes are unsigned: u8 x s8 directly, no +128 shift
    msum  = vpdpbusd(msum, ones, q_b)   the masked activation sum (a per-block popcount would not do)
    acc  += (float(dot) - zero * float(msum)) * (s_b * scale)     16 float lanes, two FMAs

Chains (`int4_chain`): consecutive blocks that share both their weight group and their activation scale
(2 with groups of 128 and 256-column activation scales, 4 with groups of 256 or whole rows) chain dot and
msum in int32 (|sum| <= 256 * 15 * 127) and take the float step once per chain; blocks past the last whole
chain (and every block when a chain is 1: groups of 64, or a scale per 64 activation columns) go one by one.
The integer sums are the per-block ones added, so a row is the same number to float rounding either way.

UNROLL chains (or blocks) a loop trip into their own accumulators; the group index advances by a counter (no
division); one fixed-order horizontal sum per row. Needs AVX-512 VNNI + VBMI + VBMI2 (Intel Ice Lake /
Sapphire Rapids, AMD Zen 4); elsewhere (or SPARSEDEPLOY_LOWBIT_PORTABLE=1) `int4_bitmask_gemv` is the
plain-numba twin computing the same integers. `kernel_paths()` says which. Kernel conventions as kernels.py:
it writes out[r] (acc: adds into it), bias added when it has `out` rows.

Measured (benchmarks/results/int4_gemv_*.md): a block costs about twice int8_bitmask's vector instructions
(the nibble unpack and the second vpdpbusd), so the kernel is compute-bound at a near constant time per block
whatever the sparsity; on the AMD EPYC Zen 4, with a float step per block, it was slower than int8 + bitmask at
every sparsity. The chains against per-block float steps on the same weights (benchmarks/int4_chain_ab.py,
AMD EPYC Zen 5, 2 threads, 7B shapes at 70 / 90%): groups of 256 1.17-1.60x faster hot, 1.16-1.34x cold; groups
of 128 mostly 1.13-1.23x, with two of twelve timings slower (a noisy machine).

Every @intrinsic stays in this file: numba's on-disk cache of a kernel is stamped by its source file.
"""
from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .lowbit import BLOCK, LANES, _features, _is, _matrix, _unrolled, _vec_types, group_blocks, has_vbmi2, has_vnni
from .simd_rows import PREFETCH_BYTES, _put, prefetch

_OPTS = dict(parallel=True, fastmath=True, cache=True, nogil=True)
BITS = 4
MAXQ = 2 ** BITS - 1
PAD = 64                       # zero bytes after the packed codes: a block loads 64 bytes from any offset
SCALE_TYPES = ("fp32", "fp16")  # storage of the per-group scale and zero point (fp16: as uint16 bits)


# ----------------------------------------------------------------------------- which path this CPU gets
def has_vbmi() -> bool:
    """AVX-512 VBMI (vpermb, vpmultishiftqb): Intel since Ice Lake / Cannon Lake, AMD Zen 4."""
    f = _features()
    return all(bool(f.get(k, False)) for k in ("avx512f", "avx512bw", "avx512vbmi"))


def _choose() -> dict[str, str]:
    forced = os.environ.get("SPARSEDEPLOY_LOWBIT_PORTABLE", "") not in ("", "0")
    fast = has_vnni() and has_vbmi() and has_vbmi2() and not forced
    return {"int4_bitmask": "avx512-vnni+vbmi+vbmi2" if fast else "portable"}


_PATHS = _choose()


def kernel_paths() -> dict[str, str]:
    """Which kernel the int4 format runs on this CPU: 'avx512-vnni+vbmi+vbmi2' (intrinsics) or 'portable'."""
    return dict(_PATHS)


# ----------------------------------------------------------------------------- intrinsic
@intrinsic
def vnni_int4_bitmask_dot(typingctx, vals, masks, boff, mstart, gscale, gzero, goff, bpg, q, scale, nblk, chain):
    """float32 sum over blocks b < nblk of scale[b] * gscale.flat[goff + b // bpg] *
    (dot_b - gzero.flat[goff + b // bpg] * msum_b), block b's codes expand(nibbles of vals from byte boff
    on, masks[mstart + b]) (see the module doc); the byte offset advances by ceil(popcount / 2) a block.
    chain (1, 2 or 4; int4_chain): that many consecutive blocks share their activation scale and weight group,
    so their dot and msum chain in int32 and the float step (two conversions, two FMAs) runs once per chain;
    the blocks past the last whole chain go one by one."""
    sdt = gscale.dtype if isinstance(gscale, types.Array) else None
    if not (_is(vals, types.uint8, 1) and _is(masks, types.uint64, 1) and sdt in (types.float32, types.uint16)
            and _is(gscale, sdt) and _is(gzero, sdt) and gscale.layout == "C" and gzero.layout == "C"
            and _is(q, types.int8, 1) and _is(scale, types.float32, 1)):
        return None
    half = sdt == types.uint16          # scales / zeros stored as float16 bits (SCALE_TYPES): widened in registers
    sig = types.float32(vals, masks, types.int64, types.int64, gscale, gzero, types.int64, types.int64, q, scale,
                        types.int64, types.int64)

    def codegen(context, builder, signature, args):
        i8, i32, i64, f32, v16i, v16f, v64b = _vec_types()
        m64 = ir.VectorType(ir.IntType(1), 64)
        va = context.make_array(signature.args[0])(context, builder, args[0])
        ma = context.make_array(signature.args[1])(context, builder, args[1])
        gsa = context.make_array(signature.args[4])(context, builder, args[4])
        gza = context.make_array(signature.args[5])(context, builder, args[5])
        qa = context.make_array(signature.args[8])(context, builder, args[8])
        sa = context.make_array(signature.args[9])(context, builder, args[9])
        boff, mstart, goff, bpg, nblk, chain = args[2], args[3], args[6], args[7], args[10], args[11]
        mod = builder.module
        dpbusd = cgutils.get_or_insert_function(mod, ir.FunctionType(v16i, [v16i, v16i, v16i]), "llvm.x86.avx512.vpdpbusd.512")
        fma = cgutils.get_or_insert_function(mod, ir.FunctionType(v16f, [v16f, v16f, v16f]), "llvm.fma.v16f32")
        mshift = cgutils.get_or_insert_function(mod, ir.FunctionType(v64b, [v64b, v64b]), "llvm.x86.avx512.pmultishift.qb.512")
        expand = cgutils.get_or_insert_function(mod, ir.FunctionType(v64b, [v64b, v64b, m64]),
                                                "llvm.x86.avx512.mask.expand.v64i8")
        ctpop = cgutils.get_or_insert_function(mod, ir.FunctionType(i64, [i64]), "llvm.ctpop.i64")
        zi = ir.Constant(v16i, [0] * LANES)
        zb = ir.Constant(v64b, [0] * 64)
        ones = ir.Constant(v64b, [1] * 64)
        low = ir.Constant(v64b, [15] * 64)
        splat0 = ir.Constant(ir.VectorType(i32, LANES), [0] * LANES)
        dup = ir.Constant(ir.VectorType(i32, 64), [4 * (k // 8) + k % 8 for k in range(64)])
        ctrl = ir.Constant(v64b, [4 * (k % 8) for k in range(64)])
        off = cgutils.alloca_once_value(builder, boff)
        kin = cgutils.alloca_once_value(builder, ir.Constant(i64, 0))      # block index within its group
        gi = cgutils.alloca_once_value(builder, goff)                       # flat group index

        def splat(x):
            return builder.shuffle_vector(builder.insert_element(ir.Constant(v16f, ir.Undefined), x, ir.Constant(i32, 0)),
                                          ir.Constant(v16f, ir.Undefined), splat0)

        def codes(b, dot, msum):
            """block b's codes into the int32 lanes (dot, msum); advances the byte offset."""
            mk = builder.load(builder.gep(ma.data, [builder.add(mstart, b)]))
            mv = builder.bitcast(mk, m64)
            o = builder.load(off)
            p = builder.gep(va.data, [o])
            prefetch(builder, va.data, builder.add(o, ir.Constant(i64, PREFETCH_BYTES)))
            # the masks too: 8 bytes a block, most of the bytes at high sparsity; without this the kernel ran slower
            # as sparsity rose on an Intel Xeon (4096x4096 cold, 50/70/90%: 0.42/0.54/0.73 ms; with it 0.34/0.33/0.31)
            prefetch(builder, ma.data, builder.add(builder.add(mstart, b), ir.Constant(i64, PREFETCH_BYTES // 8)))
            raw = builder.load(builder.bitcast(p, v64b.as_pointer()), align=1)
            d = builder.shuffle_vector(raw, ir.Constant(v64b, ir.Undefined), dup)
            nib = builder.and_(builder.call(mshift, [ctrl, d]), low)
            w = builder.call(expand, [nib, zb, mv])
            one = builder.select(mv, ones, zb)
            qv = builder.load(builder.bitcast(builder.gep(qa.data, [builder.mul(b, ir.Constant(i64, BLOCK))]),
                                              v16i.as_pointer()), align=1)
            nb = builder.lshr(builder.add(builder.call(ctpop, [mk]), ir.Constant(i64, 1)), ir.Constant(i64, 1))
            builder.store(builder.add(o, nb), off)
            return (builder.call(dpbusd, [dot, builder.bitcast(w, v16i), qv]),
                    builder.call(dpbusd, [msum, builder.bitcast(one, v16i), qv]))

        def finish(b, n, dot, msum, acc):
            """acc += (dot - zero * msum) * scale[b] * gscale for the n blocks from b (one group, one act scale)."""
            g = builder.load(gi)
            gs = builder.load(builder.gep(gsa.data, [g]))
            gz = builder.load(builder.gep(gza.data, [g]))
            if half:                    # float16 bits -> float32 (vcvtph2ps where the CPU has F16C)
                gs = builder.fpext(builder.bitcast(gs, ir.HalfType()), f32)
                gz = builder.fpext(builder.bitcast(gz, ir.HalfType()), f32)
            s = builder.load(builder.gep(sa.data, [b]))
            e = builder.call(fma, [builder.sitofp(msum, v16f), splat(builder.fneg(gz)), builder.sitofp(dot, v16f)])
            builder.store(builder.call(fma, [e, splat(builder.fmul(s, gs)), builder.load(acc)]), acc)
            k1 = builder.add(builder.load(kin), ir.Constant(i64, n))
            wrap = builder.icmp_unsigned("==", k1, bpg)
            builder.store(builder.select(wrap, ir.Constant(i64, 0), k1), kin)
            builder.store(builder.add(g, builder.zext(wrap, i64)), gi)

        def block(b, acc):
            dot, msum = codes(b, zi, zi)
            finish(b, 1, dot, msum, acc)

        def chained(n):
            def run(c, acc):
                b0 = builder.mul(c, ir.Constant(i64, n))
                dot, msum = zi, zi
                for u in range(n):
                    dot, msum = codes(builder.add(b0, ir.Constant(i64, u)), dot, msum)
                finish(b0, n, dot, msum, acc)
            return run

        result = cgutils.alloca_once(builder, f32)
        done = cgutils.alloca_once(builder, i64)           # blocks the chains covered

        def chains(n):
            """every whole chain of n blocks into result; done = the blocks they cover."""
            k = builder.udiv(nblk, ir.Constant(i64, n))
            builder.store(_unrolled(builder, k, chained(n)), result)
            builder.store(builder.mul(k, ir.Constant(i64, n)), done)

        is4 = builder.icmp_signed("==", chain, ir.Constant(i64, 4))
        is2 = builder.icmp_signed("==", chain, ir.Constant(i64, 2))
        with builder.if_else(is4) as (four, other):
            with four:
                chains(4)
            with other:
                with builder.if_else(is2) as (two, single):
                    with two:
                        chains(2)
                    with single:
                        builder.store(ir.Constant(f32, 0.0), result)
                        builder.store(ir.Constant(i64, 0), done)
        d0 = builder.load(done)
        rest = _unrolled(builder, builder.sub(nblk, d0), lambda b, acc: block(builder.add(d0, b), acc))
        return builder.fadd(builder.load(result), rest)

    return sig, codegen


def widen(x):
    """A stored scale or zero as float32: float32 as it is, uint16 as the float16 it holds (numba has no float16
    on CPUs); the portable kernel's twin of the intrinsic's fpext."""
    if isinstance(x, np.uint16):
        return np.float32(np.array(x, np.uint16).view(np.float16))
    return np.float32(x)


@njit(cache=True, nogil=True)
def _half_to_f32(x):
    """float16 bits -> float32 in integer arithmetic (no F16C needed): every float16 is exact in float32."""
    h = np.int32(x)
    e = (h >> 10) & 31
    m = h & 1023
    if e == 0:
        v = np.float32(m) * np.float32(2.0 ** -24)
    elif e == 31:
        v = np.float32(np.inf) if m == 0 else np.float32(np.nan)
    else:
        v = np.float32(1024 + m) * np.float32(2.0 ** (e - 25))
    return -v if (h >> 15) & 1 else v


@overload(widen)
def _widen(x):
    if x == types.float32:
        return lambda x: x
    if x == types.uint16:
        return lambda x: _half_to_f32(x)
    return None


@njit(cache=True, nogil=True, inline="always")
def int4_chain(bpg, nblk, corr_len):
    """How many consecutive 64-column blocks share both a weight group (bpg blocks) and an activation scale
    (group_blocks: 1 or 4 blocks): 4, 2 or 1; the VNNI kernel chains their integer sums."""
    G = group_blocks(nblk, corr_len)
    if G % 4 == 0 and bpg % 4 == 0:
        return 4
    if G % 2 == 0 and bpg % 2 == 0:
        return 2
    return 1


# ----------------------------------------------------------------------------- int4 + bitmask kernels
# (rowptr, masks, vals, gscale, gzero, group_size) from encode_int4_bitmask; q, corr, scale from quantize_act of x
# (corr is not read: the codes are unsigned, so there is no +128 shift to take out; it is taken so that every
# int8-activation kernel has the same (q, corr, scale, bias, out, acc) tail).
@njit(cache=True, nogil=True)
def _int4_bitmask_shape(rowptr, masks, vals, gscale, gzero, group_size, q, scale):
    """The checks both int4 + bitmask GEMVs make; returns (rows, 64-column blocks, blocks per group, groups)."""
    n = rowptr.shape[0] - 1
    nblk = masks.shape[0] // n if n else 0
    if scale.shape[0] != nblk or q.shape[0] < nblk * 64:
        raise ValueError("int4_bitmask_gemv: activation blocks do not match the weights' width")
    if group_size <= 0 or group_size % 64 != 0:
        raise ValueError("int4_bitmask_gemv: group_size must be a positive multiple of 64")
    bpg = group_size // 64
    ng = gscale.shape[1]
    if ng != (nblk + bpg - 1) // bpg or gzero.shape[0] != n or gzero.shape[1] != ng or gscale.shape[0] != n:
        raise ValueError("int4_bitmask_gemv: scales / zeros do not match the groups of the weights")
    if n and vals.shape[0] < rowptr[n] + 64:
        raise ValueError("int4_bitmask_gemv: vals lacks its 64 bytes of padding (use encode_int4_bitmask)")
    return n, nblk, bpg, ng


@njit(**_OPTS)
def int4_bitmask_gemv_vnni(rowptr, masks, vals, gscale, gzero, group_size, q, corr, scale, bias, out, acc):
    n, nblk, bpg, ng = _int4_bitmask_shape(rowptr, masks, vals, gscale, gzero, group_size, q, scale)
    has_bias = bias.shape[0] == n
    chain = int4_chain(bpg, nblk, corr.shape[0])
    for r in prange(n):
        s = vnni_int4_bitmask_dot(vals, masks, rowptr[r], r * nblk, gscale, gzero, r * ng, bpg, q, scale, nblk, chain)
        _put(out, r, s, bias, has_bias, acc)


@njit(**_OPTS)
def int4_bitmask_gemv_portable(rowptr, masks, vals, gscale, gzero, group_size, q, corr, scale, bias, out, acc):
    n, nblk, bpg, ng = _int4_bitmask_shape(rowptr, masks, vals, gscale, gzero, group_size, q, scale)
    has_bias = bias.shape[0] == n
    one = np.uint64(1)
    for r in prange(n):
        off = rowptr[r]
        s = np.float32(0.0)
        for b in range(nblk):
            m = masks[r * nblk + b]
            if m == 0:
                continue
            g = b // bpg
            dot = np.int32(0)
            msum = np.int32(0)
            k = 0
            for j in range(64):
                if (m >> np.uint64(j)) & one:
                    c = (np.int32(vals[off + (k >> 1)]) >> np.int32(4 * (k & 1))) & np.int32(15)
                    qj = np.int32(q[b * 64 + j])
                    dot += c * qj
                    msum += qj
                    k += 1
            off += (k + 1) >> 1
            e = np.float32(dot) - widen(gzero[r, g]) * np.float32(msum)
            s += e * (scale[b] * widen(gscale[r, g]))
        _put(out, r, s, bias, has_bias, acc)


int4_bitmask_gemv = int4_bitmask_gemv_vnni if _PATHS["int4_bitmask"] != "portable" else int4_bitmask_gemv_portable


# ----------------------------------------------------------------------------- encoding (numpy)
def stored_group_size(group_size, in_features: int) -> int:
    """group_size as stored: a positive multiple of 64, or -1 = one group per row (stored as the padded width)."""
    gs = int(group_size)
    if gs == -1:
        return max(BLOCK, -(-in_features // BLOCK) * BLOCK)
    if gs <= 0 or gs % BLOCK:
        raise ValueError(f"int4_bitmask: group_size {group_size} is not a positive multiple of {BLOCK} (or -1): "
                         "a group must be whole 64-column activation blocks")
    return gs


def stored_scales(a, scales: str = "fp32") -> np.ndarray:
    """Scales or zero points as stored: float32, or ("fp16") the uint16 bits of their float16 rounding (ValueError
    where one does not fit a float16)."""
    if scales not in SCALE_TYPES:
        raise ValueError(f"int4_bitmask: scale type {scales!r} is not one of {', '.join(SCALE_TYPES)}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if scales == "fp32":
        return a.copy()
    with np.errstate(over="ignore"):
        h = a.astype(np.float16)
    if not np.isfinite(h).all():
        raise ValueError("int4_bitmask: a scale or zero point does not fit a float16 (|x| > 65504 or not finite); "
                         "store them as fp32")
    return h.view(np.uint16)


def as_f32(a) -> np.ndarray:
    """Stored scales or zero points (float32, or float16 bits in uint16) as float32."""
    a = np.asarray(a)
    return a.view(np.float16).astype(np.float32) if a.dtype == np.uint16 else a.astype(np.float32, copy=False)


def scale_type(enc) -> str:
    """'fp16' when the group's scales and zeros are stored as float16 bits, else 'fp32'."""
    return "fp16" if np.asarray(enc["scale"]).dtype == np.uint16 else "fp32"


def encode_int4_bitmask(codes, scale, zero, keep, group_size, scales: str = "fp32") -> dict[str, np.ndarray]:
    """GPTQ-stage output -> the int4_bitmask arrays (module doc). codes uint8 [out, in] (0..15 where kept;
    anything where pruned), scale / zero float32 [out, ceil(in / group_size)], keep bool [out, in];
    group_size a multiple of 64 (ValueError otherwise) or -1 (one group per row). scales: their storage, "fp32"
    (exact) or "fp16" (rounded to float16, stored as uint16 bits: 4 instead of 8 bytes a group)."""
    codes = np.asarray(codes)
    keep = np.asarray(keep)
    if codes.ndim != 2 or keep.shape != codes.shape:
        raise ValueError(f"int4_bitmask: codes {codes.shape} and keep {keep.shape} must be the same 2-D shape")
    out_f, in_f = codes.shape
    gs = stored_group_size(group_size, in_f)
    ng = -(-in_f // gs) if in_f else 0
    scale = np.ascontiguousarray(scale, dtype=np.float32)
    zero = np.ascontiguousarray(zero, dtype=np.float32)
    if scale.shape != (out_f, ng) or zero.shape != (out_f, ng):
        raise ValueError(f"int4_bitmask: scale {scale.shape} / zero {zero.shape} must be {(out_f, ng)} "
                         f"(one per row and group of {gs} columns)")
    keep = keep.astype(bool)
    kept = codes[keep]
    if kept.size and (kept.min() < 0 or kept.max() > MAXQ):
        raise ValueError("int4_bitmask: a kept code is outside 0..15")
    kept = kept.astype(np.uint8)
    nblk = -(-in_f // BLOCK)
    bits = np.zeros((out_f, nblk * BLOCK), bool)
    bits[:, :in_f] = keep
    masks = np.packbits(bits.reshape(out_f, nblk, BLOCK), axis=2, bitorder="little")     # [out, nblk, 8] bytes
    masks = np.ascontiguousarray(masks).view("<u8").reshape(-1).astype(np.uint64)
    pos, nbytes = _nibble_positions(bits.reshape(out_f, nblk, BLOCK))
    rowptr = np.zeros(out_f + 1, np.int64)
    np.cumsum(nbytes.sum(axis=1), out=rowptr[1:])
    vals = np.zeros(int(rowptr[-1]) + PAD, np.uint8)
    lo = pos % 2 == 0
    vals[pos[lo] >> 1] = kept[lo]
    vals[pos[~lo] >> 1] |= kept[~lo] << 4
    return {"rowptr": rowptr, "masks": masks, "vals": vals, "scale": stored_scales(scale, scales),
            "zero": stored_scales(zero, scales), "group_size": np.array([gs], np.int64)}


def _nibble_positions(bits):
    """bits bool [out, nblk, 64] -> (nibble position in vals of each kept weight, row-major order; bytes per
    block [out, nblk]): blocks laid out one after the other, each from a byte boundary."""
    out_f, nblk, _ = bits.shape
    counts = bits.sum(axis=2).reshape(-1)
    nbytes = (counts + 1) // 2
    start = np.zeros(counts.shape[0], np.int64)
    np.cumsum(nbytes[:-1], out=start[1:])
    first = np.zeros(counts.shape[0], np.int64)                 # index of each block's first kept weight
    np.cumsum(counts[:-1], out=first[1:])
    blk = np.repeat(np.arange(counts.shape[0]), counts)         # the block of each kept weight
    rank = np.arange(blk.shape[0], dtype=np.int64) - first[blk]
    return 2 * start[blk] + rank, nbytes.reshape(out_f, nblk)


def rtn_int4(W, group_size, scales: str = "fp32") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest asymmetric 4-bit on pipeline/quantize.py's grid, per row and group, over the nonzeros
    (kept = W != 0): scale = (max - min) / 15, zero = -min / scale (one distinct value: scale = |min|, at
    least 1e-8; no kept value: min -1, max 1), code = clip(rint(w / scale + zero), 0, 15), moved one level
    where its level would be exactly 0. scales "fp16": scale, then zero, rounded to float16 before the codes are
    chosen (the codes fit the stored grid; scale at least 2^-24, float16's smallest). Returns (codes uint8
    [out, in], 0 where pruned; scale, zero float32 [out, groups], float16-exact with "fp16"; keep bool [out, in]);
    group_size as in encode_int4_bitmask."""
    W = _matrix(W)
    out_f, in_f = W.shape
    gs = stored_group_size(group_size, in_f)
    ng = -(-in_f // gs) if in_f else 0
    keep = W != 0
    scale = np.zeros((out_f, ng), np.float32)
    zero = np.zeros((out_f, ng), np.float32)
    codes = np.zeros((out_f, in_f), np.uint8)
    for g in range(ng):
        sl = slice(g * gs, min(in_f, (g + 1) * gs))
        Wg, Kg = W[:, sl], keep[:, sl]
        has = Kg.any(axis=1)
        xmin = np.where(has, np.where(Kg, Wg, np.float32(np.inf)).min(axis=1), np.float32(-1)).astype(np.float32)
        xmax = np.where(has, np.where(Kg, Wg, np.float32(-np.inf)).max(axis=1), np.float32(1)).astype(np.float32)
        s = ((xmax - xmin) / np.float32(MAXQ)).astype(np.float32)
        s = np.where(s <= 0, np.maximum(np.abs(xmin), np.float32(1e-8)), s).astype(np.float32)
        if scales == "fp16":
            s = np.maximum(as_f32(stored_scales(s, "fp16")), np.float32(2.0 ** -24))
        z = (-xmin / s).astype(np.float32)
        if scales == "fp16":
            z = as_f32(stored_scales(z, "fp16"))
        qf = np.clip(np.rint(Wg / s[:, None] + z[:, None]), 0, MAXQ).astype(np.float32)
        hit = Kg & (s[:, None] * (qf - z[:, None]) == 0)
        qf = np.where(hit, np.where(qf < MAXQ, qf + 1, qf - 1), qf)
        codes[:, sl] = np.where(Kg, qf, 0).astype(np.uint8)
        scale[:, g], zero[:, g] = s, z
    return codes, scale, zero, keep


def encode_int4_bitmask_from_weights(W, group_size=128, scales: str = "fp32") -> dict[str, np.ndarray]:
    """int4_bitmask of W quantised by `rtn_int4` (kept = the nonzeros of W), scales stored as `scales`."""
    codes, scale, zero, keep = rtn_int4(W, group_size, scales)
    return encode_int4_bitmask(codes, scale, zero, keep, group_size, scales)


def decode_int4_bitmask(enc, in_features: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of encode_int4_bitmask: (codes uint8 [out, in], 0 where pruned; scale; zero (float32, widened from
    float16 where stored so); keep)."""
    rowptr, masks, vals = enc["rowptr"], enc["masks"], enc["vals"]
    out_f = rowptr.shape[0] - 1
    nblk = masks.shape[0] // out_f if out_f else 0
    bits = np.unpackbits(masks.astype("<u8").view(np.uint8).reshape(out_f, nblk, 8), axis=2, bitorder="little")
    pos, _ = _nibble_positions(bits.reshape(out_f, nblk, BLOCK).astype(bool))
    keep = bits.reshape(out_f, nblk * BLOCK)[:, :in_features].astype(bool)
    codes = np.zeros((out_f, in_features), np.uint8)
    codes[keep] = (vals[pos >> 1] >> (4 * (pos & 1)).astype(np.uint8)) & 15
    return codes, as_f32(enc["scale"]), as_f32(enc["zero"]), keep


def dequantized_int4(enc, in_features: int) -> np.ndarray:
    """The exact float32 matrix the int4_bitmask kernels compute with: scale * (code - zero) where kept (the
    float32 arithmetic of quantize.dequantize), exactly 0 where pruned."""
    codes, scale, zero, keep = decode_int4_bitmask(enc, in_features)
    gs = int(enc["group_size"][0])
    g = np.arange(in_features) // gs
    w = scale[:, g] * (codes.astype(np.float32) - zero[:, g])
    return np.where(keep, w, np.float32(0)).astype(np.float32)
