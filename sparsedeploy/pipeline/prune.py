"""Weight pruners for one linear layer: pure tensor functions, no model and no I/O.

Every pruner takes a weight matrix W of shape [out_features, in_features] and returns a NEW
tensor W' of the same shape, dtype and device, with exact zeros where weights were pruned.
W itself is never modified. Scores and updates are computed in float32 on W's device and the
result is cast back to W's dtype at the end.

Two kinds of sparsity are supported:

* unstructured, at a fraction `sparsity` in [0, 1): the number of pruned weights is
  int(count * sparsity) for the population the method ranks over (whole matrix, one row, or one
  SparseGPT block). Candidates are ranked by a stable sort, so among equal scores the one with
  the lower (flattened) index is pruned first and never more than that count is removed — the
  weights we prune come from 4-bit GGUF files and have many exact ties.
* N:M, given as nm=(N, M): in every row, each run of M consecutive input columns starting at a
  multiple of M keeps exactly N weights (its M - N lowest scores are pruned). `sparsity` is then
  ignored.
"""
from __future__ import annotations

import math
import numbers
import re
from typing import Callable, Protocol

import numpy as np
import torch
from scipy.linalg import lapack as _lapack
from torch import Tensor

from ..errors import UserError

_NM_FIX = "use 'unstructured' or an N:M pattern with integers 0 < N < M, such as '2:4' or '4:8'"


class Stats(Protocol):
    """What the walker hands a pruner; only the attributes that method needs must be present."""

    col_norm: Tensor  # [in]: Wanda's ‖X_j‖₂ over all calibration tokens, per input column j
    hessian: Tensor  # [in, in]: H = 2/n Σ x xᵀ over the n calibration tokens


# --------------------------------------------------------------------------------------------
# argument checks


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' with integers 0 < N < M -> (N, M); anything else -> UserError."""
    if not isinstance(pattern, str):
        raise UserError(f"sparsity pattern must be a string, got {pattern!r}", _NM_FIX)
    text = pattern.strip().lower()
    if text == "unstructured":
        return None
    match = re.fullmatch(r"(\d+)\s*:\s*(\d+)", text)
    if match is None:
        raise UserError(f"unknown sparsity pattern {pattern!r}", _NM_FIX)
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise UserError(f"sparsity pattern {pattern!r} needs 0 < N < M (N weights kept of every M)", _NM_FIX)
    return n, m


def _check_weight(W: Tensor) -> None:
    if not isinstance(W, Tensor) or W.dim() != 2:
        shape = tuple(W.shape) if isinstance(W, Tensor) else type(W).__name__
        raise UserError(f"a pruner needs a 2-D weight matrix [out, in], got {shape}")
    if not W.is_floating_point():
        raise UserError(f"a pruner needs a floating-point weight matrix, got {W.dtype}")


def _check_sparsity(sparsity: float) -> None:
    if not isinstance(sparsity, numbers.Real) or isinstance(sparsity, bool) or not 0.0 <= sparsity < 1.0:
        raise UserError(f"sparsity must be a number in [0, 1), got {sparsity!r}",
                        "pass a fraction such as 0.5 for 50% of the weights pruned")


def _check_nm(nm: tuple[int, int], in_features: int) -> tuple[int, int]:
    try:
        n, m = (int(v) for v in nm)
        valid = tuple(nm) == (n, m) and 0 < n < m
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise UserError(f"bad N:M pattern {nm!r}", _NM_FIX)
    if in_features % m:
        raise UserError(f"the {n}:{m} pattern needs in_features to be a multiple of {m}, got {in_features}",
                        "use 'unstructured' for this layer, or a pattern whose M divides in_features")
    return n, m


def _stat(stats: Stats, name: str, method: str) -> Tensor:
    value = getattr(stats, name, None) if stats is not None else None
    if value is None:
        raise UserError(f"the {method} pruner needs the calibration statistic {name!r}, which was not collected")
    return value


# --------------------------------------------------------------------------------------------
# mask helpers: True marks a weight to prune


def _lowest_k_mask(score: Tensor, k: int) -> Tensor:
    """Mask of the k smallest entries along the last dim; equal scores go by lower index first."""
    mask = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    if k > 0:
        order = torch.argsort(score, dim=-1, stable=True)
        mask.scatter_(-1, order[..., :k], True)
    return mask


def _lowest_k_overall(score: Tensor, k: int) -> Tensor:
    """Mask of the k smallest entries of the whole tensor (ranked in row-major order): the same mask as a stable
    argsort of the flattened scores (_lowest_k_mask), found in linear time: everything below the k-th smallest
    value, then the entries equal to it in row-major order until k (a 7B-shaped matrix: 45M scores, many equal
    after bf16 storage; the sort took ~15 s of a 2-core machine per matrix)."""
    flat = score.reshape(-1)
    n = flat.numel()
    if k <= 0 or k >= n or not torch.isfinite(flat).all():
        return _lowest_k_mask(flat, k).reshape(score.shape)
    t = torch.kthvalue(flat, k).values
    mask = flat < t
    need = k - int(mask.sum())
    if need > 0:
        ties = torch.nonzero(flat == t).reshape(-1)[:need]
        mask[ties] = True
    return mask.reshape(score.shape)


def _nm_mask(score: Tensor, n: int, m: int) -> Tensor:
    """Per row, in each aligned group of m columns prune the m - n lowest scores (keep n)."""
    rows, cols = score.shape
    return _lowest_k_mask(score.reshape(rows, cols // m, m), m - n).reshape(rows, cols)


def _mask_from_score(score: Tensor, sparsity: float, nm: tuple[int, int] | None, per_row: bool) -> Tensor:
    if nm is not None:
        return _nm_mask(score, *nm)
    if per_row:
        return _lowest_k_mask(score, int(score.shape[1] * sparsity))
    return _lowest_k_overall(score, int(score.numel() * sparsity))


def _validate(W: Tensor, sparsity: float, nm: tuple[int, int] | None) -> tuple[int, int] | None:
    """Checks the arguments shared by every pruner; returns the checked N:M pair (or None)."""
    _check_weight(W)
    if nm is not None:
        return _check_nm(nm, W.shape[1])
    _check_sparsity(sparsity)
    return None


# --------------------------------------------------------------------------------------------
# magnitude and Wanda


@torch.no_grad()
def prune_magnitude(W: Tensor, stats: Stats | None, sparsity: float, nm: tuple[int, int] | None = None) -> Tensor:
    """Magnitude pruning: score_ij = |W_ij|.

    Unstructured: the k = int(W.numel() * sparsity) smallest |W_ij| of the whole matrix are zeroed.
    N:M: the M - N smallest |W_ij| of every aligned M-column group of every row are zeroed.
    `stats` is not used (it may be None).
    """
    nm = _validate(W, sparsity, nm)
    W = W.detach()
    if nm is None and sparsity == 0:
        return W.clone()
    score = W.to(torch.float32).abs()
    return W.masked_fill(_mask_from_score(score, sparsity, nm, per_row=False), 0)


@torch.no_grad()
def prune_wanda(W: Tensor, stats: Stats, sparsity: float, nm: tuple[int, int] | None = None) -> Tensor:
    """Wanda (Sun et al. 2023): score_ij = |W_ij| · ‖X_j‖₂, compared within each output row.

    Unstructured: each row i loses its int(in_features * sparsity) lowest scores.
    N:M: each aligned M-column group of each row loses its M - N lowest scores.
    """
    nm = _validate(W, sparsity, nm)
    W = W.detach()
    col_norm = _stat(stats, "col_norm", "wanda").detach().to(W.device, torch.float32).reshape(-1)
    if col_norm.numel() != W.shape[1]:
        raise UserError(f"wanda: col_norm has {col_norm.numel()} entries but the weight has {W.shape[1]} input columns")
    if nm is None and sparsity == 0:
        return W.clone()
    score = W.to(torch.float32).abs() * col_norm[None, :]
    return W.masked_fill(_mask_from_score(score, sparsity, nm, per_row=True), 0)


# --------------------------------------------------------------------------------------------
# SparseGPT


def _factor_dtype(device: torch.device) -> torch.dtype:
    # The Cholesky factorisations run in float64 (CPU and CUDA both support it): H is often
    # ill-conditioned (outlier features, few calibration tokens) and float64 avoids spurious
    # factorisation failures and keeps CPU and CUDA results close. The O(in³) cost is paid once
    # per linear. Other backends (e.g. MPS) lack float64 and stay in float32.
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


def _damped(H: Tensor, dtype: torch.dtype, damp: float) -> Tensor:
    A = H.to(dtype, copy=True)
    A.diagonal().add_(damp)
    return A


def _factor_in_place(H: Tensor, dtype: torch.dtype, damp: float, into: Tensor | None = None) -> Tensor | None:
    """CPU float64: U (float32) from A = H + λI by LAPACK in A's own memory (potrf, potri, potrf), or None if
    A is not positive definite. One [in, in] float64 matrix at a time (a 7B down_proj's is 1 GB), where torch's
    cholesky / cholesky_inverse each allocate a new one; also ~1.5x faster on 2 cores (11008²: 21 s against 33).
    A is C-ordered and symmetric, so its transpose is the same matrix in Fortran order: the lower factor L2 of
    A⁻¹ = L2 L2ᵀ that LAPACK leaves there reads, through A, as U = L2ᵀ (A⁻¹ = UᵀU, upper; `clean` zeroes the rest)."""
    A = _damped(H, dtype, damp)
    M = A.numpy().T
    c, info = _lapack.dpotrf(M, lower=1, clean=1, overwrite_a=1)
    if info == 0:
        c, info = _lapack.dpotri(c, lower=1, overwrite_c=1)    # lower triangle of A⁻¹ (the rest stays 0)
    if info == 0:
        c, info = _lapack.dpotrf(c, lower=1, clean=1, overwrite_a=1)
    if info != 0 or not np.isfinite(c).all():
        return None
    if not np.shares_memory(c, M):   # LAPACK worked on a copy (not expected for a contiguous float64 array)
        A = torch.from_numpy(np.ascontiguousarray(c.T))
    return into.copy_(A) if into is not None else A.to(torch.float32)


def _factor_torch(H: Tensor, dtype: torch.dtype, damp: float, into: Tensor | None = None) -> Tensor | None:
    """U (float32) from A = H + λI with torch (any device), or None if A is not positive definite; at most two
    [in, in] matrices of `dtype` alive at a time, each dropped once used."""
    A = _damped(H, dtype, damp)
    L, info = torch.linalg.cholesky_ex(A)
    del A
    if info.item() != 0:
        return None
    inv = torch.cholesky_inverse(L)
    del L
    U, info = torch.linalg.cholesky_ex(inv, upper=True)
    del inv
    if info.item() != 0 or not bool(torch.isfinite(U).all()):
        return None
    return into.copy_(U) if into is not None else U.to(torch.float32)


def _inverse_hessian_factor(H: Tensor, percdamp: float, retries: int = 4, who: str = "sparsegpt",
                            into: Tensor | None = None) -> Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹, i.e. (H + λI)⁻¹ = UᵀU, with λ = percdamp · mean(diag H).

    Row j of U carries what the OBS update needs once columns < j are fixed:
    U_jj² = [(H_{j:,j:})⁻¹]_00 and U_j,j: / U_jj = [(H_{j:,j:})⁻¹]_0,: / [(H_{j:,j:})⁻¹]_00.
    If a factorisation fails, λ is multiplied by 10 and it is tried again, up to `retries` times.
    into: a float32 [in, in] tensor U is written to and returned (it may be H itself, which is read until the
    factor has succeeded: the caller's Hessian buffer becomes U, one such matrix less at the peak).
    """
    dtype = _factor_dtype(H.device)
    mean_diag = torch.diagonal(H).to(dtype).mean().item()
    damp = percdamp * mean_diag
    factor = _factor_in_place if H.device.type == "cpu" and dtype == torch.float64 else _factor_torch
    for _ in range(retries + 1):
        U = factor(H, dtype, damp, into)
        if U is not None:
            return U
        damp = damp * 10 if damp > 0 else 0.01 * mean_diag
    raise UserError(
        f"{who}: the calibration Hessian is not positive definite even with damping {damp / 10:.3g} "
        f"({retries} retries, x10 each)",
        "use more (or more varied) calibration samples, or pass a larger percdamp")


def _sparsegpt_block(Wb: Tensor, Ub: Tensor, sparsity: float, nm: tuple[int, int] | None,
                     quant=None, b0: int = 0, rest: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Prunes one block of columns in place in Wb, compensating within the block.

    Wb: [rows, b] current weights of the block; Ub: [b, b] the block's diagonal part of U.
    Saliency of weight w in column j: w² / U_jj² (= w² / [H⁻¹]_jj in OBS terms).
    For each column j in order, with q the column after pruning and e = (w - q) / U_jj, the
    remaining columns get W_:,j+1: -= e · U_j,j+1: (the optimal OBS correction).
    Returns the errors E [rows, b], one column e per column j, for the lazy update of later blocks.
    quant (joint path, like the SparseGPT reference's wbits): a `quantize.ColumnQuantizer`; each column
    is masked, then its kept weights are quantized (pruned ones become exactly 0, kept ones never do),
    and e carries the pruning plus quantization error. b0: the block's first column; rest: the current
    weights after the block (only read when a quantization group reaches past the block).
    """
    rows, b = Wb.shape
    d = torch.diagonal(Ub)
    if nm is None:
        prune = _lowest_k_overall(Wb.square() / d.square()[None, :], int(Wb.numel() * sparsity))
    else:
        n, m = nm
        prune = torch.zeros_like(Wb, dtype=torch.bool)
    E = torch.zeros_like(Wb)
    for j in range(b):
        if nm is not None and j % m == 0:
            # N:M masks are decided when the group starts, from the already-compensated weights.
            group = Wb[:, j:j + m]
            prune[:, j:j + m] = _lowest_k_mask(group.square() / d[j:j + m].square()[None, :], m - n)
        w = Wb[:, j]
        if quant is None:
            q = w.masked_fill(prune[:, j], 0)
        else:
            c = b0 + j
            group = None
            if c % quant.gs == 0:
                keep = ~prune[:, j:]
                group = (Wb[:, j:], keep)
                if rest is not None and rest.shape[1] and quant.gs > b - j:
                    group = (torch.cat([Wb[:, j:], rest], 1),
                             torch.cat([keep, torch.ones_like(rest, dtype=torch.bool)], 1))
            q = quant.column(c, w, ~prune[:, j], group)
        e = (w - q) / d[j]
        Wb[:, j + 1:].addr_(e, Ub[j, j + 1:], alpha=-1)
        Wb[:, j] = q
        E[:, j] = e
    return Wb, E


@torch.no_grad()
def prune_sparsegpt(W: Tensor, stats: Stats, sparsity: float, nm: tuple[int, int] | None = None,
                    blocksize: int = 128, percdamp: float = 0.01, quant=None) -> Tensor:
    """SparseGPT (Frantar & Alistarh 2023): prune with OBS error compensation from H = 2/n Σ x xᵀ.

    1. Dead inputs (H_jj == 0) get H_jj = 1 and their weight column set to 0.
    2. λ = percdamp · mean(diag H) is added to the diagonal and U, the upper Cholesky factor of
       H⁻¹, is computed (see `_inverse_hessian_factor`).
    3. Columns are processed in blocks of `blocksize`. Unstructured: the block's mask prunes the
       int(block numel · sparsity) lowest w² / U_jj² over the whole block (all rows). N:M: the mask
       of each M-column group is decided when the group starts. Within the block the error of
       each pruned column is compensated on the later columns of the block, then all later blocks
       get the lazy batch update W_:,later -= E · U_block,later.
    For N:M, blocksize is rounded down to a multiple of M (at least M) so groups never straddle blocks.
    The total count is the sum of the per-block counts, i.e. int(rows · blocksize · sparsity) per
    full block.
    quant: joint pruning + quantization (see `_sparsegpt_block`); blocksize is then also rounded to a
    multiple of the quantization group size, so groups never straddle blocks. Returns fake-quant
    weights; the codes, scales and zero points stay in `quant`. With quant, sparsity 0 still quantizes.
    """
    nm = _validate(W, sparsity, nm)
    if not isinstance(blocksize, int) or blocksize <= 0:
        raise UserError(f"sparsegpt: blocksize must be a positive integer, got {blocksize!r}")
    if not percdamp >= 0:
        raise UserError(f"sparsegpt: percdamp must be >= 0, got {percdamp!r}")
    W = W.detach()
    rows, cols = W.shape
    H = _stat(stats, "hessian", "sparsegpt").detach().to(W.device, torch.float32)
    if tuple(H.shape) != (cols, cols):
        raise UserError(f"sparsegpt: the Hessian has shape {tuple(H.shape)} but the weight has {cols} input columns")
    if not bool(torch.isfinite(H).all()):
        raise UserError("sparsegpt: the calibration Hessian has NaN or infinite entries",
                        "check the calibration data and the model's activations for overflow")
    if nm is None and sparsity == 0 and quant is None:
        return W.clone()
    unit = nm[1] if nm is not None else 1
    if quant is not None and quant.gs < cols:
        unit = math.lcm(unit, quant.gs)
    blocksize = max(unit, blocksize // unit * unit)

    Wf = W.to(torch.float32).clone()
    H = H.clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    Wf[:, dead] = 0.0
    U = _inverse_hessian_factor(H, percdamp)

    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        Wb, E = _sparsegpt_block(Wf[:, b0:b1].clone(), U[b0:b1, b0:b1], sparsity, nm, quant, b0, Wf[:, b1:])
        Wf[:, b0:b1] = Wb
        if b1 < cols:
            Wf[:, b1:].addmm_(E, U[b0:b1, b1:], alpha=-1)
    return Wf.to(W.dtype)


# --------------------------------------------------------------------------------------------

PRUNERS: dict[str, Callable[..., Tensor]] = {
    "magnitude": prune_magnitude,
    "wanda": prune_wanda,
    "sparsegpt": prune_sparsegpt,
}

NEEDS: dict[str, frozenset[str]] = {
    "magnitude": frozenset(),
    "wanda": frozenset({"col_norm"}),
    "sparsegpt": frozenset({"hessian"}),
}


def sparsity_of(W: Tensor) -> float:
    """Fraction of entries that are exactly zero."""
    if W.numel() == 0:
        return 0.0
    return (W == 0).sum().item() / W.numel()
