"""ONNX -> serialized TensorRT engine + JSON sidecar, for TensorRT ("trt") and TensorRT-RTX ("trt-rtx").

Both flavors share one code path; where they differ it is spelled out:
- Precision. TensorRT 10 builds weakly typed networks and lowers an fp32 ONNX to fp16 with
  BuilderFlag.FP16. TensorRT 11 removed that flag and TensorRT-RTX never had it: networks are strongly
  typed, so an fp16 engine needs an fp16 ONNX. We detect the flag, not a version number, and refuse a
  request the installed TensorRT cannot honour. fp32 means fp32: TF32 is switched off, as Polygraphy does.
- Build-time tuning. TensorRT times kernels on the build GPU (so its builder needs one) and can keep those
  timings in a timing cache. TensorRT-RTX compiles ahead of time without a GPU and tunes at run time: it
  has no timing cache, and targets compute capabilities (default 8.0/8.6/8.9/12.0) instead of a GPU.

The sidecar (`<engine>.json`) carries what an engine cannot: the TensorRT version and GPU it is valid
for, the batch profile, precision, the source ONNX and checkpoint sha256, and the artifact metadata
(class names, preprocessing, ...) that vfpt_deploy.runtime.tensorrt_runner needs to serve it.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from vfpt_deploy import __version__
from vfpt_deploy.errors import VFPTError
from vfpt_deploy.files import atomic_write, dumps_json, file_sha256
from vfpt_deploy.runtime.tensorrt_runner import FLAVORS, CudaDevice, import_tensorrt
from vfpt_deploy.schema import (ARTIFACT_FORMAT, INPUT_NAME, OUTPUT_NAME, SIDECAR_FORMAT, SIDECAR_VERSION,
                                decode_metadata, sidecar_path)

PRECISIONS = ("fp32", "fp16")
OPT_LEVELS = range(0, 6)  # TensorRT's builder optimization levels; 3 is its default
RTX_COMPUTE_CAPABILITIES = {"7.5": "SM75", "8.0": "SM80", "8.6": "SM86", "8.9": "SM89", "12.0": "SM120", "12.1": "SM121"}


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


def builder_gpu() -> CudaDevice | None:
    """The GPU this process would build on (via torch, which the exporting side has), or None."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return CudaDevice(0, torch.cuda.get_device_name(0), f"{major}.{minor}")


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
        module, hint = FLAVORS[flavor] if flavor in FLAVORS else (None, None)
        if module is None:
            raise
        missing.append((f"TensorRT{'-RTX' if flavor == 'trt-rtx' else ''} (Python module '{module}')", f"install {hint}"))
    if need_gpu and builder_gpu() is None:
        missing.append(("a CUDA GPU", "run on a machine with an NVIDIA GPU and driver"))
    if missing:
        what = " and ".join(m for m, _ in missing)
        fix = "; ".join(f for _, f in missing)
        alt = " (or --format trt-rtx, whose builder needs no GPU)" if flavor == "trt" else ""
        raise VFPTError(f"--format {flavor} needs {what}, not found here; {fix}{alt}")
    return trt


def onnx_summary(onnx_path: Path) -> tuple[dict, str]:
    """(decoded vfpt metadata, "fp16" if the graph itself is typed fp16 else "fp32"), weights left on disk."""
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:
        raise VFPTError(f"{onnx_path} is not a readable ONNX model ({str(e).strip()[:120]})") from None
    meta = decode_metadata({p.key: p.value for p in model.metadata_props})
    half = onnx.TensorProto.FLOAT16
    g = model.graph
    typed_half = (any(i.type.tensor_type.elem_type == half for i in g.input)
                  or any(t.data_type == half for t in g.initializer)
                  or any(a.name == "to" and a.i == half for n in g.node if n.op_type == "Cast" for a in n.attribute)
                  or any(a.t.data_type == half for n in g.node if n.op_type == "Constant" for a in n.attribute if a.t))
    return meta, ("fp16" if typed_half else "fp32")


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


def _profile(trt_input_shape, batch, min_batch, opt_batch, max_batch) -> tuple[list, list, list]:
    dims = list(trt_input_shape)
    if len(dims) != 4 or any(d < 0 for d in dims[1:]):
        raise VFPTError(f"ONNX input '{INPUT_NAME}' has shape {dims}; TensorRT needs [batch, 3, H, W] with a fixed "
                        "image size: export with a fixed --img-size")
    if batch is not None:
        min_batch = opt_batch = max_batch = batch
    opt_batch = max_batch if opt_batch is None else opt_batch
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise VFPTError(f"batch profile must satisfy 1 <= min <= opt <= max, got min {min_batch}, opt {opt_batch}, "
                        f"max {max_batch}")
    if dims[0] >= 0 and not min_batch == max_batch == dims[0]:
        raise VFPTError(f"the ONNX has a fixed batch of {dims[0]}; build with --batch {dims[0]} or export the ONNX "
                        "with a dynamic batch")
    shape = dims[1:]
    return [min_batch, *shape], [opt_batch, *shape], [max_batch, *shape]


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, flavor: str = "trt", precision: str = "fp32",
                 batch: int | None = None, min_batch: int = 1, opt_batch: int | None = None, max_batch: int = 8,
                 workspace_mb: int | None = None, opt_level: int = 3, timing_cache: str | Path | None = None,
                 version_compatible: bool = False, hardware_compatible: bool = False,
                 compute_capabilities: list[str] | None = None, metadata: dict | None = None,
                 verbose: bool = False) -> EngineResult:
    """Parse `onnx_path` with TensorRT's ONNX parser, build an engine and write it plus its JSON sidecar.

    batch fixes the profile to one batch size; otherwise min/opt/max_batch (opt defaults to max).
    metadata (decoded: classes, preprocess, checkpoint_sha256, ...) defaults to the ONNX's own vfpt metadata.
    compute_capabilities (TensorRT-RTX only) chooses target GPUs, e.g. ["8.6", "8.9"].
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if precision not in PRECISIONS:
        raise VFPTError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if opt_level not in OPT_LEVELS:
        raise VFPTError(f"builder optimization level must be 0..5, got {opt_level}")
    if workspace_mb is not None and workspace_mb <= 0:
        raise VFPTError(f"workspace must be a positive number of MiB, got {workspace_mb}")
    if compute_capabilities and flavor != "trt-rtx":
        raise VFPTError("compute capabilities are a TensorRT-RTX setting; TensorRT builds for the GPU it runs on "
                        "(use --hardware-compatible for any Ampere+ GPU)")
    if version_compatible and flavor == "trt-rtx":
        # Its builder needs TensorRT's lean runtime (libnvinfer_lean) for that, which TensorRT-RTX does not ship.
        raise VFPTError("version-compatible engines are a TensorRT setting; TensorRT-RTX cannot build them "
                        "(drop --version-compatible, or use --format trt)")
    bad = [c for c in compute_capabilities or [] if c not in RTX_COMPUTE_CAPABILITIES]
    if bad:
        raise VFPTError(f"unknown compute capability {bad[0]!r}; TensorRT-RTX targets {', '.join(RTX_COMPUTE_CAPABILITIES)}")
    if not onnx_path.is_file():
        raise VFPTError(f"ONNX file {onnx_path} does not exist; export one with 'vfpt-deploy export --format onnx'")
    trt = check_trt_available(flavor)
    onnx_meta, onnx_precision = onnx_summary(onnx_path)
    meta = {**onnx_meta, **(metadata or {})}
    if "preprocess" not in meta:
        raise VFPTError(f"{onnx_path} carries no vfpt metadata (classes, preprocessing): export it with "
                        "'vfpt-deploy export', or pass metadata")
    notes: list[str] = []

    # Precision: weakly typed + FP16 flag only where the flag exists (TensorRT 10); otherwise the graph decides.
    has_fp16_flag = hasattr(trt.BuilderFlag, "FP16")
    if onnx_precision == "fp16":
        if precision != "fp16":
            raise VFPTError(f"{onnx_path.name} is an fp16 graph; build it with precision fp16, or export an fp32 ONNX")
        strongly_typed = True
    elif precision == "fp16" and not has_fp16_flag:
        raise VFPTError(f"{trt.__name__} {trt.__version__} builds strongly typed networks (no FP16 builder flag): "
                        f"precision comes from the ONNX, and {onnx_path.name} is fp32; export it with --precision fp16")
    else:
        strongly_typed = not has_fp16_flag
    precision_mode = "strongly-typed" if strongly_typed else ("builder-flag" if precision == "fp16" else "weakly-typed")

    logger = _make_logger(trt, verbose)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    t0 = time.perf_counter()
    if not parser.parse_from_file(str(onnx_path)):  # from a file, so external weights (.data) are found
        raise VFPTError(f"TensorRT's ONNX parser ({trt.__name__} {trt.__version__}) rejected {onnx_path.name}: "
                        f"{_parser_errors(parser)}")
    parse_seconds = time.perf_counter() - t0
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    if [t.name for t in inputs] != [INPUT_NAME] or [t.name for t in outputs] != [OUTPUT_NAME]:
        raise VFPTError(f"{onnx_path.name} has inputs {[t.name for t in inputs]} and outputs "
                        f"{[t.name for t in outputs]}; vfpt-deploy engines need '{INPUT_NAME}' -> '{OUTPUT_NAME}'")
    pmin, popt, pmax = _profile(inputs[0].shape, batch, min_batch, opt_batch, max_batch)

    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, pmin, popt, pmax)
    config.add_optimization_profile(profile)
    config.builder_optimization_level = opt_level
    if workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 layers stay fp32 (TensorRT enables TF32 by default)
    if precision_mode == "builder-flag":
        config.set_flag(trt.BuilderFlag.FP16)
        # LayerNorm in fp16 can overflow on ViT activations: ask for fp32 there (a preference, so TensorRT
        # may still pick fp16 where no fp32 kernel exists, and says so in its log).
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type == trt.LayerType.NORMALIZATION:
                layer.precision = trt.DataType.FLOAT
                layer.set_output_type(0, trt.DataType.FLOAT)
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    hardware = "none"
    if hardware_compatible:
        if flavor == "trt-rtx":
            notes.append("hardware_compatible ignored: TensorRT-RTX engines are portable across their compute-"
                         "capability targets by design (choose them with compute_capabilities)")
        else:
            config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
            hardware = "ampere_plus"
    if compute_capabilities:
        config.num_compute_capabilities = len(compute_capabilities)
        for i, cc in enumerate(compute_capabilities):
            config.set_compute_capability(getattr(trt.ComputeCapability, RTX_COMPUTE_CAPABILITIES[cc]), i)

    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache = None
    if cache_path is not None and flavor == "trt-rtx":
        notes.append("timing cache ignored: TensorRT-RTX tunes kernels at run time and has no build timing cache")
        cache_path = None
    elif cache_path is not None:
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            notes.append(f"timing cache {cache_path} is from another GPU or TensorRT version; starting a fresh one")
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, ignore_mismatch=False)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_seconds = time.perf_counter() - t0
    if serialized is None:
        why = "; ".join(e for e in logger.errors[-3:] if e) or "no error details"
        raise VFPTError(f"{trt.__name__} {trt.__version__} failed to build an engine from {onnx_path.name}: {why}")
    blob = memoryview(serialized).cast("B")
    atomic_write(engine_path, lambda tmp: Path(tmp).write_bytes(blob))
    if cache is not None:
        data = memoryview(config.get_timing_cache().serialize()).cast("B")
        atomic_write(cache_path, lambda tmp: Path(tmp).write_bytes(data))

    gpu = builder_gpu()
    meta["format"] = meta.get("format", ARTIFACT_FORMAT)
    meta["precision"] = precision
    sidecar = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "engine": {"file": engine_path.name, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": blob.nbytes},
        "tensorrt": {"flavor": flavor, "module": trt.__name__, "version": trt.__version__},
        "gpu": {"name": gpu.name, "compute_capability": gpu.compute_capability} if gpu else None,
        "precision": precision,
        "profile": {"input": INPUT_NAME, "min": pmin, "opt": popt, "max": pmax},
        "build": {"precision_mode": precision_mode, "tf32": False, "opt_level": opt_level,
                  "workspace_mb": workspace_mb, "version_compatible": version_compatible,
                  "hardware_compatibility": hardware, "compute_capabilities": list(compute_capabilities or []),
                  "timing_cache": str(cache_path) if cache_path else None,
                  "parse_seconds": round(parse_seconds, 3), "build_seconds": round(build_seconds, 3)},
        "onnx": {"file": onnx_path.name, "sha256": file_sha256(onnx_path)},
        "tool_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "metadata": meta,  # the model: classes, preprocess, checkpoint_sha256, config, ... (what predictors read)
    }
    side = sidecar_path(engine_path)
    atomic_write(side, lambda tmp: Path(tmp).write_text(dumps_json(sidecar, indent=2) + "\n"))
    return EngineResult(engine_path, side, sidecar, parse_seconds, build_seconds, notes)
