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

Multi-task artifacts: one model per task, each naming its task in `parameters.extra.task` and the
artifact's served name in `parameters.extra.artifact`. In one process the models of one artifact share ONE
predictor (one onnxruntime session) and ONE batcher (`Shared` below), so requests for different tasks are
inferred together: the batch carries each row's task index, and each model trims its rows to its own
task's classes. The batch metrics of a shared batcher are labelled with the artifact's name.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from mlserver import MLModel
from mlserver.errors import MLServerError
from mlserver.settings import ModelSettings
from mlserver.types import InferenceRequest, InferenceResponse, MetadataModelResponse, Parameters
from mlserver.utils import get_model_uri

from vfpt_deploy.errors import UsageError, VFPTError
from vfpt_deploy.artifacts.schema import MAX_BATCH, is_engine
from vfpt_deploy.threads import resolve_threads
from vfpt_deploy.text import printable

from . import serve_limits, serve_triton
from .batcher import Batcher
from .predictor import Predictor
from .serve_io import (BadRequest, binary_outputs, decode_images, encode_response, install_grpc_checks,
                       metadata_tensors, parse_request)

IMPLEMENTATION = "vfpt_deploy.runtime.serving.VFPTModel"
WELLKNOWN = ["model.onnx", "model.plan", "model.engine"]  # found in a folder uri (KServe's /mnt/models)
DEFAULT_MAX_ROWS = 32  # rows per request when batching is off (MLServer's max_batch_size 0 or 1)
BATCH_METRIC = "vfpt_batch_size"
TASKS_METRIC = "vfpt_batch_tasks"
SELF_CHECK_METRIC = "vfpt_self_check_passed"  # 1 passed, 0 failed; absent for an artifact without a golden set
SELF_CHECK_SECONDS = "vfpt_self_check_seconds"

log = logging.getLogger(__name__)
serve_limits.install()  # bounded REST bodies, gzip included, in every process that loads this runtime
install_grpc_checks()  # malformed gRPC tensors: INVALID_ARGUMENT with one line, not INTERNAL

# MLServer re-executes this module (importlib.reload) for every model it loads from a model-settings.json,
# so the process-wide state below is taken over from the previous execution, never made anew.
_opened: dict[tuple[str, str], Predictor] = globals().get("_opened", {})  # (name, real path) -> opened by serve
started: set[str] = globals().get("started", set())  # models whose load() finished here (kept after unload)
_histogram = globals().get("_histogram")
_tasks_histogram = globals().get("_tasks_histogram")
_shared: dict = globals().get("_shared", {})  # (artifact name, real path) -> Shared, for multi-task artifacts
_shared_lock: threading.Lock = globals().get("_shared_lock") or threading.Lock()  # loads run in threads
_self_check_gauges = globals().get("_self_check_gauges")


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


def hand_over_tasks(name: str, path: str | os.PathLike, predictor: Predictor) -> None:
    """Give an opened multi-task predictor to the task models of artifact `name` (`path`) in this process."""
    with _shared_lock:
        _shared[(name, os.path.realpath(path))] = Shared(name, predictor)


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


def tasks_histogram():
    """distinct tasks per inference call of a multi-task artifact, by artifact name (see batch_histogram)."""
    global _tasks_histogram
    if _tasks_histogram is None:
        from prometheus_client import Histogram

        _tasks_histogram = Histogram(TASKS_METRIC, "Distinct tasks per inference call of a multi-task VFPT artifact",
                                     ["model_name", "model_version"], buckets=(1, 2, 3, 4, 8, 16, 32, 64, 128, 256))
    return _tasks_histogram


def self_check_gauges():
    """(passed, seconds) Prometheus gauges by model, on the registry /metrics serves; made once per process."""
    global _self_check_gauges
    if _self_check_gauges is None:
        from prometheus_client import Gauge

        _self_check_gauges = (
            Gauge(SELF_CHECK_METRIC, "1 when the model reproduced its golden set on this machine at load, 0 when not",
                  ["model_name", "model_version"]),
            Gauge(SELF_CHECK_SECONDS, "Seconds the load-time golden-set replay took", ["model_name", "model_version"]))
    return _self_check_gauges


def run_self_check(model: str, version: str, predictor: Predictor, path: str):
    """The load-time self-check of one model (once per predictor: a multi-task artifact's task models share
    it): logged in one line, exported as gauges; ArtifactError when the artifact does not reproduce here."""
    from .selfcheck import check_on_load, describe_check

    passed, seconds = self_check_gauges()
    try:
        result = check_on_load(predictor, path)
    except VFPTError as e:
        passed.labels(model_name=model, model_version=version).set(0)
        log.error("model %s: %s", model, e)
        raise
    if result is None:
        log.warning("model %s: %s", model, describe_check(None))
        return None
    passed.labels(model_name=model, model_version=version).set(1)
    seconds.labels(model_name=model, model_version=version).set(result.seconds)
    log.info("model %s: %s", model, describe_check(result))
    return result


@dataclass(eq=False)
class Shared:
    """One multi-task artifact's predictor and batcher, shared by the models of its tasks in this process.
    `users`: id(model) -> model name of the models loaded on it; the last one to unload closes it."""

    name: str  # the artifact's served name: the label of its batch metrics
    predictor: Predictor
    batcher: Batcher | None = None
    batching: tuple | None = None  # (max_rows, max_delay_s, max_requests) the batcher was made with
    users: dict = field(default_factory=dict)
    batch_sizes: Counter = field(default_factory=Counter)

    def batcher_for(self, model: str, batching: tuple) -> Batcher:
        return shared_batcher(self, self.predictor.infer, model, batching, "task models")


def shared_batcher(owner, infer, model: str, batching: tuple, others: str) -> Batcher:
    """The one batcher of `owner` (a multi-task artifact's Shared, or a pack backbone: .name, .batcher,
    .batching, .batch_sizes), made by the first model to load on it; every model on it must batch alike."""
    if owner.batcher is None:
        rows, delay, max_requests = owner.batching = batching
        sizes = batch_histogram().labels(model_name=owner.name, model_version="")
        tasks = tasks_histogram().labels(model_name=owner.name, model_version="")
        owner.batcher = Batcher(infer, rows, delay, max_requests=max_requests,
                                on_batch=lambda n: (owner.batch_sizes.update([n]), sizes.observe(n)),
                                on_tasks=lambda ids: tasks.observe(len(set(ids.tolist()))))
    elif batching != owner.batching:
        raise UsageError(f"model {model}: its batching {batching[:2]} differs from {owner.batching[:2]} of the "
                         f"other {others} of {owner.name}, which share one batcher; give them the same "
                         "max_batch_size and max_batch_time")
    return owner.batcher


def attach(name: str, path: str, extra: dict, model: "VFPTModel") -> Shared:
    """The Shared of artifact `name` at `path`: the one handed over or already opened in this process, else
    opened now (once, however many task models load at the same time). Runs in a worker thread."""
    key = (name, os.path.realpath(path))
    with _shared_lock:
        shared = _shared.get(key)
        if shared is None:
            predictor = open_artifact(path, extra.get("providers"), extra.get("threads"),
                                      bool(extra.get("allow_fallback", False)))
            shared = _shared[key] = Shared(name, predictor)
        shared.users[id(model)] = model.name
        return shared


def detach(shared: Shared, model: "VFPTModel") -> None:
    """A task model unloads: the last one closes the batcher and the session."""
    with _shared_lock:
        shared.users.pop(id(model), None)
        if shared.users:
            return
        for key in [k for k, v in _shared.items() if v is shared]:
            del _shared[key]
    if shared.batcher is not None:
        shared.batcher.close()
    shared.predictor.close()


def task_index(predictor: Predictor, task, model: str, path: str) -> int | None:
    """The index of the task a model serves (None: a single-task artifact); one line when they disagree."""
    names = predictor.tasks
    if task is None and names:
        raise UsageError(f"model {model}: {path} holds {len(names)} tasks ({', '.join(names)}); serve one model per "
                         "task, naming it in parameters.extra.task (as 'vfpt-deploy serve' does)")
    if task is not None and not names:
        raise UsageError(f"model {model}: parameters.extra.task is set, but {path} holds a single task; drop it")
    if task is not None and task not in names:
        raise UsageError(f"model {model}: parameters.extra.task {str(task)[:80]!r} is not a task of {path}, which "
                         f"holds {', '.join(names)}; fix the task name")
    return None if task is None else names.index(task)


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(bfloat16)": "bfloat16"}


def triton_model(predictor: Predictor, classes: list[str], max_rows: int):
    """(the TritonModel runtime/triton_config.py builds a config from, whether it runs on a GPU) for an
    opened artifact as this server serves it: the image input alone (a multi-task graph's task input is
    filled in by the server), logits as wide as the served model's classes."""
    from vfpt_deploy.artifacts.schema import INPUT_NAME, OUTPUT_NAME

    from .triton_config import Tensor, TritonModel

    session = getattr(predictor, "session", None)
    if hasattr(predictor, "profile_max"):  # a TensorRT engine
        lo, hi = int(getattr(predictor, "min_batch", 1)), int(predictor.profile_max)
        dtype = str(np.dtype(getattr(predictor, "in_dtype", np.float32)))
        shape = tuple(int(d) for d in getattr(predictor, "input_shape", (3, *predictor.preprocess.size)))
        fixed = lo == hi
        inp = Tensor(INPUT_NAME, dtype, ((hi,) if fixed else (-1,)) + shape)
        out_dtype = str(np.dtype(getattr(predictor, "out_dtype", np.float32)))
        out = Tensor(OUTPUT_NAME, out_dtype, ((hi,) if fixed else (-1,)) + (len(classes),))
        return TritonModel("engine", inp, out, classes, None if fixed else (lo, hi, hi), [], ""), True
    i, o = session.get_inputs()[0], session.get_outputs()[0]
    dims = lambda shape: tuple(d if isinstance(d, int) and d > 0 else -1 for d in shape)  # noqa: E731
    inp = Tensor(i.name, _ORT_TYPES.get(i.type, i.type), dims(i.shape))
    out = Tensor(o.name, _ORT_TYPES.get(o.type, o.type), dims(o.shape)[:1] + (len(classes),))
    fixed = inp.shape[0] > 0
    gpu = any(p != "CPUExecutionProvider" for p in predictor.providers)
    return TritonModel("onnx", inp, out, classes, None if fixed else (1, max_rows, max_rows), [], ""), gpu


class _OneLineClientErrors(logging.Filter):
    """MLServer's gRPC servicer logs every error with its traceback; for a bad request (4xx) the message
    alone says it all, and a client sending many would bury the log. The line names the request id (the
    client's, or the one serve_io gave the request) and the status, like the REST lines of serve_triton."""

    vfpt_one_line = True  # how a filter from an earlier execution of this module is recognized

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, MLServerError) and exc.status_code < 500:
            from mlserver.grpc.utils import STATUS_CODE_MAPPING

            info = serve_triton.REQUEST.get()
            code = STATUS_CODE_MAPPING.get(exc.status_code)
            record.msg = (f"request {printable(info.id[:128]) if info else '-'}: gRPC "
                          f"{code.name if code else exc.status_code}: {printable(' '.join(str(exc).split()), 400)}")
            record.levelno, record.levelname = logging.WARNING, "WARNING"  # a client's fault, as REST logs it
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


def quiet_client_errors() -> None:
    grpc_log = logging.getLogger("mlserver.grpc")
    if not any(getattr(f, "vfpt_one_line", False) for f in grpc_log.filters):
        grpc_log.addFilter(_OneLineClientErrors())


quiet_client_errors()  # here too: the gRPC server may run in a process where no model loads (parallel workers)


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
        self.shared: Shared | None = None  # a multi-task artifact's predictor and batcher, shared by its tasks
        self.task: int | None = None  # the task index this model serves (None: a single-task artifact)
        self.stats = serve_triton.Stats()  # Triton's statistics extension (runtime/serve_triton.py)
        self._triton_config = None

    async def load(self) -> bool:
        path = await get_model_uri(self.settings, wellknown_filenames=WELLKNOWN)
        extra = dict((self.settings.parameters.extra or {}) if self.settings.parameters else {})
        if extra.get("task") is not None:
            artifact = str(extra.get("artifact") or os.path.splitext(os.path.basename(path))[0])
            self.shared = await asyncio.to_thread(attach, artifact, path, extra, self)
            self.predictor = self.shared.predictor
        else:
            self.predictor = _opened.pop((self.name, os.path.realpath(path)), None) or await asyncio.to_thread(
                open_artifact, path, extra.get("providers"), extra.get("threads"),
                bool(extra.get("allow_fallback", False)))
        for note in getattr(self.predictor, "notes", ()):  # e.g. an int8 form that can saturate on this CPU
            logging.getLogger("mlserver").warning("model %s: %s", self.name, note)
        self.task = task_index(self.predictor, extra.get("task"), self.name, path)
        self.self_check = None
        if extra.get("self_check", True) is not False:
            try:
                self.self_check = await asyncio.to_thread(run_self_check, self.name, self.version or "",
                                                          self.predictor, path)
            except VFPTError:
                await self.unload()
                raise
        self.classes = self.predictor.classes_of(self.task)
        self.size = self.predictor.preprocess.size
        batching = self._batching()
        serve_limits.allow_model(self.max_rows, self.size)  # the REST body limit covers this model's largest request
        if self.shared is not None:
            self.batcher = self.shared.batcher_for(self.name, batching)
            self.batch_sizes = self.shared.batch_sizes
        else:
            labels = batch_histogram().labels(model_name=self.name, model_version=self.version or "")
            self.batcher = Batcher(self.predictor.infer, *batching[:2], max_requests=batching[2],
                                   on_batch=lambda rows: (self.batch_sizes.update([rows]), labels.observe(rows)))
        quiet_client_errors()
        serve_triton.models[self.name] = self
        started.add(self.name)
        return True

    def _batching(self) -> tuple[int, float, int | None]:
        """(rows per call, seconds to wait, requests per call) from the settings and the artifact's limits."""
        batching = self.max_batch_size > 1
        limit = getattr(self.predictor, "profile_max", None)  # a TensorRT engine's largest batch
        self.max_rows = self.max_batch_size if batching else min(DEFAULT_MAX_ROWS, limit or DEFAULT_MAX_ROWS)
        if limit is not None and self.max_rows > limit:
            raise UsageError(f"model {self.name}: max_batch_size {self.max_rows} is over the engine's profile "
                             f"maximum of {limit}; lower it or rebuild the engine")
        return self.max_rows, self.max_batch_time if batching else 0.0, None if batching else 1

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        started = time.perf_counter_ns()
        info = serve_triton.REQUEST.get()
        if info is not None:  # REST/gRPC: the id its log line names; REST: the outputs wanted as binary data
            info.id, info.binary_outputs = payload.id or info.id, binary_outputs(payload)
        try:
            response, timing = await self._predict(payload, started)
        except BaseException:
            self.stats.add("fail", time.perf_counter_ns() - started)
            raise
        end = time.perf_counter_ns()
        for key in ("compute_input", "queue", "compute_infer"):
            self.stats.add(key, timing[key])
        self.stats.add("compute_output", end - timing["output"])
        self.stats.add("success", end - started)
        self.stats.inference_count += timing["rows"]
        self.stats.last_inference_ms = serve_triton.now_ms()
        return response

    async def _predict(self, payload: InferenceRequest, started: int) -> tuple[InferenceResponse, dict]:
        parsed = parse_request(payload, self.size, self.max_rows, len(self.classes))
        timing: dict = {"rows": parsed.rows}
        try:
            x = parsed.x if parsed.blobs is None else await asyncio.to_thread(
                decode_images, parsed.blobs, self.predictor.preprocess)
            submitted = time.perf_counter_ns()
            logits = await self.batcher.submit(x, self.task, timing=timing)
        except VFPTError as e:  # the artifact failed to run: the server's fault, not the request's
            raise MLServerError(str(e), 500) from None
        timing["output"] = time.perf_counter_ns()
        timing.update(compute_input=submitted - started, compute_infer=timing.get("infer_ns", 0),
                      queue=timing["output"] - submitted - timing.get("infer_ns", 0))
        # a multi-task graph pads every row to its widest task with -inf: keep this task's own classes
        return encode_response(np.asarray(logits)[:, :len(self.classes)], parsed, self.classes, self.name,
                               self.version), timing

    def triton_stats(self) -> dict:
        """Triton's statistics of this model (serve_triton.Stats): its requests, and the inference calls of
        the batcher its rows go through (shared by the task models of a multi-task artifact)."""
        batches = dict(self.batcher.batch_stats) if self.batcher is not None else {}
        return self.stats.as_json(self.name, self.version or "", batches)

    def triton_config(self):
        """Triton's ModelConfig of this model as served here, built as `vfpt-deploy triton` builds it
        (runtime/triton_config.py): its input and output, max_batch_size and dynamic batching as this
        server batches, CPU or GPU instances as its session runs. Made once."""
        if self._triton_config is None:
            from .triton_config import TritonSettings, model_config

            model, gpu = triton_model(self.predictor, self.classes, self.max_rows)
            batching = self.max_batch_size > 1
            settings = TritonSettings(max_batch_size=self.max_rows if model.batch else None, kind="gpu" if gpu else "cpu",
                                      max_queue_delay_us=int(round(self.max_batch_time * 1e6)),
                                      dynamic_batching=batching, preferred_batch_sizes=() if batching else None)
            try:
                self._triton_config = model_config(model, settings.check(), self.name,
                                                   getattr(self.predictor, "path", self.name))
            except UsageError as e:
                raise BadRequest(str(e)) from None
        return self._triton_config

    async def metadata(self) -> MetadataModelResponse:
        inputs, outputs = metadata_tensors(self.size, len(self.classes))
        platform = "tensorrt_plan" if hasattr(self.predictor, "profile_max") else "onnxruntime_onnx"
        params = Parameters(max_batch_size=self.max_rows, max_batch_time=self.max_batch_time,
                            num_classes=len(self.classes), **self._task_metadata(), **self._check_metadata())
        return MetadataModelResponse(name=self.name, versions=[self.version] if self.version else None,
                                     platform=platform, inputs=inputs, outputs=outputs, parameters=params)

    def _check_metadata(self) -> dict:
        """The load-time self-check: passed / absent (no golden set) / off, its time and inputs."""
        r = getattr(self, "self_check", None)
        if r is None:
            has_golden = "golden" in self.predictor.metadata
            return {"self_check": "off" if has_golden else "absent"}
        return {"self_check": "passed", "self_check_seconds": round(r.seconds, 4),
                "self_check_inputs": sum(c.samples for c in r.comparisons)}

    def _task_metadata(self) -> dict:
        """For a task model: its task, its artifact's name, and the models sharing its session and batcher."""
        if self.shared is None:
            return {}
        with _shared_lock:
            models = sorted(set(self.shared.users.values()))
        return {"task": self.predictor.tasks[self.task], "artifact": self.shared.name, "session_models": models}

    async def unload(self) -> bool:
        if serve_triton.models.get(self.name) is self:
            del serve_triton.models[self.name]
        if self.shared is not None:  # the session and batcher stay while other task models use them
            shared, self.shared = self.shared, None
            detach(shared, self)
            return True
        if self.batcher is not None:
            self.batcher.close()
        if self.predictor is not None:
            self.predictor.close()
        return True
