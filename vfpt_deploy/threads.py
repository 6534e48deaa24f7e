"""CPU thread counts for torch and onnxruntime.

On a 2-core machine with one other busy process, torch's OpenMP threads spin waiting for a core that is
taken: a training step of the demo ViT took 301 ms with 2 threads against 130 ms with 1 (medians of 20,
this project's machine). Fewer threads by load would fix the speed but make results depend on the load
(float sums in another order), and the same command and seed must give the same bits. So the default
is fixed per machine (every usable CPU) and the CLI sets OMP_WAIT_POLICY=PASSIVE (unless the user set
it) before torch loads, so waiting threads sleep instead of spinning: 120 ms per step with 2 threads
under the same load, 84 ms quiet (66 ms spinning). Torch-free.
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
    """Every usable CPU (affinity-aware): the same on every run of a machine, so results repeat."""
    return usable_cpus()


def passive_waits() -> None:
    """Waiting OpenMP threads sleep instead of spinning (takes effect if torch is not loaded yet)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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
