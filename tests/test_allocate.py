"""Layerwise sparsity allocators (uniform / OWL / DLP), rebalance, layer statistics, table and plot.
Pure and fast: synthetic numbers and small tensors only."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from rich.console import Console

from sparsedeploy.errors import UserError
from sparsedeploy.pipeline import allocate as al
from sparsedeploy.pipeline.plots import plot_allocation, ratios_table


def wmean(x, w) -> float:
    x, w = np.asarray(x, dtype=np.float64), np.asarray(w, dtype=np.float64)
    return float((x * w).sum() / w.sum())


def span(x) -> float:
    return max(x) - min(x)


RNG = np.random.default_rng(1234)
SCORES = list(RNG.uniform(0.5, 2.0, size=12))
SIZES = [int(s) for s in RNG.integers(1_000, 9_000, size=12)]  # deliberately unequal


# ----------------------------------------------------------------------------------------------- DLP
def test_dlp_small_case_by_hand():
    # S = 1..4: I = 1 - S/10 = .9 .8 .7 .6; normalised 1, 2/3, 1/3, 0; d = 2α·u with α = .05;
    # R = p + mean(d) - d = .55 - d.
    a = al.allocate_dlp([1, 2, 3, 4], [10, 10, 10, 10], 0.5, alpha=0.05)
    assert a.ratios == pytest.approx([0.45, 0.55 - 0.1 / 1.5, 0.55 - 0.1 / 3, 0.55], abs=1e-12)
    assert a.importance == pytest.approx([0.9, 0.8, 0.7, 0.6], abs=1e-12)
    assert a.scores == [1, 2, 3, 4] and a.alpha == 0.05 and a.stat == "median" and a.allocator == "dlp"


@pytest.mark.parametrize("p,alpha", [(0.3, 0.04), (0.5, 0.04), (0.7, 0.15)])
def test_dlp_weighted_mean_span_and_monotone(p, alpha):
    a = al.allocate_dlp(SCORES, SIZES, p, alpha=alpha)
    assert abs(wmean(a.ratios, SIZES) - p) < 1e-9
    assert abs(a.weighted_mean - p) < 1e-9
    # with unequal sizes the plain mean is NOT p: the weighting is real
    assert abs(float(np.mean(a.ratios)) - p) > 1e-6
    assert span(a.ratios) == pytest.approx(2 * alpha, abs=1e-12)
    assert all(0 <= r <= al.R_MAX for r in a.ratios)
    # importance is 1 - S/ΣS and more important layers get strictly lower sparsity
    assert a.importance == pytest.approx([1 - s / sum(SCORES) for s in SCORES], abs=1e-12)
    order = np.argsort(a.importance)
    r_sorted = np.asarray(a.ratios)[order]
    assert np.all(np.diff(r_sorted) < 0)


def test_dlp_equal_scores_and_single_layer_are_uniform():
    a = al.allocate_dlp([2.0] * 5, [7] * 5, 0.6, alpha=0.1)
    assert a.ratios == [0.6] * 5
    b = al.allocate_dlp([3.0], [100], 0.45)
    assert b.ratios == [0.45]


def _skewed_layers():
    g = torch.Generator().manual_seed(0)
    # layer 0: most scores tiny, a few enormous -> low median, high mean
    w0 = torch.full((64, 64), 0.1)
    w0.view(-1)[torch.randperm(w0.numel(), generator=g)[:200]] = 50.0
    # layer 1: every score moderate -> median == mean == 1
    w1 = torch.ones(64, 64)
    ones = torch.ones(64)
    return [al.layer_statistics([w0], [ones]), al.layer_statistics([w1], [ones])]


def test_dlp_median_and_mean_stats_disagree_on_skewed_layers():
    stats = _skewed_layers()
    assert stats[0]["median"] < stats[1]["median"] and stats[0]["mean"] > stats[1]["mean"]
    sizes = [4096, 4096]
    med = al.allocate("dlp", stats, sizes, 0.5, stat="median")
    mean = al.allocate("dlp", stats, sizes, 0.5, stat="mean")
    assert med.stat == "median" and mean.stat == "mean"
    assert med.scores == [s["median"] for s in stats] and mean.scores == [s["mean"] for s in stats]
    # median: the skewed layer looks LESS unimportant -> more important -> lower sparsity; mean: reversed
    assert med.ratios[0] < med.ratios[1]
    assert mean.ratios[0] > mean.ratios[1]


# -------------------------------------------------------------------------------------- default α
def test_default_alpha_follows_the_paper_table_and_interpolates():
    for p, alpha in al.PAPER_ALPHA.items():
        assert al.default_alpha(p) == pytest.approx(alpha, abs=1e-15)
    assert al.PAPER_ALPHA == {0.1: 0.06, 0.2: 0.02, 0.3: 0.04, 0.4: 0.02, 0.5: 0.04, 0.6: 0.10, 0.7: 0.15, 0.8: 0.12}
    assert al.default_alpha(0.55) == pytest.approx(0.07)
    assert al.default_alpha(0.65) == pytest.approx(0.125)
    assert al.default_alpha(0.75) == pytest.approx(0.135)
    assert al.default_alpha(0.15) == pytest.approx(0.04)
    assert al.default_alpha(0.62) == pytest.approx(0.10 + 0.2 * 0.05)
    assert al.default_alpha(0.05) == 0.06 and al.default_alpha(0.95) == 0.12  # end values outside [0.1, 0.8]


def test_dlp_default_alpha_is_used_when_feasible():
    a = al.allocate_dlp(SCORES, SIZES, 0.6)
    assert a.alpha == pytest.approx(0.10)
    assert span(a.ratios) == pytest.approx(0.20, abs=1e-12)
    b = al.allocate("dlp", [{"median": s, "mean": s} for s in SCORES], SIZES, 0.65)
    assert b.alpha == pytest.approx(0.125)


# The layer with the largest score (least important, u = 0) is pushed up to p + 2α·mean_w(u); with
# every other layer at u = 1, mean_w(u) is close to 1 and α = 0.12 would overshoot R_MAX at p = 0.9.
HIGH_SCORES = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 9.0]
HIGH_SIZES = [10, 20, 10, 20, 10, 20, 10, 30]


def test_dlp_at_p09_lowers_the_default_alpha_to_stay_below_r_max():
    p = 0.9
    mu = 1 - HIGH_SIZES[-1] / sum(HIGH_SIZES)  # weighted mean of the normalised importance
    alpha_max = (al.R_MAX - p) / (2 * mu)
    assert alpha_max < al.default_alpha(p)
    a = al.allocate_dlp(HIGH_SCORES, HIGH_SIZES, p)
    assert a.alpha == pytest.approx(alpha_max, rel=1e-12)
    assert max(a.ratios) <= al.R_MAX and min(a.ratios) >= 0
    assert max(a.ratios) == pytest.approx(al.R_MAX, abs=1e-12)  # the bound is tight, not over-cautious
    assert abs(wmean(a.ratios, HIGH_SIZES) - p) < 1e-9
    assert span(a.ratios) == pytest.approx(2 * a.alpha, abs=1e-12)


def test_dlp_at_p09_with_realistic_scores_never_exceeds_r_max():
    scores = list(np.linspace(1.0, 3.0, 32))
    a = al.allocate_dlp(scores, [100] * 32, 0.9)
    assert max(a.ratios) <= al.R_MAX and abs(a.weighted_mean - 0.9) < 1e-9
    assert 0 < a.alpha <= al.default_alpha(0.9)


def test_dlp_explicit_infeasible_alpha_names_the_largest_feasible():
    p = 0.9
    mu = 1 - HIGH_SIZES[-1] / sum(HIGH_SIZES)
    alpha_max = (al.R_MAX - p) / (2 * mu)
    with pytest.raises(UserError) as e:
        al.allocate_dlp(HIGH_SCORES, HIGH_SIZES, p, alpha=0.12)
    msg = str(e.value)
    assert "α" in msg and f"{alpha_max:.6g}" in msg and "\n" not in msg
    # the floor side: at low p the most important layer would go below 0
    with pytest.raises(UserError, match="α"):
        al.allocate_dlp(SCORES, SIZES, 0.1, alpha=0.5)
    # the named largest value is accepted and is tight
    ok = al.allocate_dlp(HIGH_SCORES, HIGH_SIZES, p, alpha=alpha_max)
    assert max(ok.ratios) <= al.R_MAX and ok.alpha == pytest.approx(alpha_max)


@pytest.mark.parametrize("alpha", [-0.01, float("nan"), float("inf")])
def test_dlp_bad_alpha_is_a_user_error(alpha):
    with pytest.raises(UserError, match="α"):
        al.allocate_dlp(SCORES, SIZES, 0.5, alpha=alpha)


def test_dlp_alpha_zero_is_uniform():
    a = al.allocate_dlp(SCORES, SIZES, 0.5, alpha=0.0)
    assert a.ratios == pytest.approx([0.5] * len(SCORES), abs=1e-15)


# -------------------------------------------------------------------------------------- rebalance
def test_rebalance_clamps_and_restores_weighted_mean_with_unequal_weights():
    ratios = [-0.2, 0.1, 0.35, 0.6, 1.4]
    weights = [1.0, 7.0, 2.0, 3.0, 0.5]
    out = al.rebalance(ratios, weights, 0.4)
    assert abs(wmean(out, weights) - 0.4) < 1e-9
    assert all(0.0 <= r <= al.R_MAX for r in out)
    assert out[0] == 0.0 and out[-1] == al.R_MAX  # clamped ends
    # one constant shift: differences between unclamped entries are unchanged
    assert out[2] - out[1] == pytest.approx(0.25, abs=1e-12)
    assert out[3] - out[2] == pytest.approx(0.25, abs=1e-12)
    assert all(a <= b for a, b in zip(out, out[1:]))  # order preserved


def test_rebalance_shift_pushes_entries_into_the_bound():
    ratios = [0.9, 0.95, 0.5]
    weights = [1, 1, 10]
    out = al.rebalance(ratios, weights, 0.97)
    assert abs(wmean(out, weights) - 0.97) < 1e-9
    assert out[0] == al.R_MAX and out[1] == al.R_MAX and out[2] < al.R_MAX


def test_rebalance_leaves_feasible_ratios_alone_and_rejects_bad_targets():
    ratios = [0.4, 0.6]
    assert al.rebalance(ratios, [1, 1], 0.5) == ratios
    with pytest.raises(UserError):
        al.rebalance(ratios, [1, 1], 1.2)
    with pytest.raises(UserError):
        al.rebalance(ratios, [1], 0.5)


# -------------------------------------------------------------------------------------------- OWL
D = [0.010, 0.004, 0.025, 0.007, 0.015, 0.002]


def test_owl_more_outliers_lower_sparsity_mean_and_span():
    sizes = [100] * len(D)
    a = al.allocate_owl(D, sizes, 0.6, lam=0.08)
    assert a.allocator == "owl" and a.alpha == 0.08 and a.scores == D and a.importance == D
    assert abs(wmean(a.ratios, sizes) - 0.6) < 1e-9
    assert span(a.ratios) == pytest.approx(0.16, abs=1e-12)
    order = np.argsort(D)
    assert np.all(np.diff(np.asarray(a.ratios)[order]) < 0)
    # by hand: n = (D - min)/(max - min)·2λ, ratio = p + mean(n) - n
    d = np.asarray(D)
    n = (d - d.min()) / (d.max() - d.min()) * 0.16
    assert a.ratios == pytest.approx(list(0.6 + n.mean() - n), abs=1e-12)


def test_owl_weighted_mean_with_unequal_sizes():
    sizes = [10, 50, 20, 5, 40, 30]
    a = al.allocate_owl(D, sizes, 0.5, lam=0.05)
    assert abs(wmean(a.ratios, sizes) - 0.5) < 1e-9
    assert span(a.ratios) == pytest.approx(0.10, abs=1e-12)


def test_owl_lambda_feasibility():
    d = [0.0] + [0.02] * 7  # one layer with no outliers is pushed up to p + 2λ·(7/8)
    sizes = [1] * 8
    lam_max = (al.R_MAX - 0.95) / (2 * 7 / 8)
    a = al.allocate_owl(d, sizes, 0.95)  # default λ = 0.08 is too wide here: lowered
    assert a.alpha == pytest.approx(lam_max) and max(a.ratios) <= al.R_MAX
    assert abs(a.weighted_mean - 0.95) < 1e-9
    with pytest.raises(UserError, match="λ") as e:
        al.allocate_owl(d, sizes, 0.95, lam=0.08)
    assert f"{lam_max:.6g}" in str(e.value)
    with pytest.raises(UserError, match="λ"):
        al.allocate("owl", [{"outlier_ratio": x} for x in d], sizes, 0.5, owl_lambda=-1.0)


# ---------------------------------------------------------------------------------------- uniform
def test_uniform():
    a = al.allocate_uniform([3, 5, 7], 0.7)
    assert a.ratios == [0.7, 0.7, 0.7] and a.alpha is None and a.scores is None and a.importance is None
    assert a.weighted_mean == pytest.approx(0.7)
    rows = a.to_layers()
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert {"index", "score", "importance", "sparsity"} <= set(rows[0]) and rows[0]["score"] is None
    assert al.allocate("uniform", [], [3, 5, 7], 0.7).ratios == [0.7, 0.7, 0.7]


@pytest.mark.parametrize("p", [0, 1, 1.5, -0.1, float("nan"), True, "0.5"])
def test_sparsity_outside_open_unit_interval_is_a_user_error(p):
    stats = [{"median": 1.0, "mean": 1.0, "outlier_ratio": 0.01}, {"median": 2.0, "mean": 2.0, "outlier_ratio": 0.02}]
    for name in al.ALLOCATORS:
        with pytest.raises(UserError, match="sparsity"):
            al.allocate(name, stats, [10, 10], p)


def test_dispatcher_errors_and_to_layers():
    stats = [{"median": 1.0, "mean": 1.0, "outlier_ratio": 0.01}, {"median": 2.0, "mean": 3.0, "outlier_ratio": 0.02}]
    with pytest.raises(UserError, match="allocator"):
        al.allocate("best", stats, [10, 10], 0.5)
    with pytest.raises(UserError, match="stat"):
        al.allocate("dlp", stats, [10, 10], 0.5, stat="mode")
    with pytest.raises(UserError, match="calibrat"):
        al.allocate("dlp", [], [10, 10], 0.5)
    with pytest.raises(UserError):
        al.allocate("owl", stats, [10, 10, 10], 0.5)
    rows = al.allocate("dlp", stats, [10, 10], 0.5, stat="mean").to_layers()
    assert [r["score"] for r in rows] == [1.0, 3.0]
    assert rows[0]["importance"] == pytest.approx(0.75) and rows[0]["sparsity"] < rows[1]["sparsity"]


# ------------------------------------------------------------------------------ layer statistics
def _reference_stats(weights, norms, m):
    A = np.concatenate([(np.abs(w.numpy()) * c.numpy()[None, :]).ravel() for w, c in zip(weights, norms)])
    srt = np.sort(A)
    lower_median = float(srt[(A.size + 1) // 2 - 1])
    mean = float(A.astype(np.float64).mean())
    return lower_median, mean, float((A > m * mean).sum() / A.size)


def test_layer_statistics_match_numpy():
    g = torch.Generator().manual_seed(7)
    shapes = [(48, 32), (48, 32), (96, 32), (32, 96)]  # even total count: exercises the lower median
    weights = [torch.randn(*s, generator=g) for s in shapes]
    norms = [torch.rand(s[1], generator=g) + 0.1 for s in shapes]
    norms[2][:3] = 40.0  # a few outlier input channels
    for m in (5.0, 3.0):
        got = al.layer_statistics(weights, norms, owl_m=m)
        med, mean, outl = _reference_stats(weights, norms, m)
        assert got["median"] == med
        assert got["mean"] == pytest.approx(mean, rel=1e-6)
        assert got["outlier_ratio"] == outl and outl > 0
        assert got["numel"] == sum(a * b for a, b in shapes)


def test_layer_statistics_even_count_uses_lower_median_and_handles_half_precision():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float16)
    got = al.layer_statistics([w], [torch.ones(4)])
    assert got["median"] == 2.0 and got["mean"] == 2.5 and got["outlier_ratio"] == 0.0


def test_layer_statistics_beyond_torch_quantile_limit():
    n_rows, n_cols = 4100, 4100  # 16.8M scores > torch.quantile's 2**24 input limit
    g = torch.Generator().manual_seed(3)
    w = torch.rand(n_rows, n_cols, generator=g)
    got = al.layer_statistics([w], [torch.ones(n_cols)])
    flat = w.numpy().ravel()
    k = (flat.size + 1) // 2 - 1
    assert got["median"] == float(np.partition(flat, k)[k])


@pytest.mark.parametrize("margin", [0.004, 0.0])  # 0.0 makes the bracket miss: exercises the fallback
def test_bracketed_selection_is_exact(monkeypatch, margin):
    monkeypatch.setattr(al, "_SELECT_DIRECT", 1_000)
    monkeypatch.setattr(al, "_SELECT_SAMPLE", 4_096)
    monkeypatch.setattr(al, "_SELECT_MARGIN", margin)
    g = torch.Generator().manual_seed(11)
    cases = [torch.randn(200_001, generator=g).abs(),
             torch.randint(0, 5, (100_000,), generator=g).float(),  # heavy ties
             torch.cat([torch.zeros(90_000), torch.rand(10_000, generator=g) * 1e6])]
    for x in cases:
        srt = np.sort(x.numpy())
        for k in (1, 17, (x.numel() + 1) // 2, x.numel() - 3, x.numel()):
            assert al._kth_smallest(x, k) == float(srt[k - 1]), k


def test_layer_statistics_rejects_mismatched_norms():
    with pytest.raises(UserError, match="calibrate"):
        al.layer_statistics([torch.ones(4, 8)], [torch.ones(4)])


# -------------------------------------------------------------------------------- table and plot
def _overlay():
    sizes = [100] * len(SCORES)
    return {name: al.allocate(name, [{"median": s, "mean": s, "outlier_ratio": s / 100} for s in SCORES],
                              sizes, 0.7).to_layers() for name in al.ALLOCATORS}


def test_plot_writes_a_png_atomically(tmp_path):
    out = tmp_path / "ratios.png"
    assert plot_allocation(out, _overlay(), "tiny · target 70%") == out
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    assert [p.name for p in tmp_path.iterdir()] == ["ratios.png"]  # no temp file left behind
    only_uniform = tmp_path / "u.png"
    plot_allocation(only_uniform, {"uniform": _overlay()["uniform"]}, "uniform only")
    assert only_uniform.read_bytes()[:4] == b"\x89PNG"


def test_ratios_table_renders_layer_rows_and_weighted_mean():
    sizes = [10, 30, 60]
    a = al.allocate_dlp([1.0, 2.0, 4.0], sizes, 0.5, alpha=0.05)
    console = Console(record=True, width=140)
    console.print(ratios_table(a.to_layers(), "dlp allocation, target 50%"))
    text = console.export_text()
    assert "dlp allocation, target 50%" in text
    for row in a.to_layers():
        line = next(ln for ln in text.splitlines() if f"{row['sparsity']:.2%}" in ln)
        assert f"{row['score']:.6g}" in line and f"{row['importance']:.6g}" in line and str(row["index"]) in line
    assert "parameter-weighted mean sparsity 50.0000%" in text
    # explicit sizes override; without any size information the caption says so
    console = Console(record=True, width=140)
    console.print(ratios_table([{"index": 0, "score": None, "importance": None, "sparsity": 0.3},
                                {"index": 1, "score": None, "importance": None, "sparsity": 0.5}], "t"))
    assert "unweighted mean sparsity 40.0000%" in console.export_text()
