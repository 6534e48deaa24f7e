"""onnxruntime backend: providers chosen by what really works here, metadata from the model itself."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .predictor import INPUT_NAME, Predictor, decode_metadata

_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
            "trt": "TensorrtExecutionProvider", "coreml": "CoreMLExecutionProvider", "dml": "DmlExecutionProvider"}
_OPT_LEVELS = ("disable", "basic", "extended", "all")


class RuntimeSetupError(RuntimeError):
    """The artifact or the runtime cannot be used as asked (message names the fix)."""


def gpu_present() -> bool:
    """An NVIDIA device node (desktop/server or Jetson). onnxruntime-gpu lists its CUDA/TensorRT providers
    as available even without one, then logs a load error and falls back to the CPU."""
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/nvhost-ctrl-gpu"))


def default_providers() -> list[str]:
    """TensorRT EP > CUDA > CPU, each only where it can really run."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider"] if gpu_present() else []
    return [p for p in wanted if p in available] + ["CPUExecutionProvider"]


def resolve_providers(names: list[str] | None) -> list[str]:
    import onnxruntime as ort

    if not names:
        return default_providers()
    out = []
    available = ort.get_available_providers()
    for n in names:
        full = _ALIASES.get(n.lower(), n)
        if full not in available:
            raise RuntimeSetupError(f"execution provider {n!r} is not available in this onnxruntime "
                                    f"(available: {', '.join(available)})")
        out.append(full)
    return out


def make_session(path: str | os.PathLike, providers: list[str] | None = None, *, threads: int | None = None,
                 optimization: str = "all", optimized_model_path: str | None = None):
    """An InferenceSession. threads: intra-op threads (None = onnxruntime's default, one per core)."""
    import onnxruntime as ort

    if optimization not in _OPT_LEVELS:
        raise RuntimeSetupError(f"optimization must be one of {', '.join(_OPT_LEVELS)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if threads:
        so.intra_op_num_threads = threads
    if optimized_model_path:
        so.optimized_model_filepath = str(optimized_model_path)
    so.log_severity_level = 3
    path = Path(path)
    if not path.is_file():
        raise RuntimeSetupError(f"model {path} does not exist; export one with 'vfpt-deploy export'")
    try:
        return ort.InferenceSession(str(path), so, providers=resolve_providers(providers))
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf types
        raise RuntimeSetupError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0][:200]}") from None


class OnnxPredictor(Predictor):
    """Serve an exported VFPT ONNX model with onnxruntime."""

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None, *, threads: int | None = None,
                 optimization: str = "all") -> None:
        self.path = Path(path)
        self.session = make_session(path, providers, threads=threads, optimization=optimization)
        self.metadata = decode_metadata(self.session.get_modelmeta().custom_metadata_map)
        if "preprocess" not in self.metadata:
            raise RuntimeSetupError(f"{path} has no vfpt-deploy metadata (vfpt.preprocess); export it with 'vfpt-deploy export'")

    @property
    def providers(self) -> list[str]:
        """The providers the session really uses (not the ones asked for)."""
        return self.session.get_providers()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def open_predictor(path: str | os.PathLike, providers: list[str] | None = None, **kwargs) -> Predictor:
    """The right backend for an artifact: .onnx -> onnxruntime, .engine/.plan -> TensorRT."""
    suffix = Path(path).suffix.lower()
    if suffix in (".engine", ".plan", ".trt"):
        from .tensorrt_runner import TensorRTPredictor

        return TensorRTPredictor(path, **kwargs)
    return OnnxPredictor(path, providers, **kwargs)
