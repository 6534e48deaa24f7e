"""Run a serialized TensorRT (or TensorRT-RTX) engine behind the shared Predictor interface.

An engine is only valid for the TensorRT version and GPU it was built for, and it carries none of the
model's metadata, so every engine travels with a JSON sidecar (`<engine>.json`, written by
vfpt_deploy.exporters.tensorrt). Loading checks, in this order, each with a one-line error: the sidecar,
the TensorRT module, the TensorRT version, a visible GPU, its compute capability, the engine's sha256,
and finally TensorRT's own verdict. Inference follows TensorRT's Python samples: device buffers from
cuda-python, `set_input_shape` + `set_tensor_address` + `execute_async_v3` on a private stream.

Imports numpy and the standard library at module level; TensorRT and cuda-python only when an engine is
opened. Never torch or timm.
"""
from __future__ import annotations

import ctypes
import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vfpt_deploy.errors import VFPTError
from vfpt_deploy.files import file_sha256
from vfpt_deploy.schema import INPUT_NAME, OUTPUT_NAME, SIDECAR_FORMAT, SIDECAR_VERSION, check_metadata, check_sidecar, sidecar_path  # noqa: F401

from .predictor import Predictor

# flavor -> (Python module, what the user installs to get it)
FLAVORS = {
    "trt": ("tensorrt", "the 'tensorrt' extra (pip install 'vfpt-deploy[tensorrt]', from NVIDIA's index) "
                        "or NVIDIA's TensorRT container"),
    "trt-rtx": ("tensorrt_rtx", "the 'trt-rtx' extra (pip install 'vfpt-deploy[trt-rtx]')"),
}
CUDA_PYTHON_HINT = "cuda-python (pip install 'cuda-python>=12', part of the 'tensorrt' and 'trt-rtx' extras)"
# TensorRT-RTX engines built without an explicit target run on these (TensorRT-RTX docs, "CPU-only AOT").
RTX_DEFAULT_TARGETS = ("8.0", "8.6", "8.9", "12.0")


def import_tensorrt(flavor: str):
    """The TensorRT Python module for a flavor, or a one-line error naming what to install."""
    if flavor not in FLAVORS:
        raise VFPTError(f"unknown TensorRT flavor {flavor!r}; use one of {', '.join(FLAVORS)}")
    module, hint = FLAVORS[flavor]
    try:
        trt = importlib.import_module(module)
        trt.Builder, trt.Runtime  # the PyPI shim packages import but have no bindings
    except (ImportError, AttributeError, OSError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VFPTError(f"TensorRT{'-RTX' if flavor == 'trt-rtx' else ''} (Python module '{module}') is not "
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
            raise VFPTError(f"running TensorRT engines needs {CUDA_PYTHON_HINT}, which is not installed") from None
    return cudart


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    compute_capability: str  # "8.9"


def _cuda_check(cudart, result, what: str):
    """cuda-python calls return (error, *values): raise on error, return the value(s)."""
    err, *values = result
    if int(err) != 0:
        name = cudart.cudaGetErrorName(err)[1].decode()
        text = cudart.cudaGetErrorString(err)[1].decode()
        raise VFPTError(f"CUDA error during {what}: {name} ({text})")
    return values[0] if len(values) == 1 else tuple(values)


def cuda_device(index: int = 0) -> CudaDevice:
    """The CUDA GPU TensorRT will run on, or a one-line error saying why there is none."""
    cudart = import_cudart()
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        why = cudart.cudaGetErrorName(err)[1].decode() if int(err) != 0 else "0 devices"
        raise VFPTError(f"no CUDA GPU is visible ({why}); TensorRT engines run on an NVIDIA GPU -- on this "
                        "machine serve the ONNX file with onnxruntime instead")
    if index >= count:
        raise VFPTError(f"GPU {index} requested but only {count} CUDA device(s) are visible")
    prop = _cuda_check(cudart, cudart.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
    return CudaDevice(index, name, f"{prop.major}.{prop.minor}")


def _cc(s: str) -> tuple[int, int]:
    major, minor = str(s).split(".")
    return int(major), int(minor)


def _version(s: str) -> tuple[int, ...]:
    return tuple(int(p) for p in str(s).split(".")[:3] if p.isdigit())


def read_sidecar(engine_path: str | Path) -> dict:
    """The engine's JSON sidecar, checked for shape; one-line errors for every way it can be wrong."""
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise VFPTError(f"engine {engine_path} does not exist; build one with 'vfpt-deploy export --format trt'")
    side = sidecar_path(engine_path)
    if not side.is_file():
        raise VFPTError(f"engine {engine_path} has no sidecar {side.name} (it holds the TensorRT version, GPU, "
                        "classes and preprocessing); rebuild the engine with 'vfpt-deploy export --format trt'")
    try:
        meta = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VFPTError(f"sidecar {side} is not valid JSON ({e}); rebuild the engine") from None
    return check_sidecar(meta, str(side))


def check_compatible(sidecar: dict, trt_version: str, device: CudaDevice | None) -> list[str]:
    """Refuse an engine built for another TensorRT or GPU before TensorRT is asked to load it.

    Returns warnings (e.g. same compute capability, different GPU model); raises VFPTError on a mismatch.
    TensorRT's own rules: a plain engine needs the exact TensorRT version it was built with and a GPU of
    the same compute capability; a version-compatible engine runs on the same major version, same or newer;
    a hardware-compatible (Ampere+) engine runs on any compute capability >= 8.0; a TensorRT-RTX engine
    runs on the compute capabilities it was built for.
    """
    built = sidecar["tensorrt"]
    build = sidecar["build"]
    flavor = built.get("flavor", "trt")
    rebuild = f"rebuild it here with 'vfpt-deploy export --format {flavor}'"
    bv, rv = _version(built["version"]), _version(trt_version)
    if build.get("version_compatible"):
        if bv[:1] != rv[:1] or rv < bv:
            raise VFPTError(f"engine was built (version-compatible) with {built['module']} {built['version']}, "
                            f"which runs on {bv[0]}.x >= {built['version']} only, but this is {trt_version}; {rebuild}")
    elif bv != rv:
        raise VFPTError(f"engine was built with {built['module']} {built['version']} but this is {trt_version}; "
                        f"TensorRT engines run only on the version that built them: {rebuild} "
                        "(or build with --version-compatible)")
    if device is None:
        return []
    here = _cc(device.compute_capability)
    what = f"this GPU is {device.name} (compute capability {device.compute_capability})"
    if flavor == "trt-rtx":
        targets = build.get("compute_capabilities") or list(RTX_DEFAULT_TARGETS)
        if device.compute_capability not in targets:
            raise VFPTError(f"engine was built by TensorRT-RTX for compute capabilities {', '.join(targets)} but "
                            f"{what}; {rebuild} with --compute-capability {device.compute_capability} "
                            "(TensorRT-RTX supports RTX GPUs only: 7.5/8.6/8.9/12.x)")
        return []
    gpu = sidecar.get("gpu") or {}
    if build.get("hardware_compatibility") == "ampere_plus":
        if here < (8, 0):
            raise VFPTError(f"engine was built hardware-compatible for Ampere and newer (>= 8.0) but {what}; {rebuild}")
        return []
    if gpu.get("compute_capability") and gpu["compute_capability"] != device.compute_capability:
        raise VFPTError(f"engine was built on {gpu.get('name')} (compute capability {gpu['compute_capability']}) but "
                        f"{what}; TensorRT engines are specific to the GPU that built them: {rebuild} "
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
    """

    def __init__(self, engine_path: str | Path, device: int = 0) -> None:
        self.engine_path = Path(engine_path)
        self.sidecar = read_sidecar(self.engine_path)
        self.metadata = dict(self.sidecar["metadata"])
        self.preprocess = check_metadata(self.metadata, str(sidecar_path(self.engine_path)))["preprocess"]
        self.flavor = self.sidecar["tensorrt"].get("flavor", "trt")
        trt = self.trt = import_tensorrt(self.flavor)
        check_compatible(self.sidecar, trt.__version__, None)  # version first: cheapest, no GPU needed
        self.device = cuda_device(device)
        self.warnings = check_compatible(self.sidecar, trt.__version__, self.device)
        if file_sha256(self.engine_path) != self.sidecar["engine"]["sha256"]:
            raise VFPTError(f"{self.engine_path} does not match its sidecar's sha256 (overwritten or corrupt); "
                            "rebuild the engine")

        cudart = self.cudart = import_cudart()
        _cuda_check(cudart, cudart.cudaSetDevice(device), "cudaSetDevice")
        self._logger = trt.Logger(trt.Logger.ERROR)
        self._runtime = trt.Runtime(self._logger)
        if self.sidecar["build"].get("version_compatible"):
            self._runtime.engine_host_code_allowed = True  # version-compatible engines embed the lean runtime
        blob = self.engine_path.read_bytes()
        problem = _validity_problem(trt, self._runtime, blob)
        if problem:
            raise VFPTError(f"TensorRT refuses {self.engine_path} on {self.device.name} ({problem}); rebuild the "
                            f"engine here with 'vfpt-deploy export --format {self.flavor}'")
        self.engine = self._runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            raise VFPTError(f"TensorRT could not deserialize {self.engine_path} on {self.device.name}; rebuild the "
                            f"engine here with 'vfpt-deploy export --format {self.flavor}'")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        if sorted(names) != sorted([INPUT_NAME, OUTPUT_NAME]):
            raise VFPTError(f"engine tensors are {names}, expected '{INPUT_NAME}' -> '{OUTPUT_NAME}'")
        lo, _, hi = self.engine.get_tensor_profile_shape(INPUT_NAME, 0)
        # profile_max bounds every enqueue; max_batch (the Predictor's chunk size) may be set lower or higher.
        self.min_batch, self.profile_max = int(lo[0]), int(hi[0])
        self.max_batch = self.profile_max
        self.input_shape = tuple(int(d) for d in hi[1:])
        self.in_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(INPUT_NAME)))
        self.out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(OUTPUT_NAME)))
        self.num_classes = int(self.engine.get_tensor_shape(OUTPUT_NAME)[-1])
        self._stream = _cuda_check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        # Pinned host + device buffers sized for the profile's largest batch, allocated once.
        self._buffers = {}
        for name, shape, dtype in ((INPUT_NAME, (self.profile_max, *self.input_shape), self.in_dtype),
                                   (OUTPUT_NAME, (self.profile_max, self.num_classes), self.out_dtype)):
            nbytes = int(np.prod(shape)) * dtype.itemsize
            host_ptr = _cuda_check(cudart, cudart.cudaMallocHost(nbytes), "cudaMallocHost")
            host = np.ctypeslib.as_array(ctypes.cast(host_ptr, ctypes.POINTER(ctypes.c_uint8)), (nbytes,))
            dev = _cuda_check(cudart, cudart.cudaMalloc(nbytes), "cudaMalloc")
            self._buffers[name] = (host.view(dtype).reshape(shape), int(dev), int(host_ptr))
            self.context.set_tensor_address(name, int(dev))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_shape:
            raise VFPTError(f"engine input is [N, {', '.join(map(str, self.input_shape))}], got {list(batch.shape)}")
        step = self.profile_max
        outs = [self._run(batch[i:i + step]) for i in range(0, len(batch), step)]
        return np.concatenate(outs) if outs else np.zeros((0, self.num_classes), np.float32)

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        cudart, n = self.cudart, len(chunk)
        b = max(n, self.min_batch)  # pad up to the profile's minimum batch; padded rows are dropped below
        host_in, dev_in, _ = self._buffers[INPUT_NAME]
        host_out, dev_out, _ = self._buffers[OUTPUT_NAME]
        host_in[:n] = chunk.astype(self.in_dtype, copy=False)
        host_in[n:b] = 0
        self.context.set_input_shape(INPUT_NAME, (b, *self.input_shape))
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        in_bytes, out_bytes = host_in[:b].nbytes, host_out[:b].nbytes
        _cuda_check(cudart, cudart.cudaMemcpyAsync(dev_in, host_in.ctypes.data, in_bytes, h2d, self._stream), "copy in")
        if not self.context.execute_async_v3(int(self._stream)):
            raise VFPTError(f"TensorRT failed to run {self.engine_path} on a batch of {b}")
        _cuda_check(cudart, cudart.cudaMemcpyAsync(host_out.ctypes.data, dev_out, out_bytes, d2h, self._stream), "copy out")
        _cuda_check(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return host_out[:n].astype(np.float32)

    def close(self) -> None:
        """Free the CUDA buffers and stream (also done when the predictor is garbage-collected)."""
        cudart, buffers = getattr(self, "cudart", None), getattr(self, "_buffers", {})
        for _, dev, host_ptr in buffers.values():
            cudart.cudaFree(dev)
            cudart.cudaFreeHost(host_ptr)
        self._buffers = {}
        if getattr(self, "_stream", None) is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
