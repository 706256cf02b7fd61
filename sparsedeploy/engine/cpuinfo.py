"""What CPU this is, for result names and tables (no numba, no numpy: light enough for any process)."""
from __future__ import annotations

import platform


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_tag() -> str:
    """The CPU kind in result names: intel_xeon / amd_epyc (a result on one kind is not a result on the other)."""
    try:
        info = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    except OSError:
        return "cpu"
    return "intel_xeon" if "GenuineIntel" in info else "amd_epyc" if "AuthenticAMD" in info else "cpu"
