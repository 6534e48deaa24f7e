"""What machine a result came from: CPU model and the ISA flags that change numerics, GPU and driver,
library versions. Every verify report, golden set, self-check and test log names it, because the same
artifact gives other numbers on other hardware (onnxruntime's u8s8 int8 matmul saturates on AVX2 without
VNNI; float32 kernels differ per ISA). Torch-free.
"""
from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys

# x86 flags (as /proc/cpuinfo spells them) whose presence changes which kernels onnxruntime, oneDNN and
# MKL pick, and so the low bits of float32 results and whether int8 matmuls can saturate.
NUMERIC_ISA = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16",
               "asimd", "sve")  # the last two: aarch64
LIBRARIES = ("onnxruntime", "onnxruntime-gpu", "onnx", "numpy", "tensorrt", "tensorrt-rtx-cu12", "torch", "timm")


@functools.lru_cache(maxsize=1)
def cpu() -> dict:
    """{'model', 'arch', 'isa': [numeric ISA flags present], 'cores'}; on a machine without
    /proc/cpuinfo the model is platform.processor() and isa is empty (unknown)."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model", "hardware") and not model:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return {"model": model or platform.processor() or "unknown", "arch": platform.machine(),
            "isa": [f for f in NUMERIC_ISA if f in flags], "cores": cores}


@functools.lru_cache(maxsize=1)
def gpus() -> list[dict]:
    """NVIDIA GPUs as nvidia-smi names them ([] without a GPU or without nvidia-smi)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = [[v.strip() for v in line.split(",")] for line in out.splitlines() if line.strip()]
    return [{"name": r[0], "driver": r[1] if len(r) > 1 else "", "compute_capability": r[2] if len(r) > 2 else ""}
            for r in rows]


def libraries() -> dict[str, str]:
    """Installed versions of the libraries whose kernels produce the numbers."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def describe(providers: list[str] | None = None, gpu: bool | None = None) -> dict:
    """This machine, for a report: CPU (model, arch, numeric ISA flags, cores), GPUs (when `gpu` is true,
    or None and a GPU provider is in `providers`), the execution providers used, OS, Python and libraries."""
    want_gpu = gpu if gpu is not None else any(p != "CPUExecutionProvider" for p in providers or [])
    return {"cpu": cpu(), "gpus": gpus() if want_gpu else [], "providers": list(providers or []),
            "os": f"{platform.system()} {platform.release()}", "python": sys.version.split()[0],
            "libraries": libraries()}


def summary(info: dict | None = None) -> str:
    """One line: 'Intel(R) Xeon(R) Processor, x86_64, 2 cores; ISA avx2 fma avx512f ...'."""
    info = info or describe()
    c = info.get("cpu") or {}
    isa = " ".join(c.get("isa") or []) or "unknown"
    line = f"{c.get('model', 'unknown')}, {c.get('arch', '?')}, {c.get('cores', '?')} cores; ISA {isa}"
    for g in info.get("gpus") or []:
        line += f"; GPU {g.get('name', '?')} (driver {g.get('driver', '?')})"
    return line


def missing_isa(required: list[str] | tuple[str, ...]) -> list[str]:
    """The flags of `required` this CPU lacks (all of them when the CPU's flags cannot be read)."""
    have = set(cpu()["isa"])
    return [f for f in required if f not in have]
