"""What CPU this is, for result names and tables (no numba, no numpy: light enough for any process)."""
from __future__ import annotations

import platform

# AMD families as /proc/cpuinfo numbers them: 25 (0x19) is Zen 3 (models 0x00-0x0f, 0x20-0x5f) or Zen 4
# (0x10-0x1f, 0x60-0xaf); 26 (0x1a) is Zen 5. The VMs here hide the model name ("AMD EPYC"), and a result on
# one generation is not a result on another (Zen 5 runs 512-bit vectors at full width and some AVX-512
# instructions at other speeds than Zen 4).


def _info() -> str:
    try:
        return open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    except OSError:
        return ""


def _field(info: str, key: str) -> str:
    for line in info.splitlines():
        if line.split(":", 1)[0].strip() == key:
            return line.split(":", 1)[1].strip()
    return ""


def amd_zen(info: str | None = None) -> int | None:
    """The Zen generation of an AMD CPU (3, 4 or 5) from its family and model; None if not AMD or unknown."""
    info = _info() if info is None else info
    if "AuthenticAMD" not in info:
        return None
    try:
        family, model = int(_field(info, "cpu family")), int(_field(info, "model"))
    except ValueError:
        return None
    if family == 26:
        return 5
    if family == 25:
        return 4 if 0x10 <= model <= 0x1f or 0x60 <= model <= 0xaf else 3
    return None


def cpu_name(info: str | None = None) -> str:
    """The model name, with the Zen generation added where the name does not say it ("AMD EPYC (Zen 5)")."""
    info = _info() if info is None else info
    name = _field(info, "model name") or platform.processor() or platform.machine()
    zen = amd_zen(info)
    if zen and "zen" not in name.lower():
        name = f"{name} (Zen {zen})"
    return name


def cpu_tag(info: str | None = None) -> str:
    """The CPU kind in result names: intel_xeon / amd_epyc (Zen 4 and unknown AMD: the name every earlier AMD
    result carries) / amd_epyc_zen5 (a result on one kind is not a result on the other)."""
    info = _info() if info is None else info
    if not info:
        return "cpu"
    if "GenuineIntel" in info:
        return "intel_xeon"
    if "AuthenticAMD" in info:
        return "amd_epyc_zen5" if amd_zen(info) == 5 else "amd_epyc"
    return "cpu"
