"""onnxruntime backend: providers chosen by what really works here, metadata from the model itself."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vfpt_deploy.errors import ArtifactError, RuntimeSetupError
from vfpt_deploy.schema import INPUT_NAME, OUTPUT_NAME, check_metadata, check_output_width, decode_metadata, is_engine

from .predictor import Predictor

_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
            "trt": "TensorrtExecutionProvider", "coreml": "CoreMLExecutionProvider", "dml": "DmlExecutionProvider"}
_OPT_LEVELS = ("disable", "basic", "extended", "all")


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
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in outputs] != [OUTPUT_NAME]:
            raise ArtifactError(f"{path} has inputs {[i.name for i in inputs]} and outputs {[o.name for o in outputs]}; "
                                f"vfpt-deploy models take '{INPUT_NAME}' and give '{OUTPUT_NAME}'")
        checked = check_metadata(self.metadata, str(path), inputs[0].shape)
        check_output_width(outputs[0].shape[-1], checked["classes"], str(path))
        self.preprocess = checked["preprocess"]

    @property
    def providers(self) -> list[str]:
        """The providers the session really uses (not the ones asked for)."""
        return self.session.get_providers()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if self.session is None:
            raise RuntimeSetupError(f"the predictor for {self.path} is closed")
        return self.session.run(None, {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def close(self) -> None:
        self.session = None


def open_predictor(path: str | os.PathLike, providers: list[str] | None = None, **kwargs) -> Predictor:
    """The right backend for an artifact: .onnx -> onnxruntime, .engine/.plan -> TensorRT."""
    if is_engine(path):
        from .tensorrt_runner import TensorRTPredictor

        return TensorRTPredictor(path, **kwargs)
    return OnnxPredictor(path, providers, **kwargs)
