"""Latency measurement without torch: warm-up, a timed loop, summary statistics, peak memory, machine facts.

What the benchmarks (vfpt_deploy.bench, benchmarks/*.py) time with, and what an edge device can run on its
own. A `Timer` turns one call into seconds: `PerfCounterTimer` (wall clock, CPU work and anything that
blocks until done) here; bench.py adds a CUDA-event timer on GPU. Statistics are numpy's (percentiles
with its default linear interpolation, std with ddof=1).
"""
from __future__ import annotations

import math
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

from vfpt_deploy.errors import UsageError

PERCENTILES = (50, 90, 95, 99)
MAX_ITERS = 1_000_000  # most calls a loop makes (a duration-bound loop stops here even at nanoseconds a call)
MAX_SECONDS = 3600.0  # longest warm-up or measurement of one loop


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
    iters / duration_s is set; check() says, in one line, what is wrong with anything else. Seconds are
    finite, > 0 and at most MAX_SECONDS; counts are integers of at most MAX_ITERS."""

    warmup: int | None = 10
    warmup_s: float | None = None
    iters: int | None = 50
    duration_s: float | None = None
    min_iters: int = 3  # a duration-bound loop still gives percentiles something to work on

    def check(self) -> "LoopSpec":
        if (self.warmup is None) == (self.warmup_s is None):
            raise UsageError("give the warm-up as a count or as seconds, not both and not neither")
        if (self.iters is None) == (self.duration_s is None):
            raise UsageError("give the measurement as iterations or as a duration in seconds, not both and not neither")
        if self.warmup is not None:
            _count(self.warmup, "warm-up count", 0)
        if self.warmup_s is not None:
            _seconds(self.warmup_s, "warm-up time")
        if self.iters is not None:
            _count(self.iters, "iterations", 1)
        if self.duration_s is not None:
            _seconds(self.duration_s, "duration")
        _count(self.min_iters, "min_iters", 1)
        return self


def _count(v, what: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= MAX_ITERS:
        raise UsageError(f"{what} must be an integer >= {lo} and <= {MAX_ITERS}, got {v!r}")
    return int(v)


def _seconds(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
            or not (math.isfinite(v) and 0 < v <= MAX_SECONDS):
        raise UsageError(f"{what} must be a finite number of seconds > 0 and <= {MAX_SECONDS:g}, got {v!r}")
    return float(v)


def measure(fn: Callable[[], object], spec: LoopSpec, timer: Timer | None = None,
            clock: Callable[[], float] = time.perf_counter) -> np.ndarray:
    """Warm up, then time fn call by call. Returns the per-call durations in seconds (float64).
    clock bounds the warm-up and a duration-bound loop (tests pass a fake one); timer times each call."""
    spec.check()
    timer = timer or PerfCounterTimer()
    if spec.warmup is not None:
        for _ in range(spec.warmup):
            fn()
    else:
        t_end = clock() + spec.warmup_s
        fn()  # at least once: the first call is where lazy initialisation happens
        calls = 1
        while clock() < t_end and calls < MAX_ITERS:
            fn()
            calls += 1
    times: list[float] = []
    if spec.iters is not None:
        for _ in range(spec.iters):
            times.append(timer.time(fn))
    else:
        # Bound by the clock (not by the sum of timed durations) so slow untimed work still ends it.
        t_end = clock() + spec.duration_s
        while (clock() < t_end or len(times) < spec.min_iters) and len(times) < MAX_ITERS:
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
        raise UsageError("summarize needs a non-empty 1-D sequence of durations")
    if batch < 1:
        raise UsageError(f"batch must be >= 1, got {batch}")
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


def physical_memory_bytes() -> int | None:
    """Physical RAM of this machine (sysconf pages x page size); None where the OS does not say."""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None
    return int(pages * size) if pages > 0 and size > 0 else None


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
        "physical_memory_bytes": physical_memory_bytes(),
        "gpus": gpus(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": library_versions(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
