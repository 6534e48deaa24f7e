import builtins
import io

from vfpt_deploy.runtime import hardware

AMD = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma f16c\n\n"


def fake_cpuinfo(monkeypatch, text):
    real = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: io.StringIO(text) if p == "/proc/cpuinfo" else real(p, *a, **k))
    hardware.cpu.cache_clear()
    monkeypatch.setattr(hardware, "gpus", lambda: [])


def test_an_avx2_only_cpu_is_named_with_its_numeric_flags(monkeypatch):
    fake_cpuinfo(monkeypatch, AMD)
    try:
        c = hardware.cpu()
        assert c["model"] == "AMD EPYC 7B13" and c["isa"] == ["avx2", "fma"]
        assert hardware.missing_isa(["avx2", "avx512_vnni"]) == ["avx512_vnni"]
        assert hardware.summary().startswith("AMD EPYC 7B13") and "ISA avx2 fma" in hardware.summary()
    finally:
        hardware.cpu.cache_clear()


def test_unreadable_cpuinfo_says_unknown_flags(monkeypatch):
    real = builtins.open

    def no_cpuinfo(p, *a, **k):
        if p == "/proc/cpuinfo":
            raise OSError("no such file")
        return real(p, *a, **k)

    monkeypatch.setattr(builtins, "open", no_cpuinfo)
    hardware.cpu.cache_clear()
    try:
        assert hardware.cpu()["isa"] == [] and "ISA unknown" in hardware.summary({"cpu": hardware.cpu()})
        assert hardware.missing_isa(["avx2"]) == ["avx2"]
    finally:
        hardware.cpu.cache_clear()


def test_describe_reports_providers_and_versions():
    info = hardware.describe(["CPUExecutionProvider"])
    assert info["providers"] == ["CPUExecutionProvider"] and info["gpus"] == []
    assert "numpy" in info["libraries"] and info["cpu"]["cores"] >= 1
