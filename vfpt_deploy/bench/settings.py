"""What a bench run is asked: the backends, batch sizes (bounded, and checked to fit memory before anything is
allocated), loop lengths, threads, fold, device, seed and task stream."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from vfpt_deploy.errors import UsageError
from vfpt_deploy.runtime.onnx_runner import check_threads
from vfpt_deploy.runtime.timing import LoopSpec, physical_memory_bytes

BACKENDS = ("torch", "torch-folded", "ort-cpu", "ort-cuda", "ort-cuda-graph", "ort-trt", "tensorrt")
FOLDS = ("auto", "tokens", "kv", "none")  # torch-folded; the exported ONNX takes all but 'none'
FORMAT = "vfpt-deploy.bench"
VERSION = 1
MiB = 1024**2
MAX_BATCH = 4096
INPUT_RAM_FRACTION = 0.25  # an input batch may take at most this share of the machine's physical RAM
DTYPES = ("fp32", "fp16", "bf16")  # what the PyTorch backends can run in (BenchSettings.dtype)


def parse_batches(text: str) -> tuple[int, ...]:
    """'1,8,32' -> (1, 8, 32); integers 1..MAX_BATCH, no repeats."""
    try:
        batches = tuple(int(b) for b in text.replace(" ", "").split(",") if b)
    except ValueError:
        raise UsageError(f"batch sizes are comma-separated positive integers (e.g. 1,8,32), got {text!r}") from None
    if not batches:
        raise UsageError(f"batch sizes must be positive integers (e.g. 1,8,32), got {text!r}")
    check_batches(batches)
    return batches


def check_batches(batches) -> tuple[int, ...]:
    for b in batches:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= b <= MAX_BATCH:
            raise UsageError(f"batch sizes must be positive integers up to {MAX_BATCH}, got {b!r}")
    if len(set(batches)) != len(batches):
        raise UsageError(f"batch sizes repeat in {list(batches)}")
    return tuple(int(b) for b in batches)


def input_bytes(batch: int, image_size: tuple[int, int]) -> int:
    """Bytes of one float32 [batch, 3, H, W] input."""
    h, w = image_size
    return int(batch) * 3 * int(h) * int(w) * 4


def check_input_memory(batch: int, image_size: tuple[int, int]) -> None:
    """Refuse, before allocating it, an input batch larger than INPUT_RAM_FRACTION of physical RAM."""
    ram = physical_memory_bytes()
    need = input_bytes(batch, image_size)
    if ram is not None and need > INPUT_RAM_FRACTION * ram:
        raise UsageError(f"batch {batch} of {image_size[0]}x{image_size[1]} images needs {need / MiB:.0f} MiB of input "
                         f"alone, more than {INPUT_RAM_FRACTION:.0%} of this machine's {ram / MiB:.0f} MiB RAM; "
                         "use smaller --batch sizes")


@dataclass
class BenchSettings:
    batches: tuple[int, ...] = (1, 8, 32)
    loop: LoopSpec = field(default_factory=LoopSpec)
    threads: int | None = None  # torch intra-op threads and onnxruntime intra-op threads; None: library default
    e2e: bool = False  # GPU backends: also time with host<->device copies
    fold: str = "auto"  # fold mode of torch-folded and of the ONNX exported from a checkpoint
    device: str | None = None  # torch backends: "cpu", "cuda", "cuda:1"; None: CUDA when present
    dtype: str = "fp32"  # torch backends: fp32, fp16 or bf16 (an ONNX file carries its own precision)
    seed: int = 0
    task: str | None = None  # multi-task artifacts: also measure a single-task stream of this task

    def check(self) -> "BenchSettings":
        if not self.batches:
            raise UsageError("give at least one batch size (e.g. 1,8,32)")
        self.batches = check_batches(tuple(self.batches))
        self.threads = check_threads(self.threads)
        if self.fold not in FOLDS:
            raise UsageError(f"fold must be one of {', '.join(FOLDS)}, got {self.fold!r}")
        if self.dtype not in DTYPES:
            raise UsageError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        self.loop.check()
        return self

    def check_memory(self, image_size: tuple[int, int]) -> None:
        """Every batch's input fits memory, for a model of this image size (checked before allocating)."""
        for b in sorted(self.batches, reverse=True):
            check_input_memory(b, image_size)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["batches"] = list(self.batches)
        return d
