"""onnxruntime backend: providers chosen by what really works here, metadata from the model itself.

`make_session` is the one place an InferenceSession is made (OnnxPredictor, the benchmarks). A GPU
provider that cannot load its libraries makes onnxruntime log errors, print "EP Error" and quietly run on
the CPU: the noise is kept from the user, and asking for a GPU provider that fell back is refused in one
line unless allow_fallback.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import threading
from pathlib import Path

import numpy as np

from vfpt_deploy.artifacts.files import not_a_file, regular_file
from vfpt_deploy.errors import ArtifactError, RuntimeSetupError, UsageError
from vfpt_deploy.extras import import_onnxruntime
from vfpt_deploy.artifacts.schema import (INPUT_NAME, OUTPUT_NAME, TASK_INPUT, check_metadata, check_output_width,
                                          decode_metadata, graph_problems, is_engine, output_classes, read_graph,
                                          refuse_pack_backbone)
from vfpt_deploy.threads import resolve_threads

from .hardware import int8_isa_note
from .predictor import Predictor

CONTROL_FLOW_OPS = frozenset({"Loop", "Scan", "If", "SequenceMap"})

log = logging.getLogger(__name__)

_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
            "trt": "TensorrtExecutionProvider", "coreml": "CoreMLExecutionProvider", "dml": "DmlExecutionProvider"}
_OPT_LEVELS = ("disable", "basic", "extended", "all")
# Providers that run on a GPU: asking for one and getting the CPU is a fallback the user must accept.
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider",
                 "MIGraphXExecutionProvider")
_ORT_DEFAULT_SEVERITY = 2  # onnxruntime's default logger level: warnings and up
_QUIET_SEVERITY = 4  # fatal only: hides the provider-library load errors
_QUIET_LOCK = threading.Lock()  # quiet_onnxruntime swaps process-wide streams: one thread at a time


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


def provider_name(name: str) -> str:
    """'cuda' -> 'CUDAExecutionProvider'; full names pass through."""
    return _ALIASES.get(name.lower(), name)


def resolve_providers(names: list[str] | None, allow_fallback: bool = False) -> list[str]:
    """Full provider names. One this onnxruntime lacks (the CPU build has no CUDA) is an error, unless
    allow_fallback: then it is left out, and the CPU runs what nothing else can."""
    import onnxruntime as ort

    if not names:
        return default_providers()
    out = []
    available = ort.get_available_providers()
    for n in names:
        full = provider_name(n)
        if full not in available:
            if allow_fallback:
                continue
            raise RuntimeSetupError(f"execution provider {n!r} is not available in this onnxruntime "
                                    f"(available: {', '.join(available)}); use --providers cpu, or "
                                    "--allow-fallback to accept the CPU")
        out.append(full)
    return out or ["CPUExecutionProvider"]


def check_threads(threads) -> int | None:
    """None (onnxruntime's default: one per core) or an integer 1..MAX_THREADS (vfpt_deploy.threads' check)."""
    return None if threads is None else resolve_threads(threads)


def _with_options(providers: list[str], provider_options: dict[str, dict] | None) -> list:
    """Provider names, each paired with its options where some are given: [(name, {key: str}), ...]."""
    opts = {provider_name(k): v for k, v in (provider_options or {}).items()}
    unknown = [k for k in opts if k not in providers]
    if unknown:
        raise UsageError(f"provider options for {unknown[0]}, which is not among the providers "
                         f"({', '.join(providers)})")
    return [(p, {str(k): str(v) for k, v in opts[p].items()}) if p in opts else p for p in providers]


@contextlib.contextmanager
def quiet_onnxruntime():
    """Keep onnxruntime's own noise off the terminal while a session is made: provider-library load errors
    (its default logger, raised to fatal-only here) and the 'EP Error ... Falling back' text its Python
    wrapper prints. Both are restored afterwards; what was printed goes to this module's debug log."""
    import onnxruntime as ort

    out, err = io.StringIO(), io.StringIO()
    # The redirect swaps process-wide sys.stdout/stderr: two threads inside at once (serve loads models
    # concurrently) would restore each other's swap and leave the terminal silent for good.
    with _QUIET_LOCK:
        ort.set_default_logger_severity(_QUIET_SEVERITY)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                yield
        finally:
            ort.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)
        noise = (out.getvalue() + err.getvalue()).strip()
        if noise:
            log.debug("onnxruntime, while creating a session:\n%s", noise)


def check_fallback(asked: list[str], used: list[str]) -> None:
    """Refuse a session that was asked for GPU providers and runs on none of them."""
    gpu = [p for p in asked if p in GPU_PROVIDERS]
    if gpu and not any(p in used for p in gpu):
        where = "CPU" if set(used) <= {"CPUExecutionProvider"} else ", ".join(used)
        raise RuntimeSetupError(f"asked for {' and '.join(gpu)} but onnxruntime fell back to {where} (no usable "
                                "GPU/CUDA libraries); use --providers cpu, or --allow-fallback to accept the CPU")


def check_fixed_dims(fixed_dims) -> dict[str, int]:
    """{symbolic dimension name: size >= 1}, e.g. {'batch': 8}; None gives {}."""
    out = {}
    for name, size in (fixed_dims or {}).items():
        if not isinstance(name, str) or not name or isinstance(size, bool) or not isinstance(size, (int, np.integer)) \
                or size < 1:
            raise UsageError(f"fixed dimensions map a dimension name to a size >= 1, got {name!r}: {size!r}")
        out[name] = int(size)
    return out


def _session_options(ort, threads: int | None, optimization: str, optimized_model_path, fixed_dims=None):
    if optimization not in _OPT_LEVELS:
        raise UsageError(f"optimization must be one of {', '.join(_OPT_LEVELS)}, got {optimization!r}")
    so = ort.SessionOptions()
    for name, size in check_fixed_dims(fixed_dims).items():  # onnxruntime then folds the shape arithmetic
        so.add_free_dimension_override_by_name(name, size)
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if threads:
        so.intra_op_num_threads = threads
    if optimized_model_path:
        so.optimized_model_filepath = str(optimized_model_path)
    so.log_severity_level = 3
    return so


def make_session(path: str | os.PathLike, providers: list[str] | None = None, *, threads: int | None = None,
                 optimization: str = "all", optimized_model_path: str | None = None,
                 provider_options: dict[str, dict] | None = None, allow_fallback: bool = False,
                 fixed_dims: dict[str, int] | None = None):
    """An InferenceSession. threads: intra-op threads (None = onnxruntime's default, one per core).
    providers: names or aliases (cpu, cuda, tensorrt); None: the best that can really run here.
    provider_options: {provider: {option: value}}, e.g. {'cuda': {'device_id': 0}}.
    allow_fallback: accept a session that asked for a GPU provider and runs on the CPU.
    fixed_dims: symbolic input dimensions fixed for this session, e.g. {'batch': 8} (onnxruntime's free
    dimension override): a session for one shape, as CUDA graphs need."""
    ort = import_onnxruntime()  # refuses onnxruntime and onnxruntime-gpu side by side (vfpt_deploy.extras)

    threads = check_threads(threads)
    so = _session_options(ort, threads, optimization, optimized_model_path, fixed_dims)
    path = Path(path)
    if not regular_file(path):
        raise ArtifactError(f"model {path} {not_a_file(path, 'export one with ' + repr('vfpt-deploy export'))}")
    if path.suffix.lower() in (".pt", ".pth"):
        raise ArtifactError(f"{path} is a checkpoint, not an exported model; export it first with "
                            f"'vfpt-deploy export --ckpt {path}'")
    asked = resolve_providers(providers, allow_fallback)
    wanted = _with_options(asked, provider_options)
    try:
        with quiet_onnxruntime():
            session = ort.InferenceSession(str(path), so, providers=wanted)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf types
        raise ArtifactError(f"onnxruntime cannot load {path}: {str(e).strip().splitlines()[0][:200]}") from None
    if not allow_fallback:
        check_fallback(asked, session.get_providers())
    return session


def refuse_control_flow(path: Path, ops) -> None:
    """vfpt-deploy never exports loops or branches; a file that has them was made elsewhere and could run
    for ever inside onnxruntime, where no signal reaches it."""
    found = sorted(set(ops) & CONTROL_FLOW_OPS)
    if found:
        raise ArtifactError(f"{path} has control-flow ops ({', '.join(found)}), which vfpt-deploy never exports "
                            "(a crafted graph can run for ever); re-export the model with 'vfpt-deploy export'")


RUN_FAILURE_FIX = "re-export the model with 'vfpt-deploy export'"  # (the export pipeline says what it did instead)


def ort_cause(e: BaseException, limit: int = 240) -> str:
    """onnxruntime's failure in one short line that keeps its cause: the op and node, then the reason, without
    the source location, C++ signature and failed check that come before it ('... dynamic_quantize_matmul.cc:97
    onnxruntime::common::Status ...(...) const IsBQuantParamSupported(...) was false. MatmulInteger : b zero
    point is not valid'). Cut from the front when still long: the cause is at the end."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    m = re.match(r"Non-zero status code returned while running (\S+) node\. Name:'([^']*)' Status Message: (.*)", text)
    if m:
        op, node, status = m.groups()
        status = re.sub(r"^\S+\.(?:cc|h|cpp):\d+ .*? was false\. ", "", status)
        status = re.sub(r"^\S+\.(?:cc|h|cpp):\d+ ", "", status)
        text = f"{op} node {node[:80]!r}: {status}"
    return text if len(text) <= limit else "..." + text[-(limit - 3):]


class OnnxPredictor(Predictor):
    """Serve an exported VFPT ONNX model with onnxruntime. `session` is the InferenceSession (None once
    closed); `providers` what it really runs on."""

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None, *, threads: int | None = None,
                 optimization: str = "all", allow_fallback: bool = False,
                 provider_options: dict[str, dict] | None = None, fixed_dims: dict[str, int] | None = None) -> None:
        self.path = Path(path)
        # The graph is read once, before onnxruntime runs anything: control flow is refused, and the
        # graph's own precision is kept (verify gates by it). Without the onnx package (a lean serving
        # install) or for a file onnx cannot read, onnxruntime's load gives the verdict.
        facts = read_graph(self.path, strict=False) if self.path.is_file() else None
        if facts is not None:
            refuse_control_flow(self.path, facts.ops)
        self.graph_precision = facts.precision if facts is not None else None
        self._facts = facts
        self.session = make_session(path, providers, threads=threads, optimization=optimization,
                                    provider_options=provider_options, allow_fallback=allow_fallback,
                                    fixed_dims=fixed_dims)
        # A failing run raises (and is reported in one line below); onnxruntime's own log line is not needed.
        self._quiet_run = import_onnxruntime().RunOptions()
        self._quiet_run.log_severity_level = _QUIET_SEVERITY
        try:
            self._check_model()
        except BaseException:
            self.close()
            raise

    def _check_model(self) -> None:
        path = self.path
        self.metadata = decode_metadata(self.session.get_modelmeta().custom_metadata_map)
        refuse_pack_backbone(self.metadata, str(path))
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        want = [INPUT_NAME, TASK_INPUT] if "tasks" in self.metadata else [INPUT_NAME]
        if [i.name for i in inputs] != want or [o.name for o in outputs] != [OUTPUT_NAME]:
            raise ArtifactError(f"{path} has inputs {[i.name for i in inputs]} and outputs {[o.name for o in outputs]}; "
                                f"this vfpt-deploy model should take {want} and give '{OUTPUT_NAME}'")
        if len(inputs) > 1 and inputs[1].type != "tensor(int64)":
            raise ArtifactError(f"{path}: input '{TASK_INPUT}' is {inputs[1].type}, not tensor(int64); re-export it")
        checked = check_metadata(self.metadata, str(path), inputs[0].shape)
        check_output_width(outputs[0].shape[-1], checked, str(path))
        problems = graph_problems(self._facts, checked, [i.name for i in inputs], outputs[0].shape[-1]) \
            if self._facts is not None else []
        if problems:  # the same contradictions inspect shows
            raise ArtifactError(f"{path}: {problems[0]}; re-export the artifact")
        self.preprocess = checked["preprocess"]
        note = int8_isa_note(self.metadata.get("quantization"), self.providers)
        self.notes = (note,) if note else ()

    @property
    def providers(self) -> list[str]:
        """The providers the session really uses (not the ones asked for); empty once closed."""
        return list(self.session.get_providers()) if self.session is not None else []

    def infer(self, batch: np.ndarray, task_ids: np.ndarray | None = None) -> np.ndarray:
        if self.session is None:
            raise RuntimeSetupError(f"the predictor for {self.path} is closed; open a new one")
        feed = {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}
        ids = self.check_task_ids(batch, task_ids)
        if ids is not None:
            feed[TASK_INPUT] = ids
        if not len(batch):  # nothing to run (a graph's reshapes may not take a zero batch)
            return np.zeros((0, output_classes(self.metadata)), np.float32)
        try:
            return self.session.run(None, feed, self._quiet_run)[0]
        except Exception as e:  # onnxruntime's own Fail / RuntimeException types
            raise ArtifactError(f"onnxruntime failed to run {self.path} on a batch of {len(batch)}: {ort_cause(e)}; "
                                f"{RUN_FAILURE_FIX}") from None

    def close(self) -> None:
        """Release the session (its memory goes when nothing else holds it). Safe to call twice."""
        self.session = None


def open_predictor(path: str | os.PathLike, providers: list[str] | None = None, **kwargs) -> Predictor:
    """The right backend for an artifact: .onnx -> onnxruntime, .engine/.plan -> TensorRT."""
    if is_engine(path):
        from .tensorrt_runner import TensorRTPredictor

        return TensorRTPredictor(path, **kwargs)
    return OnnxPredictor(path, providers, **kwargs)
