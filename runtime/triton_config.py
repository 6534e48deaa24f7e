"""Triton's model configuration for a VFPT model: ONE builder for the config.pbtxt that `vfpt-deploy triton`
writes (exporters/triton.py) and the config that `vfpt-deploy serve` answers to Triton clients
(`get_model_config`, runtime/serve_triton.py), so the two cannot drift apart.

The message is Triton's own protobuf (tritonclient's model_config_pb2, loaded from its file alone), built
from a TritonModel (the artifact's input/output names, dtypes, dims, classes and batch range) and
TritonSettings (max_batch_size, instances, kind, dynamic batching). Torch-free.
"""
from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vfpt_deploy.errors import ArtifactError, UsageError
from vfpt_deploy.extras import MissingExtra, install_hint
from vfpt_deploy.artifacts.schema import MAX_BATCH

KINDS = ("gpu", "cpu")
PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "engine": ("tensorrt_plan", "model.plan")}
# An ONNX with a dynamic batch: the same as `vfpt-deploy serve --max-batch-size` by default, so Triton and
# serve batch alike (an engine's own profile max is used for engines).
DEFAULT_MAX_BATCH = 32
DEFAULT_QUEUE_DELAY_US = 100  # how long Triton may hold a request to batch it with later ones
MAX_QUEUE_DELAY_US = 10_000_000
MAX_INSTANCES = 1024
LABELS_FILE = "labels.txt"
_TRITON_TYPES = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16", "float64": "FP64"}
PB2_MODULE = "vfpt_deploy.runtime._triton_model_config_pb2"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def model_config_pb2():
    """Triton's model configuration schema, as tritonclient ships it. Loaded from its own file: importing
    tritonclient.grpc also registers Triton's service protos, whose names (proto package 'inference')
    clash with MLServer's in one process."""
    if PB2_MODULE in sys.modules:
        return sys.modules[PB2_MODULE]
    try:
        spec = importlib.util.find_spec("tritonclient")
        path = Path(spec.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py" if spec else None
        if path is None or not path.is_file():
            raise ImportError("tritonclient is not installed, or ships no grpc/model_config_pb2.py")
        module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(PB2_MODULE, path))
        module.__spec__.loader.exec_module(module)
    except (ImportError, TypeError) as e:
        raise MissingExtra(f"a Triton model config needs Triton's config schema from tritonclient "
                           f"({str(e).strip()[:80]}); {install_hint('tritonclient')}") from None
    sys.modules[PB2_MODULE] = module
    return module


def _check_int(value, option: str, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise UsageError(f"{option} must be an integer in {lo}..{hi}, got {value!r}")


@dataclass(frozen=True)
class TritonSettings:
    """How Triton serves the model. name: the model's folder and name (default: the artifact's file stem).
    max_batch_size: default the engine's profile max, or DEFAULT_MAX_BATCH for an ONNX with a dynamic batch.
    preferred_batch_sizes: batches the dynamic batcher aims for (default: an engine's opt batch where it
    is below max, else none). kind: 'gpu' or 'cpu' instances ('cpu' serves ONNX only)."""

    name: str | None = None
    max_batch_size: int | None = None
    instances: int = 1
    kind: str = "gpu"
    preferred_batch_sizes: tuple[int, ...] | None = None
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    dynamic_batching: bool = True

    def check(self) -> "TritonSettings":
        if self.name is not None and (not isinstance(self.name, str) or not _NAME.fullmatch(self.name)):
            raise UsageError(f"--name {self.name!r}: a Triton model name is its folder name: 1-128 letters, digits, "
                             "'_', '-' or '.', not starting with '.' or '-'")
        if self.max_batch_size is not None:
            _check_int(self.max_batch_size, "--max-batch", 1, MAX_BATCH)
        _check_int(self.instances, "--instances", 1, MAX_INSTANCES)
        _check_int(self.max_queue_delay_us, "--max-queue-delay-us", 0, MAX_QUEUE_DELAY_US)
        if self.kind not in KINDS:
            raise UsageError(f"--kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for b in self.preferred_batch_sizes or ():
            _check_int(b, "--preferred-batch", 1, MAX_BATCH)
        if not isinstance(self.dynamic_batching, bool):
            raise UsageError(f"dynamic_batching is true or false, got {self.dynamic_batching!r}")
        return self


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # numpy-style: float32, float16, ...
    shape: tuple  # with the batch dim; -1 where a dim is not fixed


@dataclass(frozen=True)
class TritonModel:
    """What the config is made from, read from the artifact."""

    kind: str  # "onnx" or "engine"
    input: Tensor
    output: Tensor
    classes: list[str]
    batch: tuple[int, int, int] | None  # (min, opt, max) batches the model takes; None: one fixed batch
    files: list[tuple[Path, str]]  # (source, path under NAME/1/); the model file first
    sha256: str  # of the model file
    notes: list[str] = field(default_factory=list)


def _data_type(pb, dtype: str, path: Path) -> int:
    try:
        return pb.DataType.Value("TYPE_" + _TRITON_TYPES.get(dtype, dtype.upper()))
    except ValueError:
        raise ArtifactError(f"{path}: tensor type {dtype!r} has no Triton equivalent") from None


def model_config(model: TritonModel, settings: TritonSettings, name: str, path: Path):
    """Triton's ModelConfig message for the model. A model with one fixed batch is served unbatched
    (max_batch_size 0, dims with the batch, no dynamic batching)."""
    pb = model_config_pb2()
    platform = PLATFORMS[model.kind][0]
    if model.kind == "engine" and settings.kind == "cpu":
        raise UsageError("a TensorRT engine runs on a GPU only; use --kind gpu, or serve the .onnx on CPU instances")
    max_batch = _max_batch(model, settings, path)
    cfg = pb.ModelConfig(name=name, platform=platform, max_batch_size=max_batch)
    skip = 1 if max_batch else 0  # Triton's dims leave out the batch dim of a batching model
    for spec, tensors in ((model.input, cfg.input), (model.output, cfg.output)):
        t = tensors.add(name=spec.name, data_type=_data_type(pb, spec.dtype, path))
        t.dims.extend(spec.shape[skip:])
    cfg.output[0].label_filename = LABELS_FILE
    cfg.instance_group.add(count=settings.instances, kind=pb.ModelInstanceGroup.Kind.Value(f"KIND_{settings.kind.upper()}"))
    if max_batch and settings.dynamic_batching:
        preferred = settings.preferred_batch_sizes
        if preferred is None:  # an engine is tuned for its opt batch
            preferred = (model.batch[1],) if model.kind == "engine" and model.batch[1] < max_batch else ()
        too_big = [b for b in preferred if b > max_batch]
        if too_big:
            raise UsageError(f"--preferred-batch {too_big[0]} is over max_batch_size {max_batch}")
        cfg.dynamic_batching.preferred_batch_size.extend(sorted(set(preferred)))
        cfg.dynamic_batching.max_queue_delay_microseconds = settings.max_queue_delay_us
    return cfg


def _max_batch(model: TritonModel, settings: TritonSettings, path: Path) -> int:
    asked = settings.max_batch_size
    if model.batch is None:
        if asked is not None:
            raise UsageError(f"{path} takes one fixed batch of {model.input.shape[0]}; Triton serves it unbatched "
                             "(max_batch_size 0): drop --max-batch, or re-export with a dynamic batch")
        return 0
    if asked is None:
        return model.batch[2]
    if model.kind == "engine" and asked > model.batch[2]:
        raise UsageError(f"--max-batch {asked} is over the engine's profile max {model.batch[2]}; rebuild the engine "
                         f"with --max-batch {asked}, or ask for at most {model.batch[2]}")
    return asked


def config_dict(msg) -> dict:
    """A protobuf message as Triton's HTTP API writes it: proto field names, numbers as JSON numbers (also
    the 64-bit ones protobuf's own JSON writes as strings), enums by name, scalar fields always present."""
    from google.protobuf.descriptor import FieldDescriptor as F

    def value(fd, v):
        if fd.type == F.TYPE_MESSAGE:
            return config_dict(v)
        if fd.type == F.TYPE_ENUM:
            return fd.enum_type.values_by_number[v].name if v in fd.enum_type.values_by_number else v
        return v

    out = {}
    for fd in msg.DESCRIPTOR.fields:
        v = getattr(msg, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            vf = fd.message_type.fields_by_name["value"]
            out[fd.name] = {k: value(vf, x) for k, x in v.items()}
        elif fd.label == F.LABEL_REPEATED:
            out[fd.name] = [value(fd, x) for x in v]
        elif fd.type == F.TYPE_MESSAGE:
            if msg.HasField(fd.name):
                out[fd.name] = config_dict(v)
        else:
            out[fd.name] = value(fd, v)
    return out
