"""INT8 post-training quantization of an exported fp32 ONNX, with onnxruntime.quantization (no hand-written
quantizer) or, for TensorRT, NVIDIA ModelOpt's ONNX PTQ.

Modes (QUANTIZE_MODES):
  dynamic   weights int8 per channel, activations quantized at run time (onnxruntime only: MatMulInteger /
            DynamicQuantizeMatMul ops). Needs no data.
  static    Q/DQ with calibrated activation ranges. For onnxruntime: uint8 activations, int8 per-channel
            weights on the linear layers. For TensorRT (--format trt/trt-rtx): the profile TensorRT parses
            (symmetric int8 activations and weights, float biases, Q/DQ only around MatMul/Gemm/Conv).

The same model on every x86-64 CPU: onnxruntime multiplies uint8 activations by int8 weights with AVX2's
vpmaddubsw, which sums two products in an int16 and saturates (255 x 127 x 2 > 32767) on CPUs without VNNI
(measured: the tests' tiny model's min cosine fell from 0.9993 to 0.9855 under an emulated AVX2 CPU).
onnxruntime targets therefore get 7-bit weights (onnxruntime's reduce_range: int8 in [-64, 64], 255 x 64 x 2
fits) -- the same kernels and speed, the same logits on AVX2, AVX-512, VNNI and AMX -- and the written graph
is checked for it. TensorRT keeps full-range int8 (GPUs do not saturate); its ONNX run by onnxruntime on a
CPU without VNNI does saturate, which the artifact records (quantization.cpu) and predict/verify/serve say.
  modelopt  NVIDIA ModelOpt's ONNX PTQ (Q/DQ placed for TensorRT's fusions), calibrated with onnxruntime
            on the CPU; needs the `modelopt` extra.

Every mode first runs onnxruntime's quant_pre_process on the export (symbolic shape inference and basic
graph optimization): quantize_dynamic fails on the raw export's stale value_info otherwise. What stays in
float was chosen by measurement (docs/benchmarks.md, INT8): LayerNorm (quantizing it cut the demo run's
agreement to 91%), Softmax and GELU, the residual adds, the attention products q.k and attn.v (the
largest error on the demo run, and keeping them float was faster too), the classifier head, and the
patch embedding Conv (its input is the pixels; under 1% of a ViT-B/16's linear work). Static Q/DQ quantizes
the inputs of the linear layers, not their outputs, as dynamic does.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import io
import logging
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from vfpt_deploy.errors import RuntimeSetupError, UsageError, VFPTError
from vfpt_deploy.extras import extra_install
from vfpt_deploy.artifacts.schema import INPUT_NAME, QUANTIZE_MODES, encode_metadata
from vfpt_deploy.runtime.hardware import INT8_FORMS, int8_cpu_record

# Linear layers (weights x activations) and the attention products (activations x activations).
LINEAR_OPS = ("MatMul", "Gemm", "Conv")
OUTPUT_FLOAT = ("MatMul", "Conv", "Gemm")
MODELOPT_EXTRA = extra_install("modelopt")


@dataclass(frozen=True)
class QuantizeSpec:
    """How to quantize. target: 'onnxruntime' or 'tensorrt' (the static Q/DQ profile TensorRT parses).
    keep_head / keep_attention: leave the classifier head / the two attention MatMuls in float.
    method: static calibration, 'minmax' or 'percentile' (ranges that ignore the rarest outliers)."""

    mode: str = "dynamic"
    target: str = "onnxruntime"
    per_channel: bool = True
    keep_head: bool = True
    keep_attention: bool = True
    method: str = "minmax"
    op_types: tuple[str, ...] = LINEAR_OPS
    # static: uint8 activations with a zero point. None: yes for onnxruntime (measured more accurate than
    # symmetric int8, at the same speed), never for TensorRT (its parser takes zero points of 0 only).
    asymmetric: bool | None = None
    keep_nodes: tuple[str, ...] = ()  # regular expressions: linear nodes whose name matches stay float
    # static: no Q/DQ on the linear layers' outputs (only their inputs and weights are quantized, as dynamic
    # does): on the demo run output Q/DQ raised the logit error from 0.16 to 0.26 for no speed on the CPU.
    output_float: bool = True
    keep_patch: bool = True  # the patch embedding Conv stays float (measured on the demo run)
    # weights: 'int7' (int8 storage, values in [-64, 64]: onnxruntime's reduce_range), 'int8' (full range) or
    # 'uint8' (asymmetric, onnxruntime's U8U8). None: int7 for onnxruntime -- with uint8 activations no int16
    # pair sum of AVX2's vpmaddubsw can saturate, so the artifact computes the same on every x86-64 CPU
    # (INT8_FORMS) --, int8 for TensorRT (GPUs do not saturate; its parser wants symmetric int8).
    weights: str | None = None

    @property
    def weight_type(self) -> str:
        return self.weights or ("int8" if self.target == "tensorrt" else "int7")

    def check(self) -> "QuantizeSpec":
        if self.mode not in QUANTIZE_MODES:
            raise UsageError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, got {self.mode!r}")
        if self.target not in ("onnxruntime", "tensorrt"):
            raise UsageError(f"quantization target must be onnxruntime or tensorrt, got {self.target!r}")
        if self.target == "tensorrt" and self.mode == "dynamic":
            raise UsageError("TensorRT cannot run dynamic quantization (MatMulInteger); use --quantize static "
                             "or modelopt for --format trt/trt-rtx")
        if self.weights == "uint8" and self.target == "tensorrt":
            raise UsageError("TensorRT parses only symmetric int8 weights, not uint8")
        if self.asymmetric and self.target == "tensorrt":
            raise UsageError("TensorRT parses only symmetric int8 activations (zero point 0)")
        if self.weights not in (None, *INT8_FORMS):
            raise UsageError(f"int8 weights must be int8, int7 or uint8, got {self.weights!r}")
        if self.method not in ("minmax", "percentile"):
            raise UsageError(f"calibration method must be minmax or percentile, got {self.method!r}")
        return self


@dataclass
class QuantizeResult:
    path: Path
    info: dict  # what the artifact's metadata records under vfpt.quantization
    ops: Counter = field(default_factory=Counter)
    opset: int = 17


class ArrayReader:
    """onnxruntime's CalibrationDataReader over preprocessed images, in fixed batches."""

    def __init__(self, x: np.ndarray, batch: int = 8) -> None:
        self.x, self.batch, self.i = x, batch, 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        out = {INPUT_NAME: np.ascontiguousarray(self.x[self.i:self.i + self.batch], dtype=np.float32)}
        self.i += self.batch
        return out

    def rewind(self) -> None:
        self.i = 0


def check_modelopt():
    """modelopt.onnx.quantization, or one line naming the extra."""
    try:
        with _quiet():
            import modelopt.onnx.quantization as mq
    except Exception as e:  # ImportError, or its own import-time checks of the onnx extras
        raise RuntimeSetupError(f"--quantize modelopt needs NVIDIA ModelOpt ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:80]}); {MODELOPT_EXTRA}") from None
    return mq


@contextlib.contextmanager
def _quiet():
    """The quantizers print progress bars and log every step: keep that off the user's terminal."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        levels = {n: logging.getLogger(n).level for n in (None, "modelopt", "onnxruntime")}  # None: the root
        for n in levels:
            logging.getLogger(n).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for n, lv in levels.items():
                logging.getLogger(n).setLevel(lv)


def prepare(src: Path, dst: Path) -> Path:
    """onnxruntime's quant_pre_process: shape inference + basic optimization, which the quantizers need."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with _quiet():
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
    except Exception as e:
        raise VFPTError(f"quant_pre_process failed on {src.name}: {_first(e)}") from None
    return dst


def _first(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def graph_roles(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Names of the linear nodes by role: 'head' (the last MatMul/Gemm: the classifier), 'attention'
    (MatMuls of two activations: q.k and attn.v; and of an activation and a per-head constant of rank > 2:
    a Swin kv fold's q.K_prompt and attn.V_prompt, its prompt keys/values [heads, ...]), 'patch' (the first
    Conv: the patch embedding), 'weights' (the rest)."""
    inits = {t.name for t in model.graph.initializer}
    consts = inits | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    linear = [n for n in model.graph.node if n.op_type in LINEAR_OPS]
    head = [n.name for n in linear if n.op_type in ("MatMul", "Gemm")][-1:]
    batched = set(batched_constant_matmuls(model))
    attention = [n.name for n in linear if n.op_type == "MatMul" and (not set(n.input) & consts or n.name in batched)]
    patch = [n.name for n in linear if n.op_type == "Conv"][:1]
    weights = [n.name for n in linear if n.name not in head + attention + patch]
    return {"head": head, "attention": attention, "patch": patch, "weights": weights}


def batched_constant_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMuls whose second input is a constant of rank > 2 (one matrix per head). onnxruntime's dynamic
    quantizer gives such a weight a per-channel zero point its MatMulInteger kernel refuses at run time
    ("MatmulInteger : b zero point is not valid"): dynamic quantization keeps them float."""
    ranks = {t.name: len(t.dims) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output:
            ranks.update({n.output[0]: len(a.t.dims) for a in n.attribute if a.name == "value"})
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) == 2
            and ranks.get(n.input[1], 0) > 2]


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed nodes stable names: exclusion lists and the metadata refer to nodes by name."""
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"


def plan_exclusions(model: onnx.ModelProto, spec: QuantizeSpec) -> tuple[list[str], list[str]]:
    """(linear nodes to quantize, linear nodes kept in float) by the spec's keep_head / keep_attention /
    keep_patch / keep_nodes. onnxruntime's dynamic quantizer has no Gemm, and its per-channel weights of a
    batched constant do not run (batched_constant_matmuls): those stay float there."""
    roles = graph_roles(model)
    keep = (roles["head"] if spec.keep_head else []) + (roles["attention"] if spec.keep_attention else [])
    keep += roles["patch"] if spec.keep_patch else []
    linear = [n for n in model.graph.node if n.op_type in spec.op_types]
    batched = set(batched_constant_matmuls(model)) if spec.mode == "dynamic" and spec.per_channel else set()
    keep += [n.name for n in linear if any(re.search(k, n.name) for k in spec.keep_nodes)
             or (spec.mode == "dynamic" and n.op_type == "Gemm") or n.name in batched]
    return [n.name for n in linear if n.name not in keep], [n.name for n in linear if n.name in keep]


def _dynamic(src: Path, dst: Path, spec: QuantizeSpec, exclude: list[str]) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # MatMulConstBOnly False: the attention products are quantized too, unless keep_attention excludes them.
    # The dynamic quantizer first rewrites every Gemm to a MatMul named '<gemm>_MatMul' (+ Add), which its
    # exclusion list then no longer matched: the classifier head was quantized while the metadata said float
    # (measured on the demo run: that head alone changed 7 of 397 predictions). Exclude both names.
    quantize_dynamic(str(src), str(dst), op_types_to_quantize=list(spec.op_types), per_channel=spec.per_channel,
                     weight_type=_wtype(spec), reduce_range=spec.weight_type == "int7", nodes_to_exclude=exclude + [f"{n}_MatMul" for n in exclude],
                     extra_options={"MatMulConstBOnly": False})
    return {"weights": _weights_text(spec), "activations": "uint8, ranges computed per batch at run time"}


def _weights_text(spec: QuantizeSpec) -> str:
    kind = {"int7": "int8 symmetric, 7-bit range [-64, 64] (reduce_range)", "int8": "int8 symmetric",
            "uint8": "uint8 asymmetric"}[spec.weight_type]
    return kind + (", per channel" if spec.per_channel else "")


def _wtype(spec: QuantizeSpec):
    from onnxruntime.quantization import QuantType

    return QuantType.QUInt8 if spec.weight_type == "uint8" else QuantType.QInt8


def _static_ort(src: Path, dst: Path, spec: QuantizeSpec, exclude: list[str], x: np.ndarray) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    trt = spec.target == "tensorrt"
    sym = trt or spec.asymmetric is False
    # (No CalibMaxIntermediateOutputs: onnxruntime 1.31 drops the collected batches when it is reached.
    # MinMax keeps only per-batch min/max, so memory stays small without it.)
    extra = {"ActivationSymmetric": sym, "WeightSymmetric": spec.weight_type != "uint8", "CalibPercentile": 99.999,
             "OpTypesToExcludeOutputQuantization": list(OUTPUT_FLOAT if spec.output_float else ())}
    if trt:  # TensorRT refuses int32 biases and non-zero zero points (ENVIRONMENT.md; measured)
        extra["QuantizeBias"] = False
    method = CalibrationMethod.Percentile if spec.method == "percentile" else CalibrationMethod.MinMax
    act = QuantType.QInt8 if sym else QuantType.QUInt8
    quantize_static(str(src), str(dst), ArrayReader(x), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(spec.op_types), per_channel=spec.per_channel,
                    activation_type=act, weight_type=_wtype(spec), reduce_range=spec.weight_type == "int7",
                    nodes_to_exclude=exclude,
                    calibrate_method=method, calibration_providers=["CPUExecutionProvider"], extra_options=extra)
    return {"weights": _weights_text(spec),
            "activations": f"{'int8 symmetric' if sym else 'uint8 asymmetric'}, calibrated ({spec.method})"}


def _modelopt(src: Path, dst: Path, spec: QuantizeSpec, exclude: list[str], x: np.ndarray) -> dict:
    mq = check_modelopt()
    method = "max" if spec.method == "minmax" else "entropy"
    shape = "x".join(map(str, (min(8, len(x)), *x.shape[1:])))  # ModelOpt splits the images into batches of 8
    mq.quantize(str(src), quantize_mode="int8", calibration_data={INPUT_NAME: x}, calibration_method=method,
                calibration_shapes=f"{INPUT_NAME}:{shape}", calibration_eps=["cpu"], high_precision_dtype="fp32",
                output_path=str(dst), op_types_to_quantize=list(spec.op_types),
                nodes_to_exclude=[f"^{re.escape(n)}$" for n in exclude], log_level="ERROR")
    return {"weights": "int8 symmetric, per channel (ModelOpt)",
            "activations": f"int8 symmetric, calibrated ({method}, ModelOpt)"}


def quantize_onnx(src: str | os.PathLike, dst: str | os.PathLike, spec: QuantizeSpec, *,
                  calib: np.ndarray | None = None, calib_info: dict | None = None) -> QuantizeResult:
    """fp32 ONNX `src` (a vfpt export) -> int8 ONNX `dst` with src's metadata, precision 'int8' and a
    `quantization` record (mode, tool, what was quantized and what stayed float, the calibration set).
    calib: preprocessed calibration images (static / modelopt). Intermediate files go beside dst."""
    import onnxruntime

    src, dst = Path(src), Path(dst)
    spec.check()
    if spec.mode != "dynamic" and (calib is None or not len(calib)):
        raise UsageError(f"--quantize {spec.mode} needs calibration images; pass --calib DIR or builtin")
    prepared = prepare(src, dst.with_name(dst.stem + ".prepared.onnx"))
    model = onnx.load(str(prepared))
    _name_nodes(model)
    onnx.save(model, str(prepared))
    quantize, kept = plan_exclusions(model, spec)
    try:
        with _quiet():
            if spec.mode == "dynamic":
                how = _dynamic(prepared, dst, spec, kept)
            elif spec.mode == "static":
                how = _static_ort(prepared, dst, spec, kept, calib)
            else:
                how = _modelopt(prepared, dst, spec, kept, calib)
    except VFPTError:
        raise
    except Exception as e:  # the quantizers raise plain exceptions of many kinds
        raise VFPTError(f"{spec.mode} int8 quantization failed: {_first(e)}") from None
    finally:
        with contextlib.suppress(OSError):
            prepared.unlink()
    tool = (f"nvidia-modelopt {importlib.metadata.version('nvidia-modelopt')}" if spec.mode == "modelopt"
            else f"onnxruntime {onnxruntime.__version__}")
    info = {"mode": spec.mode, "target": spec.target, "tool": tool, **how,
            "quantized": {"nodes": len(quantize), "op_types": sorted({n.op_type for n in model.graph.node
                                                                      if n.name in set(quantize)})},
            "kept_float": kept_float(model, spec, kept), "calibration": calib_info if spec.mode != "dynamic" else None,
            "cpu": int8_cpu_record("int8" if spec.mode == "modelopt" else spec.weight_type)}
    return stamp(src, dst, info)


INTEGER_WEIGHT_INPUTS = {"MatMulInteger": 1, "ConvInteger": 1, "DynamicQuantizeMatMul": 1, "MatMulIntegerToFloat": 1,
                         "QLinearMatMul": 3, "QLinearConv": 3, "DequantizeLinear": 0}


def int8_weight_ranges(model: onnx.ModelProto) -> dict[str, tuple[str, int, int]]:
    """Every integer weight an integer matmul reads (directly, or through a Q/DQ DequantizeLinear):
    name -> (dtype, min, max)."""
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        i = INTEGER_WEIGHT_INPUTS.get(n.op_type)
        if i is not None and len(n.input) > i and n.input[i] in inits:
            w = onnx.numpy_helper.to_array(inits[n.input[i]])
            if w.dtype in (np.int8, np.uint8) and w.size:
                out[n.input[i]] = (str(w.dtype), int(w.min()), int(w.max()))
    return out


def saturation_problems(model: onnx.ModelProto, form: str) -> list[str]:
    """Why the written int8 model is not the form its metadata claims (INT8_FORMS): an int7 model has int8
    weights in [-64, 64] only (so two uint8 x weight products stay within int16), a uint8 one uint8 weights."""
    want = {"int7": ("int8", -64, 64), "uint8": ("uint8", 0, 255), "int8": ("int8", -128, 127)}[form]
    return [f"weight {name} is {dtype} in [{lo}, {hi}], outside the {form} form's {want[0]} [{want[1]}, {want[2]}]"
            for name, (dtype, lo, hi) in int8_weight_ranges(model).items()
            if dtype != want[0] or lo < want[1] or hi > want[2]]


def kept_float(model: onnx.ModelProto, spec: QuantizeSpec, kept: list[str]) -> dict:
    """What runs in float: compute op types that are never quantized, and the linear nodes left out."""
    roles = graph_roles(model)
    compute = {"LayerNormalization", "Softmax", "Erf", "Gelu", "Add", "Mul", "Div", "Sub", "Pow", "Sqrt",
               "ReduceMean", "Tanh", "Sigmoid", "Exp"}
    ops = sorted({n.op_type for n in model.graph.node if n.op_type in compute} - set(spec.op_types))
    nodes = {role: [n for n in names if n in kept] for role, names in roles.items()}
    return {"op_types": ops, "nodes": {k: v for k, v in nodes.items() if v}}


def stamp(src: Path, dst: Path, info: dict) -> QuantizeResult:
    """Copy src's vfpt metadata onto the quantized file (quantizers drop or keep it unpredictably) with
    precision int8, the real opset and the quantization record; check the result."""
    from vfpt_deploy.exporters.onnx import op_histogram
    from vfpt_deploy.artifacts.schema import decode_metadata

    meta = decode_metadata({p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props})
    model = onnx.load(str(dst))
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    meta = {**meta, "precision": "int8", "opset": opset, "quantization": info}
    del model.metadata_props[:]
    for k, v in encode_metadata(meta).items():
        model.metadata_props.add(key=k, value=v)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise VFPTError(f"onnx.checker rejected the quantized model: {_first(e)}") from None
    wrong = saturation_problems(model, info["cpu"]["form"])
    if wrong:  # the quantizer did not write what the metadata would promise (e.g. reduce_range ignored)
        raise VFPTError(f"the quantized model is not the {info['cpu']['form']} form it should be: {wrong[0]}"
                        f"{f' (and {len(wrong) - 1} more)' if len(wrong) > 1 else ''}")
    onnx.save(model, str(dst))
    return QuantizeResult(dst, info, op_histogram(model), opset)
