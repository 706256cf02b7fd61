"""cpu_name / cpu_tag tell the CPU kinds these machines come as apart (a result on one is not one on another)."""
from sparsedeploy.engine.cpuinfo import amd_zen, cpu_name, cpu_tag


def _info(vendor, family, model, name):
    return f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\nmodel name\t: {name}\n"


def test_zen_generations_and_tags():
    zen4 = _info("AuthenticAMD", 25, 17, "AMD EPYC")             # Genoa: family 0x19, model 0x11
    zen5 = _info("AuthenticAMD", 26, 2, "AMD EPYC")              # Turin: family 0x1a
    zen3 = _info("AuthenticAMD", 25, 1, "AMD EPYC 7B13")
    xeon = _info("GenuineIntel", 6, 143, "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz")
    assert [amd_zen(i) for i in (zen3, zen4, zen5, xeon)] == [3, 4, 5, None]
    assert cpu_tag(zen4) == "amd_epyc" and cpu_tag(zen5) == "amd_epyc_zen5" and cpu_tag(xeon) == "intel_xeon"
    assert cpu_name(zen5) == "AMD EPYC (Zen 5)" and cpu_name(zen4) == "AMD EPYC (Zen 4)"
    assert cpu_name(xeon) == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    assert cpu_name(_info("AuthenticAMD", 26, 2, "AMD Ryzen 9 9950X (Zen 5)")).count("Zen") == 1


def test_this_machine_has_a_tag():
    assert cpu_tag() in ("intel_xeon", "amd_epyc", "amd_epyc_zen5", "cpu") and cpu_name()
