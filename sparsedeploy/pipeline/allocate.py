"""Layerwise sparsity allocation: how much of each decoder layer to prune for a target sparsity p.

Pure functions over per-layer numbers: no model, no I/O. The caller measures each decoder layer once
with `layer_statistics` (Wanda scores A = |W| · ‖X_j‖₂ over all the layer's prunable linears) and
passes the per-layer results, plus the number of prunable parameters per layer (`sizes`), to an
allocator:

* uniform — every layer gets p.
* DLP (Chen et al. 2025) — unimportance S_l = median (paper) or mean (authors' code) of A_l;
  importance I_l = 1 − S_l / Σ_k S_k; d = minmax(I) · 2α; R_l = p + mean_w(d) − d_l.
  More important layers are pruned less.
* OWL (Yin et al. 2024) — outlier ratio D_l = #(A_l > M · mean(A_l)) / numel(A_l);
  n = minmax(D) · 2λ; R_l = p + mean_w(n) − n_l. Layers with more outliers are pruned less.

mean_w is the mean weighted by `sizes`, so the parameter-weighted mean of the ratios is exactly p
(for a Llama every decoder layer has the same size, so this equals the plain mean the papers use).

Both non-uniform allocators spread the ratios over a band of width 2α (2λ). Every ratio must stay
in [0, R_MAX]. When the amplitude is the default one it is lowered to the largest feasible value if
needed (this happens for DLP at p = 0.9); an amplitude the user passed explicitly is never changed:
an infeasible one raises UserError naming the largest feasible value. `rebalance` is applied last
as a safety net against rounding (clamp into bounds, one constant shift to restore the mean).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError

R_MAX = 0.999  # largest per-layer sparsity, i.e. ratios live in [0, 1)

# The DLP paper's α for each target sparsity (its hyper-parameter table).
PAPER_ALPHA: dict[float, float] = {
    0.1: 0.06, 0.2: 0.02, 0.3: 0.04, 0.4: 0.02, 0.5: 0.04, 0.6: 0.10, 0.7: 0.15, 0.8: 0.12,
}

OWL_LAMBDA = 0.08  # OWL's default λ
OWL_M = 5.0  # OWL's default outlier threshold M

ALLOCATORS = ("uniform", "owl", "dlp")
DLP_STATS = ("median", "mean")

_MEAN_TOL = 1e-12  # rebalance aims well inside the promised 1e-9
_FLAT_TOL = 1e-12  # importance spreads at or below this count as "all layers equal"


# --------------------------------------------------------------------------------------------- checks
def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _check_p(p) -> float:
    if not _is_real(p) or not 0.0 < float(p) < 1.0:
        raise UserError(f"sparsity {p!r} is outside (0, 1)", "pass a fraction such as --sparsity 0.7")
    return float(p)


def _check_sizes(sizes, n: int | None = None) -> np.ndarray:
    sizes = list(sizes)
    if not sizes:
        raise UserError("no decoder layers to allocate sparsity to", "check that the model has prunable linears")
    if n is not None and len(sizes) != n:
        raise UserError(f"{n} per-layer statistics but {len(sizes)} layer sizes",
                        "rerun `sparsedeploy calibrate --force` for this model")
    if any(not _is_real(s) or s <= 0 for s in sizes):
        raise UserError(f"layer sizes must be positive parameter counts, got {sizes}",
                        "check that every decoder layer has prunable linears")
    return np.asarray(sizes, dtype=np.float64)


def _check_values(values, what: str) -> np.ndarray:
    values = list(values)
    if any(not _is_real(v) or v < 0 for v in values):
        raise UserError(f"{what} must be finite and non-negative, got {values}",
                        "check the calibration statistics (rerun `sparsedeploy calibrate --force`)")
    return np.asarray(values, dtype=np.float64)


def _wmean(x: np.ndarray, w: np.ndarray) -> float:
    return float(np.dot(x, w) / w.sum())


# --------------------------------------------------------------------------------------- statistics
def layer_statistics(weights: list[Tensor], col_norms: list[Tensor], owl_m: float = OWL_M) -> dict[str, float]:
    """Wanda-score statistics of ONE decoder layer, over all its prunable linears together.

    weights[i] is a linear's [out, in] weight, col_norms[i] its [in] calibration-input column norms
    ‖X_j‖₂. A_i = |W_i| · ‖X_j‖₂ (broadcast over rows); A = all A_i flattened and concatenated.

    Returns {"median", "mean", "outlier_ratio", "numel"}:
      median        — exact LOWER median of A: the ⌈n/2⌉-th smallest value (for an even count n this
                      is the smaller of the two middle values, like torch.median). Found by selection
                      (torch.kthvalue, bracketed by a sample for large n) on one flat float32 buffer,
                      so ~200M elements (a LLaMA-7B layer) work without torch.quantile's input-size
                      limit; peak memory ≈ 6 bytes × n (≈ 1.2 GB, ~4 s on 2 CPU cores for LLaMA-7B).
      mean          — mean of A (accumulated in float64).
      outlier_ratio — OWL's D_l: fraction of A strictly greater than owl_m · mean(A).
      numel         — n, the number of scores (equals the layer's prunable parameter count).
    Computed on the weights' device in float32.
    """
    if len(weights) == 0:
        raise UserError("a decoder layer has no prunable linears", "check the model architecture")
    if len(weights) != len(col_norms):
        raise UserError(f"{len(weights)} weights but {len(col_norms)} column-norm vectors for a layer",
                        "rerun `sparsedeploy calibrate --force`")
    if not _is_real(owl_m) or owl_m <= 0:
        raise UserError(f"OWL outlier threshold M={owl_m!r} must be a positive number", "pass e.g. --owl-m 5")
    device = weights[0].device
    n = 0
    for W, c in zip(weights, col_norms):
        if W.dim() != 2 or c.dim() != 1 or c.shape[0] != W.shape[1]:
            raise UserError(f"column norms of shape {tuple(c.shape)} do not match a weight of shape {tuple(W.shape)}",
                            "rerun `sparsedeploy calibrate --force` for this model")
        n += W.numel()
    if n == 0:
        raise UserError("a decoder layer has only empty linears", "check the model architecture")

    flat = torch.empty(n, dtype=torch.float32, device=device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    at = 0
    with torch.no_grad():
        for W, c in zip(weights, col_norms):
            view = flat[at:at + W.numel()].view(W.shape)
            view.copy_(W.detach())  # in place: no full-size temporaries, any input dtype
            view.abs_().mul_(c.detach().to(device, torch.float32)[None, :])
            total += view.sum(dtype=torch.float64)
            at += W.numel()
        mean = float(total) / n
        if not math.isfinite(mean):
            raise UserError("Wanda scores of a layer are not finite (NaN/inf weights or activations)",
                            "check the model weights and rerun `sparsedeploy calibrate --force`")
        outliers = int(torch.count_nonzero(flat > owl_m * mean))
        median = _kth_smallest(flat, (n + 1) // 2)
    del flat
    return {"median": median, "mean": mean, "outlier_ratio": outliers / n, "numel": n}


_SELECT_DIRECT = 1 << 22  # below this many elements, select with one kthvalue
_SELECT_SAMPLE = 1 << 20  # sample size used to bracket the k-th value of larger tensors
_SELECT_MARGIN = 0.004  # bracket half-width in quantile units (≈ 8 standard errors of the sample quantile)


def _kth_smallest(flat: Tensor, k: int) -> float:
    """Exact k-th smallest (1-indexed) of a 1-D float tensor without NaNs.

    Large tensors: bracket the answer between two values read off a sorted random sample, count
    the elements below / up to the bracket, and select within the (small) bracket; this is exact and
    about 3x faster than one kthvalue over ~200M elements. Falls back to a full kthvalue if the
    bracket misses (rare) or the tensor is small."""
    n = flat.numel()
    if n <= _SELECT_DIRECT:
        return float(flat.kthvalue(k).values)
    gen = torch.Generator(device=flat.device).manual_seed(n)
    sample = flat[torch.randint(n, (_SELECT_SAMPLE,), generator=gen, device=flat.device)].sort().values
    q = k / n
    i_lo = min(math.floor((q - _SELECT_MARGIN) * _SELECT_SAMPLE), _SELECT_SAMPLE - 1)
    i_hi = max(math.ceil((q + _SELECT_MARGIN) * _SELECT_SAMPLE), 0)
    t_lo = float(sample[i_lo]) if i_lo >= 0 else -math.inf
    t_hi = float(sample[i_hi]) if i_hi < _SELECT_SAMPLE else math.inf
    below = int(torch.count_nonzero(flat < t_lo))
    upto = int(torch.count_nonzero(flat <= t_hi))
    if below < k <= upto:
        inside = flat[(flat >= t_lo) & (flat <= t_hi)]
        return float(inside.kthvalue(k - below).values)
    return float(flat.kthvalue(k).values)


# ------------------------------------------------------------------------------------------- result
@dataclass
class Allocation:
    """One allocation. For DLP: scores = S_l (the chosen stat), importance = I_l, alpha = α used.
    For OWL: scores = importance = D_l (outlier ratio; the quantity that ranks layers), alpha = λ used.
    For uniform: scores, importance and alpha are None. weighted_mean = Σ size·ratio / Σ size."""
    allocator: str
    target: float
    ratios: list[float]
    scores: list[float] | None
    importance: list[float] | None
    alpha: float | None
    stat: str | None
    weighted_mean: float
    sizes: list[int] | None = field(default=None)

    def to_layers(self) -> list[dict]:
        """[{"index", "score", "importance", "sparsity"(, "params")}] — one dict per decoder layer;
        "params" (the layer's prunable parameter count) is present when sizes are known."""
        out = []
        for i, r in enumerate(self.ratios):
            row = {"index": i,
                   "score": None if self.scores is None else float(self.scores[i]),
                   "importance": None if self.importance is None else float(self.importance[i]),
                   "sparsity": float(r)}
            if self.sizes is not None:
                row["params"] = int(self.sizes[i])
            out.append(row)
        return out


# ------------------------------------------------------------------------------------------ helpers
def default_alpha(p: float) -> float:
    """DLP's α for target sparsity p from the paper's table: linear interpolation between the listed
    points, the end value below 0.1 / above 0.8. (Feasibility is checked later, in allocate_dlp.)"""
    p = float(p)
    xs = sorted(PAPER_ALPHA)
    if p <= xs[0]:
        return PAPER_ALPHA[xs[0]]
    if p >= xs[-1]:
        return PAPER_ALPHA[xs[-1]]
    for a, b in zip(xs, xs[1:]):
        if a <= p <= b:
            t = (p - a) / (b - a)
            return PAPER_ALPHA[a] + t * (PAPER_ALPHA[b] - PAPER_ALPHA[a])
    raise AssertionError("unreachable")


def rebalance(ratios, weights, target, lo: float = 0.0, hi: float = R_MAX) -> list[float]:
    """Clamp `ratios` into [lo, hi] and add one constant shift c (ratios clamped again after the
    shift) so that the `weights`-weighted mean equals `target` (to 1e-9; in practice ~1e-15).

    The weighted mean of clip(r + c, lo, hi) is continuous and non-decreasing in c, so c is found by
    bisection (then polished with one exact step over the unclamped entries). Requires lo ≤ target ≤ hi.
    """
    r = np.asarray(list(ratios), dtype=np.float64)
    w = np.asarray(list(weights), dtype=np.float64)
    if r.shape != w.shape or r.size == 0:
        raise UserError(f"rebalance needs one weight per ratio, got {r.size} ratios and {w.size} weights")
    if not np.all(np.isfinite(r)) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise UserError("rebalance needs finite ratios and non-negative weights with a positive sum")
    if not (_is_real(target) and _is_real(lo) and _is_real(hi) and lo <= target <= hi):
        raise UserError(f"target {target!r} is outside the allowed per-layer range [{lo}, {hi}]",
                        f"choose a target sparsity between {lo} and {hi}")
    target, lo, hi = float(target), float(lo), float(hi)

    def mean_at(c: float) -> float:
        return _wmean(np.clip(r + c, lo, hi), w)

    if abs(mean_at(0.0) - target) <= _MEAN_TOL:
        return [float(x) for x in np.clip(r, lo, hi)]
    a, b = lo - float(r.max()), hi - float(r.min())  # mean_at(a) == lo, mean_at(b) == hi
    for _ in range(200):
        mid = 0.5 * (a + b)
        if mid in (a, b):
            break
        if mean_at(mid) < target:
            a = mid
        else:
            b = mid
    c = a if abs(mean_at(a) - target) <= abs(mean_at(b) - target) else b
    # Exact polish: on the unclamped entries the mean is linear in c.
    free = (r + c > lo) & (r + c < hi)
    if w[free].sum() > 0:
        c2 = c + (target - mean_at(c)) * w.sum() / w[free].sum()
        if abs(mean_at(c2) - target) < abs(mean_at(c) - target):
            c = c2
    return [float(x) for x in np.clip(r + c, lo, hi)]


def _max_amplitude(u: np.ndarray, w: np.ndarray, p: float) -> float:
    """Largest a ≥ 0 with every p + 2a·(mean_w(u) − u_l) in [0, R_MAX], for u in [0, 1] with min 0, max 1."""
    mu = _wmean(u, w)
    up = (R_MAX - p) / (2.0 * mu) if mu > 0 else math.inf  # the layer with u = 0 rises to p + 2a·mu
    down = p / (2.0 * (1.0 - mu)) if mu < 1 else math.inf  # the layer with u = 1 falls to p − 2a·(1 − mu)
    return max(0.0, min(up, down))


def _spread(key: np.ndarray, w: np.ndarray, p: float, amp: float | None, default: float,
            name: str, symbol: str, option: str) -> tuple[np.ndarray, float]:
    """Min-max normalise `key` (higher = keep more), spread over width 2·amp around p keeping the
    weighted mean p. Returns (ratios, amplitude used)."""
    if p > R_MAX:
        raise UserError(f"sparsity {p} is above the per-layer maximum {R_MAX} that {name} can allocate",
                        f"use a sparsity ≤ {R_MAX}, or the uniform allocator")
    explicit = amp is not None
    if explicit and (not _is_real(amp) or amp < 0):
        raise UserError(f"{name} {symbol}={amp!r} must be a non-negative number",
                        f"pass {option} ≥ 0 or omit it for the default")
    a = float(amp) if explicit else float(default)
    lo_k, hi_k = float(key.min()), float(key.max())
    if hi_k - lo_k <= _FLAT_TOL * max(1.0, abs(hi_k), abs(lo_k)):
        return np.full(key.shape, p), a  # every layer looks the same: uniform
    u = (key - lo_k) / (hi_k - lo_k)
    a_max = _max_amplitude(u, w, p)
    if a > a_max:
        if explicit and a > a_max * (1 + 1e-9) + 1e-15:
            raise UserError(
                f"{name} {symbol}={a:g} at sparsity {p:g} would push layer ratios outside [0, {R_MAX}]",
                f"use {option} ≤ {a_max:.6g} (the largest feasible {symbol}) or omit it for the default")
        a = a_max
    d = 2.0 * a * u
    return p + _wmean(d, w) - d, a


# ---------------------------------------------------------------------------------------- allocators
def allocate_uniform(sizes: list[int], p: float) -> Allocation:
    """Every decoder layer gets sparsity p."""
    p = _check_p(p)
    w = _check_sizes(sizes)
    ratios = [p] * len(w)
    return Allocation("uniform", p, ratios, None, None, None, None, _wmean(np.asarray(ratios), w),
                      [int(s) for s in sizes])


def allocate_dlp(scores: list[float], sizes: list[int], p: float, alpha: float | None = None,
                 stat: str = "median") -> Allocation:
    """DLP. `scores` = per-layer unimportance S_l (median or mean Wanda score of the layer, as named by
    `stat`, which is only recorded here). alpha=None: the paper's table (default_alpha), lowered to
    the largest feasible value if the ratios would leave [0, R_MAX]; an explicit infeasible α raises."""
    p = _check_p(p)
    if stat not in DLP_STATS:
        raise UserError(f"unknown DLP stat {stat!r}", "use median (the paper) or mean (the authors' code)")
    s = _check_values(scores, "DLP layer scores")
    w = _check_sizes(sizes, len(s))
    total = float(s.sum())
    importance = 1.0 - s / total if total > 0 else np.ones_like(s)
    ratios, used = _spread(importance, w, p, alpha, default_alpha(p), "DLP", "α", "--alpha")
    ratios = np.asarray(rebalance(ratios, w, p))
    return Allocation("dlp", p, ratios.tolist(), s.tolist(), importance.tolist(), used, stat, _wmean(ratios, w),
                      [int(x) for x in sizes])


def allocate_owl(outlier_ratios: list[float], sizes: list[int], p: float, lam: float | None = None,
                 m: float = OWL_M) -> Allocation:
    """OWL. `outlier_ratios` = per-layer D_l (measured by layer_statistics with threshold m; m is only
    recorded in the docs here). lam=None: λ = OWL_LAMBDA (0.08), lowered to the largest feasible value
    if the ratios would leave [0, R_MAX]; an explicit infeasible λ raises. The normalisation uses the
    size-weighted mean (equal to OWL's plain mean when all layers have the same size)."""
    p = _check_p(p)
    if not _is_real(m) or m <= 0:
        raise UserError(f"OWL outlier threshold M={m!r} must be a positive number", "pass e.g. --owl-m 5")
    d = _check_values(outlier_ratios, "OWL outlier ratios")
    w = _check_sizes(sizes, len(d))
    ratios, used = _spread(d, w, p, lam, OWL_LAMBDA, "OWL", "λ", "--owl-lambda")
    ratios = np.asarray(rebalance(ratios, w, p))
    return Allocation("owl", p, ratios.tolist(), d.tolist(), d.tolist(), used, None, _wmean(ratios, w),
                      [int(x) for x in sizes])


def allocate(name: str, stats: list[dict], sizes: list[int], p: float, *, alpha: float | None = None,
             stat: str = "median", owl_lambda: float | None = None, owl_m: float = OWL_M) -> Allocation:
    """Dispatch by allocator name. `stats` = one layer_statistics dict per decoder layer (may be empty
    for "uniform"). alpha is DLP's α, owl_lambda OWL's λ; None = default (lowered if infeasible)."""
    if name not in ALLOCATORS:
        raise UserError(f"unknown allocator {name!r}", f"use one of {', '.join(ALLOCATORS)}")
    if name == "uniform":
        return allocate_uniform(sizes, p)
    if not stats:
        raise UserError(f"the {name} allocator needs per-layer calibration statistics",
                        "run `sparsedeploy calibrate` first")
    if len(stats) != len(sizes):
        raise UserError(f"{len(stats)} per-layer statistics but {len(sizes)} decoder layers",
                        "rerun `sparsedeploy calibrate --force` for this model")
    key = stat if name == "dlp" else "outlier_ratio"
    if name == "dlp" and stat not in DLP_STATS:
        raise UserError(f"unknown DLP stat {stat!r}", "use median (the paper) or mean (the authors' code)")
    try:
        values = [float(s[key]) for s in stats]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"per-layer statistics lack {key!r}", "rerun `sparsedeploy calibrate --force`")
    if name == "dlp":
        return allocate_dlp(values, sizes, p, alpha=alpha, stat=stat)
    return allocate_owl(values, sizes, p, lam=owl_lambda, m=owl_m)
