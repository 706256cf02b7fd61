"""Stages: `stage(run, cfg) -> artifact`. Each reads only what earlier stages wrote, writes to a temp
name and renames, then marks itself done in the manifest; a stage done with the same arguments and
inputs is skipped unless forced.

One module per stage (calibrate, allocate, prune, quantize, evaluate; the math they call lives beside this
package in pipeline/), what they share in common.py. This package re-exports every name, so
`stages.prune(...)`, `stages.CalibConfig` and `stages.CALIB_STATS` work as before. Note that
`stages.prune` etc. are the stage functions, not the submodules of the same name.
"""
from __future__ import annotations

from ..models import resolve
from ..prune import NEEDS, PRUNERS
from ..rundir import RunDir, read_json, write_json
from .common import (ALLOCATORS, CALIB_STATS, CALIB_TOKENS, EVAL, METHODS, PREQUANT, QUANTIZED, RATIOS, RATIOS_PNG,
                     layer_zero_counts, peak_rss_mb, record_realized, reset_peak_rss, resolve_device)
from .calibrate import CalibConfig, calibrate
from .allocate import AllocConfig, allocate, check_sparsity, check_spread, layer_stats
from .prune import PruneConfig, drop_quantized, prune, validate_prune
from .quantize import QuantConfig, quantize
from .evaluate import EvalConfig, evaluate

__all__ = [
    "ALLOCATORS", "CALIB_STATS", "CALIB_TOKENS", "EVAL", "METHODS", "NEEDS", "PREQUANT", "PRUNERS", "QUANTIZED",
    "RATIOS", "RATIOS_PNG", "AllocConfig", "CalibConfig", "EvalConfig", "PruneConfig", "QuantConfig", "RunDir",
    "allocate", "calibrate", "check_sparsity", "check_spread", "drop_quantized", "evaluate", "layer_stats",
    "layer_zero_counts", "peak_rss_mb", "reset_peak_rss", "prune", "quantize", "read_json", "record_realized", "resolve",
    "resolve_device", "validate_prune", "write_json",
]
