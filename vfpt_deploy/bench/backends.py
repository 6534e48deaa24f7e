"""The bench backends: each one way of running the model, which `loop.py` times over a batch sweep (or
records as skipped, with the reason).

  torch          PyTorch eager, the unfolded model (live FFT): the reference
  torch-folded   PyTorch eager, prompts folded to constants (fold_model)
  ort-cpu        onnxruntime, CPU execution provider
  ort-cuda       onnxruntime, CUDA EP -- only when a session really runs on it (session.get_providers())
  ort-cuda-graph the same with onnxruntime's CUDA graphs (enable_cuda_graph): each batch size is captured
                 once on IO-bound device buffers and replayed; Unavailable when onnxruntime refuses the graph
  ort-trt        onnxruntime, TensorRT EP -- likewise
  tensorrt       a TensorRT engine file (needs the tensorrt module and a CUDA GPU)

Timing: perf_counter around each call on CPU; on GPU CUDA events on the stream the work runs on, with
inputs and outputs already on the device (onnxruntime IO binding) so copies are not timed. `e2e` adds
end-to-end rows on GPU backends that time host->device copy, inference and device->host copy with
perf_counter. The ort-* and tensorrt backends run the runtime's own predictors (OnnxPredictor,
TensorRTPredictor) through their public API.

The GPU paths (CUDA events, IO binding, TensorRT engines) follow the documented torch / onnxruntime /
TensorRT APIs; they run only where a GPU is present.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from vfpt_deploy.artifacts.schema import INPUT_NAME, OUTPUT_NAME, TASK_INPUT, output_classes
from vfpt_deploy.bench.settings import DTYPES, MiB, check_input_memory
from vfpt_deploy.errors import RuntimeSetupError, Unavailable, UsageError, VFPTError
from vfpt_deploy.extras import import_onnxruntime
from vfpt_deploy.runtime.timing import PerfCounterTimer, Timer

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


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise UsageError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


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
    """A torch module (eager), in inference mode, on CPU or one CUDA device, in float32 (default), float16
    or bfloat16 (`dtype`: DTYPES). The caller's module is left where it is, in its own dtype: the backend
    runs a copy whenever the device or dtype differ (a run.pt's model is exported and verified afterwards).
    One batch-1 call is made up front, so a dtype the module cannot run in (cuFFT in half precision, say)
    is Unavailable here rather than a crash mid-sweep."""

    def __init__(self, name: str, module, image_size: tuple[int, int], device: str | None, seed: int, detail: dict,
                 dtype: str = "fp32"):
        import copy

        import torch

        self.torch = torch
        self.name = name
        self.dev = _torch_device(device)
        self.device = str(self.dev)
        self.dtype = torch_dtype(dtype)
        first = next(iter(module.parameters()), None)
        moves = first is not None and (first.device != self.dev or first.dtype != self.dtype)
        self.module = (copy.deepcopy(module) if moves else module).eval().to(self.dev, self.dtype)
        self.image_size = tuple(image_size)
        self.seed = seed
        self.detail = {**detail, **({"dtype": dtype} if dtype != "fp32" else {})}
        self.providers = []
        try:
            with torch.inference_mode():
                self.module(torch.zeros(1, 3, *self.image_size, device=self.dev, dtype=self.dtype))
        except RuntimeError as e:  # e.g. cuFFT refuses half precision for the live FFT's sizes
            self.close()
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise Unavailable(f"{name} cannot run in {dtype} on {self.device}: {first_line}") from None

    def runner(self, batch: int, e2e: bool, task_ids: np.ndarray | None = None) -> Callable[[], object]:
        torch, module = self.torch, self.module
        host = torch.from_numpy(make_input(batch, self.image_size, self.seed)).to(self.dtype)
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


ORT_PROVIDERS = {"ort-cpu": ["CPUExecutionProvider"],
                 "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                 "ort-cuda-graph": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                 "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}


class OrtBackend(Backend):
    """An ONNX file in onnxruntime through runtime.onnx_runner.OnnxPredictor, with one execution provider;
    Unavailable when the session fell back to another provider (it would time the wrong thing).

    ort-cuda-graph turns on onnxruntime's CUDA graphs. Documented constraints (onnxruntime's CUDA EP page):
    every node must run on the CUDA EP (else the session is refused: Unavailable, with onnxruntime's words),
    inputs and outputs are bound once with IO binding and keep their device addresses, and a graph holds
    one input shape. A dynamic batch leaves shape arithmetic (Shape/Gather/Concat) on the CPU, which alone
    makes onnxruntime refuse the graph, so each runner opens its own session with the batch dimension fixed
    (a free-dimension override: onnxruntime folds the shape arithmetic away), captures the graph there
    with a few regular runs, and every timed call replays it. Capture cannot run on the legacy default
    stream, so this backend runs on a stream of its own. The session made in __init__ (no graphs, batch
    free) only checks that CUDA really runs and reads the metadata."""

    def __init__(self, name: str, kind: str, path: Path, threads: int | None, seed: int, detail: dict):
        from vfpt_deploy.runtime.onnx_runner import OnnxPredictor

        self.ort = ort = import_onnxruntime(f"the {kind} benchmark")
        self.name, self.kind, self.path, self.seed = name, kind, Path(path), seed
        asked = ORT_PROVIDERS[kind]
        want = asked[0]
        if want not in ort.get_available_providers():
            raise Unavailable(f"this onnxruntime build ({ort.__version__}) has no {want} (for CUDA, swap onnxruntime "
                              "for onnxruntime-gpu: README, 'Install')")
        self.stream, self.device_id, self.graphs = None, 0, kind == "ort-cuda-graph"
        self.threads, self._graph_predictors = threads, []
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
        """Run onnxruntime's CUDA work on torch's current stream, so CUDA events recorded there time it; with
        CUDA graphs, on a new torch stream (capture cannot use the legacy default stream)."""
        try:
            import torch
        except ImportError:
            return {"device_id": 0}
        if not torch.cuda.is_available():
            return {"device_id": 0}
        self.device_id = torch.cuda.current_device()
        if self.stream is None:  # one stream for every session of this backend
            self.stream = torch.cuda.Stream(self.device_id) if self.graphs else torch.cuda.current_stream()
        return {"device_id": self.device_id, "user_compute_stream": str(self.stream.cuda_stream)}

    def _graph_predictor(self, batch: int):
        """A session for this batch size alone, CUDA graphs on (see the class docstring)."""
        from vfpt_deploy.runtime.onnx_runner import OnnxPredictor

        dim = self.predictor.session.get_inputs()[0].shape[0]
        fixed = {dim: batch} if isinstance(dim, str) and dim else {}
        options = {"CUDAExecutionProvider": {**self._cuda_options(), "enable_cuda_graph": "1"}}
        try:
            p = OnnxPredictor(self.path, ORT_PROVIDERS[self.kind], threads=self.threads, allow_fallback=True,
                              provider_options=options, fixed_dims=fixed)
        except VFPTError as e:
            raise Unavailable(f"onnxruntime would not make a CUDA-graph session of {self.path.name} at batch "
                              f"{batch}: {e}") from None
        self._graph_predictors.append(p)
        if p.providers[:1] != ["CUDAExecutionProvider"]:
            raise Unavailable(f"the CUDA-graph session fell back to {', '.join(p.providers)}")
        return p

    def runner(self, batch: int, e2e: bool, task_ids: np.ndarray | None = None) -> Callable[[], object]:
        if self.graphs and e2e:
            raise Unavailable("CUDA graphs replay on device buffers bound once: no end-to-end rows (see ort-cuda)")
        x = make_input(batch, self.image_size, self.seed)
        infer = self.predictor.infer
        if self.kind == "ort-cpu" or e2e:
            return lambda: infer(x, task_ids)  # numpy in, numpy out: copies included on GPU EPs
        # IO binding: input and output live on the GPU, so a timed run is inference only.
        predictor = self._graph_predictor(len(x)) if self.graphs else self.predictor
        ort, session = self.ort, predictor.session
        binding = session.io_binding()
        binding.bind_ortvalue_input(INPUT_NAME, ort.OrtValue.ortvalue_from_numpy(x, "cuda", self.device_id))
        ids = predictor.check_task_ids(x, task_ids)
        if ids is not None:
            binding.bind_ortvalue_input(TASK_INPUT, ort.OrtValue.ortvalue_from_numpy(ids, "cuda", self.device_id))
        y = ort.OrtValue.ortvalue_from_shape_and_type([batch, self.num_classes], np.float32, "cuda", self.device_id)
        binding.bind_ortvalue_output(OUTPUT_NAME, y)
        binding.synchronize_inputs()
        if not self.graphs:
            return lambda: session.run_with_iobinding(binding)
        try:  # regular runs (allocations) until onnxruntime captures the graph; later calls replay it
            for _ in range(3):
                session.run_with_iobinding(binding)
        except Exception as e:  # onnxruntime's own Fail / RuntimeException types
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise Unavailable(f"onnxruntime could not capture a CUDA graph at batch {batch}: {first}") from None
        return lambda: session.run_with_iobinding(binding)

    def timer(self, e2e: bool) -> Timer:
        if self.kind != "ort-cpu" and not e2e and self.stream is not None:
            return CudaEventTimer(self.stream)
        return PerfCounterTimer()

    def close(self) -> None:
        self.predictor.close()
        for p in self._graph_predictors:
            p.close()
        self._graph_predictors = []


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
