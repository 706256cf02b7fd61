"""Perplexity vs decode latency: the Pareto frontier of measured configurations, and the pick within a budget.

A point is one measured configuration (a model at one sparsity on one engine), a dict:
    {"label": "60%", "engine": "native", "sparsity": 0.6, "ms": 29.1, "ppl": 154.8,
     "deployment": "OUT/p60/deployment", "kind": "sparsedeploy"}
"ms" is the median decode time per token, "ppl" the perplexity; "deployment" and "kind" ("sparsedeploy" or
"llama.cpp peer") are optional and only carried along. Pure functions: no torch, no files.
"""
from __future__ import annotations

import math

from ..errors import UserError, check

REL_TOL = 1e-9        # a budget exactly on a point admits it despite float rounding (36.06 * 1.1 etc.)


def _usable(p: dict) -> bool:
    """A point with a finite latency and a perplexity that is not NaN (an infinite perplexity is usable: it is
    simply worse than every finite one)."""
    ms, ppl = p.get("ms"), p.get("ppl")
    return (isinstance(ms, (int, float)) and math.isfinite(ms) and isinstance(ppl, (int, float))
            and not math.isnan(ppl))


def dominates(a: dict, b: dict) -> bool:
    """a is at least as fast and at least as accurate as b, and strictly better in one of them."""
    return a["ms"] <= b["ms"] and a["ppl"] <= b["ppl"] and (a["ms"] < b["ms"] or a["ppl"] < b["ppl"])


def frontier(points: list[dict]) -> list[dict]:
    """The Pareto-optimal points (no other point is as fast and as accurate and strictly better in one),
    sorted by latency (ties: lower perplexity first). Points without a usable ms/ppl are left out."""
    pts = [p for p in points if _usable(p)]
    keep = [p for p in pts if not any(dominates(q, p) for q in pts if q is not p)]
    return sorted(keep, key=lambda p: (p["ms"], p["ppl"]))


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_budget(ppl_budget: float | None = None, latency_ms: float | None = None) -> tuple[str, float]:
    """Exactly one budget, valid -> ("ppl", B) or ("latency", X); anything else is a one-line UserError."""
    check(not (ppl_budget is not None and latency_ms is not None), "--ppl-budget and --latency-ms were both given",
          "give one: --ppl-budget 1.10 (fastest within 10% of dense perplexity) or --latency-ms X (most accurate "
          "within X ms/token)")
    check(ppl_budget is not None or latency_ms is not None, "no budget given",
          "give one: --ppl-budget 1.10 (fastest within 10% of dense perplexity) or --latency-ms X (most accurate "
          "within X ms/token)")
    if ppl_budget is not None:
        check(_number(ppl_budget) and math.isfinite(ppl_budget),
              f"--ppl-budget {ppl_budget} is not a finite number", "use a ratio to the dense perplexity, e.g. 1.10")
        check(ppl_budget >= 1.0, f"--ppl-budget {ppl_budget:g} would ask for better than dense perplexity",
              "use a ratio of at least 1.0 to the dense model's perplexity, e.g. 1.10 for at most 10% worse")
        return "ppl", float(ppl_budget)
    check(_number(latency_ms) and math.isfinite(latency_ms), f"--latency-ms {latency_ms} is not a finite number",
          "use milliseconds per decoded token, e.g. 25")
    check(latency_ms > 0, f"--latency-ms {latency_ms:g} must be above 0", "use milliseconds per decoded token, e.g. 25")
    return "latency", float(latency_ms)


def _ceil(x: float, step: float) -> float:
    """x rounded up to a multiple of step (a budget printed with that precision still admits x)."""
    return math.ceil(x / step - 1e-9) * step


def describe(p: dict) -> str:
    return f"{p['engine']} {p['label']}"


def pick(points: list[dict], *, dense_ppl: float, ppl_budget: float | None = None,
         latency_ms: float | None = None) -> dict:
    """The point to deploy. ppl_budget B: the fastest point with ppl <= B * dense_ppl (tie: lower ppl).
    latency_ms X: the lowest-perplexity point with ms <= X (tie: faster). Exactly one budget; nothing within
    it -> UserError naming the closest point and the budget that would admit it."""
    kind, budget = check_budget(ppl_budget, latency_ms)
    check(_number(dense_ppl) and math.isfinite(dense_ppl) and dense_ppl > 0,
          f"the dense perplexity {dense_ppl} is not a positive number", "re-evaluate the dense model")
    pts = [p for p in points if _usable(p)]
    check(bool(pts), "no measured configuration to choose from", "run the sweep with at least one engine")
    if kind == "ppl":
        limit = budget * dense_ppl
        fits = [p for p in pts if p["ppl"] <= limit * (1 + REL_TOL)]
        if fits:
            return min(fits, key=lambda p: (p["ms"], p["ppl"]))
        near = min(pts, key=lambda p: (p["ppl"], p["ms"]))
        need = _ceil(near["ppl"] / dense_ppl, 0.01)
        raise UserError(f"no configuration is within --ppl-budget {budget:g} (perplexity at most {limit:.2f}, "
                        f"dense {dense_ppl:.2f}); the closest is {describe(near)} at perplexity {near['ppl']:.2f} "
                        f"({near['ppl'] / dense_ppl:.3f}× dense, {near['ms']:.2f} ms/token)",
                        f"--ppl-budget {need:.2f} would admit it")
    fits = [p for p in pts if p["ms"] <= budget * (1 + REL_TOL)]
    if fits:
        return min(fits, key=lambda p: (p["ppl"], p["ms"]))
    near = min(pts, key=lambda p: (p["ms"], p["ppl"]))
    need = _ceil(near["ms"], 0.1)
    raise UserError(f"no configuration decodes within --latency-ms {budget:g}; the closest is {describe(near)} at "
                    f"{near['ms']:.2f} ms/token (perplexity {near['ppl']:.2f})",
                    f"--latency-ms {need:.1f} would admit it")
