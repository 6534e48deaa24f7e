"""Folded VFPT models to ONNX: one file, dynamic batch, fixed image size, no FFT, TensorRT-parsable ops.

Input `images` float32 [batch, 3, H, W] (normalized as the metadata's preprocess says); output `logits`
float32 [batch, classes]. An fp16 graph keeps float32 I/O and computes in float16, with LayerNorm,
Softmax and the reductions kept in float32 (casts at their edges), so strongly typed TensorRT builds it.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

from vfpt_deploy import __version__
from vfpt_deploy.artifacts.checkpoint import Run
from vfpt_deploy.errors import UsageError, VFPTError
from vfpt_deploy.artifacts.files import atomic_write
from vfpt_deploy.folding import fold_model
from vfpt_deploy.artifacts.schema import ARTIFACT_FORMAT, INPUT_NAME, OUTPUT_NAME, TASK_INPUT, encode_metadata, op_histogram  # noqa: F401

DEFAULT_OPSET = 17  # first opset with LayerNormalization: avoids TensorRT's fp16 LayerNorm overflow
MAX_PROTOBUF = 2 * 1024**3
# Ops the TensorRT 10 ONNX parser supports (onnx-tensorrt docs/operators.md), default domain only.
TENSORRT_ONNX_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike
Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GroupNormalization
GRU HardSigmoid HardSwish Identity If InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean Min Mish Mod Mul
Neg NonMaxSuppression Not Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN Round ScaledTanh
Scan Scatter ScatterElements ScatterND Selu Shape Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu
Unsqueeze Upsample Where Xor
""".split())
FFT_OPS = frozenset({"DFT", "STFT"})
# Kept in float32 inside an fp16 graph: normalization statistics and softmax overflow in half.
FP32_OPS = ["LayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "Pow", "Sqrt", "Exp"]


@dataclass
class ExportResult:
    path: Path
    fold_mode: str
    precision: str
    opset: int
    size_bytes: int
    ops: Counter = field(default_factory=Counter)

    @property
    def op_count(self) -> int:
        return sum(self.ops.values())


def check_ops(ops: Counter, *, require_tensorrt: bool = True) -> None:
    """Fail loudly on FFT ops (TensorRT and ORT-CUDA cannot run them) or ops TensorRT cannot parse."""
    fft = sorted(set(ops) & FFT_OPS)
    if fft and require_tensorrt:
        raise VFPTError(f"the exported graph still has {', '.join(fft)} ops; fold the prompts (--fold tokens/kv)")
    bad = sorted(set(ops) - TENSORRT_ONNX_OPS - FFT_OPS)
    if bad and require_tensorrt:
        raise VFPTError(f"the exported graph has ops TensorRT's ONNX parser does not support: {', '.join(bad)}")


@contextlib.contextmanager
def unfused_attention(module: torch.nn.Module):
    """timm attention as explicit MatMul/Softmax instead of SDPA while exporting: the SDPA export
    brings shape-dependent Casts that the fp16 converter cannot type, and plain ops suit every parser."""
    saved = [(m, m.fused_attn) for m in module.modules() if hasattr(m, "fused_attn")]
    for m, _ in saved:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, v in saved:
            m.fused_attn = v


def _torch_export(module: torch.nn.Module, tmp: str, image_size: tuple[int, int], opset: int,
                  num_tasks: int | None = None) -> None:
    args: tuple = (torch.randn(2, 3, *image_size),)
    names = [INPUT_NAME]
    if num_tasks:  # multi-task: a task index per sample
        args, names = (*args, torch.tensor([0, num_tasks - 1])), [INPUT_NAME, TASK_INPUT]
    axes = {n: {0: "batch"} for n in names}
    if hasattr(module, "onnx_inputs"):  # a module with more inputs (folding/packs.py) names them and their axes
        args, names, axes = module.onnx_inputs(image_size)
    with warnings.catch_warnings(), torch.no_grad(), unfused_attention(module):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, tmp, dynamo=False, input_names=names, output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamic_axes={**axes, OUTPUT_NAME: {0: "batch"}})


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """float16 compute with float32 I/O; FP32_OPS stay float32 behind Cast nodes."""
    from onnxconverter_common import float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=FP32_OPS,
                                                disable_shape_infer=False)


def export_module(module: torch.nn.Module, path: str | os.PathLike, *, image_size: tuple[int, int],
                  opset: int = DEFAULT_OPSET, precision: str = "fp32", metadata: dict | None = None) -> ExportResult:
    """Export a folded module (fold_model's output, or any images->logits module) to one ONNX file with
    the TorchScript exporter (faster than dynamo here, and the smaller graph)."""
    if precision not in ("fp32", "fp16"):
        raise VFPTError(f"precision must be fp32 or fp16, got {precision!r}")
    if opset < 17:
        raise VFPTError(f"opset {opset} has no LayerNormalization op; use --opset 17 or newer")
    path = Path(path)
    fold_mode = getattr(module, "fold_mode", "custom")
    module = module.eval().float()
    result: dict = {}

    def write(tmp: str) -> None:
        try:
            _torch_export(module, tmp, image_size, opset, getattr(module, "num_tasks", None))
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise VFPTError(f"ONNX export (TorchScript) failed: {first}") from None
        # Constant folding + dead-node removal (what the dynamo exporter's optimize=True does): a
        # smaller graph, and one the fp16 converter can type-infer (the raw TorchScript graph's
        # Identity nodes trip it).
        import onnxscript.optimizer

        model = onnxscript.optimizer.optimize(onnx.load(tmp))
        if precision == "fp16":
            model = to_fp16(model)
        meta = {"format": ARTIFACT_FORMAT, "tool_version": __version__, "fold": fold_mode, "precision": precision,
                "opset": opset, "image_size": list(image_size), **(metadata or {})}
        del model.metadata_props[:]
        for k, v in encode_metadata(meta).items():
            model.metadata_props.add(key=k, value=v)
        model.producer_name, model.producer_version = "vfpt-deploy", __version__
        if model.ByteSize() >= MAX_PROTOBUF:
            raise VFPTError(f"the model is {model.ByteSize() / 2**30:.1f} GB, over ONNX's 2 GB single-file limit")
        onnx.save_model(model, tmp)
        try:
            onnx.checker.check_model(tmp, full_check=True)
        except onnx.checker.ValidationError as e:
            raise VFPTError(f"onnx.checker rejected the exported model: {str(e).splitlines()[0][:200]}") from None
        ops = op_histogram(model)
        check_ops(ops)
        result["ops"] = ops

    atomic_write(path, write)
    return ExportResult(path, fold_mode, precision, opset, path.stat().st_size, result["ops"])


def add_metadata(path: str | os.PathLike, values: dict) -> None:
    """Set vfpt.* metadata entries of an exported ONNX file in place (atomically): the golden set is written
    into the final graph (after quantization), so the file's sha256 covers it."""
    path = Path(path)
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    props.update(encode_metadata(values))
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    if model.ByteSize() >= MAX_PROTOBUF:
        raise VFPTError(f"the model is {model.ByteSize() / 2**30:.1f} GB, over ONNX's 2 GB single-file limit")
    atomic_write(path, lambda tmp: onnx.save_model(model, tmp))


def run_metadata(run: Run) -> dict:
    """What a runtime needs to serve a run's artifact without the checkpoint."""
    return {"classes": run.classes, "preprocess": run.preprocess.to_dict(), "config": run.config.to_dict(),
            "backbone": {"name": run.backbone.name, "kwargs": run.backbone.kwargs, "source": run.backbone.source,
                         "sha256": run.backbone.sha256},
            "checkpoint_sha256": run.sha256, "checkpoint": run.path.name if run.path else ""}


def export_onnx(run: Run, path: str | os.PathLike, *, fold: str = "auto", precision: str = "fp32",
                opset: int = DEFAULT_OPSET, fold_dtype: torch.dtype = torch.float32) -> ExportResult:
    """run.pt -> folded module -> ONNX with the run's metadata. fold: auto, tokens or kv. ('none', the
    live FFT, is not exported: the exporter would fold a parameter FFT to constants anyway, so such a
    graph would claim a live FFT it does not have.)"""
    if fold == "none":
        raise UsageError("fold 'none' cannot be exported: the exporter folds the prompts' FFT to constants "
                         "anyway; use --fold tokens or kv (the PyTorch model keeps the live FFT for comparison)")
    folded = fold_model(run.model, fold, fold_dtype)
    return export_module(folded, path, image_size=run.model.img_size, opset=opset, precision=precision,
                         metadata=run_metadata(run))


def tasks_metadata(tasks, folds: list[str]) -> dict:
    """A multi-task artifact's metadata: the shared backbone and preprocessing once (run_metadata of the
    first run), then per task, in index order, its own part of run_metadata plus its name, fold and M."""
    first = run_metadata(tasks.first)
    per_task = []
    for name, run, fold in zip(tasks.names, tasks.runs, folds):
        own = run_metadata(run)
        per_task.append({"name": name, "fold": fold, "num_prompts": run.config.num_prompts,
                         **{k: own[k] for k in ("classes", "config", "checkpoint_sha256", "checkpoint")}})
    return {"preprocess": first["preprocess"], "backbone": first["backbone"],
            "fold": folds[0] if len(set(folds)) == 1 else "mixed", "tasks": per_task}


def export_tasks(tasks, path: str | os.PathLike, *, fold: str = "auto", precision: str = "fp32",
                 opset: int = DEFAULT_OPSET, fold_dtype: torch.dtype = torch.float32) -> ExportResult:
    """A multitask.TaskSet -> one ONNX holding the backbone once and every task's constants and head.
    Inputs `images` and `task` (int64 [batch]); output `logits` [batch, widest task's classes]."""
    from vfpt_deploy.folding.multitask import fold_tasks

    if fold == "none":
        raise UsageError("fold 'none' cannot be exported; use --fold auto, tokens or kv")
    module = fold_tasks(tasks, fold, fold_dtype)
    meta = tasks_metadata(tasks, module.task_folds)
    result = export_module(module, path, image_size=tasks.first.model.img_size, opset=opset, precision=precision,
                           metadata=meta)
    result.fold_mode = meta["fold"]
    return result
