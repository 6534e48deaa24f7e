"""The one export pipeline: a loaded run -> fold -> ONNX -> (TensorRT engine) -> verify -> in place.

`export_run` is what the CLI, the demo and the benchmark call. The output policy lives here once:
outputs never name an input; suffixes match formats (.onnx; .engine/.plan, the ONNX an engine is built
from beside it with .onnx); every new file is written into a staging folder beside its final place and
moved there only after verification passed, so a failed export, build or verify leaves the previous
artifact and its report untouched.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import ArtifactError, UsageError, VFPTError
from vfpt_deploy.artifacts.files import Staging, check_outputs, check_suffix
from vfpt_deploy.artifacts.schema import (ENGINE_SUFFIXES, EXPORT_FOLDS, FORMATS, ONNX_SUFFIXES, PACK_FORMATS, PRECISIONS,
                                          report_path, sidecar_path)

if TYPE_CHECKING:  # torch loads with these: checking settings and paths (plan_export) must not wait for it
    from vfpt_deploy.artifacts.checkpoint import Run
    from vfpt_deploy.folding.multitask import TaskSet

FOLD_DTYPES = ("float32", "float64")
TOLERANCE_KEYS = ("atol", "rtol", "min_cosine", "min_agreement", "max_top1_drop")


@dataclass(frozen=True)
class ExportSettings:
    """Everything an export decides. build: TensorRT builder settings (format trt / trt-rtx; its flavor
    and precision follow format and precision). tolerances: overrides of the precision's defaults.
    data: real images for the verification besides the random inputs ('builtin[:name]' or a folder).
    quantize (precision int8): dynamic, static or modelopt (default: dynamic for onnx, static for engines);
    calib: its calibration images ('builtin[:name]' or a folder; default: the run's built-in training
    data), calib_samples of them."""

    format: str = "onnx"
    fold: str = "auto"
    precision: str = "fp32"
    opset: int = 17
    fold_dtype: str = "float32"
    build: object | None = None  # exporters.tensorrt.BuildSettings
    tolerances: dict = field(default_factory=dict)
    data: str | None = None
    num_random: int = 16
    threads: int | None = None
    quantize: str | None = None
    calib: str | None = None
    calib_samples: int | None = None

    def check(self) -> "ExportSettings":
        for name, value, choices in (("--format", self.format, FORMATS), ("--fold", self.fold, EXPORT_FOLDS),
                                     ("--precision", self.precision, PRECISIONS),
                                     ("--fold-dtype", self.fold_dtype, FOLD_DTYPES)):
            if value not in choices:
                raise UsageError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or not 17 <= self.opset <= 23:
            raise UsageError(f"--opset must be 17..23 (17 is the first with LayerNormalization), got {self.opset!r}")
        unknown = sorted(set(self.tolerances) - set(TOLERANCE_KEYS))
        if unknown:
            raise UsageError(f"unknown tolerance {unknown[0]!r}; use {', '.join(TOLERANCE_KEYS)}")
        from vfpt_deploy.artifacts.compare import Tolerances

        Tolerances.for_precision(self.precision).override(**self.tolerances)  # range-checks the overrides
        self.quant_spec()
        return self

    def quant_spec(self):
        """The int8 quantization settings (exporters.quantize.QuantizeSpec, checked), or None for fp32/fp16."""
        if self.precision != "int8":
            if self.quantize is not None or self.calib is not None or self.calib_samples is not None:
                raise UsageError("--quantize, --calib and --calib-samples apply to --precision int8 only")
            return None
        from vfpt_deploy.exporters.quantize import QuantizeSpec

        mode = self.quantize or ("dynamic" if self.format == "onnx" else "static")
        if mode == "dynamic" and (self.calib is not None or self.calib_samples is not None):
            raise UsageError("dynamic quantization needs no calibration data; drop --calib/--calib-samples, or "
                             "use --quantize static")
        if self.calib_samples is not None and (isinstance(self.calib_samples, bool) or
                                               not isinstance(self.calib_samples, int) or self.calib_samples < 1):
            raise UsageError(f"--calib-samples must be a positive integer, got {self.calib_samples!r}")
        target = "onnxruntime" if self.format == "onnx" and mode != "modelopt" else "tensorrt"
        return QuantizeSpec(mode=mode, target=target).check()

    def builder(self):
        """The TensorRT builder settings with flavor and precision taken from this export."""
        from vfpt_deploy.exporters.tensorrt import BuildSettings

        base = self.build if self.build is not None else BuildSettings()
        return dataclasses.replace(base, flavor=self.format, precision=self.precision).check()


@dataclass(frozen=True)
class ExportPaths:
    onnx: Path
    engine: Path | None
    report: Path  # the verification report of what was verified

    def outputs(self) -> dict[str, Path]:
        out = {"the ONNX output": self.onnx, "the verify report": self.report}
        if self.engine is not None:
            out.update({"the engine output": self.engine, "the engine sidecar": sidecar_path(self.engine)})
        return out


def export_paths(ckpt: Path | None, settings: ExportSettings, out: str | os.PathLike | None) -> ExportPaths:
    """Where an export writes: --out, or beside the checkpoint named after it."""
    if out is None and ckpt is None:
        raise UsageError("name the output with --out (e.g. --out tasks.onnx)")
    stem = (ckpt.stem if ckpt else "model") + ("" if settings.precision == "fp32" else f".{settings.precision}")
    if settings.format == "onnx":
        onnx = check_suffix(out if out is not None else ckpt.with_name(f"{stem}.onnx"), ONNX_SUFFIXES, "ONNX")
        return ExportPaths(onnx, None, report_path(onnx))
    engine = check_suffix(out if out is not None else ckpt.with_name(f"{stem}.engine"), ENGINE_SUFFIXES, "engine")
    return ExportPaths(engine.with_suffix(".onnx"), engine, report_path(engine))


@dataclass
class ExportOutcome:
    paths: ExportPaths
    onnx: object  # exporters.onnx.ExportResult (of the staged file; sizes and ops hold for the final one)
    engine: object | None  # exporters.tensorrt.EngineResult
    report: object  # verify.VerifyReport
    written: list[Path] = field(default_factory=list)  # empty when verification failed: nothing was replaced
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.report.passed

    @property
    def onnx_path(self) -> Path:
        return self.paths.onnx


def plan_export(ckpt: Path | None, settings: ExportSettings, out: str | os.PathLike | None = None,
                inputs: dict[str, str | os.PathLike | None] | None = None) -> ExportPaths:
    """Check the settings and the output policy without loading anything: where the export will write,
    or a one-line error. export_run calls it too."""
    settings.check()
    paths = export_paths(ckpt, settings, out)
    check_outputs(paths.outputs(), {"--ckpt": ckpt, **(inputs or {}), "--data": settings.data, "--calib": settings.calib})
    return paths


def export_run(run: Run | TaskSet, settings: ExportSettings, out: str | os.PathLike | None = None, *,
               inputs: dict[str, str | os.PathLike | None] | None = None,
               on_step: Callable[[str], None] | None = None) -> ExportOutcome:
    """Fold, export, (build,) verify, and only then move the new files into place.

    run: one loaded run, or a multitask.TaskSet (one artifact for several runs sharing a backbone; every
    task verified against its own unfolded model on one mixed-task stream).
    inputs: the command's other input files by option name (e.g. {'--backbone': path}), so no output
    can overwrite them. Returns the outcome; when verification fails, `written` is empty and the report
    says why (the previous artifact and report are untouched)."""
    from vfpt_deploy.folding.multitask import TaskSet

    if settings.format in PACK_FORMATS:
        raise UsageError(f"--format {settings.format} is exported by pack_pipeline.export_pack_run")
    step = on_step or (lambda s: None)
    multi = isinstance(run, TaskSet)
    if multi:
        check_multitask_settings(settings)
        inputs = {**(inputs or {}), **{f"task {n}'s run.pt": p for n, p in zip(run.names, run.paths) if p}}
    paths = plan_export(None if multi else run.path, settings, out, inputs)
    builder = settings.builder() if paths.engine is not None else None
    if builder is not None:
        from vfpt_deploy.exporters.tensorrt import check_trt_available

        check_trt_available(builder.flavor)  # one line, before any work
    sets, notes = verification_inputs(run, settings)  # a bad --data fails before any work
    spec = settings.quant_spec()
    if spec is not None and spec.mode != "dynamic":
        step("reading the calibration images")
    calib = _calibration(run, settings, spec)  # a bad --calib (or no ModelOpt) fails before any work too
    with Staging(paths.onnx.parent) as stage:
        step(f"folding ({settings.fold}) + exporting ONNX")
        onnx_result = _export_onnx(run, settings, stage.path(paths.onnx))
        if spec is not None:
            step(f"quantizing to int8 ({spec.mode}" + (f", {calib.info['count']} calibration images)" if calib else ")"))
            onnx_result = _quantize(onnx_result, spec, calib, stage.path(paths.onnx), notes)
        step("recording the golden set")
        _attach_golden(run, settings, sets, stage.path(paths.onnx))
        onnx_result = dataclasses.replace(onnx_result, size_bytes=stage.path(paths.onnx).stat().st_size)
        built = None
        if builder is not None:
            step(f"building the {settings.format} engine")
            built = _build(stage, paths, builder)
        step("verifying against PyTorch")
        report = _verify(stage, paths, run, settings, sets, built is not None, notes)
        notes += _report_notes(paths.report, report)
        written = stage.commit() if report.passed else []
    return ExportOutcome(paths, onnx_result, built, report, written, notes)


def check_multitask_settings(settings: ExportSettings) -> None:
    if settings.precision == "int8":
        raise UsageError("int8 multi-task artifacts are not supported yet; export --precision fp32 or fp16, or "
                         "quantize the tasks one by one")


def verification_inputs(run: Run | TaskSet, settings: ExportSettings) -> tuple[list, list[str]]:
    """What verification compares on: random inputs and --data, or else the run's own built-in data (per
    task for a TaskSet: its own data, its own random inputs); and a note saying where that came from.
    With several tasks, --data applies to every task, except a bare 'builtin', which is each task's own
    built-in set (the one it was trained on; 'builtin' = digits-shifted for a task that recorded none), as
    when --data is not given: 'builtin:NAME' names one set for all."""
    from vfpt_deploy.folding.multitask import TaskSet
    from .verify import input_sets, task_input_sets

    if isinstance(run, TaskSet):
        if settings.data is not None and settings.data != "builtin":
            return task_input_sets(run, settings.data, settings.num_random), []
        own = [recorded_builtin_data(r) or settings.data for r in run.runs]
        used = ", ".join(f"{n}: {d}" for n, d in zip(run.names, own) if d)
        notes = [f"verified each task on its own data ({used}) too"] if used else []
        return task_input_sets(run, own, settings.num_random), notes
    data = settings.data if settings.data is not None else recorded_builtin_data(run)
    notes = [] if settings.data is not None or data is None else [f"verified on the run's own data ({data}) too"]
    return input_sets(run, data, settings.num_random), notes


def _export_onnx(run: Run | TaskSet, settings: ExportSettings, path: Path):
    """The folded ONNX; for int8 the fp32 graph the quantizer starts from, beside `path` (not committed)."""
    import torch

    from vfpt_deploy.exporters.onnx import export_onnx, export_tasks

    from vfpt_deploy.folding.multitask import TaskSet

    int8 = settings.precision == "int8"
    export = export_tasks if isinstance(run, TaskSet) else export_onnx
    return export(run, path.with_name(path.stem + ".fp32.onnx") if int8 else path, fold=settings.fold,
                  precision="fp32" if int8 else settings.precision, opset=settings.opset,
                  fold_dtype=getattr(torch, settings.fold_dtype))


def _calibration(run: Run, settings: ExportSettings, spec):
    """The calibration images of a static / ModelOpt int8 export (None for dynamic and float)."""
    if spec is None or spec.mode == "dynamic":
        return None
    if spec.mode == "modelopt":
        from vfpt_deploy.exporters.quantize import check_modelopt

        check_modelopt()
    source = settings.calib if settings.calib is not None else recorded_builtin_data(run)
    if source is None:
        raise UsageError(f"--quantize {spec.mode} needs calibration images: pass --calib DIR (a folder of images, "
                         "or one with train/) or --calib builtin[:name]")
    from .calibration import DEFAULT_SAMPLES, calibration_set

    return calibration_set(run, source, settings.calib_samples or DEFAULT_SAMPLES)


def _quantize(fp32, spec, calib, path: Path, notes: list[str]):
    """fp32 export -> int8 at `path` (exporters.quantize); the ExportResult of the int8 file."""
    from vfpt_deploy.exporters.onnx import check_ops
    from vfpt_deploy.exporters.quantize import quantize_onnx

    q = quantize_onnx(fp32.path, path, spec, calib=None if calib is None else calib.x,
                      calib_info=None if calib is None else calib.info)
    fp32.path.unlink(missing_ok=True)
    if spec.target == "tensorrt":
        check_ops(q.ops)  # Q/DQ around MatMul/Gemm/Conv only: what TensorRT's parser takes
    elif spec.mode == "dynamic":
        notes.append("int8 dynamic runs on onnxruntime only (MatMulInteger); for TensorRT export with "
                     "--format trt/trt-rtx (static Q/DQ)")
    return dataclasses.replace(fp32, path=path, precision="int8", opset=q.opset, size_bytes=path.stat().st_size,
                               ops=q.ops)


def _attach_golden(run: Run | TaskSet, settings: ExportSettings, sets, path: Path) -> None:
    """A few of the verification inputs and the unfolded model's logits for them, with the gate of this
    precision, into the final ONNX (an engine's sidecar copies them): vfpt_deploy/golden.py."""
    from vfpt_deploy.exporters.onnx import add_metadata

    from vfpt_deploy.artifacts.golden import KEY, encode
    from .verify import Tolerances, make_golden

    tol = Tolerances.for_precision(settings.precision).override(**settings.tolerances)
    add_metadata(path, {KEY: encode(make_golden(run, sets, tol, settings.precision))})


def _build(stage: Staging, paths: ExportPaths, builder):
    from vfpt_deploy.exporters.tensorrt import build_engine

    engine = stage.path(paths.engine)
    stage.path(sidecar_path(paths.engine))  # build_engine writes it beside the staged engine
    return build_engine(stage.dir / paths.onnx.name, engine, builder)


def _verify(stage: Staging, paths: ExportPaths, run: Run | TaskSet, settings: ExportSettings, sets, has_engine: bool,
            notes: list[str]):
    """Verify the engine where it can run, else (TensorRT-RTX off an RTX GPU) the ONNX it was built from."""
    from .verify import verify_artifact

    common = dict(run=run, inputs=sets, overrides=settings.tolerances, threads=settings.threads,
                  report_path=stage.path(paths.report))
    if has_engine:
        try:
            return verify_artifact(stage.dir / paths.engine.name, name=str(paths.engine), **common)
        except (ArtifactError, UsageError):
            raise
        except VFPTError as e:
            if settings.format != "trt-rtx":
                raise
            # TensorRT-RTX builds anywhere but its engines run only on RTX-class GPUs: say so, and verify
            # the ONNX the engine was built from.
            notes.append(f"engine built but NOT run here ({e}); verified the ONNX it was built from")
            common["report_path"] = stage.path(report_path(paths.onnx))
    try:
        return verify_artifact(stage.dir / paths.onnx.name, name=str(paths.onnx), **common)
    except ArtifactError as e:  # the file just written does not run: name it as the user knows it, no re-export
        from vfpt_deploy.runtime.onnx_runner import RUN_FAILURE_FIX

        msg = str(e).replace(str(stage.dir / paths.onnx.name), str(paths.onnx))
        raise ArtifactError(msg.replace(RUN_FAILURE_FIX, "nothing was written (this export cannot run in onnxruntime: "
                                                         "try another --precision, --quantize or --fold)")) from None


def recorded_builtin_data(run: Run) -> str | None:
    """The built-in data set a run was trained on (its meta says), so a plain re-export verifies on the
    same real images as before instead of random inputs only."""
    data = (run.meta.get("train") or {}).get("data") if isinstance(run.meta.get("train"), dict) else None
    return data if isinstance(data, str) and (data == "builtin" or data.startswith("builtin:")) else None


def _report_notes(previous: Path, report) -> list[str]:
    """Say so when the report being replaced covered real images and the new one does not."""
    try:
        old = json.loads(previous.read_text())
        old_real = [c["inputs"] for c in old.get("comparisons", []) if not str(c.get("inputs", "")).startswith("random")]
    except (OSError, ValueError, TypeError, AttributeError):
        return []
    new_real = [c.inputs for c in report.comparisons if not c.inputs.startswith("random")]
    if old_real and not new_real:
        return [f"the previous report covered {old_real[0]}; this one random inputs only (pass --data to "
                "verify on images too)"]
    return []

