"""ONNX -> serialized TensorRT engine + JSON sidecar, for TensorRT ("trt") and TensorRT-RTX ("trt-rtx").

Both flavors share one code path; where they differ it is spelled out:
- Precision. TensorRT 10 builds weakly typed networks and lowers an fp32 ONNX to fp16 with
  BuilderFlag.FP16. TensorRT 11 removed that flag and TensorRT-RTX never had it: networks are strongly
  typed, so an fp16 engine needs an fp16 ONNX. We detect the flag, not a version number, and refuse a
  request the installed TensorRT cannot honour. fp32 means fp32: TF32 is switched off, as Polygraphy does.
- Build-time tuning. TensorRT times kernels on the build GPU (so its builder needs one) and can keep those
  timings in a timing cache. TensorRT-RTX compiles ahead of time without a GPU and tunes at run time: it
  has no timing cache, and targets compute capabilities (default 8.0/8.6/8.9/12.0) instead of a GPU.

The build is split Polygraphy-style: BuildSettings (checked once, up front) and one small step per stage
(parse, precision mode, builder config, profile, timing cache, serialize, write sidecar), run in order by
build_engine.

The sidecar (`<engine>.json`) carries what an engine cannot: the TensorRT version and GPU it is valid
for, the batch profile, precision, the source ONNX and checkpoint sha256, and the artifact metadata
(class names, preprocessing, ...) that vfpt_deploy.runtime.tensorrt_runner needs to serve it.

Multi-task ONNX (metadata `tasks`, vfpt_deploy/multitask.py) has a second input `task` (int64 [batch]).
TensorRT >= 10 (and TensorRT-RTX) take int64 I/O natively, so it stays int64: the profile gives it the
same min/opt/max batch as `images`, and the sidecar records it (profile.task, sidecar version 2).

Torch-free at import time (and at build time, unless torch is already loaded and cuda-python is not).
"""
from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vfpt_deploy import __version__
from vfpt_deploy.errors import ArtifactError, InputError, RuntimeSetupError, UsageError, VFPTError
from vfpt_deploy.artifacts.files import (Staging, atomic_write, check_outputs, check_suffix, dumps_json, file_sha256,
                                         not_a_file, regular_file)
from vfpt_deploy.runtime.tensorrt_runner import FLAVORS, CudaDevice, cuda_device, import_tensorrt
from vfpt_deploy.artifacts.schema import (ARTIFACT_FORMAT, ENGINE_SUFFIXES, INPUT_NAME, MAX_BATCH, OUTPUT_NAME, PRECISIONS,
                                SIDECAR_FORMAT, SIDECAR_VERSION, TASK_DTYPES, TASK_INPUT, TRT_FLAVORS, read_graph,
                                sidecar_path)

OPT_LEVELS = range(0, 6)  # TensorRT's builder optimization levels; 3 is its default
MAX_WORKSPACE_MB = 1 << 20  # 1 TiB
RTX_COMPUTE_CAPABILITIES = {"7.5": "SM75", "8.0": "SM80", "8.6": "SM86", "8.9": "SM89", "12.0": "SM120", "12.1": "SM121"}


# -- settings ----------------------------------------------------------------------------------------
def _check_int(value, option: str, lo: int, hi: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise UsageError(f"{option} must be an integer in {lo}..{hi}, got {value!r}; {fix}")


@dataclass(frozen=True)
class BuildSettings:
    """How to build an engine. `batch` fixes the profile to one batch size; otherwise min/opt/max_batch
    (opt defaults to max). compute_capabilities (TensorRT-RTX only) chooses target GPUs, e.g. ("8.6", "8.9").
    Call check() (build_engine does) to refuse, in one line, every invalid value or combination."""

    flavor: str = "trt"
    precision: str = "fp32"
    batch: int | None = None
    min_batch: int = 1
    opt_batch: int | None = None
    max_batch: int = 8
    workspace_mb: int | None = None
    opt_level: int = 3
    timing_cache: Path | None = None
    version_compatible: bool = False
    hardware_compatible: bool = False
    compute_capabilities: tuple[str, ...] = ()
    verbose: bool = False

    def __post_init__(self) -> None:  # normalize what callers may pass as str / list
        if self.timing_cache is not None and not isinstance(self.timing_cache, Path):
            object.__setattr__(self, "timing_cache", Path(self.timing_cache))
        if isinstance(self.compute_capabilities, (list, tuple)):
            object.__setattr__(self, "compute_capabilities", tuple(self.compute_capabilities))

    @property
    def profile_batches(self) -> tuple[int, int, int]:
        """(min, opt, max) batch of the optimization profile, after --batch and the opt default."""
        if self.batch is not None:
            return self.batch, self.batch, self.batch
        return self.min_batch, self.max_batch if self.opt_batch is None else self.opt_batch, self.max_batch

    def check(self) -> "BuildSettings":
        self._check_choices()
        self._check_batches()
        self._check_builder()
        self._check_flavor_options()
        return self

    def _check_choices(self) -> None:
        if self.flavor not in TRT_FLAVORS:
            raise UsageError(f"--format must be one of {', '.join(TRT_FLAVORS)} for an engine, got {self.flavor!r}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}; "
                             "pass --precision fp32, fp16 or int8")
        for name in ("version_compatible", "hardware_compatible", "verbose"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"--{name.replace('_', '-')} is a flag (true or false), got {getattr(self, name)!r}")

    def _check_batches(self) -> None:
        fix = "pick a batch size the GPU can hold"
        if self.batch is not None:
            _check_int(self.batch, "--batch", 1, MAX_BATCH, fix)
        for name in ("min_batch", "max_batch") + (("opt_batch",) if self.opt_batch is not None else ()):
            _check_int(getattr(self, name), f"--{name.replace('_', '-')}", 1, MAX_BATCH, fix)
        lo, opt, hi = self.profile_batches
        if not 1 <= lo <= opt <= hi:
            raise UsageError(f"batch profile must satisfy 1 <= min <= opt <= max, got min {lo}, opt {opt}, max {hi}; "
                             "order --min-batch, --opt-batch and --max-batch")

    def _check_builder(self) -> None:
        if isinstance(self.opt_level, bool) or self.opt_level not in OPT_LEVELS:
            raise UsageError(f"builder optimization level must be 0..5, got {self.opt_level!r}; pass --opt-level 0..5 "
                             "(3 is TensorRT's default)")
        if self.workspace_mb is not None:
            _check_int(self.workspace_mb, "--workspace-mb (the workspace limit, MiB)", 1, MAX_WORKSPACE_MB,
                       "or leave it out to let TensorRT use the GPU's memory")

    def _check_flavor_options(self) -> None:
        if self.compute_capabilities and self.flavor != "trt-rtx":
            raise UsageError("compute capabilities are a TensorRT-RTX setting; TensorRT builds for the GPU it runs "
                             "on (use --hardware-compatible for any Ampere+ GPU)")
        if self.version_compatible and self.flavor == "trt-rtx":
            # Its builder needs TensorRT's lean runtime (libnvinfer_lean) for that, which TensorRT-RTX does not ship.
            raise UsageError("version-compatible engines are a TensorRT setting; TensorRT-RTX cannot build them "
                             "(drop --version-compatible, or use --format trt)")
        bad = [c for c in self.compute_capabilities if c not in RTX_COMPUTE_CAPABILITIES]
        if bad:
            raise UsageError(f"unknown compute capability {bad[0]!r}; TensorRT-RTX targets "
                             f"{', '.join(RTX_COMPUTE_CAPABILITIES)}: pass --compute-capability with one of them")


@dataclass
class EngineResult:
    engine_path: Path
    sidecar_path: Path
    sidecar: dict
    parse_seconds: float
    build_seconds: float
    notes: list[str] = field(default_factory=list)  # settings the flavor ignores, and why

    @property
    def engine_bytes(self) -> int:
        return self.sidecar["engine"]["bytes"]


# -- environment -------------------------------------------------------------------------------------
def builder_gpu() -> CudaDevice | None:
    """The GPU this process would build on, or None. Asks cuda-python (no torch import); where that is not
    installed, asks torch only if the caller already loaded it."""
    try:
        return cuda_device(0)
    except (VFPTError, OSError, RuntimeError):
        pass
    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability(0)
        return CudaDevice(0, torch.cuda.get_device_name(0), f"{major}.{minor}")
    except (AttributeError, RuntimeError):
        return None


def check_trt_available(flavor: str = "trt", *, need_gpu: bool | None = None):
    """Return the TensorRT module for `flavor`, or raise one VFPTError naming everything that is missing.

    need_gpu defaults to True for "trt" (TensorRT's builder times kernels on a GPU) and False for
    "trt-rtx" (its builder compiles ahead of time on the CPU).
    """
    need_gpu = (flavor == "trt") if need_gpu is None else need_gpu
    missing, trt = [], None
    try:
        trt = import_tensorrt(flavor)
    except VFPTError:
        if flavor not in FLAVORS:
            raise
        module, hint = FLAVORS[flavor]
        missing.append((f"TensorRT{'-RTX' if flavor == 'trt-rtx' else ''} (Python module '{module}')", f"install {hint}"))
    if need_gpu and builder_gpu() is None:
        missing.append(("a CUDA GPU", "run on a machine with an NVIDIA GPU and driver"))
    if missing:
        what = " and ".join(m for m, _ in missing)
        fix = "; ".join(f for _, f in missing)
        alt = " (or --format trt-rtx, whose builder needs no GPU)" if flavor == "trt" else ""
        raise RuntimeSetupError(f"--format {flavor} needs {what}, not found here; {fix}{alt}")
    return trt


# -- the source ONNX ---------------------------------------------------------------------------------
def onnx_summary(onnx_path: Path) -> tuple[dict, str]:
    """(decoded vfpt metadata, "fp16" if the graph itself is typed fp16 else "fp32"), weights left on disk."""
    facts = read_graph(onnx_path)
    return facts.metadata, facts.precision


def check_paths(onnx_path: Path, engine_path: Path, settings: BuildSettings) -> None:
    """The engine ends in .engine/.plan, names no input, and the ONNX exists."""
    check_suffix(engine_path, ENGINE_SUFFIXES, "TensorRT engine")
    check_outputs({"--out": engine_path, "sidecar": sidecar_path(engine_path), "--timing-cache": settings.timing_cache},
                  {"the ONNX": onnx_path})
    if not regular_file(onnx_path):
        raise InputError(f"ONNX file {onnx_path} {not_a_file(onnx_path, 'export one with ' + repr('vfpt-deploy export --format onnx'))}")


def source_metadata(onnx_path: Path, metadata: dict | None) -> tuple[dict, str]:
    """(the ONNX's vfpt metadata with `metadata` on top, the graph's own precision)."""
    onnx_meta, onnx_precision = onnx_summary(onnx_path)
    meta = {**onnx_meta, **(metadata or {})}
    if "preprocess" not in meta:
        raise ArtifactError(f"{onnx_path} carries no vfpt metadata (classes, preprocessing): export it with "
                            "'vfpt-deploy export', or pass metadata")
    return meta, onnx_precision


# -- build steps -------------------------------------------------------------------------------------
def precision_mode(trt, precision: str, onnx_precision: str, onnx_name: str) -> str:
    """"strongly-typed" (the graph decides), "builder-flag" (TensorRT 10's FP16 flag) or "weakly-typed".
    The FP16 flag is used only where it exists; a request the installed TensorRT cannot honour is refused."""
    has_fp16_flag = hasattr(trt.BuilderFlag, "FP16")
    if (onnx_precision == "int8") != (precision == "int8"):
        raise UsageError(f"{onnx_name} is a{'n int8' if onnx_precision == 'int8' else ' float'} graph; build it with "
                         f"precision {'int8' if onnx_precision == 'int8' else 'fp32 or fp16'}, or export with "
                         "--precision int8 (the Q/DQ nodes in the ONNX carry the int8 precision)")
    if onnx_precision == "int8":  # explicit Q/DQ: the graph decides every layer's precision
        return "strongly-typed"
    if onnx_precision == "fp16":
        if precision != "fp16":
            raise UsageError(f"{onnx_name} is an fp16 graph; build it with precision fp16, or export an fp32 ONNX")
        return "strongly-typed"
    if precision == "fp16" and not has_fp16_flag:
        raise UsageError(f"{trt.__name__} {trt.__version__} builds strongly typed networks (no FP16 builder flag): "
                         f"precision comes from the ONNX, and {onnx_name} is fp32; export it with --precision fp16")
    if not has_fp16_flag:
        return "strongly-typed"
    return "builder-flag" if precision == "fp16" else "weakly-typed"


def _make_logger(trt, verbose: bool):
    """A TensorRT logger that keeps errors (for one-line messages) and prints only when verbose."""

    tag = trt.__name__

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg).strip().splitlines()[0] if str(msg).strip() else "")
            if verbose and severity <= trt.ILogger.Severity.WARNING:
                print(f"[{tag}] {msg}")

    return Logger()


def _parser_errors(parser) -> str:
    """Every parser error, one per node: `node 12 '/blocks.0/DFT' (DFT): No importer registered ...`."""
    out = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        desc = str(e.desc()).strip().splitlines()[0] if str(e.desc()).strip() else str(e.code())
        if "Plugin not found" in desc:  # the parser's last resort for an op it has no importer for
            desc = "unsupported op (no TensorRT importer or plugin for it)"
            if e.node_operator() in ("DFT", "STFT"):
                desc += "; TensorRT has no FFT: export with the prompts folded (--fold tokens or kv)"
        where = f"node {e.node()} '{e.node_name()}' ({e.node_operator()}): " if e.node() >= 0 else ""
        out.append(where + desc)
    return "; ".join(out) or "no error details"


@dataclass
class ParsedNetwork:
    """A parsed ONNX: the parser owns the weights the network points at, so they live (and die) together."""

    logger: object
    builder: object
    network: object
    parser: object
    seconds: float


def input_names(meta: dict) -> list[str]:
    """The inputs an artifact's graph takes: `images`, and `task` for a multi-task one."""
    return [INPUT_NAME, TASK_INPUT] if "tasks" in meta else [INPUT_NAME]


def parse(trt, onnx_path: Path, strongly_typed: bool, verbose: bool,
          inputs: tuple[str, ...] | list[str] = (INPUT_NAME,)) -> ParsedNetwork:
    """TensorRT's ONNX parser on the file (so external weights are found); one-line errors per node.
    `inputs`: the input names the graph must have, in order (input_names of its metadata)."""
    logger = _make_logger(trt, verbose)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    t0 = time.perf_counter()
    if not parser.parse_from_file(str(onnx_path)):
        raise ArtifactError(f"TensorRT's ONNX parser ({trt.__name__} {trt.__version__}) rejected {onnx_path.name}: "
                            f"{_parser_errors(parser)}")
    parsed = ParsedNetwork(logger, builder, network, parser, time.perf_counter() - t0)
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    if names != list(inputs) or outputs != [OUTPUT_NAME]:
        raise ArtifactError(f"{onnx_path.name} has inputs {names} and outputs {outputs}; its metadata says "
                            f"{list(inputs)} -> ['{OUTPUT_NAME}']: re-export it with 'vfpt-deploy export'")
    return parsed


def task_dtype(trt, network) -> str | None:
    """The numpy dtype name TensorRT gives the `task` input ('int64'), None without one; a task input of
    another type or rank is refused (the runtime binds int indices [batch])."""
    tensors = [network.get_input(i) for i in range(network.num_inputs)]
    task = next((t for t in tensors if t.name == TASK_INPUT), None)
    if task is None:
        return None
    dtype = np.dtype(trt.nptype(task.dtype)).name
    if dtype not in TASK_DTYPES or len(task.shape) != 1:
        raise ArtifactError(f"TensorRT reads input '{TASK_INPUT}' as {dtype} {list(task.shape)}; vfpt-deploy "
                            "multi-task graphs take int64 [batch]: re-export it with 'vfpt-deploy export'")
    return dtype


def profile_shapes(trt_input_shape, settings: BuildSettings) -> tuple[list, list, list]:
    """[min, opt, max] input shapes from the (checked) settings and the ONNX input's shape."""
    dims = list(trt_input_shape)
    if len(dims) != 4 or any(d < 0 for d in dims[1:]):
        raise ArtifactError(f"ONNX input '{INPUT_NAME}' has shape {dims}; TensorRT needs [batch, 3, H, W] with a "
                            "fixed image size: export with a fixed --img-size")
    min_batch, opt_batch, max_batch = settings.profile_batches
    if dims[0] >= 0 and not min_batch == max_batch == dims[0]:
        raise UsageError(f"the ONNX has a fixed batch of {dims[0]}; build with --batch {dims[0]} or export the ONNX "
                         "with a dynamic batch")
    shape = dims[1:]
    return [min_batch, *shape], [opt_batch, *shape], [max_batch, *shape]


def add_profile(parsed: ParsedNetwork, config, settings: BuildSettings, tasks: bool = False,
                extra: dict | None = None) -> tuple[list, list, list]:
    """One optimization profile: `images` [batch, 3, H, W] and, for a multi-task graph, `task` [batch] over the
    same batches (every dynamic input needs its range in the profile), plus `extra` {input: {min, opt, max}}
    (a backbone artifact's tables: tensorrt_pack.py). Returns the images' shapes."""
    shapes = profile_shapes(parsed.network.get_input(0).shape, settings)
    profile = parsed.builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, *shapes)
    if tasks:
        profile.set_shape(TASK_INPUT, *[s[:1] for s in shapes])
    for name, t in (extra or {}).items():
        profile.set_shape(name, t["min"], t["opt"], t["max"])
    config.add_optimization_profile(profile)
    return shapes


def _keep_norms_fp32(trt, config, network) -> None:
    """FP16 flag on; LayerNorm in fp16 can overflow on ViT activations, so ask for fp32 there (a preference:
    TensorRT may still pick fp16 where no fp32 kernel exists, and says so in its log)."""
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.NORMALIZATION:
            layer.precision = trt.DataType.FLOAT
            layer.set_output_type(0, trt.DataType.FLOAT)


def builder_config(trt, parsed: ParsedNetwork, settings: BuildSettings, mode: str, notes: list[str]):
    """(builder config, hardware compatibility written to the sidecar): optimization level, workspace,
    no TF32, fp16 where asked, version/hardware compatibility and RTX compute-capability targets."""
    config = parsed.builder.create_builder_config()
    config.builder_optimization_level = settings.opt_level
    if settings.workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_mb) << 20)
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 layers stay fp32 (TensorRT enables TF32 by default)
    if mode == "builder-flag":
        _keep_norms_fp32(trt, config, parsed.network)
    if settings.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    hardware = "none"
    if settings.hardware_compatible and settings.flavor == "trt-rtx":
        notes.append("hardware_compatible ignored: TensorRT-RTX engines are portable across their compute-"
                     "capability targets by design (choose them with compute_capabilities)")
    elif settings.hardware_compatible:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
        hardware = "ampere_plus"
    if settings.compute_capabilities:
        config.num_compute_capabilities = len(settings.compute_capabilities)
        for i, cc in enumerate(settings.compute_capabilities):
            config.set_compute_capability(getattr(trt.ComputeCapability, RTX_COMPUTE_CAPABILITIES[cc]), i)
    return config, hardware


def attach_timing_cache(config, settings: BuildSettings, notes: list[str]):
    """The timing cache to update after the build (read from settings.timing_cache), or None."""
    path = settings.timing_cache
    if path is None:
        return None
    if settings.flavor == "trt-rtx":
        notes.append("timing cache ignored: TensorRT-RTX tunes kernels at run time and has no build timing cache")
        return None
    try:
        data = path.read_bytes() if path.is_file() else b""
    except OSError as e:
        raise InputError(f"--timing-cache {path} is not readable ({e.strerror}); pass a readable file") from None
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        notes.append(f"timing cache {path} is from another GPU or TensorRT version; starting a fresh one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def serialize(trt, parsed: ParsedNetwork, config, onnx_name: str) -> tuple[memoryview, float]:
    """(the serialized engine as bytes, build seconds), or the builder's last errors in one line."""
    t0 = time.perf_counter()
    serialized = parsed.builder.build_serialized_network(parsed.network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        why = "; ".join(e for e in parsed.logger.errors[-3:] if e) or "no error details"
        raise ArtifactError(f"{trt.__name__} {trt.__version__} failed to build an engine from {onnx_name}: {why}")
    return memoryview(serialized).cast("B"), seconds


def profile_dict(shapes: tuple[list, list, list], task: str | None) -> dict:
    """The sidecar's profile: the images' shapes, and a multi-task engine's `task` input with its dtype."""
    out = {"input": INPUT_NAME, **dict(zip(("min", "opt", "max"), shapes))}
    if task is not None:
        out["task"] = {"input": TASK_INPUT, "dtype": task, **{k: v[:1] for k, v in zip(("min", "opt", "max"), shapes)}}
    return out


def sidecar_dict(trt, settings: BuildSettings, *, blob: memoryview, engine_path: Path, onnx_path: Path, meta: dict,
                 profile: dict, mode: str, hardware: str, seconds: tuple[float, float]) -> dict:
    """What the runtime needs to check and serve the engine (schema.check_sidecar reads it back)."""
    gpu = builder_gpu()
    meta = {**meta, "format": meta.get("format", ARTIFACT_FORMAT), "precision": settings.precision}
    cache = settings.timing_cache if settings.flavor != "trt-rtx" else None
    return {
        "format": SIDECAR_FORMAT,
        # The oldest sidecar version that describes this engine, so older readers still load single-task ones.
        "version": SIDECAR_VERSION if "task" in profile else 1,
        "engine": {"file": engine_path.name, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": blob.nbytes},
        "tensorrt": {"flavor": settings.flavor, "module": trt.__name__, "version": trt.__version__},
        "gpu": {"name": gpu.name, "compute_capability": gpu.compute_capability} if gpu else None,
        "precision": settings.precision,
        "profile": profile,
        "build": {"precision_mode": mode, "tf32": False, "opt_level": settings.opt_level,
                  "workspace_mb": settings.workspace_mb, "version_compatible": settings.version_compatible,
                  "hardware_compatibility": hardware, "compute_capabilities": list(settings.compute_capabilities),
                  "timing_cache": str(cache) if cache else None,
                  "parse_seconds": round(seconds[0], 3), "build_seconds": round(seconds[1], 3)},
        "onnx": {"file": onnx_path.name, "sha256": file_sha256(onnx_path)},
        "tool_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "metadata": meta,  # the model: classes, preprocess, checkpoint_sha256, config, ... (what predictors read)
    }


def write_outputs(engine_path: Path, blob: memoryview, sidecar: dict, config, cache, settings: BuildSettings) -> Path:
    """Engine and sidecar staged together and moved into place; then the updated timing cache. Returns the
    sidecar's path."""
    side = sidecar_path(engine_path)
    with Staging(engine_path.parent) as stage:
        stage.path(engine_path).write_bytes(blob)
        stage.path(side).write_text(dumps_json(sidecar, indent=2) + "\n")
        stage.commit()
    if cache is not None:
        data = memoryview(config.get_timing_cache().serialize()).cast("B")
        atomic_write(settings.timing_cache, lambda tmp: Path(tmp).write_bytes(data))
    return side


def build_engine(onnx_path: str | Path, engine_path: str | Path, settings: BuildSettings,
                 metadata: dict | None = None) -> EngineResult:
    """Parse `onnx_path` with TensorRT's ONNX parser, build an engine and write it plus its JSON sidecar.

    metadata (decoded: classes, preprocess, checkpoint_sha256, ...) defaults to the ONNX's own vfpt metadata.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    settings.check()
    check_paths(onnx_path, engine_path, settings)
    trt = check_trt_available(settings.flavor)
    meta, onnx_precision = source_metadata(onnx_path, metadata)
    mode = precision_mode(trt, settings.precision, onnx_precision, onnx_path.name)
    notes: list[str] = []
    parsed = parse(trt, onnx_path, mode == "strongly-typed", settings.verbose, input_names(meta))
    task = task_dtype(trt, parsed.network)
    config, hardware = builder_config(trt, parsed, settings, mode, notes)
    shapes = add_profile(parsed, config, settings, tasks=task is not None)
    cache = attach_timing_cache(config, settings, notes)
    blob, build_seconds = serialize(trt, parsed, config, onnx_path.name)
    sidecar = sidecar_dict(trt, settings, blob=blob, engine_path=engine_path, onnx_path=onnx_path, meta=meta,
                           profile=profile_dict(shapes, task), mode=mode, hardware=hardware,
                           seconds=(parsed.seconds, build_seconds))
    side = write_outputs(engine_path, blob, sidecar, config, cache, settings)
    return EngineResult(engine_path, side, sidecar, parsed.seconds, build_seconds, notes)
