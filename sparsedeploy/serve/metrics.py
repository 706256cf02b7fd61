"""Prometheus text exposition (format 0.0.4) for the server, written by hand: counters, gauges and
histograms with fixed buckets, all behind one lock (updated from the event loop and the engine thread)."""
from __future__ import annotations

import math
import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


def _fmt(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    if float(v).is_integer():
        return str(int(v))
    return repr(float(v))


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    esc = lambda s: str(s).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')  # noqa: E731
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in sorted(labels.items())) + "}"


class _Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets) + (math.inf,)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
                break
        self.sum += v
        self.count += 1


class Metrics:
    def __init__(self, prefix: str = "sparsedeploy"):
        self.prefix = prefix
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = {}
        self._gauges: dict[str, dict[tuple, float]] = {}
        self._hists: dict[str, dict[tuple, _Histogram]] = {}
        self._help: dict[str, tuple[str, str]] = {}

    def describe(self, name: str, kind: str, text: str) -> None:
        self._help[name] = (kind, text)

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        with self._lock:
            series = self._counters.setdefault(name, {})
            key = tuple(sorted(labels.items()))
            series[key] = series.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels) -> None:
        with self._lock:
            self._gauges.setdefault(name, {})[tuple(sorted(labels.items()))] = float(value)

    def observe(self, name: str, value: float, buckets=LATENCY_BUCKETS, **labels) -> None:
        with self._lock:
            series = self._hists.setdefault(name, {})
            key = tuple(sorted(labels.items()))
            if key not in series:
                series[key] = _Histogram(buckets)
            series[key].observe(float(value))

    def value(self, name: str, **labels) -> float:
        """A counter's or gauge's current value (0 if never set): for tests and the load test."""
        key = tuple(sorted(labels.items()))
        with self._lock:
            for table in (self._counters, self._gauges):
                if name in table and key in table[name]:
                    return table[name][key]
        return 0.0

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            names = sorted(set(self._counters) | set(self._gauges) | set(self._hists) | set(self._help))
            for name in names:
                full = f"{self.prefix}_{name}"
                kind, text = self._help.get(name, ("untyped", ""))
                if name in self._counters:
                    kind = "counter"
                elif name in self._hists:
                    kind = "histogram"
                elif name in self._gauges:
                    kind = "gauge"
                if text:
                    lines.append(f"# HELP {full} {text}")
                lines.append(f"# TYPE {full} {kind}")
                for key, v in sorted(self._counters.get(name, {}).items()):
                    lines.append(f"{full}{_labels(dict(key))} {_fmt(v)}")
                for key, v in sorted(self._gauges.get(name, {}).items()):
                    lines.append(f"{full}{_labels(dict(key))} {_fmt(v)}")
                for key, h in sorted(self._hists.get(name, {}).items()):
                    base = dict(key)
                    cum = 0
                    for b, c in zip(h.buckets, h.counts):
                        cum += c
                        lines.append(f"{full}_bucket{_labels({**base, 'le': _fmt(b)})} {cum}")
                    lines.append(f"{full}_sum{_labels(base)} {_fmt(h.sum)}")
                    lines.append(f"{full}_count{_labels(base)} {h.count}")
        return "\n".join(lines) + "\n"
