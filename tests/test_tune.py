"""The native tuner (engine/native/tune.py): timings taken on a busy machine are not trusted."""
from __future__ import annotations

import numpy as np
import pytest

from sparsedeploy.engine.native import tune
from sparsedeploy.engine.native.pack import encode


def _layers(seed=0, rows=96, cols=128, sparsity=0.7):
    rng = np.random.default_rng(seed)
    out = {}
    for g, shape in {"qkv": (rows, cols), "up": (2 * rows, cols), "down": (cols, 2 * rows)}.items():
        W = rng.standard_normal(shape).astype(np.float32)
        W[rng.random(shape) < sparsity] = 0.0
        out[g] = W
    return [out]


class _Load:
    """Stands in for cpuload.OtherLoad: reports the given fractions, one per timing attempt."""
    seen: list = []

    def __init__(self, fractions):
        self.fractions = list(fractions)

    def __call__(self, pids):
        load = self

        class Ctx:
            fraction = None

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.fraction = load.fractions.pop(0) if load.fractions else 0.0
                _Load.seen.append(self.fraction)

        return Ctx()


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_a_machine_that_stays_busy_gets_the_fewest_bytes_and_parallel_builds(monkeypatch, weights):
    monkeypatch.setattr(tune, "OtherLoad", _Load([0.6] * (tune.RETRIES + 1)))
    monkeypatch.setattr(tune, "RETRY_PAUSE_S", 0.0)
    _Load.seen = []
    layers = _layers()
    choice, rec = tune.choose_formats(layers, threads=2, rounds=2, weights=weights)
    assert len(_Load.seen) == tune.RETRIES + 1 and rec["attempts"] == tune.RETRIES + 1
    assert "fewest bytes" in rec["fallback"] and "60%" in rec["fallback"]
    for g, W in layers[0].items():
        fmt = choice[0][g]
        assert not fmt.endswith("/serial")
        sizes = {f: sum(a.nbytes for a in encode(W, f).values()) for f in tune.candidates(W, weights)}
        assert sizes[fmt] == min(sizes.values()), (g, fmt, sizes)


def test_a_passing_load_is_timed_again_and_then_trusted(monkeypatch):
    monkeypatch.setattr(tune, "OtherLoad", _Load([0.9, 0.01]))
    monkeypatch.setattr(tune, "RETRY_PAUSE_S", 0.0)
    _Load.seen = []
    choice, rec = tune.choose_formats(_layers(), threads=2, rounds=3)
    assert _Load.seen == [0.9, 0.01] and rec["attempts"] == 2 and "fallback" not in rec
    for g, ms in rec["ms"][0].items():                 # the fastest (or a smaller tie) of the second attempt
        assert ms[choice[0][g]] <= min(ms.values()) * (1 + rec["tie"]) + 2e-6


def test_serial_builds_are_timed_only_for_small_groups(monkeypatch):
    monkeypatch.setattr(tune, "OtherLoad", _Load([]))
    layers = _layers()
    monkeypatch.setattr(tune, "SERIAL_MAX_WEIGHTS", layers[0]["qkv"].size)     # qkv is small enough, up/down not
    _, rec = tune.choose_formats(layers, threads=2, rounds=1)
    ms = rec["ms"][0]
    assert any(f.endswith("/serial") for f in ms["qkv"])
    assert not any(f.endswith("/serial") for f in ms["up"]) and not any(f.endswith("/serial") for f in ms["down"])
