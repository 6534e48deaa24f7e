"""Export prompt packs and backbone artifacts end to end, as pipeline.py exports the others: fold, write into
a staging folder, verify through onnxruntime against the run's unfolded PyTorch model, and only then put in
place (a failed export or verification leaves the previous file and its report untouched).

- `export --ckpt run.pt --format backbone [--out B.onnx]`: the run's frozen backbone with the per-task tables
  as graph inputs (folding/packs.py); verified by running the run itself as a pack through it.
- `export --ckpt run.pt --format pack --backbone-artifact B.onnx [--out NAME.pack.safetensors]`: the run's
  pack (artifacts/pack.py), refused in one line when B.onnx holds another backbone than the run's, verified
  through B.onnx, with its golden set.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from vfpt_deploy.artifacts.files import Staging, check_outputs, check_suffix
from vfpt_deploy.artifacts.pack import PACK_SUFFIX
from vfpt_deploy.artifacts.schema import ONNX_SUFFIXES, TASK_NAME, report_path
from vfpt_deploy.errors import UsageError

from .pipeline import ExportSettings, verification_inputs

if TYPE_CHECKING:
    from vfpt_deploy.artifacts.checkpoint import Run

GOLDEN_ROWS = (1, 2)  # per pack: random inputs, real images (a pack stays small: docs/serving.md)


@dataclass(frozen=True)
class PackPlan:
    out: Path
    report: Path
    backbone: Path | None  # --backbone-artifact (format pack)
    name: str | None  # the pack's task name (format pack)
    limits: dict = field(default_factory=dict)  # format backbone


@dataclass
class PackOutcome:
    plan: PackPlan
    format: str
    size_bytes: int
    report: object  # verify.VerifyReport
    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.report.passed


def check_limits(max_prompts: int | None, max_classes: int | None) -> dict:
    """The backbone artifact's pack limits (--max-prompts, --max-classes), checked; {} where none is given."""
    out = {}
    for key, value, top in (("prompts", max_prompts, 100_000), ("classes", max_classes, 1_000_000)):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
                raise UsageError(f"--max-{key} must be an integer in [1, {top}], got {value!r}")
            out[key] = value
    return out


def plan_pack_export(ckpt: Path, settings: ExportSettings, out: str | os.PathLike | None, *,
                     backbone_artifact: Path | None = None, name: str | None = None, limits: dict | None = None,
                     inputs: dict | None = None) -> PackPlan:
    """Check a pack / backbone export's options and outputs without loading anything; one line when wrong."""
    fmt = settings.format
    if settings.precision != "fp32" or settings.quantize is not None:
        raise UsageError(f"--format {fmt} is fp32 only for now; drop --precision/--quantize")
    if fmt == "backbone":
        if backbone_artifact is not None or name is not None:
            raise UsageError("--backbone-artifact and --task name a pack; --format backbone writes the backbone itself")
        out = check_suffix(out if out is not None else ckpt.with_name(f"{ckpt.stem}.backbone.onnx"), ONNX_SUFFIXES,
                           "backbone artifact")
    else:
        if limits:
            raise UsageError("--max-prompts/--max-classes size a backbone artifact (--format backbone)")
        if backbone_artifact is None:
            raise UsageError("--format pack needs the backbone artifact it runs on: --backbone-artifact B.onnx (export "
                             "one with --format backbone)")
        if not Path(backbone_artifact).is_file():
            raise UsageError(f"--backbone-artifact {backbone_artifact} does not exist; export one with "
                             f"'vfpt-deploy export --ckpt {ckpt} --format backbone --out {backbone_artifact}'")
        name = name or ckpt.stem.removesuffix(".pack")
        if not TASK_NAME.fullmatch(name):
            raise UsageError(f"pack name {name[:80]!r} must be 1-64 letters, digits, '_', '.' or '-', starting with a "
                             "letter or digit; name it with --task NAME=run.pt")
        out = check_suffix(out if out is not None else ckpt.with_name(f"{name}.pack{PACK_SUFFIX}"), (PACK_SUFFIX,),
                           "prompt pack")
    plan = PackPlan(out, report_path(out), None if backbone_artifact is None else Path(backbone_artifact), name,
                    limits or {})
    check_outputs({f"the {fmt} output": out, "the verify report": plan.report},
                  {"--ckpt": ckpt, "--backbone-artifact": plan.backbone, **(inputs or {}), "--data": settings.data})
    return plan


def export_pack_run(run: Run, settings: ExportSettings, plan: PackPlan,
                    on_step: Callable[[str], None] | None = None) -> PackOutcome:
    """Export (format backbone or pack, as settings.format says), verify, and only then put in place."""
    import torch

    from vfpt_deploy.artifacts.files import file_sha256
    from vfpt_deploy.artifacts.golden import KEY, encode
    from vfpt_deploy.artifacts.pack import Pack, check_fits
    from vfpt_deploy.artifacts.schema import read_graph
    from vfpt_deploy.exporters.pack import (check_same_backbone, export_backbone, pack_metadata, write_run_pack)
    from vfpt_deploy.folding.packs import check_packable, pack_tables
    from vfpt_deploy.runtime.packs import PackPredictor, PackSession

    from .verify import Tolerances, make_golden, verify_artifact

    step = on_step or (lambda s: None)
    check_packable(run)
    if settings.format == "pack":  # a backbone that is not the run's is refused before any work
        geometry = check_same_backbone(run, read_graph(plan.backbone).metadata, str(plan.backbone))
        backbone_sha = file_sha256(plan.backbone)
    sets, notes = verification_inputs(run, settings)
    step(f"folding ({settings.fold})")
    tables = pack_tables(run, settings.fold, getattr(torch, settings.fold_dtype))
    name = plan.name or (run.path.stem if run.path else "run")
    with Staging(plan.out.parent) as stage:
        staged = stage.path(plan.out)
        if settings.format == "backbone":
            step("exporting the backbone artifact")
            export_backbone(run, staged, opset=settings.opset, limits=plan.limits)
            session = PackSession(staged, ["cpu"], threads=settings.threads)
            pack = Pack(tables, pack_metadata(run, name if TASK_NAME.fullmatch(name) else "run", tables,
                                              session.sha256, session.geometry.get("identity")), run.preprocess)
            session.add(pack)
        else:
            identity = geometry.get("identity")  # the pack fits any backbone artifact with this identity
            check_fits(Pack(tables, pack_metadata(run, name, tables, backbone_sha, identity), run.preprocess),
                       geometry, backbone_sha, str(plan.out))
            step("recording the golden set")
            tol = Tolerances.for_precision("fp32").override(**settings.tolerances)
            golden = encode(make_golden(run, sets, tol, "fp32", rows=GOLDEN_ROWS))
            write_run_pack(run, staged, tables, name, backbone_sha, {KEY: golden}, identity)
            session = PackSession(plan.backbone, ["cpu"], threads=settings.threads)
            pack = session.add(staged)
        step(f"verifying through {'it' if settings.format == 'backbone' else plan.backbone} against PyTorch")
        predictor = PackPredictor(session, pack.name, owns_session=True)
        report = verify_artifact(staged, run, inputs=sets, overrides=settings.tolerances, threads=settings.threads,
                                 report_path=stage.path(plan.report), name=str(plan.out), predictor=predictor)
        size = staged.stat().st_size
        written = stage.commit() if report.passed else []
    return PackOutcome(plan, settings.format, size, report, written, notes)


@dataclass(frozen=True)
class EnginePlan:
    """export --format backbone --engine FLAVOR: the engine built from the verified backbone ONNX."""

    out: Path
    build: object  # exporters.tensorrt.BuildSettings, checked
    max_tasks: int
    opt_tasks: int | None


def plan_backbone_engine(plan: PackPlan, flavor: str, build, max_tasks: int | None,
                         opt_tasks: int | None) -> EnginePlan:
    """Check the engine's settings and output (B.engine beside B.onnx) before the export; one line when wrong.
    The task range is checked against the limits the backbone will record (--max-tasks <= its task limit)."""
    from dataclasses import replace

    from vfpt_deploy.artifacts.pack import DEFAULT_LIMITS
    from vfpt_deploy.artifacts.schema import sidecar_path
    from vfpt_deploy.exporters.tensorrt import check_trt_available
    from vfpt_deploy.exporters.tensorrt_pack import DEFAULT_MAX_TASKS, pack_ranges

    build = replace(build, flavor=flavor).check()
    max_tasks = DEFAULT_MAX_TASKS if max_tasks is None else max_tasks
    pack_ranges({"limits": {**DEFAULT_LIMITS, **plan.limits}}, build.profile_batches, max_tasks, opt_tasks)
    check_trt_available(flavor)  # one line, before the export
    out = plan.out.with_suffix(".engine")
    check_outputs({"the engine": out, "its sidecar": sidecar_path(out)}, {"the backbone artifact": plan.out})
    return EnginePlan(out, build, max_tasks, opt_tasks)


def build_planned_engine(plan: EnginePlan, onnx_path: Path):
    """Build the engine of the (verified, in place) backbone artifact: exporters/tensorrt_pack.py."""
    from vfpt_deploy.exporters.tensorrt_pack import build_backbone_engine

    return build_backbone_engine(onnx_path, plan.out, plan.build, max_tasks=plan.max_tasks, opt_tasks=plan.opt_tasks)
