"""Weight quantization for one linear layer (round-to-nearest and GPTQ) that keeps every pruned zero,
and the packed on-disk checkpoint. Pure tensor functions and file I/O; knows nothing about the walker.

The grid: per group of `group_size` input columns of one output row, over its *kept* weights only,
    maxq = 2**bits - 1, codes q in [0, maxq],   dequantized value  w_q = scale · (q - zero)
    asymmetric: scale = (max w - min w) / maxq, zero = -min w / scale   (a float offset: levels span
                exactly [min w, max w], like GGUF's Q4_1 "scale + min")
    symmetric:  scale = 2 · max |w| / maxq,   zero = maxq / 2           (levels ±scale/2, ±3·scale/2, …)
Neither grid has a level at 0 (except by a float coincidence, which `codes` steps away from), so no kept
weight is ever rounded to 0, and every kept weight is within scale/2 of its value. Pruned weights (a
weight that is 0 on input, or True in `mask`) are not on the grid at all: they are exactly 0, kept so by
a sparsity bitmask. So the set of zeros after quantization is exactly the set before, and the stages check
that each layer's zero count is unchanged.

Why not an integer zero point (GPTQ's grid, which contains an exact 0 so pruned weights could live in it)?
Then a small kept weight either rounds to 0 (new zeros: the sparsity changes) or must be pushed to the
nearest nonzero level, up to a full step away. Wanda keeps small weights on the high-activation (outlier)
input columns, exactly where that error is amplified: on a synthetic layer with 6 outlier columns the
output error of 4-bit GPTQ was ~100× larger with the pushed levels than with this grid, and SmolLM2 at
50% Wanda went from perplexity 81 to 357 at 4 bits. The float-offset grid costs nothing in accuracy and
one bit per weight (the mask) on disk.

When `group_size` does not divide in_features, the last group of each row is simply shorter (the GPTQ
reference does the same); nothing is padded. `group_size=-1` means one group per output row.

GPTQ (Frantar et al. 2022): columns are quantized one at a time in blocks of `blocksize`; each
column's error e = (w - w_q) / U_jj is compensated on the later columns with the upper Cholesky
factor U of (H + λI)⁻¹ (λ = 1% of mean diag H), lazily across blocks. With a sparsity mask the
compensating updates do reach pruned positions in between, but a pruned weight is set back to exactly 0
when its column comes up and the difference is itself propagated as error — the same thing the
SparseGPT reference does with a fixed mask. `freeze_pruned=True` instead drops every update that would
touch a pruned position (pruned weights stay 0 throughout); propagating measured slightly better.
act-order processes columns by decreasing diag(H). Groups stay contiguous in the original column
order (GPTQ's "static groups"): their parameters are computed from the weights before the loop, so no
per-column group index has to be stored.

Packed checkpoint (RUN/quantized/, format "sparsedeploy-packed/2"): model.safetensors (above 512 MiB of tensors:
Hugging Face's shards model-0000k-of-0000n.safetensors named by model.safetensors.index.json, written one tensor at a
time by `PackedWriter`, so a streamed quantize never holds the whole checkpoint) holds, per quantized linear
`<module>` [out, in]:
    `<module>.weight_mask`    uint8 [out, ceil(in/8)]: the keep bitmask per row, 8 per byte, least significant
                              bit first (bit c of row r = 1: weight (r, c) is kept; 0: pruned, exactly 0);
    `<module>.weight_qcodes`  uint8 [ceil(nnz·bits/8)]: the codes of the *kept* weights only (nnz of them),
                              row by row, columns ascending within a row, as one bit stream: code i of the
                              stream occupies bits i·bits … i·bits+bits-1, least significant first (pack_bits'
                              order: int4 two per byte, the earlier code in the low nibble; 3-bit eight codes in
                              three bytes); rows are not padded, so a row may start inside a byte;
    `<module>.weight_rowptr`  int64 [out+1]: row r's codes are stream codes rowptr[r] … rowptr[r+1]-1, i.e.
                              bits rowptr[r]·bits … (offsets in *codes*, not bytes; rowptr[0] = 0, rowptr[out]
                              = nnz, rowptr[r+1] - rowptr[r] = the kept count of row r);
    `<module>.weight_scales`  float32 [out, groups] and, when asymmetric, `<module>.weight_zeros` (float32
                              [out, groups]; symmetric: zero = maxq/2, not stored), so the restore is bit-exact;
    `<module>.weight_shape`   int64 [2] = (out, in).
Pruned positions hold no code, so the codes take bits·(1 - sparsity) bits per weight and the checkpoint
shrinks with sparsity (the mask stays 1 bit per weight). Every other tensor (embeddings, norms, biases) is
stored unchanged in its own dtype (a streamed quantize of a bf16 model keeps them bf16); tied tensors once.
quantize.json names the format, bits, group size, symmetry, the tied tensors and the sizes. `load_packed` rebuilds the fake-quant float model; it also reads the older format
"sparsedeploy-packed/1" (same tensors without weight_rowptr, weight_qcodes uint8 [out, ceil(in·bits/8)]:
every position's code densely bit-packed per row, pruned positions holding code 0). Writing is always /2.
sparsedeploy.engine.native.gptq_codes reads both formats without torch.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError, check
from ..engine.native.gptq_codes import unpack_bits as _unpack_bits_np
from .prune import _inverse_hessian_factor

BITS_RANGE = (2, 8)
PACKED_FILE = "model.safetensors"
QUANT_JSON = "quantize.json"
FORMAT_V1 = "sparsedeploy-packed/1"   # dense codes per row (pruned positions hold code 0); read only
FORMAT = "sparsedeploy-packed/2"      # kept codes only + row pointer; what write_packed writes
FORMATS = (FORMAT_V1, FORMAT)


# --------------------------------------------------------------------------------------------
# argument checks


def check_quant_args(bits, group_size) -> None:
    lo, hi = BITS_RANGE
    check(isinstance(bits, int) and not isinstance(bits, bool) and lo <= bits <= hi,
          f"--bits {bits} is outside {lo}–{hi}", "use e.g. --bits 4 (GPTQ supports 2 to 8 bits)")
    check(isinstance(group_size, int) and not isinstance(group_size, bool) and (group_size == -1 or group_size >= 1),
          f"--group-size {group_size} is not a positive integer or -1",
          "use e.g. --group-size 128, or -1 for one group per output row")


def _ngroups(cols: int, group_size: int) -> int:
    return 1 if group_size == -1 else math.ceil(cols / group_size)


def _group_len(cols: int, group_size: int) -> int:
    return cols if group_size == -1 else group_size


# --------------------------------------------------------------------------------------------
# the grid


def grid_params(W: Tensor, keep: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """(scale, zero) per row of W [rows, k] over its kept weights; float32. Levels are scale·(q - zero)."""
    maxq = 2 ** bits - 1
    W = W.to(torch.float32)
    has = keep.any(dim=1)
    if sym:
        xmax = torch.where(keep, W.abs(), torch.zeros_like(W)).max(dim=1).values
        xmax = torch.where(has & (xmax > 0), xmax, torch.ones_like(xmax))
        return 2 * xmax / maxq, torch.full_like(xmax, maxq / 2)
    inf = torch.full_like(W, float("inf"))
    xmin = torch.where(keep, W, inf).min(dim=1).values
    xmax = torch.where(keep, W, -inf).max(dim=1).values
    xmin = torch.where(has, xmin, -torch.ones_like(xmin))
    xmax = torch.where(has, xmax, torch.ones_like(xmax))
    scale = (xmax - xmin) / maxq
    flat = scale <= 0          # one distinct kept value: any positive step puts it on level 0
    scale = torch.where(flat, xmin.abs().clamp(min=1e-8), scale)
    return scale, -xmin / scale


def dequantize(q: Tensor, scale: Tensor, zero: Tensor, keep: Tensor) -> Tensor:
    """The one formula for fake-quant values: scale·(q - zero) where kept, exactly 0 where pruned (float32;
    the loader uses it too, so the restore is bit-exact)."""
    scale, zero = scale.to(torch.float32), zero.to(torch.float32)
    shape = torch.broadcast_shapes(q.shape, scale.shape, zero.shape, keep.shape)
    w = torch.empty(shape, dtype=torch.float32, device=q.device).copy_(q)   # converts and broadcasts in one buffer
    # in place, the same IEEE operations as scale * (q - zero): one [out, in] float32 buffer, not four
    return w.sub_(zero).mul_(scale).masked_fill_(keep.logical_not(), 0.0)


def codes(w: Tensor, scale: Tensor, zero: Tensor, maxq: int, keep: Tensor) -> Tensor:
    """Integer codes (as float32) of w on the grid: the nearest level; pruned entries get code 0 (unused).
    A kept weight whose level is exactly 0.0 (possible only when `zero` happens to be an integer) moves
    one level, so no kept weight becomes 0."""
    q = torch.clamp(torch.round(w / scale + zero), 0, maxq)
    hit = keep & (dequantize(q, scale, zero, keep) == 0)
    if bool(hit.any()):
        q = torch.where(hit, torch.where(q < maxq, q + 1, q - 1), q)
    return torch.where(keep, q, torch.zeros_like(q))


@dataclass
class QuantResult:
    weight: Tensor | None  # [out, in] fake-quantized weights, W's dtype
    q: Tensor            # [out, in] uint8 codes in [0, 2**bits - 1] (0 where pruned)
    scale: Tensor        # [out, groups] float32
    zero: Tensor         # [out, groups] float32 (maxq / 2 when symmetric)
    keep: Tensor         # [out, in] bool: False = pruned (exactly 0)
    bits: int
    group_size: int
    sym: bool
    act_order: bool

    @property
    def g_idx(self) -> Tensor:
        cols = self.q.shape[1]
        return torch.arange(cols) // _group_len(cols, self.group_size)


class ColumnQuantizer:
    """Quantizes a weight matrix column by column (GPTQ's and joint SparseGPT's inner loop), in a
    processing order given by `perm` (identity unless act-order). Keeps codes, scales and zero points.

    Without `perm`, group g covers columns [g·gs, (g+1)·gs); its parameters are computed when its first
    column comes up, from the weights as they are then (after earlier compensation), pruned ones as 0.
    With `perm` (act-order) and groups, the groups are the same original-order column ranges and their
    parameters come from `static_groups(W, keep)` before the loop (W in original column order).
    """

    def __init__(self, rows: int, cols: int, bits: int, group_size: int, sym: bool, device, perm: Tensor | None = None):
        check_quant_args(bits, group_size)
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.maxq = 2 ** bits - 1
        self.gs = _group_len(cols, group_size)
        self.rows, self.cols = rows, cols
        ng = _ngroups(cols, group_size)
        self.scale = torch.zeros(rows, ng, dtype=torch.float32, device=device)
        self.zero = torch.zeros(rows, ng, dtype=torch.float32, device=device)
        self.q = torch.zeros(rows, cols, dtype=torch.uint8, device=device)     # processing order (bits <= 8)
        self.keep = torch.ones(rows, cols, dtype=torch.bool, device=device)
        self.perm = perm
        self.static = perm is not None and group_size != -1
        self.group_of = (perm // self.gs) if self.static else None     # processing position -> group
        self.pruned = 0      # entries handed in as pruned (they come out exactly 0)

    def static_groups(self, W: Tensor, keep: Tensor) -> None:
        """Parameters of every (original-order, contiguous) group from W [out, in] before any update."""
        Wk = W.to(torch.float32)
        for g0 in range(0, self.cols, self.gs):
            self.scale[:, g0 // self.gs], self.zero[:, g0 // self.gs] = grid_params(
                Wk[:, g0:g0 + self.gs], keep[:, g0:g0 + self.gs], self.bits, self.sym)

    def column(self, c: Tensor | int, w: Tensor, keep: Tensor, group: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Quantize processing column c (values w [rows], keep [rows]) and return its fake-quant values.
        At a group start, `group` = (current weights, keep) of at least that group's columns."""
        if self.static:
            g = int(self.group_of[c])
        else:
            g = c // self.gs
        if not self.static and c % self.gs == 0:
            if group is None:
                raise ValueError("column(): a group starts here; pass its current weights")
            Wg, Kg = group
            Wg, Kg = Wg[:, :self.gs], Kg[:, :self.gs]
            self.scale[:, g], self.zero[:, g] = grid_params(Wg, Kg, self.bits, self.sym)
        q = codes(w, self.scale[:, g], self.zero[:, g], self.maxq, keep)
        self.q[:, c] = q
        self.keep[:, c] = keep
        self.pruned += int((~keep).sum())
        return dequantize(q, self.scale[:, g], self.zero[:, g], keep)

    def result(self, weight: Tensor, act_order: bool) -> QuantResult:
        """Codes back in the original column order; `weight` is already in original order."""
        q, keep = self.q, self.keep
        if self.perm is not None:
            q, keep = torch.empty_like(self.q), torch.empty_like(self.keep)
            q[:, self.perm] = self.q
            keep[:, self.perm] = self.keep
        return QuantResult(weight, q.cpu(), self.scale.cpu(), self.zero.cpu(), keep.cpu(),
                           self.bits, self.group_size, self.sym, act_order)


def _check_weight(W: Tensor, who: str) -> None:
    if not isinstance(W, Tensor) or W.dim() != 2 or not W.is_floating_point():
        raise UserError(f"{who} needs a 2-D floating-point weight matrix [out, in]")


def _keep_mask(W: Tensor, mask: Tensor | None) -> Tensor:
    keep = W != 0
    if mask is not None:
        check(tuple(mask.shape) == tuple(W.shape), f"the sparsity mask has shape {tuple(mask.shape)}, the weight {tuple(W.shape)}")
        keep &= ~mask.to(torch.bool).to(W.device)
    return keep


# --------------------------------------------------------------------------------------------
# round-to-nearest


@torch.no_grad()
def quantize_rtn(W: Tensor, bits: int, group_size: int = 128, sym: bool = False, mask: Tensor | None = None) -> QuantResult:
    """Round-to-nearest on the same grid as GPTQ (no error compensation). mask: True = pruned."""
    _check_weight(W, "quantize_rtn")
    check_quant_args(bits, group_size)
    rows, cols = W.shape
    keep = _keep_mask(W, mask)
    Wf = W.detach().to(torch.float32) * keep
    qz = ColumnQuantizer(rows, cols, bits, group_size, sym, W.device)
    out = torch.empty_like(Wf)
    for g0 in range(0, cols, qz.gs):
        g1 = min(g0 + qz.gs, cols)
        K = keep[:, g0:g1]
        qz.scale[:, g0 // qz.gs], qz.zero[:, g0 // qz.gs] = grid_params(Wf[:, g0:g1], K, bits, sym)
        s_, z = qz.scale[:, g0 // qz.gs, None], qz.zero[:, g0 // qz.gs, None]
        q = codes(Wf[:, g0:g1], s_, z, qz.maxq, K)
        qz.q[:, g0:g1], qz.keep[:, g0:g1] = q, K
        out[:, g0:g1] = dequantize(q, s_, z, K)
    return qz.result(out.to(W.dtype), act_order=False)


# --------------------------------------------------------------------------------------------
# GPTQ


def aligned_blocksize(blocksize: int, group_size: int, m: int | None = None) -> int:
    """A block size that is a multiple of the group size (and of M for N:M), so no group straddles blocks."""
    unit = 1
    if group_size > 0:
        unit = math.lcm(unit, group_size)
    if m:
        unit = math.lcm(unit, m)
    return max(unit, blocksize // unit * unit)


@torch.no_grad()
def gptq(W: Tensor, H: Tensor, bits: int, group_size: int = 128, act_order: bool = False, sym: bool = False,
         percdamp: float = 0.01, blocksize: int = 128, mask: Tensor | None = None,
         freeze_pruned: bool = False, own_h: bool = False) -> QuantResult:
    """GPTQ on one linear: W [out, in], H = 2/n Σ x xᵀ [in, in] of its calibration inputs.

    mask: True marks pruned weights (in addition to every weight that is already exactly 0); those come
    out exactly 0 and every other weight comes out nonzero. freeze_pruned: see the module docstring
    (default False: a pruned position's accumulated update is propagated as error, like SparseGPT).
    Dead inputs (H_jj == 0) get H_jj = 1; their weights are quantized, not zeroed, so sparsity is unchanged.
    blocksize is rounded to a multiple of group_size. own_h: the caller gives H away (e.g. LinearStats.take_hessian),
    so it is overwritten instead of copied (one [in, in] matrix less at the peak: 0.5 GB for a 7B down_proj).
    """
    _check_weight(W, "gptq")
    check_quant_args(bits, group_size)
    check(isinstance(blocksize, int) and blocksize > 0, f"gptq: blocksize must be a positive integer, got {blocksize!r}")
    check(percdamp >= 0, f"gptq: percdamp must be >= 0, got {percdamp!r}")
    rows, cols = W.shape
    H = H.detach().to(W.device, torch.float32)
    H = H if own_h else H.clone()
    check(tuple(H.shape) == (cols, cols), f"gptq: the Hessian has shape {tuple(H.shape)} but the weight has {cols} input columns")
    check(bool(torch.isfinite(H).all()), "gptq: the calibration Hessian has NaN or infinite entries",
          "check the calibration data and the model's activations for overflow")
    keep = _keep_mask(W, mask)
    Wf = W.detach().to(torch.float32) * keep
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        Wf, keep, H = Wf[:, perm], keep[:, perm], H[perm][:, perm]
    U = _inverse_hessian_factor(H, percdamp, who="gptq", into=H)   # U overwrites H (ours): one [in, in] float32 less
    qz = ColumnQuantizer(rows, cols, bits, group_size, sym, W.device, perm)
    if qz.static:
        qz.static_groups(W.detach(), _keep_mask(W, mask))
    bs = aligned_blocksize(blocksize, group_size)
    for b0 in range(0, cols, bs):
        b1 = min(b0 + bs, cols)
        W1, K1, U1 = Wf[:, b0:b1].clone(), keep[:, b0:b1], U[b0:b1, b0:b1]
        E = torch.zeros_like(W1)
        for j in range(b1 - b0):
            c = b0 + j
            w = W1[:, j]
            group = None
            if not qz.static and c % qz.gs == 0:   # a group starts: its current weights (reaching past the block only per row)
                group = (W1[:, j:], K1[:, j:])
                if qz.gs > b1 - c and b1 < cols:
                    group = (torch.cat([W1[:, j:], Wf[:, b1:]], 1), torch.cat([K1[:, j:], keep[:, b1:]], 1))
            wq = qz.column(c, w, K1[:, j], group)
            e = (w - wq) / U1[j, j]
            upd = torch.outer(e, U1[j, j + 1:])
            W1[:, j + 1:] -= upd * K1[:, j + 1:] if freeze_pruned else upd
            W1[:, j] = wq
            E[:, j] = e
        Wf[:, b0:b1] = W1
        if b1 < cols:
            upd = E @ U[b0:b1, b1:]
            Wf[:, b1:] -= upd * keep[:, b1:] if freeze_pruned else upd
    if perm is not None:
        out = torch.empty_like(Wf)
        out[:, perm] = Wf
        Wf = out
    return qz.result(Wf.to(W.dtype), act_order)


def layer_output_error(W: Tensor, Wq: Tensor, X: Tensor) -> float:
    """‖X Wᵀ - X Wqᵀ‖²_F / ‖X Wᵀ‖²_F for calibration inputs X [n, in]."""
    ref = X @ W.t().to(X.dtype)
    return float(((ref - X @ Wq.t().to(X.dtype)) ** 2).sum() / (ref ** 2).sum())


# --------------------------------------------------------------------------------------------
# packed checkpoint (sparsedeploy-packed/2; /1 read too)


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Codes [rows, n] (integers in [0, 2**bits)) -> uint8 [rows, ceil(n·bits/8)], densely bit-packed per row:
    code i occupies bits i·bits … i·bits+bits-1, least significant first (int4: two per byte, code 2k in
    the low nibble; 3-bit: 8 codes in 3 bytes; 1-bit: the bitmask)."""
    v = values.cpu().numpy().astype(np.uint8, copy=False)   # uint8 throughout: 1 byte a code, never 8
    if bits == 1:
        return torch.from_numpy(np.packbits(v, axis=1, bitorder="little"))
    rows, n = v.shape
    planes = ((v[:, :, None] >> np.arange(bits, dtype=np.uint8)) & 1).reshape(rows, n * bits)
    return torch.from_numpy(np.packbits(planes, axis=1, bitorder="little"))


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of `pack_bits`: uint8 [rows, bytes] -> uint8 codes [rows, n] (the engine's torch-free unpacker)."""
    return torch.from_numpy(_unpack_bits_np(packed.cpu().numpy(), bits, n))


def pack_linear(res: QuantResult) -> dict[str, Tensor]:
    """The packed tensors of one linear (names without the module prefix), format /2: the kept weights'
    codes only, one bit stream in row order, with a row pointer in codes (see the module docstring)."""
    rows, cols = res.q.shape
    keep = res.keep.to(torch.bool).cpu()
    kept = res.q.cpu()[keep]                                               # row-major: rows in order, columns ascending
    counts = keep.sum(dim=1, dtype=torch.int64)
    rowptr = torch.zeros(rows + 1, dtype=torch.int64)
    rowptr[1:] = torch.cumsum(counts, 0)
    out = {
        "weight_qcodes": pack_bits(kept[None, :], res.bits)[0].contiguous(),  # uint8 [ceil(nnz·bits/8)]
        "weight_rowptr": rowptr,                                          # int64 [out+1], offsets in codes
        "weight_mask": pack_bits(keep.to(torch.uint8), 1),                # uint8, 1 = kept, 0 = pruned
        "weight_scales": res.scale.to(torch.float32).cpu().contiguous(),  # [out, groups]
        "weight_shape": torch.tensor([rows, cols], dtype=torch.int64),
    }
    if not res.sym:
        out["weight_zeros"] = res.zero.to(torch.float32).cpu().contiguous()   # [out, groups], float offsets
    return out


def _corrupt(what: str) -> UserError:
    return UserError(f"corrupt packed checkpoint: {what}", "rerun `sparsedeploy quantize RUN --force`")


def unpack_codes(t: dict[str, Tensor], bits: int, fmt: str = FORMAT) -> tuple[Tensor, Tensor]:
    """(codes uint8 [out, in] with 0 at pruned positions, keep bool [out, in]) from one linear's packed tensors
    in format `fmt` (/1 or /2)."""
    try:
        rows, cols = (int(v) for v in t["weight_shape"].tolist())
        keep = unpack_bits(t["weight_mask"], 1, cols).to(torch.bool)
        packed = t["weight_qcodes"]
        if fmt == FORMAT_V1:
            q = unpack_bits(packed, bits, cols)
        else:
            rowptr = t["weight_rowptr"].to(torch.int64)
            nnz = int(keep.sum())
            counts = keep.sum(dim=1, dtype=torch.int64)
            if (packed.dim() != 1 or packed.numel() != -(-nnz * bits // 8) or tuple(rowptr.shape) != (rows + 1,)
                    or int(rowptr[0]) != 0 or not torch.equal(rowptr[1:] - rowptr[:-1], counts)):
                raise _corrupt("the kept codes do not match the mask and row pointer")
            q = torch.zeros(rows, cols, dtype=torch.uint8)
            q[keep] = unpack_bits(packed[None, :], bits, nnz)[0]
    except KeyError as e:
        raise _corrupt(f"a quantized linear lacks {e.args[0]}") from None
    if tuple(q.shape) != (rows, cols) or tuple(keep.shape) != (rows, cols):
        raise _corrupt("a quantized linear's codes do not match its shape")
    return torch.where(keep, q, torch.zeros_like(q)), keep


def unpack_linear(t: dict[str, Tensor], bits: int, group_size: int, sym: bool, fmt: str = FORMAT) -> Tensor:
    """Fake-quant float32 weight from one linear's packed tensors (bit-exact with the quantizer's values)."""
    q, keep = unpack_codes(t, bits, fmt)
    rows, cols = q.shape
    scale = t["weight_scales"].to(torch.float32)
    zero = torch.full_like(scale, (2 ** bits - 1) / 2) if sym else t["weight_zeros"].to(torch.float32)
    gs = _group_len(cols, group_size)
    if cols % gs == 0:   # whole groups: the same elementwise formula, broadcast (no [out, in] scale and zero copies)
        ng = cols // gs
        return dequantize(q.view(rows, ng, gs), scale[:, :, None], zero[:, :, None], keep.view(rows, ng, gs)).view(rows, cols)
    g_idx = torch.arange(cols) // gs
    return dequantize(q, scale[:, g_idx], zero[:, g_idx], keep)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


class PackedWriter:
    """Writes a packed checkpoint's tensors one at a time into `folder` (shard by shard, pipeline.stream.ShardWriter:
    one model.safetensors, or Hugging Face's shards + index above `max_shard_bytes`, default a model shard's), each
    tensor straight to its file, so a streamed quantize holds no more than the layer being packed. `add_linear`
    packs one quantized linear and checks that its packed tensors
    unpack to the linear's fake-quant weight bit for bit; `add` stores any other tensor unchanged (its dtype kept);
    `close` writes quantize.json. The caller writes config.json and the tokenizer, and moves the folder into place."""

    def __init__(self, folder: Path, max_shard_bytes: int | None = None):
        from . import stream

        self.folder = Path(folder)
        self.writer = stream.ShardWriter(self.folder, max_shard_bytes)
        self.grid: tuple | None = None
        self.linears: list[str] = []
        self.packed_bytes = self.code_bytes = self.linear_params = self.kept = 0
        self.other_bytes = self.other_params = 0

    def add_linear(self, module: str, res: QuantResult, weight: Tensor) -> None:
        """module: the linear's name (e.g. model.layers.3.mlp.up_proj); weight: its fake-quant weight."""
        grid = (res.bits, res.group_size, res.sym, res.act_order)
        if self.grid is None:
            self.grid = grid
        elif grid != self.grid:
            raise ValueError(f"{module} was quantized with {grid}, the checkpoint's other linears with {self.grid}")
        tensors = pack_linear(res)
        if not torch.equal(unpack_linear(tensors, res.bits, res.group_size, res.sym), weight.detach().to("cpu", torch.float32)):
            raise RuntimeError(f"the packed codes of {module} do not restore its weights bit-exactly (a bug; nothing was written)")
        for k, v in tensors.items():
            self.writer.add(f"{module}.{k}", v)
            self.packed_bytes += v.numel() * v.element_size()
            self.code_bytes += v.numel() if k == "weight_qcodes" else 0
        self.linears.append(module)
        self.linear_params += weight.numel()
        self.kept += int(res.keep.sum())

    def add(self, name: str, t: Tensor) -> None:
        self.writer.add(name, t)
        self.other_bytes += t.numel() * t.element_size()
        self.other_params += t.numel()

    def close(self, tied: dict[str, str], info: dict) -> dict:
        """Finish the tensors and write quantize.json (tied: {alias: stored name}); returns its document."""
        if self.grid is None:
            raise ValueError("a packed checkpoint needs at least one quantized linear")
        self.writer.close()
        bits, gs, sym, act = self.grid
        total_params = self.linear_params + self.other_params
        size = _dir_bytes(self.folder)
        doc = {"bits": bits, "group_size": gs, "sym": sym, "act_order": act, "format": FORMAT,
               "quantized_linears": sorted(self.linears), "tied": dict(tied), **info,
               "bytes": {"checkpoint": size, "dense_fp32": total_params * 4, "dense_fp16": total_params * 2,
                         "quantized_linears_packed": self.packed_bytes, "quantized_linears_codes": self.code_bytes,
                         "quantized_linears_fp32": self.linear_params * 4,
                         "quantized_linears_fp16": self.linear_params * 2, "other_tensors": self.other_bytes},
               "params": {"total": total_params, "quantized": self.linear_params, "quantized_kept": self.kept}}
        doc["ratio_vs_fp32"] = size / doc["bytes"]["dense_fp32"]
        doc["ratio_vs_fp16"] = size / doc["bytes"]["dense_fp16"]
        (self.folder / QUANT_JSON).write_text(json.dumps(doc, indent=2) + "\n")
        return doc


def check_restores(folder: Path, state: dict[str, Tensor], tied: dict[str, str]) -> None:
    """The packed folder, read back, equals the model's state dict bit for bit (dtype included)."""
    restored = load_packed_state(folder)
    for name, t in state.items():
        got = restored.get(tied.get(name, name))
        if got is None or got.dtype != t.dtype or not torch.equal(got, t.detach().cpu()):
            raise RuntimeError(f"packed checkpoint does not restore {name} bit-exactly (a bug; nothing was written)")


def write_packed(model, tokenizer, results: dict[str, QuantResult], out: Path, info: dict) -> dict:
    """Write the packed checkpoint folder `out` of an in-memory model atomically: the packed linears + every
    other tensor unchanged (tied ones once), config.json (the architecture), tokenizer files and quantize.json.
    The folder is read back with `load_packed_state` and must equal the model's state bit-exactly before
    it is renamed into place. Returns the quantize.json document."""
    from .arch import tied_aliases
    from .models import replace_dir

    state = model.state_dict()
    tied = tied_aliases(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        writer = PackedWriter(tmp)
        for name, t in state.items():
            mod = name[:-len(".weight")] if name.endswith(".weight") else None
            if mod in results:
                writer.add_linear(mod, results[mod], t)
            elif name not in tied:
                writer.add(name, t.detach().cpu())
        write_side_files(tmp, model.config, tokenizer)
        doc = writer.close(tied, info)
        check_restores(tmp, state, tied)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return doc


def write_side_files(folder: Path, config, tokenizer) -> None:
    config.to_json_file(str(Path(folder) / "config.json"))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _packed_files(folder: Path) -> list[Path]:
    """The checkpoint's tensor files: model.safetensors, or the shards named by model.safetensors.index.json."""
    from .stream import INDEX

    index = folder / INDEX
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError):
            raise UserError(f"{folder} holds a corrupt packed checkpoint ({INDEX})", "rerun `sparsedeploy quantize RUN --force`")
        return [folder / f for f in files]
    return [folder / PACKED_FILE]


def load_packed_state(folder: Path) -> dict[str, Tensor]:
    """The fake-quant state dict (every tensor, tied ones under their first name) from a packed folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        doc = json.loads((folder / QUANT_JSON).read_text())
        raw = {}
        for f in _packed_files(folder):
            raw.update(load_file(str(f)))
    except UserError:
        raise
    except FileNotFoundError as e:
        raise UserError(f"{folder} is not a packed checkpoint ({Path(e.filename).name} is missing)",
                        "run `sparsedeploy quantize RUN` to write RUN/quantized/")
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{folder} holds a corrupt packed checkpoint ({type(e).__name__})", "rerun `sparsedeploy quantize RUN --force`")
    fmt = doc.get("format")
    if fmt not in FORMATS:
        raise UserError(f"{folder}: unknown packed checkpoint format {fmt!r} (this version reads {', '.join(FORMATS)})",
                        "quantize again with this version: `sparsedeploy quantize RUN --force`")
    state: dict[str, Tensor] = {}
    linears: dict[str, dict[str, Tensor]] = {}
    for name, t in raw.items():
        mod, _, leaf = name.rpartition(".")
        if leaf.startswith("weight_"):
            linears.setdefault(mod, {})[leaf] = t
        else:
            state[name] = t
    for mod, t in linears.items():
        state[f"{mod}.weight"] = unpack_linear(t, doc["bits"], doc["group_size"], doc["sym"], fmt)
    for alias, name in doc.get("tied", {}).items():
        state[alias] = state[name]
    return state


def load_packed(folder: Path):
    """(model, tokenizer): the fake-quantized float model rebuilt from a packed checkpoint folder."""
    from .models import _transformers

    t = _transformers()
    folder = Path(folder)
    state = load_packed_state(folder)
    config = t.AutoConfig.from_pretrained(str(folder))
    model = t.AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if k not in state] + list(unexpected)
    if bad:
        raise UserError(f"{folder}: the packed checkpoint does not match its config ({', '.join(bad[:3])})",
                        "rerun `sparsedeploy quantize RUN --force`")
    tok = t.AutoTokenizer.from_pretrained(str(folder)) if (folder / "tokenizer_config.json").is_file() else None
    return model.eval(), tok
