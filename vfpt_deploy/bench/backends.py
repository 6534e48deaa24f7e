"""Latency benchmarks of a VFPT model across runtimes: what `vfpt-deploy bench` calls.

Backends (each measured over a batch sweep, or skipped with the reason):
  torch          PyTorch eager, the unfolded model (live FFT): the reference
  torch-folded   PyTorch eager, prompts folded to constants (fold_model)
  ort-cpu        onnxruntime, CPU execution provider
  ort-cuda       onnxruntime, CUDA EP -- only when a session really runs on it (session.get_providers())
  ort-trt        onnxruntime, TensorRT EP -- likewise
  tensorrt       a TensorRT engine file (needs the tensorrt module and a CUDA GPU)

Timing: perf_counter around each call on CPU; on GPU CUDA events on the stream the work runs on, with
inputs and outputs already on the device (onnxruntime IO binding) so copies are not timed. `e2e` adds
end-to-end rows on GPU backends that time host->device copy, inference and device->host copy with
perf_counter. Statistics and machine facts come from vfpt_deploy.runtime.timing.

The ort-* and tensorrt backends run the runtime's own predictors (OnnxPredictor, TensorRTPredictor)
through their public API; a run.pt is exported to ONNX by the one export pipeline (pipeline.export_run),
verified against PyTorch like any export. Option values are checked here (one-line UsageError): loop
lengths by LoopSpec, batch sizes 1..4096 and, once a model's image size is known, an input batch of at
most a quarter of physical RAM, before anything is allocated.

Multi-task artifacts (an ONNX or engine whose metadata lists `tasks`) take a task index per image. By
default each batch replays a mixed-task stream: every sample's task is drawn uniformly at random (seeded)
from the artifact's tasks, balanced so that a batch of b images holds min(b, T) different tasks. With
`task` set (`--task NAME`), each batch size is also measured on a single-task stream of that task, right
after the mixed one on the same session, so the two compare in one run. Every row says its stream.

The GPU paths (CUDA events, IO binding, TensorRT engines) follow the documented torch / onnxruntime /
TensorRT APIs; they run only where a GPU is present.
"""
from __future__ import annotations

import csv
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from vfpt_deploy.errors import InputError, RuntimeSetupError, Unavailable, UsageError, VerificationError, VFPTError
from vfpt_deploy.extras import import_onnxruntime, needs_extras
from vfpt_deploy.artifacts.files import atomic_write, dumps_json
from vfpt_deploy.artifacts.schema import INPUT_NAME, OUTPUT_NAME, TASK_INPUT, artifact_tasks, output_classes
from vfpt_deploy.runtime.onnx_runner import check_threads
from vfpt_deploy.runtime.timing import LoopSpec, PerfCounterTimer, Timer, machine_info, measure, peak_rss_bytes, \
    physical_memory_bytes, reset_peak_rss, summarize

BACKENDS = ("torch", "torch-folded", "ort-cpu", "ort-cuda", "ort-trt", "tensorrt")
FOLDS = ("auto", "tokens", "kv", "none")  # torch-folded; the exported ONNX takes all but 'none'
FORMAT = "vfpt-deploy.bench"
VERSION = 1
MiB = 1024**2
MAX_BATCH = 4096
INPUT_RAM_FRACTION = 0.25  # an input batch may take at most this share of the machine's physical RAM


# -- settings and results ---------------------------------------------------------------------------
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
    seed: int = 0
    task: str | None = None  # multi-task artifacts: also measure a single-task stream of this task

    def check(self) -> "BenchSettings":
        if not self.batches:
            raise UsageError("give at least one batch size (e.g. 1,8,32)")
        self.batches = check_batches(tuple(self.batches))
        self.threads = check_threads(self.threads)
        if self.fold not in FOLDS:
            raise UsageError(f"fold must be one of {', '.join(FOLDS)}, got {self.fold!r}")
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


@dataclass
class Result:
    backend: str
    batch: int
    timing: str  # "host" (perf_counter, CPU), "device" (CUDA events, data on device), "end-to-end"
    stats: dict
    peak_rss_mib: float  # peak resident memory of the process while this row ran (everything loaded)
    cuda_peak_mib: float | None  # torch allocator's peak on the GPU (None: CPU, or memory torch cannot see)
    device: str
    providers: list[str] = field(default_factory=list)  # onnxruntime: what the session really uses
    detail: dict = field(default_factory=dict)  # fold mode, artifact, a multi-task batch's task counts, ...
    stream: str | None = None  # multi-task artifacts: "mixed" or "task:NAME" (Stream.label); None: single-task

    def flat(self) -> dict:
        return {"backend": self.backend, "batch": self.batch, "timing": self.timing, "stream": self.stream or "",
                **self.stats,
                "peak_rss_mib": self.peak_rss_mib, "cuda_peak_mib": self.cuda_peak_mib, "device": self.device,
                "providers": ";".join(self.providers),
                "detail": dumps_json(self.detail, sort_keys=True) if self.detail else ""}


@dataclass
class Skipped:
    backend: str
    reason: str
    batch: int | None = None


@dataclass
class BenchReport:
    machine: dict
    settings: dict
    results: list[Result] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "machine": self.machine, "settings": self.settings,
                "results": [asdict(r) for r in self.results], "skipped": [asdict(s) for s in self.skipped]}

    def write_json(self, path: str | os.PathLike) -> Path:
        text = dumps_json(self.to_dict(), indent=2)  # strict: a non-finite number is written as null
        atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))
        return Path(path)

    def write_csv(self, path: str | os.PathLike) -> Path:
        """One row per result; every row carries the machine and the settings that produced it."""
        m = self.machine
        machine_cols = {"cpu_model": m.get("cpu_model"), "physical_cores": m.get("physical_cores"),
                        "logical_cpus": m.get("logical_cpus"), "usable_cpus": m.get("usable_cpus"),
                        "threads": self.settings.get("threads"), "gpus": ";".join(m.get("gpus") or []),
                        "versions": dumps_json(m.get("versions", {}), sort_keys=True), "time_utc": m.get("time_utc")}
        rows = [{**r.flat(), **machine_cols} for r in self.results]

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                if not rows:
                    f.write("")
                    return
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)

        atomic_write(path, write)
        return Path(path)

    def plot(self, path: str | os.PathLike) -> Path:
        """PNG: p50 latency (bars to p95) and throughput vs batch size, one line per backend and timing."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not self.results:
            raise VFPTError("nothing was measured, so there is nothing to plot")
        series: dict[str, list[Result]] = {}
        for r in self.results:
            label = r.backend if r.timing in ("host", "device") else f"{r.backend} ({r.timing})"
            label += f" [{r.stream}]" if r.stream else ""
            series.setdefault(label, []).append(r)
        fig, (ax_lat, ax_thr) = plt.subplots(1, 2, figsize=(12, 4.8))
        for label, rows in series.items():
            rows = sorted(rows, key=lambda r: r.batch)
            b = [r.batch for r in rows]
            p50 = np.array([r.stats["p50_ms"] for r in rows])
            p95 = np.array([r.stats["p95_ms"] for r in rows])
            ax_lat.errorbar(b, p50, yerr=[np.zeros_like(p50), p95 - p50], marker="o", capsize=3, label=label)
            ax_thr.plot(b, [r.stats["throughput"] for r in rows], marker="o", label=label)
        batches = sorted({r.batch for r in self.results})
        for ax, ylabel in ((ax_lat, "latency per call, ms (p50, bar to p95)"), (ax_thr, "throughput, images/s")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.set_xlabel("batch size")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_lat.legend(fontsize=8)
        fig.suptitle(machine_line(self.machine, self.settings.get("threads")), fontsize=9)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
        plt.close(fig)
        return Path(path)


def machine_line(machine: dict, threads: int | None = None) -> str:
    gpu = ", ".join(machine.get("gpus") or []) or "no GPU"
    v = machine.get("versions", {})
    ort = v.get("onnxruntime-gpu") or v.get("onnxruntime")
    return (f"{machine.get('cpu_model')}, {machine.get('physical_cores')} cores / {machine.get('usable_cpus')} usable CPUs"
            f", threads {threads or 'default'}; {gpu}; torch {v.get('torch', '-')}, onnxruntime {ort or '-'}")


# -- task streams (multi-task artifacts) ----------------------------------------------------------------
@dataclass(frozen=True)
class Stream:
    """Which task each image of a multi-task artifact's batches is for: every image `task`, or (None) the
    mixed stream."""

    task: str | None = None

    @property
    def label(self) -> str:
        return "mixed" if self.task is None else f"task:{self.task}"  # ':' is in no task name (schema.TASK_NAME)


def streams(tasks: list[str], task: str | None) -> list[Stream | None]:
    """The streams a backend is measured on: [None] for a single-task artifact; mixed, then `task` alone."""
    if not tasks:
        return [None]
    return [Stream()] + ([Stream(task)] if task is not None else [])


def stream_task_ids(tasks: list[str], stream: Stream, batch: int, seed: int) -> np.ndarray:
    """int64 task indices of one batch. Mixed: each image's task is uniform at random over the T tasks, and
    the batch is balanced (min(b, T) different tasks, counts differing by at most one) rather than drawn
    independently, so that every batch of two or more images really mixes tasks; seeded by (seed, batch)."""
    if stream.task is not None:
        return np.full(batch, tasks.index(stream.task), dtype=np.int64)
    rng = np.random.default_rng([seed, batch])
    ids = np.resize(rng.permutation(len(tasks)), batch)  # a random subset of tasks when batch < T
    rng.shuffle(ids)
    return ids.astype(np.int64)


def check_task_request(checkpoint, artifacts: list, task: str | None) -> None:
    """`--task NAME` picks one task of multi-task artifacts: refused (one line) with a run.pt or a
    single-task artifact, and for a name an artifact does not hold (its tasks listed)."""
    if task is None:
        return
    shown = repr(str(task)[:80])
    if checkpoint is not None:
        raise UsageError(f"--task {shown} picks a task of a multi-task .onnx/.engine, but a run.pt holds a single "
                         "task: drop --task, or benchmark the run.pt in its own run")
    for path in artifacts:
        names = [t["name"] for t in artifact_tasks(Path(path))]
        if not names:
            raise UsageError(f"--task {shown}: {path} holds a single task; drop --task")
        if task not in names:
            raise UsageError(f"--task {shown}: {path} has no such task; it holds {', '.join(names)}")


# -- backends ----------------------------------------------------------------------------------------
# A backend that cannot run here raises vfpt_deploy.errors.Unavailable (importable from this module too):
# the run reports it as skipped, with the message as the reason.


class Backend:
    """One way of running the model. `runner(batch, e2e, task_ids)` prepares inputs and returns a
    no-argument call that runs one inference; `timer(e2e)` is what times it. `image_size` (H, W) is known
    once it is made; `tasks` (a multi-task artifact's task names, else []) too."""

    name: str
    device: str = "cpu"
    image_size: tuple[int, int]
    providers: list[str] = []
    detail: dict = {}
    tasks: list[str] = []

    def runner(self, batch: int, e2e: bool, task_ids: np.ndarray | None = None) -> Callable[[], object]:
        raise NotImplementedError

    def timer(self, e2e: bool) -> Timer:
        return PerfCounterTimer()

    def cuda_peak_reset(self) -> None:
        pass

    def cuda_peak_mib(self) -> float | None:
        return None

    def close(self) -> None:
        pass


class CudaEventTimer:
    """GPU time of one call between two CUDA events recorded on `stream` (torch's current stream)."""

    name = "cuda_events"

    def __init__(self, stream=None) -> None:
        import torch

        self.torch = torch
        self.stream = stream or torch.cuda.current_stream()

    def time(self, fn: Callable[[], object]) -> float:
        start = self.torch.cuda.Event(enable_timing=True)
        end = self.torch.cuda.Event(enable_timing=True)
        start.record(self.stream)
        fn()
        end.record(self.stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def _torch_device(device: str | None):
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeSetupError(f"device {device} asked for, but torch sees no CUDA GPU here; use --device cpu")
    return dev


class TorchBackend(Backend):
    """A torch module (eager), in inference mode, on CPU or one CUDA device."""

    def __init__(self, name: str, module, image_size: tuple[int, int], device: str | None, seed: int, detail: dict):
        import torch

        self.torch = torch
        self.name = name
        self.dev = _torch_device(device)
        self.device = str(self.dev)
        self.module = module.eval().to(self.dev)
        self.image_size = tuple(image_size)
        self.seed = seed
        self.detail = detail
        self.providers = []

    def runner(self, batch: int, e2e: bool, task_ids: np.ndarray | None = None) -> Callable[[], object]:
        torch, module = self.torch, self.module
        host = torch.from_numpy(make_input(batch, self.image_size, self.seed))
        if self.dev.type == "cuda" and e2e:
            host = host.pin_memory()

            def run():
                with torch.inference_mode():
                    return module(host.to(self.dev, non_blocking=True)).cpu()  # .cpu() waits for the result

            return run
        x = host.to(self.dev)

        def run():
            with torch.inference_mode():
                return module(x)

        return run

    def timer(self, e2e: bool) -> Timer:
        return CudaEventTimer() if self.dev.type == "cuda" and not e2e else PerfCounterTimer()

    def cuda_peak_reset(self) -> None:
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize(self.dev)
            self.torch.cuda.reset_peak_memory_stats(self.dev)

    def cuda_peak_mib(self) -> float | None:
        if self.dev.type != "cuda":
            return None
        return self.torch.cuda.max_memory_allocated(self.dev) / MiB

    def close(self) -> None:
        self.module = None
        if self.dev.type == "cuda":
            self.torch.cuda.empty_cache()


# What each ort-* backend asks onnxruntime for; the first is the one it measures.
ORT_PROVIDERS = {"ort-cpu": ["CPUExecutionProvider"],
                 "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                 "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}


class OrtBackend(Backend):
    """An ONNX file in onnxruntime through runtime.onnx_runner.OnnxPredictor, with one execution provider;
    Unavailable when the session fell back to another provider (it would time the wrong thing)."""

    def __init__(self, name: str, kind: str, path: Path, threads: int | None, seed: int, detail: dict):
        from vfpt_deploy.runtime.onnx_runner import OnnxPredictor

        self.ort = ort = import_onnxruntime(f"the {kind} benchmark")
        self.name, self.kind, self.path, self.seed = name, kind, Path(path), seed
        asked = ORT_PROVIDERS[kind]
        want = asked[0]
        if want not in ort.get_available_providers():
            raise Unavailable(f"this onnxruntime build ({ort.__version__}) has no {want} (for CUDA, swap onnxruntime "
                              "for onnxruntime-gpu: README, 'Install')")
        self.stream, self.device_id = None, 0
        options = {} if kind == "ort-cpu" else {"CUDAExecutionProvider": self._cuda_options()}
        # Fallback is judged here, more strictly than the predictor does: the measured provider must come first.
        self.predictor = OnnxPredictor(self.path, asked, threads=threads, allow_fallback=True, provider_options=options)
        self.providers = self.predictor.providers
        if self.providers[0] != want:
            self.predictor.close()
            raise Unavailable(f"onnxruntime lists {want} as available, but the session fell back to "
                              f"{', '.join(self.providers)} (no usable GPU / CUDA libraries here)")
        self.device = "cpu" if kind == "ort-cpu" else f"cuda:{self.device_id}"
        self.image_size = tuple(self.predictor.preprocess.size)
        self.tasks = self.predictor.tasks
        self.num_classes = output_classes(self.predictor.metadata)  # a multi-task graph's logits: the widest task
        meta = self.predictor.metadata
        self.detail = {**detail, "artifact": self.path.name, "threads": threads,
                       **{k: meta[k] for k in ("fold", "precision") if k in meta}}

    def _cuda_options(self) -> dict:
        """Run onnxruntime's CUDA work on torch's current stream, so CUDA events recorded there time it."""
        try:
            import torch
        except ImportError:
            return {"device_id": 0}
        if not torch.cuda.is_available():
            return {"device_id": 0}
        self.stream, self.device_id = torch.cuda.current_stream(), torch.cuda.current_device()
        return {"device_id": self.device_id, "user_compute_stream": str(self.stream.cuda_stream)}

    def runner(self, batch: int, e2e: bool, task_ids: np.ndarray | None = None) -> Callable[[], object]:
        x = make_input(batch, self.image_size, self.seed)
        infer = self.predictor.infer
        if self.kind == "ort-cpu" or e2e:
            return lambda: infer(x, task_ids)  # numpy in, numpy out: copies included on GPU EPs
        # IO binding: input and output live on the GPU, so a timed run is inference only.
        ort, session = self.ort, self.predictor.session
        binding = session.io_binding()
        binding.bind_ortvalue_input(INPUT_NAME, ort.OrtValue.ortvalue_from_numpy(x, "cuda", self.device_id))
        ids = self.predictor.check_task_ids(x, task_ids)
        if ids is not None:
            binding.bind_ortvalue_input(TASK_INPUT, ort.OrtValue.ortvalue_from_numpy(ids, "cuda", self.device_id))
        y = ort.OrtValue.ortvalue_from_shape_and_type([batch, self.num_classes], np.float32, "cuda", self.device_id)
        binding.bind_ortvalue_output(OUTPUT_NAME, y)
        binding.synchronize_inputs()
        return lambda: session.run_with_iobinding(binding)

    def timer(self, e2e: bool) -> Timer:
        if self.kind != "ort-cpu" and not e2e and self.stream is not None:
            return CudaEventTimer(self.stream)
        return PerfCounterTimer()

    def close(self) -> None:
        self.predictor.close()


class CudartEventTimer:
    """GPU time of one call between two CUDA events on a TensorRT predictor's own (cuda-python) stream."""

    name = "cuda_events"

    def __init__(self, predictor) -> None:
        from vfpt_deploy.runtime.tensorrt_runner import cuda_check

        self.cudart, self.stream, self.check = predictor.cudart, predictor.stream, cuda_check

    def time(self, fn: Callable[[], object]) -> float:
        cudart, check = self.cudart, self.check
        start = check(cudart, cudart.cudaEventCreate(), "cudaEventCreate")
        try:
            end = check(cudart, cudart.cudaEventCreate(), "cudaEventCreate")
        except VFPTError:
            cudart.cudaEventDestroy(start)
            raise
        try:
            check(cudart, cudart.cudaEventRecord(start, self.stream), "cudaEventRecord")
            fn()
            check(cudart, cudart.cudaEventRecord(end, self.stream), "cudaEventRecord")
            check(cudart, cudart.cudaEventSynchronize(end), "cudaEventSynchronize")
            ms = check(cudart, cudart.cudaEventElapsedTime(start, end), "cudaEventElapsedTime")
        finally:
            cudart.cudaEventDestroy(start)
            cudart.cudaEventDestroy(end)
        return float(ms) / 1e3


class TensorRTBackend(Backend):
    """A TensorRT / TensorRT-RTX engine through runtime.tensorrt_runner.TensorRTPredictor (which checks the
    sidecar, TensorRT version and GPU). Device timing: the batch is load()ed onto the GPU once, then each
    timed call is execute() (the engine alone, on the predictor's stream); end-to-end timing is the
    predictor's own infer() (copy in, run, copy out, synchronize)."""

    def __init__(self, name: str, path: Path, seed: int):
        from vfpt_deploy.runtime.tensorrt_runner import TensorRTPredictor

        try:
            self.predictor = TensorRTPredictor(path)
        except VFPTError as e:
            raise Unavailable(str(e)) from None
        p = self.predictor
        self.name, self.path, self.seed = name, Path(path), seed
        self.device = f"cuda:{p.device.index}"
        self.providers = []
        self.image_size = tuple(p.input_shape[1:])
        self.tasks = list(p.tasks)
        self.detail = {"artifact": self.path.name, "flavor": p.flavor, "gpu": p.device.name,
                       "max_batch": p.profile_max, **({"fold": p.metadata["fold"]} if "fold" in p.metadata else {})}

    def runner(self, batch: int, e2e: bool, task_ids: np.ndarray | None = None) -> Callable[[], object]:
        p = self.predictor
        if not p.min_batch <= batch <= p.profile_max:
            raise Unavailable(f"batch {batch} is outside the engine's optimization profile "
                              f"({p.min_batch}..{p.profile_max})")
        x = make_input(batch, self.image_size, self.seed)
        if e2e:
            return lambda: p.infer(x, task_ids)
        p.load(x, task_ids)
        return p.execute

    def timer(self, e2e: bool) -> Timer:
        return PerfCounterTimer() if e2e else CudartEventTimer(self.predictor)

    def cuda_peak_mib(self) -> float | None:
        """The engine's activation memory plus the predictor's I/O buffers (weights not counted)."""
        return (self.predictor.activation_bytes + self.predictor.io_bytes) / MiB

    def close(self) -> None:
        self.predictor.close()


def make_input(batch: int, image_size: tuple[int, int], seed: int) -> np.ndarray:
    """A normalized-image-like float32 batch; values do not change the timing of these models. Refused
    before allocating when it would not fit memory (check_input_memory)."""
    check_input_memory(batch, image_size)
    return np.random.default_rng(seed).standard_normal((batch, 3, *image_size), dtype=np.float32)


# -- running -----------------------------------------------------------------------------------------
def measure_backend(backend: Backend, settings: BenchSettings, report: BenchReport,
                    on_row: Callable[[Result], None] | None = None) -> None:
    """The batch sweep of one backend; e2e rows on GPU backends when asked. Every batch's input is checked
    to fit memory before the first is allocated."""
    settings.check_memory(backend.image_size)
    modes = [False] + ([True] if settings.e2e and backend.device != "cpu" else [])
    for batch in settings.batches:
        for stream in streams(backend.tasks, settings.task):  # mixed and single-task rows back to back
            ids = None if stream is None else stream_task_ids(backend.tasks, stream, batch, settings.seed)
            for e2e in modes:
                try:
                    fn = backend.runner(batch, e2e, ids)
                except Unavailable as e:
                    report.skipped.append(Skipped(backend.name, str(e), batch))
                    continue
                row = _measure_row(backend, batch, e2e, fn, settings, stream, ids)
                report.results.append(row)
                if on_row:
                    on_row(row)


def _measure_row(backend: Backend, batch: int, e2e: bool, fn: Callable[[], object], settings: BenchSettings,
                 stream: Stream | None = None, task_ids: np.ndarray | None = None) -> Result:
    backend.cuda_peak_reset()
    scoped = reset_peak_rss()
    seconds = measure(fn, settings.loop, backend.timer(e2e))
    timing = "end-to-end" if e2e else ("host" if backend.device == "cpu" else "device")
    detail = {**backend.detail, "rss_scope": "row" if scoped else "process"}
    if task_ids is not None:  # how many images of each task the measured batch held
        counts = np.bincount(task_ids, minlength=len(backend.tasks))
        detail["task_counts"] = {t: int(c) for t, c in zip(backend.tasks, counts) if c}
    return Result(backend.name, batch, timing, summarize(seconds, batch).to_dict(),
                  round(peak_rss_bytes() / MiB, 1), backend.cuda_peak_mib(), backend.device,
                  list(backend.providers), detail, stream.label if stream else None)


def check_request(checkpoint, onnx: list, engines: list, backends: list[str] | None) -> list[str]:
    """The backends to run (BACKENDS when none named); one-line errors for a request that cannot work."""
    wanted = list(backends) if backends else list(BACKENDS)
    unknown = [b for b in wanted if b not in BACKENDS]
    if unknown:
        raise UsageError(f"unknown backend {unknown[0]!r}; choose from {', '.join(BACKENDS)}")
    if checkpoint is None and not onnx and not engines:
        raise UsageError("nothing to benchmark: pass a run.pt and/or --onnx FILE / --engine FILE")
    for p in [*onnx, *engines]:
        if not Path(p).is_file():
            raise InputError(f"artifact {p} does not exist")
    needs_ckpt = [b for b in wanted if b in ("torch", "torch-folded")]
    if backends and needs_ckpt and checkpoint is None:
        raise UsageError(f"backend {needs_ckpt[0]} runs the PyTorch model: pass the run.pt it comes from")
    if backends and "tensorrt" in wanted and not engines:
        raise UsageError("backend tensorrt needs an engine file: pass --engine FILE")
    return wanted


@dataclass
class _Run:
    """One bench run in progress: what it was asked, and where rows, skips and status go."""

    settings: BenchSettings
    report: BenchReport
    wanted: list[str]
    on_row: Callable[[Result], None] | None
    status: Callable[[str], None]

    def backend(self, name: str, make: Callable[[], Backend]) -> None:
        """Make one backend and measure its batch sweep, or record why it was skipped."""
        try:
            backend = make()
        except Unavailable as e:
            self.skip(name, str(e))
            self.status(f"skipping {name}: {e}")
            return
        runs = [st.label for st in streams(backend.tasks, self.settings.task) if st]
        on = f" ({len(backend.tasks)} tasks; streams: {', '.join(runs)})" if runs else ""
        self.status(f"measuring {name} on {backend.device}{on}")
        try:
            measure_backend(backend, self.settings, self.report, self.on_row)
        finally:
            backend.close()

    def skip(self, name: str, reason: str) -> None:
        self.report.skipped.append(Skipped(name, reason))


def run_bench(*, checkpoint: str | os.PathLike | None = None, onnx: list[str | os.PathLike] = (),
              engines: list[str | os.PathLike] = (), backends: list[str] | None = None,
              settings: BenchSettings | None = None, backbone_weights: str | None = None,
              export_dir: str | os.PathLike | None = None,
              on_row: Callable[[Result], None] | None = None,
              on_status: Callable[[str], None] | None = None) -> BenchReport:
    """Benchmark a run.pt and/or exported artifacts on every requested backend that can run here.

    checkpoint: gives torch and torch-folded, and is exported to ONNX (settings.fold, through the export
      pipeline, verified) for the ort-* backends when no ONNX file is given.
    onnx / engines: artifacts for the ort-* backends / the tensorrt backend. A multi-task one is measured on
      the mixed-task stream, and on settings.task's single-task stream when set (module docstring).
    backends: names from BACKENDS; None: all of them (the unusable ones are reported as skipped).
    """
    settings = (settings or BenchSettings()).check()
    wanted = check_request(checkpoint, onnx, engines, backends)
    check_task_request(checkpoint, [*onnx, *engines], settings.task)
    report = BenchReport(machine_info(), {**settings.to_dict(), "backends": wanted,
                                          "checkpoint": str(checkpoint) if checkpoint else None,
                                          "onnx": [str(p) for p in onnx], "engines": [str(p) for p in engines]})
    bench = _Run(settings, report, wanted, on_row, on_status or (lambda s: None))
    try:
        import torch
    except ImportError:  # the lean install (no [export]): the ort-* and tensorrt backends still run
        torch = None
    old_threads = torch.get_num_threads() if torch else None
    if torch and settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        run = _load_run(checkpoint, backbone_weights, bench.status)
        _torch_backends(bench, run)
        with tempfile.TemporaryDirectory(prefix="vfpt-bench-") as tmp:
            _ort_backends(bench, run, [Path(p) for p in onnx], Path(export_dir or tmp))
        _tensorrt_backends(bench, [Path(p) for p in engines])
    finally:
        if torch:
            torch.set_num_threads(old_threads)
    if not report.results:
        reasons = "; ".join(f"{s.backend}: {s.reason}" for s in report.skipped) or "no backend selected"
        raise RuntimeSetupError(f"no backend could run here ({reasons})")
    return report


def _load_run(checkpoint, backbone_weights: str | None, status: Callable[[str], None]):
    if checkpoint is None:
        return None
    with needs_extras("benchmarking a run.pt"):  # PyTorch and timm: the [export] extra
        from vfpt_deploy.artifacts.checkpoint import load_run

    status(f"loading {checkpoint}")
    return load_run(checkpoint, backbone_weights=backbone_weights)


def _torch_backends(bench: _Run, run) -> None:
    for name in [b for b in bench.wanted if b in ("torch", "torch-folded")]:
        if run is None:
            bench.skip(name, "no run.pt given (PyTorch backends run the checkpoint)")
            continue
        if name == "torch":
            module, detail = run.model, {"fold": "none (live FFT)"}
        else:
            from vfpt_deploy.folding import fold_model

            module = fold_model(run.model, bench.settings.fold)
            detail = {"fold": module.fold_mode}
        s = bench.settings
        bench.backend(name, lambda: TorchBackend(name, module, run.model.img_size, s.device, s.seed, detail))


def _ort_backends(bench: _Run, run, onnx_files: list[Path], export_dir: Path) -> None:
    kinds = [b for b in bench.wanted if b.startswith("ort-")]
    if not kinds:
        return
    if not onnx_files and run is not None and bench.settings.fold != "none":
        onnx_files = [_export(bench, run, export_dir)]
    if not onnx_files:
        why = ("the live FFT (--fold none) cannot be exported to ONNX: pass --onnx FILE or another --fold"
               if run is not None else "no ONNX file or run.pt given")
        for kind in kinds:
            bench.skip(kind, why)
    s = bench.settings
    for kind in kinds:
        for path in onnx_files:
            label = kind if len(onnx_files) == 1 else f"{kind}:{path.stem}"
            bench.backend(label, lambda: OrtBackend(label, kind, path, s.threads, s.seed, {}))


def _export(bench: _Run, run, export_dir: Path) -> Path:
    """The run exported to ONNX by the one export pipeline (fold, export, verify against PyTorch)."""
    from vfpt_deploy.pipeline import ExportSettings, export_run

    fold = bench.settings.fold
    out = export_dir / f"{Path(run.path).stem}.{fold}.onnx"
    bench.status(f"exporting {run.path} to ONNX (fold {fold})")
    outcome = export_run(run, ExportSettings(format="onnx", fold=fold), out=out)
    if not outcome.passed:
        raise VerificationError(f"the ONNX exported from {run.path} (fold {fold}) failed verification against "
                                "PyTorch, so it is not benchmarked; run 'vfpt-deploy export' to see the report")
    return outcome.onnx_path


def _tensorrt_backends(bench: _Run, engines: list[Path]) -> None:
    if "tensorrt" not in bench.wanted:
        return
    if not engines:
        bench.skip("tensorrt", "no engine file given (--engine FILE, built by 'vfpt-deploy export --format trt')")
    for path in engines:
        label = "tensorrt" if len(engines) == 1 else f"tensorrt:{path.stem}"
        bench.backend(label, lambda: TensorRTBackend(label, path, bench.settings.seed))


# -- presentation ------------------------------------------------------------------------------------
def _ms(v: float) -> str:
    return f"{v:.0f}" if v >= 1000 else f"{v:.1f}" if v >= 100 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def results_table(report: BenchReport):
    """A rich Table of every result row (the machine as its caption; print it with width=table_width so
    narrow terminals wrap rather than elide numbers); columns that say nothing here
    (timing when everything ran on the CPU, CUDA peak without a GPU) are left out."""
    from rich import box
    from rich.table import Table

    rows = report.results
    show_timing = any(r.timing != "host" for r in rows)
    show_cuda = any(r.cuda_peak_mib is not None for r in rows)
    show_stream = any(r.stream for r in rows)  # a multi-task artifact: which task stream each row replayed
    t = Table(title="latency per call, ms", caption=machine_line(report.machine, report.settings.get("threads")),
              box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left", caption_justify="left")
    cols = ["backend", "batch"] + (["timing"] if show_timing else []) + (["stream"] if show_stream else []) + \
        ["n", "mean", "std", "p50", "p90", "p95", "p99", "img/s", "RSS MiB"] + (["CUDA MiB"] if show_cuda else [])
    for col in cols:
        t.add_column(col, justify="left" if col in ("backend", "timing", "stream") else "right", no_wrap=True)
    for r in rows:
        s = r.stats
        cells = [r.backend, str(r.batch)] + ([r.timing] if show_timing else []) + \
            ([r.stream or "-"] if show_stream else []) + [str(s["n"])]
        cells += [_ms(s[k]) for k in ("mean_ms", "std_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms")]
        cells += [f"{s['throughput']:.0f}" if s["throughput"] >= 100 else f"{s['throughput']:.1f}", f"{r.peak_rss_mib:.0f}"]
        if show_cuda:
            cells.append("-" if r.cuda_peak_mib is None else f"{r.cuda_peak_mib:.0f}")
        t.add_row(*cells)
    return t


def table_width(report: BenchReport) -> int:
    """Characters the results table needs: every column at its widest cell, plus the gaps."""
    t = results_table(report)
    from rich.console import Console

    return Console(width=1000).measure(t).maximum
