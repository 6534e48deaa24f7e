"""CPU thread counts for torch and onnxruntime.

On a 2-core machine with one other busy process, a torch training step took 1586 ms with 2 threads and
153 ms with 1: OpenMP threads spin waiting for a core that is taken. So the default is the cores that are
free now (usable CPUs minus the 1-minute load average, at least 1), not every core. Torch-free.
"""
from __future__ import annotations

import os

from .errors import UsageError

MAX_THREADS = 1024


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """Free cores now: usable CPUs minus the rounded 1-minute load average, at least 1."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return max(1, usable_cpus() - int(round(load)))


def resolve_threads(threads: int | None) -> int:
    """The --threads value (checked), or the default."""
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise UsageError(f"--threads must be an integer in [1, {MAX_THREADS}], got {threads!r}")
    return threads


def set_torch_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (and return the count used)."""
    import torch

    n = resolve_threads(threads)
    torch.set_num_threads(n)
    return n
