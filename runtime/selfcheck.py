"""Replay an artifact's golden set on this machine's runtime (vfpt_deploy/golden.py): the torch-free
`verify ARTIFACT`, the check `serve` runs when it loads a model, and `predict --self-check`.

The golden inputs go through the artifact as it is served (this onnxruntime provider or TensorRT engine),
and the logits are held to the gate the export recorded for the artifact's precision, against the unfolded
PyTorch model's logits computed where the artifact was exported. Torch-free.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vfpt_deploy.artifacts.compare import Comparison, Tolerances, VerifyReport, compare
from vfpt_deploy.errors import ArtifactError
from vfpt_deploy.artifacts.files import file_sha256
from vfpt_deploy.artifacts.golden import GoldenSet, read
from vfpt_deploy.artifacts.schema import output_classes, report_path

from . import hardware
from .predictor import Predictor

GOLDEN_REPORT_SUFFIX = ".golden.verify.json"
CHUNK = 8  # rows per inference call (an engine's profile may allow no more)


@dataclass
class SelfCheck:
    """The outcome of one replay: passed, what failed (one line), how long it took, the comparisons."""

    passed: bool
    seconds: float
    comparisons: list[Comparison] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    golden: GoldenSet | None = None

    @property
    def failure(self) -> str:
        """The first failing gate, as one line (empty when passed)."""
        for p in self.problems:
            return p
        for c in self.comparisons:
            if c.failures:
                return f"{c.inputs}: {c.failures[0]}"
        return ""


def golden_of(predictor: Predictor, source: str) -> GoldenSet | None:
    """The predictor's artifact's golden set, checked against its input size and logits width; None if it
    has none."""
    return read(predictor.metadata, source, image_size=predictor.preprocess.size,
                width=output_classes(predictor.metadata))


def load_sets(golden: GoldenSet) -> list[dict]:
    """What the load-time check replays: per task, the first row of its real images (the gate every precision
    applies; int8 gates nothing else), else of its random inputs. One ViT-B/16 image is about half a second on
    2 CPU cores (docs/benchmarks.md); `verify ARTIFACT` replays every row."""
    chosen: dict = {}
    for s in golden.sets:
        t = s.get("task")
        if t not in chosen or (chosen[t]["random"] and not s["random"]):
            chosen[t] = s
    return [{**s, "stop": s["start"] + 1} for s in chosen.values()]


def replay(predictor: Predictor, golden: GoldenSet, tol: Tolerances | None = None,
           sets: list[dict] | None = None) -> tuple[list[Comparison], list[str]]:
    """Every golden set (or the given `sets` of its rows) through the predictor, compared with its stored
    reference under `tol` (default: the recorded gate). A multi-task artifact's rows beyond their task's classes
    must be -inf."""
    tol = tol or golden.tolerances
    comparisons, problems = [], []
    for s in golden.sets if sets is None else sets:
        rows = slice(s["start"], s["stop"])
        x, ref = golden.x[rows], golden.logits[rows]
        ids = None if golden.task is None else golden.task[rows]
        out = np.concatenate([predictor.infer(x[i:i + CHUNK], None if ids is None else ids[i:i + CHUNK])
                              for i in range(0, len(x), CHUNK)])
        width = ref.shape[1]
        if ids is not None:
            width = len(predictor.classes_of(int(ids[0])))
            if not np.all(np.isneginf(out[:, width:])):
                problems.append(f"task {predictor.tasks[int(ids[0])]!r}: logits past its {width} classes are not -inf")
        labels = golden.labels[rows]
        comparisons.append(compare(ref[:, :width], out[:, :width], tol, f"golden: {s['what']}",
                                   labels if (labels >= 0).all() else None, gated=tol.gate_random or not s["random"]))
    return comparisons, problems


def self_check(predictor: Predictor, source: str, tol: Tolerances | None = None,
               at_load: bool = False) -> SelfCheck | None:
    """Replay the artifact's golden set (at_load: only load_sets' rows); None when it has none. A crafted golden
    set raises ArtifactError."""
    t0 = time.perf_counter()
    golden = golden_of(predictor, source)
    if golden is None:
        return None
    comparisons, problems = replay(predictor, golden, tol, load_sets(golden) if at_load else None)
    if comparisons and not any(c.gated for c in comparisons):
        problems.append(f"the golden set has no real images, and {golden.precision} artifacts are gated on images")
    passed = not problems and all(not c.failures for c in comparisons)
    return SelfCheck(passed, time.perf_counter() - t0, comparisons, problems, golden)


def isa_note(golden: GoldenSet) -> str | None:
    """Where this CPU lacks a numeric ISA flag the reference machine had (the artifact may compute otherwise
    here; the replay says whether it still holds)."""
    ref = (golden.reference.get("hardware") or {}).get("cpu") or {}
    ref_isa = [f for f in ref.get("isa") or [] if isinstance(f, str)]
    missing = hardware.missing_isa(ref_isa) if ref_isa else []
    if not missing:
        return None
    return f"this CPU lacks {', '.join(missing)}, which the reference machine ({str(ref.get('model'))[:60]}) had"


def verify_golden(artifact: str | os.PathLike, *, providers: list[str] | None = None, threads: int | None = None,
                  allow_fallback: bool = False, overrides: dict | None = None,
                  report_path_: str | os.PathLike | None = None, predictor: Predictor | None = None) -> VerifyReport:
    """`verify ARTIFACT` without a checkpoint: replay its golden set here and write the report (default:
    ARTIFACT.golden.verify.json, so the fuller report of a verify against the checkpoint is never replaced).
    predictor: an open predictor to use (and close) instead of opening ARTIFACT (a prompt pack on its
    backbone: runtime/packs.py, ARTIFACT then the pack file)."""
    from .onnx_runner import open_predictor
    from vfpt_deploy.artifacts.schema import is_engine

    artifact = Path(artifact)
    kwargs = {} if is_engine(artifact) else {"threads": threads, "allow_fallback": allow_fallback}
    with predictor if predictor is not None else open_predictor(artifact, providers, **kwargs) as predictor:
        golden = golden_of(predictor, str(artifact))
        if golden is None:
            tasks = predictor.metadata.get("tasks") or []
            ckpts = " ".join(f"--ckpt {t.get('checkpoint') or t['name'] + '.pt'}" for t in tasks[:4]) + (
                " ..." if len(tasks) > 4 else "") if tasks else "--ckpt run.pt"
            raise ArtifactError(f"{artifact} carries no golden set (exported before vfpt-deploy recorded one); verify it "
                                f"against its checkpoint{'s' if tasks else ''} with {ckpts}, or re-export it")
        precision = predictor.graph_precision or predictor.metadata.get("precision", "fp32")
        problems = []
        if precision != golden.precision:
            problems.append(f"the golden set was recorded for {golden.precision}, but the graph computes in {precision}: "
                            "re-export the artifact")
        tol = golden.tolerances.override(**(overrides or {}))
        check = self_check(predictor, str(artifact), tol)
        used = getattr(predictor, "providers", None) or ["TensorRT"]
        notes = [n for n in (*getattr(predictor, "notes", ()), isa_note(golden), _loosened(golden)) if n]
        meta = predictor.metadata
    here = hardware.describe(used)
    ref_hw = golden.reference.get("hardware") or {}
    report = VerifyReport(str(artifact), f"golden set ({golden.rows} inputs; reference: unfolded PyTorch float32 on "
                                         f"{hardware.summary(ref_hw) if ref_hw else 'an unrecorded machine'})",
                          f"{', '.join(used)} on {hardware.summary(here)}", precision, tol.describe(),
                          check.comparisons, problems + check.problems, notes, artifact_sha256=file_sha256(artifact),
                          quantization=meta.get("quantization"), tasks=[t["name"] for t in meta.get("tasks") or []] or None)
    report.hardware = here
    report.golden_sha256 = golden.sha256
    report.write(Path(report_path_) if report_path_ else golden_report_path(artifact))
    return report


def golden_report_path(artifact: str | os.PathLike) -> Path:
    """model.onnx -> model.onnx.golden.verify.json (beside, never over, model.onnx.verify.json)."""
    base = report_path(artifact)
    return base.with_name(Path(artifact).name + GOLDEN_REPORT_SUFFIX)


def _loosened(golden: GoldenSet) -> str | None:
    """Say so when the export recorded a gate other than the precision's default."""
    default = Tolerances.for_precision(golden.precision)
    if golden.tolerances == default:
        return None
    return (f"the export recorded a gate other than {golden.precision}'s default: {golden.tolerances.describe()} "
            f"(default: {default.describe()})")



def check_on_load(predictor: Predictor, source: str) -> SelfCheck | None:
    """The load-time self-check (serve, predict --self-check): replay the golden set once per predictor and keep
    the outcome on it (`predictor.self_check_result`). Raises ArtifactError, one line naming the failing gate,
    when the artifact does not reproduce here; None when it carries no golden set."""
    if hasattr(predictor, "self_check_result"):
        result = predictor.self_check_result
    else:
        result = predictor.self_check_result = self_check(predictor, source, at_load=True)
    if result is not None and not result.passed:
        isa = "; ".join(n for n in (isa_note(result.golden), *getattr(predictor, "notes", ())) if n)
        raise ArtifactError(f"{source} does not reproduce its golden set on this machine ({result.failure}; "
                            f"{hardware.summary(hardware.describe(getattr(predictor, 'providers', None)))}"
                            f"{'; ' + isa if isa else ''}): not served; re-export it, or verify it here with "
                            "'vfpt-deploy verify ARTIFACT' for the full table")
    return result


def describe_check(result: SelfCheck | None) -> str:
    """One log line: what the self-check compared and how it came out."""
    if result is None:
        return "no golden set (exported before vfpt-deploy recorded one): not self-checked; re-export to get one"
    worst = max((c.max_abs for c in result.comparisons), default=0.0)
    cosine = min((c.min_cosine for c in result.comparisons), default=1.0)
    rows = sum(c.samples for c in result.comparisons)
    return (f"self-check {'passed' if result.passed else 'FAILED'}: {rows} of {result.golden.rows} golden inputs, max |diff| "
            f"{worst:.3g}, min cosine {cosine:.6f}, {result.seconds * 1000:.0f} ms")
