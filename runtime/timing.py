"""Latency measurement without torch: warm-up, a timed loop, summary statistics, peak memory, machine facts.

What the benchmarks (vfpt_deploy.bench, benchmarks/*.py) time with, and what an edge device can run on its
own. A `Timer` turns one call into seconds: `PerfCounterTimer` (wall clock, CPU work and anything that
blocks until done) here; bench.py adds a CUDA-event timer on GPU. Statistics are numpy's (percentiles
with its default linear interpolation, std with ddof=1).
"""
from __future__ import annotations

import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Callable, Protocol

import numpy as np

from vfpt_deploy.errors import VFPTError

PERCENTILES = (50, 90, 95, 99)
MAX_ITERS = 1_000_000  # a duration-bound loop stops here even if each call takes nanoseconds


class Timer(Protocol):
    name: str

    def time(self, fn: Callable[[], object]) -> float:
        """Run fn once and return its duration in seconds."""


class PerfCounterTimer:
    """Wall-clock time of one call (time.perf_counter): right for CPU work and blocking GPU calls."""

    name = "perf_counter"

    def time(self, fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


@dataclass(frozen=True)
class LoopSpec:
    """How long to warm up and how long to measure. Exactly one of warmup / warmup_s and one of
    iters / duration_s is set; check() says what is wrong with anything else."""

    warmup: int | None = 10
    warmup_s: float | None = None
    iters: int | None = 50
    duration_s: float | None = None
    min_iters: int = 3  # a duration-bound loop still gives percentiles something to work on

    def check(self) -> "LoopSpec":
        if (self.warmup is None) == (self.warmup_s is None):
            raise VFPTError("give the warm-up as a count or as seconds, not both and not neither")
        if self.warmup is not None and self.warmup < 0:
            raise VFPTError(f"warm-up count must be >= 0, got {self.warmup}")
        if self.warmup_s is not None and not self.warmup_s > 0:
            raise VFPTError(f"warm-up seconds must be > 0, got {self.warmup_s}")
        if (self.iters is None) == (self.duration_s is None):
            raise VFPTError("give the measurement as iterations or as a duration in seconds, not both and not neither")
        if self.iters is not None and self.iters < 1:
            raise VFPTError(f"iterations must be >= 1, got {self.iters}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise VFPTError(f"duration must be > 0 seconds, got {self.duration_s}")
        if self.min_iters < 1:
            raise VFPTError(f"min_iters must be >= 1, got {self.min_iters}")
        return self


def measure(fn: Callable[[], object], spec: LoopSpec, timer: Timer | None = None) -> np.ndarray:
    """Warm up, then time fn call by call. Returns the per-call durations in seconds (float64)."""
    spec.check()
    timer = timer or PerfCounterTimer()
    if spec.warmup is not None:
        for _ in range(spec.warmup):
            fn()
    else:
        t_end = time.perf_counter() + spec.warmup_s
        fn()  # at least once: the first call is where lazy initialisation happens
        while time.perf_counter() < t_end:
            fn()
    times: list[float] = []
    if spec.iters is not None:
        for _ in range(spec.iters):
            times.append(timer.time(fn))
    else:
        # Bound by the wall clock (not by the sum of timed durations) so slow untimed work still ends it.
        t_end = time.perf_counter() + spec.duration_s
        while (time.perf_counter() < t_end or len(times) < spec.min_iters) and len(times) < MAX_ITERS:
            times.append(timer.time(fn))
    return np.asarray(times, dtype=np.float64)


@dataclass(frozen=True)
class Stats:
    """Latency statistics in milliseconds, and throughput in images per second."""

    n: int
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    throughput: float  # images/s = batch * calls / total timed seconds

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(seconds: np.ndarray | list[float], batch: int = 1) -> Stats:
    """Stats of per-call durations (seconds). std uses ddof=1 (0 for a single call)."""
    t = np.asarray(seconds, dtype=np.float64)
    if t.ndim != 1 or t.size == 0:
        raise VFPTError("summarize needs a non-empty 1-D sequence of durations")
    if batch < 1:
        raise VFPTError(f"batch must be >= 1, got {batch}")
    ms = t * 1e3
    p50, p90, p95, p99 = np.percentile(ms, PERCENTILES)
    total = float(t.sum())
    return Stats(
        n=int(t.size), mean_ms=float(ms.mean()), std_ms=float(ms.std(ddof=1)) if t.size > 1 else 0.0,
        min_ms=float(ms.min()), max_ms=float(ms.max()),
        p50_ms=float(p50), p90_ms=float(p90), p95_ms=float(p95), p99_ms=float(p99),
        throughput=batch * t.size / total if total > 0 else float("inf"),
    )


# -- peak memory -------------------------------------------------------------------------------------
def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0: write 5 to /proc/self/clear_refs), so the next
    peak_rss_bytes() covers only what ran since. False where that is not possible: the peak is then the
    process's lifetime peak (getrusage)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: VmHWM (resettable) on Linux, else getrusage's ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB elsewhere


# -- machine facts -----------------------------------------------------------------------------------
VERSION_PACKAGES = ("vfpt-deploy", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "torch", "timm",
                    "tensorrt", "tensorrt-rtx-cu12", "matplotlib")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def physical_cores() -> int | None:
    """Distinct (socket, core) pairs in /proc/cpuinfo; None where it does not say."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None
    pairs = set()
    for block in text.strip().split("\n\n"):
        phys = re.search(r"^physical id\s*:\s*(\d+)", block, re.M)
        core = re.search(r"^core id\s*:\s*(\d+)", block, re.M)
        if phys and core:
            pairs.add((phys.group(1), core.group(1)))
    return len(pairs) or None


def gpus() -> list[str]:
    """GPU names from nvidia-smi (no CUDA library needed); empty where there is none."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def library_versions(packages: tuple[str, ...] = VERSION_PACKAGES) -> dict[str, str]:
    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def machine_info() -> dict:
    """What a latency number means nothing without: CPU, cores, threads, GPU, OS, library versions."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "physical_cores": physical_cores(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,  # CPU affinity (containers / taskset)
        "gpus": gpus(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": library_versions(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
