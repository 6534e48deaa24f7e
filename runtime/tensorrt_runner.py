"""Run a serialized TensorRT (or TensorRT-RTX) engine behind the shared Predictor interface.

An engine is only valid for the TensorRT version and GPU it was built for, and it carries none of the
model's metadata, so every engine travels with a JSON sidecar (`<engine>.json`, written by
vfpt_deploy.exporters.tensorrt). Loading checks, in this order, each with a one-line error: the sidecar,
the TensorRT module, the TensorRT version, a visible GPU, its compute capability, the engine's sha256,
and finally TensorRT's own verdict. Inference follows TensorRT's Python samples: device buffers from
cuda-python, `set_input_shape` + `set_tensor_address` + `execute_async_v3` on a private stream.

TensorRTPredictor's public API also serves benchmarks: `load(batch)` puts a batch on the device, `execute()`
enqueues the engine alone on `stream`; `io_bytes` / `activation_bytes` give its device memory.

A multi-task engine (sidecar metadata `tasks`, profile.task) has a second input `task`: the task index of
each image, bound as the engine's own type (int64 with TensorRT >= 10) over the same batches as `images`;
infer(batch, task_ids) and load(batch, task_ids) take the indices (Predictor.task_ids makes them from names).

Imports numpy and the standard library at module level; TensorRT and cuda-python only when an engine is
opened. Never torch or timm.
"""
from __future__ import annotations

import ctypes
import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vfpt_deploy.errors import ArtifactError, RuntimeSetupError, UsageError, VFPTError
from vfpt_deploy.extras import extra_install
from vfpt_deploy.artifacts.files import file_sha256  # noqa: F401 (re-exported)
from vfpt_deploy.artifacts.schema import (INPUT_NAME, OUTPUT_NAME, SIDECAR_FORMAT, SIDECAR_VERSION, TASK_INPUT,  # noqa: F401
                                check_metadata, check_output_width, check_sidecar, read_sidecar, sidecar_path)

from .predictor import Predictor

# flavor -> (Python module, what the user installs to get it)
FLAVORS = {
    "trt": ("tensorrt", f"the 'tensorrt' extra ({extra_install('tensorrt')}; TensorRT from NVIDIA's index) "
                        "or NVIDIA's TensorRT container"),
    "trt-rtx": ("tensorrt_rtx", f"the 'trt-rtx' extra ({extra_install('trt-rtx')})"),
}
CUDA_PYTHON_HINT = "cuda-python (pip install 'cuda-python>=12', part of the 'tensorrt' and 'trt-rtx' extras)"
# TensorRT-RTX engines built without an explicit target run on these (TensorRT-RTX docs, "CPU-only AOT").
RTX_DEFAULT_TARGETS = ("8.0", "8.6", "8.9", "12.0")


def import_tensorrt(flavor: str):
    """The TensorRT Python module for a flavor, or a one-line error naming what to install."""
    if flavor not in FLAVORS:
        raise UsageError(f"unknown TensorRT flavor {flavor!r}; use one of {', '.join(FLAVORS)}")
    module, hint = FLAVORS[flavor]
    try:
        trt = importlib.import_module(module)
        trt.Builder, trt.Runtime  # the PyPI shim packages import but have no bindings
    except (ImportError, AttributeError, OSError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeSetupError(f"TensorRT{'-RTX' if flavor == 'trt-rtx' else ''} (Python module '{module}') is not "
                        f"usable here ({why[:120]}); install {hint}") from None
    return trt


def import_cudart():
    """cuda-python's runtime API (module path moved to cuda.bindings in cuda-python 12.6+)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise RuntimeSetupError(f"running TensorRT engines needs {CUDA_PYTHON_HINT}, which is not "
                                    "installed") from None
    return cudart


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    compute_capability: str  # "8.9"


def cuda_check(cudart, result, what: str):
    """cuda-python calls return (error, *values): raise on error, return the value(s)."""
    err, *values = result
    if int(err) != 0:
        name = cudart.cudaGetErrorName(err)[1].decode()
        text = cudart.cudaGetErrorString(err)[1].decode()
        raise RuntimeSetupError(f"CUDA error during {what}: {name} ({text})")
    return values[0] if len(values) == 1 else tuple(values)


def cuda_device(index: int = 0) -> CudaDevice:
    """The CUDA GPU TensorRT will run on, or a one-line error saying why there is none."""
    cudart = import_cudart()
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        why = cudart.cudaGetErrorName(err)[1].decode() if int(err) != 0 else "0 devices"
        raise RuntimeSetupError(f"no CUDA GPU is visible ({why}); TensorRT engines run on an NVIDIA GPU -- on this "
                        "machine serve the ONNX file with onnxruntime instead")
    if index >= count:
        raise UsageError(f"GPU {index} requested but only {count} CUDA device(s) are visible; pick 0..{count - 1}")
    prop = cuda_check(cudart, cudart.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
    return CudaDevice(index, name, f"{prop.major}.{prop.minor}")


def _cc(s: str) -> tuple[int, int]:
    major, minor = str(s).split(".")
    return int(major), int(minor)


def _version(s: str) -> tuple[int, ...]:
    return tuple(int(p) for p in str(s).split(".")[:3] if p.isdigit())



def check_compatible(sidecar: dict, trt_version: str, device: CudaDevice | None) -> list[str]:
    """Refuse an engine built for another TensorRT or GPU before TensorRT is asked to load it.

    Returns warnings (e.g. same compute capability, different GPU model); raises ArtifactError on a mismatch.
    TensorRT's own rules: a plain engine needs the exact TensorRT version it was built with and a GPU of
    the same compute capability; a version-compatible engine runs on the same major version, same or newer;
    a hardware-compatible (Ampere+) engine runs on any compute capability >= 8.0; a TensorRT-RTX engine
    runs on the compute capabilities it was built for.
    """
    rebuild = f"rebuild it here with 'vfpt-deploy export --format {sidecar['tensorrt'].get('flavor', 'trt')}'"
    _check_version(sidecar, trt_version, rebuild)
    return [] if device is None else _check_gpu(sidecar, device, rebuild)


def _check_version(sidecar: dict, trt_version: str, rebuild: str) -> None:
    built = sidecar["tensorrt"]
    bv, rv = _version(built["version"]), _version(trt_version)
    if sidecar["build"].get("version_compatible"):
        if bv[:1] != rv[:1] or rv < bv:
            raise ArtifactError(f"engine was built (version-compatible) with {built['module']} {built['version']}, "
                                f"which runs on {bv[0]}.x >= {built['version']} only, but this is {trt_version}; "
                                f"{rebuild}")
    elif bv != rv:
        raise ArtifactError(f"engine was built with {built['module']} {built['version']} but this is {trt_version}; "
                            f"TensorRT engines run only on the version that built them: {rebuild} "
                            "(or build with --version-compatible)")


def _check_gpu(sidecar: dict, device: CudaDevice, rebuild: str) -> list[str]:
    build, gpu = sidecar["build"], sidecar.get("gpu") or {}
    what = f"this GPU is {device.name} (compute capability {device.compute_capability})"
    if sidecar["tensorrt"].get("flavor", "trt") == "trt-rtx":
        targets = build.get("compute_capabilities") or list(RTX_DEFAULT_TARGETS)
        if device.compute_capability not in targets:
            raise ArtifactError(f"engine was built by TensorRT-RTX for compute capabilities {', '.join(targets)} but "
                                f"{what}; {rebuild} with --compute-capability {device.compute_capability} "
                                "(TensorRT-RTX supports RTX GPUs only: 7.5/8.6/8.9/12.x)")
        return []
    if build.get("hardware_compatibility") == "ampere_plus":
        if _cc(device.compute_capability) < (8, 0):
            raise ArtifactError(f"engine was built hardware-compatible for Ampere and newer (>= 8.0) but {what}; "
                                f"{rebuild}")
        return []
    if gpu.get("compute_capability") and gpu["compute_capability"] != device.compute_capability:
        raise ArtifactError(f"engine was built on {gpu.get('name')} (compute capability {gpu['compute_capability']}) "
                            f"but {what}; TensorRT engines are specific to the GPU that built them: {rebuild} "
                            "(or build with --hardware-compatible)")
    if gpu.get("name") and gpu["name"] != device.name:
        return [f"engine was built on {gpu['name']} and runs on {device.name} (same compute capability): it works "
                "but may be slower than an engine built on this GPU"]
    return []


def _validity_problem(trt, runtime, blob: bytes) -> str | None:
    """TensorRT's own pre-load verdict (TensorRT-RTX and newer TensorRT), as text, or None if valid."""
    if not hasattr(runtime, "get_engine_validity"):
        return None
    try:
        validity, diagnostics = runtime.get_engine_validity(blob)
    except Exception:  # older bindings differ in signature; deserialization below still reports
        return None
    if validity != trt.EngineValidity.INVALID:
        return None
    reasons = [d.name for d in trt.EngineInvalidityDiagnostics.__members__.values() if int(diagnostics) & int(d)]
    return ", ".join(reasons) or "invalid"


class TensorRTPredictor(Predictor):
    """Logits from a TensorRT / TensorRT-RTX engine on a CUDA GPU, with the artifact's own preprocessing.

    `TensorRTPredictor("model.engine")` reads `model.engine.json`, checks the engine fits this TensorRT and
    GPU, deserializes it and allocates device buffers for the profile's largest batch.

    Besides infer(), a benchmark can time the engine alone: `load(batch)` copies a batch into the device
    input buffer, then each `execute()` enqueues the engine on `stream` (no copies, no synchronization);
    `io_bytes` and `activation_bytes` are the device memory of the I/O buffers and of the engine's
    activations. close() frees the CUDA memory; it is safe to call twice.
    """

    def __init__(self, engine_path: str | Path, device: int = 0) -> None:
        self.engine_path = Path(engine_path)
        self.cudart, self.context, self.engine = None, None, None
        self._stream, self._buffers, self._loaded = None, {}, None
        self._read_sidecar()
        self._check_target(device)
        try:
            self._deserialize(device)
            self._read_io()
            self._allocate()
        except BaseException:
            self.close()
            raise

    # -- opening, step by step -----------------------------------------------------------------------
    def _read_sidecar(self) -> None:
        """Sidecar and metadata (checked), and the TensorRT module the engine was built with."""
        self.sidecar = read_sidecar(self.engine_path)
        self.metadata = dict(self.sidecar["metadata"])
        self.preprocess = check_metadata(self.metadata, str(sidecar_path(self.engine_path)))["preprocess"]
        self.flavor = self.sidecar["tensorrt"].get("flavor", "trt")
        self.trt = import_tensorrt(self.flavor)

    def _check_target(self, device: int) -> None:
        """TensorRT version (cheapest, no GPU needed), then the GPU, then the engine file's sha256."""
        check_compatible(self.sidecar, self.trt.__version__, None)
        self.device = cuda_device(device)
        self.warnings = check_compatible(self.sidecar, self.trt.__version__, self.device)
        if file_sha256(self.engine_path) != self.sidecar["engine"]["sha256"]:
            raise ArtifactError(f"{self.engine_path} does not match its sidecar's sha256 (overwritten or corrupt); "
                                "rebuild the engine")

    def _deserialize(self, device: int) -> None:
        """TensorRT's own verdict on the engine here, then the engine and an execution context."""
        trt, rebuild = self.trt, f"rebuild the engine here with 'vfpt-deploy export --format {self.flavor}'"
        cudart = self.cudart = import_cudart()
        cuda_check(cudart, cudart.cudaSetDevice(device), "cudaSetDevice")
        self._logger = trt.Logger(trt.Logger.ERROR)
        self._runtime = trt.Runtime(self._logger)
        if self.sidecar["build"].get("version_compatible"):
            self._runtime.engine_host_code_allowed = True  # version-compatible engines embed the lean runtime
        blob = self.engine_path.read_bytes()
        problem = _validity_problem(trt, self._runtime, blob)
        if problem:
            raise ArtifactError(f"TensorRT refuses {self.engine_path} on {self.device.name} ({problem}); {rebuild}")
        self.engine = self._runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            raise ArtifactError(f"TensorRT could not deserialize {self.engine_path} on {self.device.name}; {rebuild}")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeSetupError(f"TensorRT could not create an execution context for {self.engine_path} "
                                    f"on {self.device.name} (out of GPU memory?); free GPU memory and retry")

    def _read_io(self) -> None:
        """Tensor names, the profile's batch range, input shape, dtypes and the number of classes."""
        engine, trt = self.engine, self.trt
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [INPUT_NAME, TASK_INPUT] if self.tasks else [INPUT_NAME]
        if sorted(names) != sorted([*inputs, OUTPUT_NAME]):
            raise ArtifactError(f"engine tensors are {names}, its sidecar says {inputs} -> '{OUTPUT_NAME}'; "
                                "rebuild the engine with 'vfpt-deploy export'")
        lo, _, hi = engine.get_tensor_profile_shape(INPUT_NAME, 0)
        # profile_max bounds every enqueue; max_batch (the Predictor's chunk size) may be set lower or higher.
        self.min_batch, self.profile_max = int(lo[0]), int(hi[0])
        self.max_batch = self.profile_max
        self.input_shape = tuple(int(d) for d in hi[1:])
        self.in_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(INPUT_NAME)))
        self.out_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(OUTPUT_NAME)))
        self.num_classes = int(engine.get_tensor_shape(OUTPUT_NAME)[-1])
        check_output_width(self.num_classes, self.metadata, str(self.engine_path))
        self.task_dtype = self._read_task_input() if self.tasks else None

    def _read_task_input(self) -> np.dtype:
        """The `task` input's dtype; its profile must span the images' batches (every enqueue sets both)."""
        engine = self.engine
        dtype = np.dtype(self.trt.nptype(engine.get_tensor_dtype(TASK_INPUT)))
        shapes = [tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(TASK_INPUT, 0)]
        batches = [(int(s[0]),) for s in engine.get_tensor_profile_shape(INPUT_NAME, 0)]
        if dtype.kind != "i" or shapes != batches:
            raise ArtifactError(f"{self.engine_path}: input '{TASK_INPUT}' is {dtype.name} with profile {shapes}, "
                                f"not int [batch] over the images' batches {batches}; rebuild the engine with "
                                "'vfpt-deploy export'")
        return dtype

    def _allocate(self) -> None:
        """A private stream; pinned host + device buffers for the profile's largest batch, allocated once."""
        cudart = self.cudart
        self._stream = cuda_check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        tensors = [(INPUT_NAME, (self.profile_max, *self.input_shape), self.in_dtype),
                   (OUTPUT_NAME, (self.profile_max, self.num_classes), self.out_dtype)]
        if self.task_dtype is not None:
            tensors.append((TASK_INPUT, (self.profile_max,), self.task_dtype))
        for name, shape, dtype in tensors:
            nbytes = int(np.prod(shape)) * dtype.itemsize
            host_ptr = cuda_check(cudart, cudart.cudaMallocHost(nbytes), "cudaMallocHost")
            try:
                dev = int(cuda_check(cudart, cudart.cudaMalloc(nbytes), "cudaMalloc"))
            except VFPTError:
                cudart.cudaFreeHost(host_ptr)
                raise
            host = np.ctypeslib.as_array(ctypes.cast(int(host_ptr), ctypes.POINTER(ctypes.c_uint8)), (nbytes,))
            self._buffers[name] = (host.view(dtype).reshape(shape), dev, int(host_ptr))
            self.context.set_tensor_address(name, dev)

    # -- the public API ------------------------------------------------------------------------------
    @property
    def stream(self):
        """The CUDA stream (cuda-python cudaStream_t) every copy and enqueue of this predictor runs on."""
        self._check_open()
        return self._stream

    @property
    def io_bytes(self) -> int:
        """Device memory of the input and output buffers (sized for the profile's largest batch)."""
        return sum(host.nbytes for host, _, _ in self._buffers.values())

    @property
    def activation_bytes(self) -> int:
        """Device memory TensorRT reserves for the engine's activations (weights not counted)."""
        engine = self.engine
        if engine is None:
            return 0
        return int(getattr(engine, "device_memory_size_v2", None) or getattr(engine, "device_memory_size", 0))

    def load(self, batch: np.ndarray, task_ids: np.ndarray | None = None) -> int:
        """Copy a batch (at most the profile's largest) into the device input buffer, zero-padded up to the
        profile's smallest, and set the input shape; a multi-task engine also takes each image's task index
        (padding rows get task 0). Returns the batch size the engine will run."""
        self._check_open()
        batch = self._check_batch(batch)
        ids = self.check_task_ids(batch, task_ids)
        n = len(batch)
        if not 1 <= n <= self.profile_max:
            raise UsageError(f"load() takes 1..{self.profile_max} images (the engine's profile), got {n}; "
                             "use infer() for larger batches")
        cudart, b = self.cudart, max(n, self.min_batch)
        cuda_check(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")  # host buffer free
        self._copy_in(INPUT_NAME, batch, (b, *self.input_shape))
        if ids is not None:
            self._copy_in(TASK_INPUT, ids, (b,))
        self._loaded = (n, b)
        return b

    def execute(self) -> None:
        """Enqueue the engine on `stream` for the loaded batch: no copies, no synchronization."""
        self._check_open()
        if self._loaded is None:
            raise UsageError("execute() needs a batch on the device: call load(batch) first")
        if not self.context.execute_async_v3(int(self._stream)):
            raise RuntimeSetupError(f"TensorRT failed to run {self.engine_path} on a batch of {self._loaded[1]}")

    def infer(self, batch: np.ndarray, task_ids: np.ndarray | None = None) -> np.ndarray:
        batch = self._check_batch(batch)
        ids = self.check_task_ids(batch, task_ids)
        step = self.profile_max
        outs = [self._run(batch[i:i + step], None if ids is None else ids[i:i + step])
                for i in range(0, len(batch), step)]
        return np.concatenate(outs) if outs else np.zeros((0, self.num_classes), np.float32)

    def close(self) -> None:
        """Free the CUDA buffers and stream, and drop the engine (also done when garbage-collected).
        Safe to call twice."""
        state = self.__dict__
        cudart, buffers, stream = state.get("cudart"), state.get("_buffers") or {}, state.get("_stream")
        self._buffers, self._stream, self._loaded = {}, None, None
        self.context = self.engine = None  # context before engine, as TensorRT wants
        if cudart is None:
            return
        if stream is not None:
            cudart.cudaStreamSynchronize(stream)  # nothing in flight may use the buffers freed below
        for _, dev, host_ptr in buffers.values():
            cudart.cudaFree(dev)
            cudart.cudaFreeHost(host_ptr)
        if stream is not None:
            cudart.cudaStreamDestroy(stream)

    # -- internals -----------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.__dict__.get("_stream") is None:
            raise UsageError(f"the predictor for {self.engine_path} is closed; open a new TensorRTPredictor")

    def _check_batch(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_shape:
            raise UsageError(f"engine input is [N, {', '.join(map(str, self.input_shape))}], got {list(batch.shape)}")
        return batch

    def _copy_in(self, name: str, values: np.ndarray, shape: tuple) -> None:
        """values into `name`'s host buffer (zero rows up to shape[0]), the context's input shape, then the
        copy to the device on the stream (the caller synchronized, so the host buffer is free)."""
        host, dev, _ = self._buffers[name]
        n, b = len(values), shape[0]
        host[:n] = values.astype(host.dtype, copy=False)
        host[n:b] = 0
        if self.context.set_input_shape(name, shape) is False:
            raise UsageError(f"TensorRT refuses input shape {list(shape)} for '{name}' of {self.engine_path}")
        h2d = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        copy = self.cudart.cudaMemcpyAsync(dev, host.ctypes.data, host[:b].nbytes, h2d, self._stream)
        cuda_check(self.cudart, copy, f"copy in ({name})")

    def _run(self, chunk: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
        """Load, execute, copy the logits back and synchronize; padded rows are dropped."""
        n = len(chunk)
        b = self.load(chunk, ids)
        self.execute()
        cudart = self.cudart
        host_out, dev_out, _ = self._buffers[OUTPUT_NAME]
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        copy = cudart.cudaMemcpyAsync(host_out.ctypes.data, dev_out, host_out[:b].nbytes, d2h, self._stream)
        cuda_check(cudart, copy, "copy out")
        cuda_check(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return host_out[:n].astype(np.float32)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
