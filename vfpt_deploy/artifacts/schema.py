"""The artifact schema, read and written in one place: tensor names, file suffixes, the `vfpt.*` metadata
an ONNX file carries, and the JSON sidecar beside a TensorRT engine. Writers (exporters) and readers
(runtime) both use it; every field a reader takes from a file is type- and range-checked here first.

ONNX metadata_props (JSON values):
  vfpt.format            "vfpt-deploy.artifact"
  vfpt.classes           list of class names (index order)
  vfpt.preprocess        Preprocess as a dict (resize, crop, mean, std, interpolation)
  vfpt.image_size        [H, W] of the `images` input
  vfpt.fold, vfpt.precision, vfpt.opset, vfpt.tool_version, vfpt.checkpoint_sha256, vfpt.checkpoint
  vfpt.config, vfpt.backbone   the VFPT config and backbone identity (informative)
  vfpt.tasks             multi-task artifacts only (vfpt_deploy/multitask.py), instead of vfpt.classes:
                         [{name, classes, fold, num_prompts, checkpoint, checkpoint_sha256, config}], in
                         task-index order; the graph then takes a second input `task` (int64 [batch]) and
                         its logits are [batch, max classes], -inf past a task's own classes

Torch-free.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from vfpt_deploy.artifacts.files import not_a_file, read_json, regular_file
from vfpt_deploy.errors import ArtifactError, VFPTError

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
TASK_INPUT = "task"  # multi-task artifacts: int64 [batch], the task index of each sample
ARTIFACT_FORMAT = "vfpt-deploy.artifact"
RUN_SUFFIXES = (".pt", ".pth")  # what train and import write (a run.pt)
ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan")
SIDECAR_FORMAT = "vfpt-deploy.trt-engine"
SIDECAR_VERSION = 2  # the newest read; a sidecar records the oldest that describes it (2: a task input)
TASK_DTYPES = ("int64", "int32")  # what an engine's `task` input may be bound as (TensorRT >= 10: int64)
REPORT_SUFFIX = ".verify.json"
PRECISIONS = ("fp32", "fp16", "int8")
QUANTIZE_MODES = ("dynamic", "static", "modelopt")  # int8: `export --quantize` (exporters/quantize.py)
# Ops that make a graph int8: Q/DQ (static, ModelOpt) and onnxruntime's dynamic / integer kernels.
QUANT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                       "ConvInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearMatMul",
                       "QLinearConv", "QGemm"})
FORMATS = ("onnx", "trt", "trt-rtx", "pack", "backbone")  # what `export --format` writes
PACK_FORMATS = ("pack", "backbone")  # a prompt pack, and the backbone artifact packs run on (pack_pipeline.py)
EXPORT_FOLDS = ("auto", "tokens", "kv")  # what `export --fold` takes (the live FFT is not exported)
FOLDS = ("tokens", "kv", "none", "custom", "mixed")  # what an artifact's metadata may record (mixed: multi-task, per task)
TRT_FLAVORS = ("trt", "trt-rtx")
MAX_CLASSES = 1_000_000
MAX_SIDE = 8192  # largest image side an artifact may ask for (resize, crop, input size)
MAX_BATCH = 65536
MAX_TASKS = 256
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # usable as a serving model name and a file stem


def is_engine(path: str | Path) -> bool:
    return Path(path).suffix.lower() in ENGINE_SUFFIXES


def sidecar_path(engine_path: str | Path) -> Path:
    """The JSON that describes an engine: `model.engine` -> `model.engine.json`."""
    engine_path = Path(engine_path)
    if not engine_path.name or engine_path.name in (".", ".."):
        raise ArtifactError(f"{str(engine_path)!r} names no file; pass the engine file")
    return engine_path.with_name(engine_path.name + ".json")


def report_path(artifact: str | Path) -> Path:
    """Where verification writes its JSON report: `model.onnx` -> `model.onnx.verify.json`."""
    artifact = Path(artifact)
    if not artifact.name or artifact.name in (".", ".."):
        raise ArtifactError(f"{str(artifact)!r} names no file; pass the exported model file")
    return artifact.with_name(artifact.name + REPORT_SUFFIX)


def encode_metadata(meta: dict) -> dict[str, str]:
    """Plain dict -> string props, 'vfpt.' prefixed, every value JSON (so decoding is lossless)."""
    return {f"vfpt.{k}": json.dumps(v, allow_nan=False) for k, v in meta.items()}


def decode_metadata(props: dict[str, str]) -> dict:
    """String props -> plain dict (JSON values decoded where they parse); non-vfpt keys dropped."""
    out = {}
    for k, v in props.items():
        if not k.startswith("vfpt."):
            continue
        try:
            out[k[5:]] = json.loads(v)
        except (TypeError, ValueError, RecursionError):  # not JSON, or nested too deep: left as text
            out[k[5:]] = v
    return out


@dataclass(frozen=True)
class GraphFacts:
    """What an ONNX file's graph itself says, read without its external weights."""

    metadata: dict  # decoded vfpt.* props (of a key given twice, the last: what onnxruntime reads)
    precision: str  # "int8" if it has quantization ops, else "fp16" if it computes in half anywhere, else "fp32"
    ops: frozenset  # top-level op types
    duplicate_keys: tuple = ()  # (key, count) of each metadata_props key given more than once
    task_rows: frozenset = frozenset()  # rows of the constant tables the `task` input indexes: the graph's task count


def load_onnx(path: str | Path, *, strict: bool = True):
    """An ONNX file's ModelProto without its external weights (the graph, metadata and initializer
    headers only). Unreadable, or no graph at all: ArtifactError, or None when not strict (the caller then
    leaves the verdict to onnxruntime); None too without the onnx package."""
    try:
        import onnx
    except ImportError:
        if strict:
            raise ArtifactError("reading an ONNX graph needs the onnx package (pip install onnx)") from None
        return None
    if not regular_file(path):  # never open a FIFO or device: reading one blocks or never ends
        if not strict:
            return None
        raise ArtifactError(f"ONNX model {path} {not_a_file(path, 'pass an exported .onnx')}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        if not strict:
            return None
        raise ArtifactError(f"{path} is not a readable ONNX model ({str(e).strip()[:120]})") from None
    if strict and not model.graph.node and not model.graph.input:  # protobuf parses an empty file, too
        raise ArtifactError(f"{path} is not an ONNX model (it holds no graph); pass an exported .onnx")
    return model


def op_histogram(model) -> Counter:
    """Op types of the whole graph, subgraphs included (a non-default domain as 'domain::Op')."""
    ops: Counter = Counter()

    def walk(graph):
        for node in graph.node:
            op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            ops[op] += 1
            for attr in node.attribute:
                if attr.g.node:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    return ops


def graph_facts(model) -> GraphFacts:
    """Metadata, precision and top-level ops of a loaded ModelProto."""
    import onnx

    g, half = model.graph, onnx.TensorProto.FLOAT16
    typed_half = (any(i.type.tensor_type.elem_type == half for i in g.input)
                  or any(t.data_type == half for t in g.initializer)
                  or any(a.name == "to" and a.i == half for n in g.node if n.op_type == "Cast" for a in n.attribute)
                  or any(a.t.data_type == half for n in g.node if n.op_type == "Constant" for a in n.attribute if a.t))
    keys = Counter(p.key for p in model.metadata_props)
    return GraphFacts(decode_metadata({p.key: p.value for p in model.metadata_props}),
                      "int8" if any(n.op_type in QUANT_OPS for n in g.node) else "fp16" if typed_half else "fp32",
                      frozenset(n.op_type for n in g.node),
                      tuple((k, n) for k, n in keys.items() if n > 1), _task_rows(g))


def _task_rows(g) -> frozenset:
    """The first dimension of every constant table a Gather (axis 0) indexes with the `task` input: one row
    per task in a multi-task export (multitask.py: head columns, class mask, prompt rows)."""
    dims = {t.name: t.dims for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.output:
            dims.update({n.output[0]: a.t.dims for a in n.attribute if a.name == "value"})
    rows = set()
    for n in g.node:
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        if n.op_type == "Gather" and list(n.input)[1:2] == [TASK_INPUT] and axis == 0 and len(dims.get(n.input[0], ())):
            rows.add(int(dims[n.input[0]][0]))
    return frozenset(rows)


def graph_problems(facts: GraphFacts, meta: dict, inputs: list[str], output_width) -> list[str]:
    """Where an ONNX file's (checked) metadata contradicts its own graph, one sentence each: a metadata key
    given twice (the ONNX checker refuses it; readers disagree on which counts), logits narrower or wider than
    the classes named, tasks listed that the graph's task tables do not hold (or the reverse). inspect shows
    them; the runtime refuses the file on the first."""
    out = [f"metadata key {_shown(k)} is given {n} times (the ONNX checker refuses duplicates; readers disagree "
           "on which one counts)" for k, n in facts.duplicate_keys]
    tasks = meta.get("tasks") or []
    want = output_classes(meta)
    if isinstance(output_width, int) and output_width != want:
        what = "its widest task has" if tasks else "the metadata names"
        out.append(f"the model outputs {output_width} logits but {what} {want} classes")
    if tasks and TASK_INPUT not in inputs:
        out.append(f"the metadata lists {len(tasks)} tasks but the graph has no '{TASK_INPUT}' input")
    elif TASK_INPUT in inputs and not tasks:
        out.append(f"the graph takes a '{TASK_INPUT}' input but the metadata lists no tasks")
    if tasks and facts.task_rows and facts.task_rows != {len(tasks)}:
        rows = " or ".join(map(str, sorted(facts.task_rows)))
        out.append(f"the metadata lists {len(tasks)} tasks but the graph's task tables hold {rows}")
    return out


def read_graph(path: str | Path, *, strict: bool = True) -> GraphFacts | None:
    """Parse an ONNX file once for its metadata, precision and ops. Unreadable: ArtifactError, or None
    when not strict (the caller then leaves the verdict to onnxruntime); None too without the onnx package.
    The initializers' data is skipped while reading (graph_facts needs their names, types and shapes only):
    parsing a 343 MB ViT-B file whole held the file's bytes and the parsed copy at once, a peak above the
    onnxruntime session's own (docs/serving.md, "Prompt packs"). A file the skipping reader cannot walk is
    parsed whole, as before, for the same verdict."""
    model = _load_without_weights(path)
    if model is None:
        model = load_onnx(path, strict=strict)
    elif strict and not model.graph.node and not model.graph.input:
        raise ArtifactError(f"{path} is not an ONNX model (it holds no graph); pass an exported .onnx")
    return None if model is None else graph_facts(model)


_TENSOR_DATA_FIELDS = frozenset({4, 5, 6, 7, 9, 10, 11})  # TensorProto float/int32/string/int64/raw/double/uint64 data


def _varint(f) -> int | None:
    """One protobuf varint from f; None at a clean end of file."""
    out = shift = 0
    while True:
        b = f.read(1)
        if not b:
            if shift:
                raise ValueError("truncated varint")
            return None
        out |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return out
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _enc_varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _copy_fields(f, end: int | None, strip) -> bytes:
    """The protobuf fields of f up to offset `end` (None: end of file) re-encoded, where strip(field) says what
    to do with a length-delimited field: None copy it, 'drop' skip its bytes unread, a function re-encode it."""
    out = bytearray()
    while end is None or f.tell() < end:
        start = f.tell()
        tag = _varint(f)
        if tag is None:
            if end is not None:
                raise ValueError("truncated message")
            break
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _varint(f)
        elif wire in (1, 5):
            f.seek(8 if wire == 1 else 4, 1)
        elif wire == 2:
            n = _varint(f)
            if n is None:
                raise ValueError("truncated field")
            how = strip(field)
            if how == "drop":
                f.seek(n, 1)
                continue
            if how is not None:
                body = how(f, f.tell() + n)
                out += _enc_varint(tag) + _enc_varint(len(body)) + body
                continue
            f.seek(n, 1)
        else:
            raise ValueError(f"wire type {wire}")
        stop = f.tell()
        f.seek(start)
        out += f.read(stop - start)
        if f.tell() != stop:
            raise ValueError("truncated field")
    if end is not None and f.tell() != end:
        raise ValueError("field past its message")
    return bytes(out)


def _load_without_weights(path: str | Path):
    """The ModelProto of an ONNX file with every initializer's data left out (names, types, dims kept), read
    without loading that data; None when onnx is missing or the file is not one this reader can walk."""
    try:
        import onnx
    except ImportError:
        return None
    if not regular_file(path):
        return None
    tensor = lambda f, end: _copy_fields(f, end, lambda k: "drop" if k in _TENSOR_DATA_FIELDS else None)  # noqa: E731
    graph = lambda f, end: _copy_fields(f, end, lambda k: tensor if k == 5 else None)  # noqa: E731
    try:
        with open(path, "rb", buffering=1 << 16) as f:
            size = f.seek(0, 2)
            f.seek(0)
            data = _copy_fields(f, None, lambda k: graph if k == 7 else None)
            if f.tell() != size:
                return None
        return onnx.load_model_from_string(data)
    except Exception:  # noqa: BLE001 - the whole parse decides (and words) the verdict
        return None


# -- checks ------------------------------------------------------------------------------------------
def _int(v, what: str, lo: int, hi: int, source: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ArtifactError(f"{source}: {what} must be an integer in [{lo}, {hi}], got {_shown(v)}; re-export the artifact")
    return v


def _shown(v) -> str:
    """A metadata value in an error message: its repr, cut short (a crafted file may hold megabytes)."""
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _str(v, what: str, source: str, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(v, str) or (choices is not None and v not in choices):
        want = f"one of {', '.join(choices)}" if choices else "a string"
        raise ArtifactError(f"{source}: {what} must be {want}, got {_shown(v)}; re-export the artifact")
    return v


def check_metadata(meta: dict, source: str, input_shape: list | tuple | None = None) -> dict:
    """What a runtime needs from an artifact's metadata, checked: class names, preprocessing (sizes
    bounded), precision, fold and, where the input shape is known, that preprocessing makes that shape.
    Returns the metadata with `preprocess` as a Preprocess."""
    from vfpt_deploy.artifacts.preprocess import Preprocess

    if not isinstance(meta, dict) or "preprocess" not in meta:
        raise ArtifactError(f"{source} has no vfpt-deploy metadata (vfpt.preprocess); export it with 'vfpt-deploy export'")
    refuse_pack_backbone(meta, source)
    if "tasks" in meta:
        check_tasks(meta["tasks"], source)
    else:
        _check_classes(meta.get("classes"), "classes", source)
    try:
        pre = Preprocess.from_dict(meta["preprocess"])
    except VFPTError as e:
        raise ArtifactError(f"{source}: {e}") from None
    out = {**meta, "preprocess": pre}
    out["precision"] = _str(meta.get("precision", "fp32"), "precision", source, PRECISIONS)
    _str(meta.get("format", ARTIFACT_FORMAT), "format", source, (ARTIFACT_FORMAT,))
    if "image_size" in meta and meta["image_size"] != list(pre.size):
        raise ArtifactError(f"{source}: image_size {meta['image_size']!r} is not what the preprocessing makes "
                            f"({list(pre.size)}); re-export the artifact")
    if "fold" in meta:
        _str(meta["fold"], "fold", source, FOLDS)
    if meta.get("quantization") is not None:
        q = meta["quantization"]
        if not isinstance(q, dict):
            raise ArtifactError(f"{source}: quantization must be an object; re-export the artifact")
        _str(q.get("mode"), "quantization.mode", source, QUANTIZE_MODES)
    if "opset" in meta:
        _int(meta["opset"], "opset", 1, 1000, source)
    if "checkpoint_sha256" in meta:
        sha = meta["checkpoint_sha256"]
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}|", sha):
            raise ArtifactError(f"{source}: checkpoint_sha256 must be a sha256 hex digest, got {sha!r}")
    if input_shape is not None:
        hw = tuple(input_shape[-2:])
        if len(input_shape) != 4 or hw != pre.size:
            raise ArtifactError(f"{source}: preprocessing makes {list(pre.size)} images but the model input is "
                                f"{list(input_shape)}; the metadata does not belong to this model: re-export it")
    return out


def refuse_pack_backbone(meta: dict, source: str) -> None:
    """A backbone artifact for prompt packs (artifacts/pack.py) classifies nothing alone: say what it needs."""
    if isinstance(meta, dict) and "pack_backbone" in meta and "classes" not in meta and "tasks" not in meta:
        raise ArtifactError(f"{source} is a backbone artifact for prompt packs: it classifies nothing alone; pass the "
                            "pack to run on it with --pack NAME.pack.safetensors (serve: --packs DIR)")


def _check_classes(classes, what: str, source: str) -> list:
    if (not isinstance(classes, list) or not 1 <= len(classes) <= MAX_CLASSES
            or not all(isinstance(c, str) for c in classes)):
        raise ArtifactError(f"{source}: {what} must be a non-empty list of names; re-export the artifact")
    return classes


def check_tasks(tasks, source: str) -> list[dict]:
    """A multi-task artifact's task list: 1..MAX_TASKS objects with a unique, name-safe `name` and
    non-empty `classes`."""
    if not isinstance(tasks, list) or not 1 <= len(tasks) <= MAX_TASKS:
        raise ArtifactError(f"{source}: tasks must be a list of 1 to {MAX_TASKS} tasks; re-export the artifact")
    seen = set()
    for i, t in enumerate(tasks):
        name = t.get("name") if isinstance(t, dict) else None
        if not isinstance(name, str) or not TASK_NAME.fullmatch(name) or name.lower() in seen:
            raise ArtifactError(f"{source}: task {i} needs a unique name (ignoring case) of letters, digits, '_', "
                                f"'.', '-', got {str(name)[:80]!r}; re-export the artifact")
        seen.add(name.lower())
        _check_classes(t.get("classes"), f"task {name!r} classes", source)
        if "num_prompts" in t:
            _int(t["num_prompts"], f"task {name!r} num_prompts", 0, 100_000, source)
        if "fold" in t:
            _str(t["fold"], f"task {name!r} fold", source, ("tokens", "kv"))
        sha = t.get("checkpoint_sha256", "")
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}|", sha):
            raise ArtifactError(f"{source}: task {name!r} checkpoint_sha256 must be a sha256 hex digest; re-export it")
    return tasks


def artifact_tasks(artifact: str | Path) -> list[dict]:
    """The tasks an exported artifact records (an ONNX file's metadata, or an engine's sidecar), checked;
    [] for a single-task artifact. Reads the graph or sidecar only: no session, no engine."""
    if is_engine(artifact):
        meta = read_sidecar(artifact)["metadata"]
    else:
        meta = read_graph(artifact).metadata
    return check_tasks(meta["tasks"], str(artifact)) if "tasks" in meta else []


def task_names(meta: dict) -> list[str]:
    """The tasks of a (checked) multi-task artifact in index order; [] for a single-task one."""
    return [t["name"] for t in meta.get("tasks") or []]


def output_classes(meta: dict) -> int:
    """How wide the logits of a (checked) artifact are: its classes, or its widest task's."""
    if meta.get("tasks"):
        return max(len(t["classes"]) for t in meta["tasks"])
    return len(meta["classes"])


def check_output_width(num_outputs, meta: dict, source: str) -> None:
    """The logits width must match the class names the (checked) metadata gives."""
    want = output_classes(meta)
    if isinstance(num_outputs, int) and num_outputs != want:
        what = "its widest task has" if meta.get("tasks") else "the metadata names"
        raise ArtifactError(f"{source}: the model outputs {num_outputs} logits but {what} {want} classes; "
                            "re-export the artifact")


def read_sidecar(engine_path: str | Path) -> dict:
    """The engine's JSON sidecar, checked for shape; one-line errors for every way it can be wrong."""
    engine_path = Path(engine_path)
    if not regular_file(engine_path):
        raise ArtifactError(f"engine {engine_path} {not_a_file(engine_path, 'build one with ' + repr('vfpt-deploy export --format trt'))}")
    side = sidecar_path(engine_path)
    if not regular_file(side):
        raise ArtifactError(f"engine {engine_path} has no sidecar {side.name} (it holds the TensorRT version, GPU, "
                        "classes and preprocessing); rebuild the engine with 'vfpt-deploy export --format trt'")
    return check_sidecar(read_json(side, "sidecar", "rebuild the engine", ArtifactError), str(side))


def _profile_dims(v, source: str) -> list[int]:
    if not isinstance(v, list) or len(v) != 4:
        raise ArtifactError(f"{source}: profile shapes must be [batch, 3, H, W], got {v!r}; rebuild the engine")
    _int(v[0], "profile batch", 1, MAX_BATCH, source)
    for d in v[1:]:
        _int(d, "profile image dimension", 1, MAX_SIDE, source)
    return v


def check_sidecar(side: dict, source: str) -> dict:
    """An engine sidecar, every field the runtime reads checked for type and range."""
    if not isinstance(side, dict) or side.get("format") != SIDECAR_FORMAT:
        raise ArtifactError(f"{source} is not a vfpt-deploy engine sidecar (format {SIDECAR_FORMAT!r} expected)")
    version = side.get("version")
    _int(version, "sidecar version", 1, 1_000_000, source)
    if version > SIDECAR_VERSION and isinstance(side.get("profile"), dict) and "ranges" in side["profile"]:
        raise ArtifactError(f"{source} describes a prompt-pack backbone engine, which vfpt-deploy cannot run yet "
                            "(docs/tensorrt.md); serve its backbone .onnx with --packs instead")
    if version > SIDECAR_VERSION:
        raise ArtifactError(f"{source} has sidecar version {version}; this vfpt-deploy reads up to "
                            f"{SIDECAR_VERSION}: upgrade vfpt-deploy")
    for key in ("tensorrt", "build", "profile", "metadata", "engine"):
        if not isinstance(side.get(key), dict):
            raise ArtifactError(f"sidecar {source} lacks '{key}' (or it is not an object); rebuild the engine")
    trt, build, engine = side["tensorrt"], side["build"], side["engine"]
    _str(trt.get("flavor", "trt"), "tensorrt.flavor", source, TRT_FLAVORS)
    _str(trt.get("module"), "tensorrt.module", source)
    if not re.fullmatch(r"\d+(\.\d+){0,3}", str(trt.get("version")) if isinstance(trt.get("version"), str) else ""):
        raise ArtifactError(f"{source}: tensorrt.version must be a version string like '10.3.0', got "
                            f"{trt.get('version')!r}; rebuild the engine")
    for flag in ("version_compatible",):
        if not isinstance(build.get(flag, False), bool):
            raise ArtifactError(f"{source}: build.{flag} must be true or false; rebuild the engine")
    _str(build.get("hardware_compatibility", "none"), "build.hardware_compatibility", source, ("none", "ampere_plus"))
    ccs = build.get("compute_capabilities", [])
    if not isinstance(ccs, list) or not all(isinstance(c, str) and re.fullmatch(r"\d+\.\d+", c) for c in ccs):
        raise ArtifactError(f"{source}: build.compute_capabilities must be a list like ['8.6']; rebuild the engine")
    gpu = side.get("gpu")
    if gpu is not None and (not isinstance(gpu, dict) or not isinstance(gpu.get("name", ""), str)
                            or not re.fullmatch(r"\d+\.\d+", str(gpu.get("compute_capability", "0.0")))):
        raise ArtifactError(f"{source}: gpu must be null or {{name, compute_capability}}; rebuild the engine")
    sha = engine.get("sha256")
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise ArtifactError(f"{source}: engine.sha256 must be a sha256 hex digest; rebuild the engine")
    prof = side["profile"]
    mins, opts, maxs = (_profile_dims(prof.get(k), source) for k in ("min", "opt", "max"))
    if not mins[0] <= opts[0] <= maxs[0] or mins[1:] != maxs[1:] or opts[1:] != maxs[1:]:
        raise ArtifactError(f"{source}: profile min/opt/max are inconsistent ({mins}, {opts}, {maxs}); rebuild the engine")
    check_metadata(side["metadata"], source, maxs)
    _check_task_profile(side, [mins[0], opts[0], maxs[0]], source)
    return side


def _check_task_profile(side: dict, batches: list[int], source: str) -> None:
    """A multi-task engine (metadata `tasks`) records its second input as profile.task = {input 'task',
    dtype, min/opt/max [batch]} with the images' batches; a single-task one records none."""
    task, multi = side["profile"].get("task"), "tasks" in side["metadata"]
    if task is None and not multi:
        return
    if task is None or not multi:
        why = "lists tasks but the profile has no task input" if multi else "lists no tasks but the profile has one"
        raise ArtifactError(f"{source}: the metadata {why}; rebuild the engine")
    if (not isinstance(task, dict) or task.get("input") != TASK_INPUT or task.get("dtype") not in TASK_DTYPES
            or [task.get(k) for k in ("min", "opt", "max")] != [[b] for b in batches]):
        raise ArtifactError(f"{source}: profile.task must be {{input '{TASK_INPUT}', dtype {' or '.join(TASK_DTYPES)}, "
                            f"min/opt/max [batch] as the images'}}, got {str(task)[:120]}; rebuild the engine")
