"""The MLServer runtime for exported VFPT artifacts: `vfpt_deploy.runtime.serving.VFPTModel`.

One model per artifact (ONNX through onnxruntime, TensorRT engines through runtime/tensorrt_runner.py),
named in its model-settings.json. What requests and responses look like is runtime/serve_io.py; how
requests share inference calls is runtime/batcher.py. MLServer (and KServe, which runs MLServer) loads
this class from `implementation` in model-settings.json:

    {"name": "demo", "implementation": "vfpt_deploy.runtime.serving.VFPTModel",
     "max_batch_size": 32, "max_batch_time": 0.005,
     "parameters": {"uri": "./model.onnx", "extra": {"threads": 2, "providers": ["cpu"]}}}

`max_batch_size` / `max_batch_time` keep MLServer's names: rows (images) per inference call -- like
Triton's max_batch_size; MLServer's own batcher counts requests -- and seconds to wait for more. This runtime
batches after checking each request (see batcher.py for why), so MLServer's own request merger is kept off. Run with `parallel_workers: 0` (what `vfpt-deploy serve` writes): one process,
whose onnxruntime threads use the cores; the batch-size histogram lives in that process's Prometheus
registry. Torch-free: nothing here (or in what it imports) loads torch.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter

import numpy as np
from mlserver import MLModel
from mlserver.errors import MLServerError
from mlserver.settings import ModelSettings
from mlserver.types import InferenceRequest, InferenceResponse, MetadataModelResponse, Parameters
from mlserver.utils import get_model_uri

from vfpt_deploy.errors import UsageError, VFPTError
from vfpt_deploy.schema import MAX_BATCH, is_engine
from vfpt_deploy.threads import resolve_threads

from .batcher import Batcher
from .predictor import Predictor
from .serve_io import decode_images, encode_response, metadata_tensors, parse_request

IMPLEMENTATION = "vfpt_deploy.runtime.serving.VFPTModel"
WELLKNOWN = ["model.onnx", "model.plan", "model.engine"]  # found in a folder uri (KServe's /mnt/models)
DEFAULT_MAX_ROWS = 32  # rows per request when batching is off (MLServer's max_batch_size 0 or 1)
BATCH_METRIC = "vfpt_batch_size"

# MLServer re-executes this module (importlib.reload) for every model it loads from a model-settings.json,
# so the process-wide state below is taken over from the previous execution, never made anew.
_opened: dict[tuple[str, str], Predictor] = globals().get("_opened", {})  # (name, real path) -> opened by serve
started: set[str] = globals().get("started", set())  # models whose load() finished here (kept after unload)
_histogram = globals().get("_histogram")


def open_artifact(path: str | os.PathLike, providers=None, threads: int | None = None,
                  allow_fallback: bool = False) -> Predictor:
    """The predictor for an artifact: .onnx -> onnxruntime (providers, threads), engines -> TensorRT."""
    from .onnx_runner import open_predictor

    if isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    # Concurrent loads are safe: onnx_runner serializes the part of session creation that is not.
    if is_engine(path):
        return open_predictor(path)
    return open_predictor(path, providers or None, threads=resolve_threads(threads), allow_fallback=allow_fallback)


def hand_over(name: str, path: str | os.PathLike, predictor: Predictor) -> None:
    """Give an opened predictor to the model `name` that will load `path` in this process (opened once)."""
    _opened[(name, os.path.realpath(path))] = predictor


def batch_histogram():
    """rows per inference call, by model: a Prometheus histogram on the registry MLServer's /metrics
    serves (the default one, with parallel_workers 0). Made once per process."""
    global _histogram
    if _histogram is None:
        from prometheus_client import Histogram

        _histogram = Histogram(BATCH_METRIC, "Rows per inference call (requests batched together) of a VFPT model",
                               ["model_name", "model_version"],
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, MAX_BATCH))
    return _histogram


class _OneLineClientErrors(logging.Filter):
    """MLServer's gRPC servicer logs every error with its traceback; for a bad request (4xx) the message
    alone says it all, and a client sending many would bury the log."""

    vfpt_one_line = True  # how a filter from an earlier execution of this module is recognized

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, MLServerError) and exc.status_code < 500:
            record.exc_info, record.exc_text = None, None
        return True


def quiet_client_errors() -> None:
    grpc_log = logging.getLogger("mlserver.grpc")
    if not any(getattr(f, "vfpt_one_line", False) for f in grpc_log.filters):
        grpc_log.addFilter(_OneLineClientErrors())


def _batching(settings: ModelSettings) -> tuple[int, float]:
    size, seconds = settings.max_batch_size, settings.max_batch_time
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_BATCH:
        raise UsageError(f"model {settings.name}: max_batch_size must be an integer in [0, {MAX_BATCH}], got {size!r}")
    if not isinstance(seconds, (int, float)) or not 0 <= seconds <= 60:
        raise UsageError(f"model {settings.name}: max_batch_time must be 0..60 seconds, got {seconds!r}")
    return size, float(seconds)


class VFPTModel(MLModel):
    """An exported VFPT classifier behind the V2 protocol. `batch_sizes` counts rows per inference call."""

    def __init__(self, settings: ModelSettings) -> None:
        self.max_batch_size, self.max_batch_time = _batching(settings)
        # MLServer wraps predict() in its request merger when these are set; this runtime batches checked
        # rows itself (batcher.py), so its own copy of the settings has them off.
        super().__init__(settings.model_copy(update={"max_batch_size": 0, "max_batch_time": 0.0}))
        self.predictor: Predictor | None = None
        self.batcher: Batcher | None = None
        self.batch_sizes: Counter = Counter()

    async def load(self) -> bool:
        path = await get_model_uri(self.settings, wellknown_filenames=WELLKNOWN)
        extra = dict((self.settings.parameters.extra or {}) if self.settings.parameters else {})
        self.predictor = _opened.pop((self.name, os.path.realpath(path)), None) or await asyncio.to_thread(
            open_artifact, path, extra.get("providers"), extra.get("threads"), bool(extra.get("allow_fallback", False)))
        self.classes = self.predictor.classes
        self.size = self.predictor.preprocess.size
        batching = self.max_batch_size > 1
        limit = getattr(self.predictor, "profile_max", None)  # a TensorRT engine's largest batch
        self.max_rows = self.max_batch_size if batching else min(DEFAULT_MAX_ROWS, limit or DEFAULT_MAX_ROWS)
        if limit is not None and self.max_rows > limit:
            raise UsageError(f"model {self.name}: max_batch_size {self.max_rows} is over the engine's profile "
                             f"maximum of {limit}; lower it or rebuild the engine")
        labels = batch_histogram().labels(model_name=self.name, model_version=self.version or "")
        self.batcher = Batcher(self.predictor.infer, self.max_rows, self.max_batch_time if batching else 0.0,
                               on_batch=lambda rows: (self.batch_sizes.update([rows]), labels.observe(rows)),
                               max_requests=None if batching else 1)
        quiet_client_errors()
        started.add(self.name)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        parsed = parse_request(payload, self.size, self.max_rows, len(self.classes))
        try:
            x = parsed.x if parsed.blobs is None else await asyncio.to_thread(
                decode_images, parsed.blobs, self.predictor.preprocess)
            logits = await self.batcher.submit(x)
        except VFPTError as e:  # the artifact failed to run: the server's fault, not the request's
            raise MLServerError(str(e), 500) from None
        return encode_response(np.asarray(logits), parsed, self.classes, self.name, self.version)

    async def metadata(self) -> MetadataModelResponse:
        inputs, outputs = metadata_tensors(self.size, len(self.classes))
        platform = "tensorrt_plan" if hasattr(self.predictor, "profile_max") else "onnxruntime_onnx"
        params = Parameters(max_batch_size=self.max_rows, max_batch_time=self.max_batch_time,
                            num_classes=len(self.classes))
        return MetadataModelResponse(name=self.name, versions=[self.version] if self.version else None,
                                     platform=platform, inputs=inputs, outputs=outputs, parameters=params)

    async def unload(self) -> bool:
        if self.batcher is not None:
            self.batcher.close()
        if self.predictor is not None:
            self.predictor.close()
        return True
