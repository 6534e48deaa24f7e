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


# -- int8 on onnxruntime's CPU provider ------------------------------------------------------------------
# onnxruntime (MLAS) multiplies uint8 activations by int8 weights with AVX2's vpmaddubsw, which adds two
# u8 x s8 products into an int16 and saturates there (255 x 127 x 2 > 32767); AVX-512 without VNNI uses the
# same instruction. VNNI (vpdpbusd) and AMX accumulate in int32 and do not saturate. Int8 activations are
# shifted to uint8 on x86, so symmetric int8 x int8 (TensorRT's Q/DQ profile, ModelOpt) saturates the same.
VNNI = ("avx512_vnni", "avx_vnni", "amx_int8")
X86 = ("x86_64", "amd64", "i386", "i686", "x86")
# weight form (the artifact's metadata quantization.cpu.form) -> what its integer matmuls are and the x86
# ISAs of which onnxruntime's CPU provider needs one to compute them without saturating ([]: none needed).
INT8_FORMS = {
    "int7": {"matmul": "uint8 activations x 7-bit weights (int8 in [-64, 64], onnxruntime reduce_range)",
             "needs_one_of": []},
    "uint8": {"matmul": "uint8 activations x uint8 weights (onnxruntime U8U8)", "needs_one_of": []},
    "int8": {"matmul": "uint8/int8 activations x full-range int8 weights (onnxruntime U8S8)",
             "needs_one_of": list(VNNI)},
}


def int8_cpu_record(form: str) -> dict:
    """What an int8 artifact's metadata records (quantization.cpu) for a weight form of INT8_FORMS."""
    needs = INT8_FORMS[form]["needs_one_of"]
    where = ("every x86-64 CPU (AVX2, AVX-512, VNNI, AMX): two of its products fit vpmaddubsw's int16"
             if not needs else f"x86-64 CPUs with {', '.join(needs[:-1])} or {needs[-1]}; AVX2 and AVX-512 "
             "without VNNI saturate vpmaddubsw's int16 pair sums and compute another model")
    return {"form": form, "matmul": INT8_FORMS[form]["matmul"], "saturation_free_on": where,
            "needs_one_of": list(needs)}


def int8_isa_note(quantization, providers: list[str] | None = None) -> str | None:
    """One line when an int8 artifact's integer matmuls can saturate on this CPU (onnxruntime's CPU provider
    on an x86 CPU without VNNI/AMX, for a form that needs them; an artifact that records no form was written
    with full-range int8 weights); None where they compute as verified. The metadata is untrusted: only known
    flag names and forms are used."""
    if not isinstance(quantization, dict) or (providers and providers[0] != "CPUExecutionProvider"):
        return None
    c = cpu()
    if c["arch"].lower() not in X86:
        return None
    rec = quantization.get("cpu")
    if isinstance(rec, dict) and rec.get("form") in INT8_FORMS:
        form = rec["form"]
        needs = INT8_FORMS[form]["needs_one_of"]
    else:
        form, needs = "int8", list(VNNI)
    if not needs or len(missing_isa(needs)) < len(needs):
        return None
    have = (f"this CPU ({c['model']}) has none of them" if c["isa"] else "this CPU's ISA flags could not be read")
    fix = ("its TensorRT engine on a GPU is unaffected; check this ONNX on a VNNI CPU" if
           quantization.get("target") == "tensorrt" else
           "re-export it with this vfpt-deploy (7-bit weights, saturation-free on every x86-64 CPU)")
    return (f"int8 artifact ({INT8_FORMS[form]['matmul']}) computes as verified only on CPUs with "
            f"{', '.join(needs)}; {have}, so onnxruntime's int8 matmuls can saturate and its logits differ: {fix}")
