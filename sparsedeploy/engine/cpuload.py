"""How much of the CPU other processes took while we timed something (timings taken then are suspect)."""
from __future__ import annotations

import os


class OtherLoad:
    """CPU time that processes other than ours used while the block ran, as a fraction of the machine (Linux:
    /proc/stat minus our own and our workers' /proc/<pid>/stat). None where /proc is not there."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.fraction: float | None = None

    @staticmethod
    def _total() -> tuple[int, int] | None:
        try:
            f = open("/proc/stat").readline().split()[1:]
        except OSError:
            return None
        v = [int(x) for x in f]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v[:8]) - idle, sum(v[:8])

    def _ours(self) -> int:
        total = 0
        for pid in {os.getpid(), *self.pids}:
            try:
                fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])          # utime + stime
            except (OSError, IndexError, ValueError):
                pass
        return total

    def __enter__(self):
        self._t0, self._o0 = self._total(), self._ours()
        return self

    def __exit__(self, *exc):
        t1 = self._total()
        if self._t0 is None or t1 is None:
            return
        busy, total = t1[0] - self._t0[0], t1[1] - self._t0[1]
        if total > 0:
            self.fraction = max(0.0, (busy - (self._ours() - self._o0)) / total)
