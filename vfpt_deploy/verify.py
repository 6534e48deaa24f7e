"""Verify an exported artifact against the unfolded PyTorch model, Polygraphy-comparator style:
tolerances stated up front, then a report of what was compared, on what inputs, and by how much it
differed. The reference is always the unfolded model from the checkpoint (live FFT), in float32.

The gate: a comparison fails on any non-finite logit (reference or artifact), on max |diff| > atol,
max relative diff > rtol, a per-sample cosine < min_cosine, top-1 agreement < min_agreement, or a
top-k order that differs where the reference's own logits are not tied. The artifact's metadata must
be usable by the runtime (the predictor checks it when it opens) and must describe the checkpoint
(classes, preprocessing, source hash).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Run
from .errors import InputError, UsageError, VerificationError, VFPTError
from .files import atomic_write, dumps_json, file_sha256
from .fold import kv_refusal
from .multitask import TaskSet
from .schema import is_engine, report_path as default_report_path

TOP_K = 5


@dataclass(frozen=True)
class Tolerances:
    """Pass criteria. atol / rtol gate the max abs / max rel difference of the logits when set;
    min_cosine gates the smallest per-sample cosine similarity; min_agreement the top-1 agreement with
    the reference, in percent; topk_order (needs atol) the order of the top-5 classes wherever the
    reference's logits differ by more than atol (closer ones are ties and may swap). An order change
    needs two logits to move by more than atol together, so this catches what atol alone lets through:
    two differences each within atol that still reorder the top classes.
    max_top1_drop: the most the dataset top-1 may fall below the reference's, in points, where labels
    exist. gate_random: gate the random N(0,1) inputs too (int8 does not: its activation ranges are
    calibrated on images, and noise far outside them says nothing about images; they are still reported,
    and a non-finite logit still fails)."""

    atol: float | None = None
    rtol: float | None = None
    min_cosine: float | None = None
    min_agreement: float = 100.0
    topk_order: bool = False
    max_top1_drop: float | None = None
    gate_random: bool = True

    def __post_init__(self) -> None:
        for name, lo, hi in (("atol", 0.0, 1e6), ("rtol", 0.0, 1e6), ("min_cosine", -1.0, 1.0),
                             ("min_agreement", 0.0, 100.0), ("max_top1_drop", 0.0, 100.0)):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
                raise UsageError(f"--{name.replace('_', '-')} must be a finite number in [{lo:g}, {hi:g}], got {v!r}")

    @classmethod
    def for_precision(cls, precision: str) -> "Tolerances":
        if precision == "int8":  # measured: docs/benchmarks.md, INT8
            return cls(atol=None, min_cosine=0.99, min_agreement=98.0, max_top1_drop=1.0, gate_random=False)
        if precision == "fp16":
            return cls(atol=None, min_cosine=0.999, min_agreement=99.0)
        return cls(atol=1e-4, min_agreement=100.0, topk_order=True)

    def override(self, **values) -> "Tolerances":
        """These tolerances with the given (non-None) values replaced, checked again."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})

    def describe(self) -> str:
        parts = []
        if self.atol is not None:
            parts.append(f"max |diff| <= {self.atol:g}")
        if self.rtol is not None:
            parts.append(f"max rel diff <= {self.rtol:g}")
        if self.min_cosine is not None:
            parts.append(f"min cosine >= {self.min_cosine:g}")
        parts.append(f"top-1 agreement >= {self.min_agreement:g}%")
        if self.topk_order and self.atol is not None:
            parts.append(f"top-{TOP_K} order kept (ties within {self.atol:g} may swap)")
        if self.max_top1_drop is not None:
            parts.append(f"dataset top-1 at most {self.max_top1_drop:g} points below the reference's (where labels exist)")
        parts.append("all logits finite")
        if not self.gate_random:
            parts.append("real images only (random inputs reported, not gated)")
        return ", ".join(parts)


_UNGATED = Tolerances(min_agreement=0.0)  # what an ungated comparison is held to: finite logits only


@dataclass
class Comparison:
    inputs: str  # what was compared on
    samples: int
    max_abs: float
    mean_abs: float
    max_rel: float
    min_cosine: float
    agreement: float  # top-1 agreement, percent
    topk_order: float = 100.0  # percent of samples whose top-k order is kept (ties allowed)
    ref_top1: float | None = None  # dataset top-1 when labels are known
    artifact_top1: float | None = None
    failures: list[str] = field(default_factory=list)
    gated: bool = True  # False: reported only (random inputs of an int8 artifact); non-finite logits still fail


@dataclass
class VerifyReport:
    artifact: str
    checkpoint: str
    backend: str
    precision: str
    tolerances: str
    comparisons: list[Comparison]
    problems: list[str] = field(default_factory=list)  # failures not tied to one input set (metadata)
    notes: list[str] = field(default_factory=list)
    artifact_sha256: str = ""  # of the file compared: a later step (triton) checks it is still this one
    quantization: dict | None = None  # an int8 artifact's record: mode, what stayed float, calibration set
    tasks: list[str] | None = None  # a multi-task artifact's tasks (comparisons name theirs)

    @property
    def passed(self) -> bool:
        return not self.problems and bool(self.comparisons) and all(not c.failures for c in self.comparisons)

    def to_json(self) -> str:
        return dumps_json({**asdict(self), "passed": self.passed}, indent=2)


def _nonfinite(a: np.ndarray, who: str) -> str | None:
    bad = np.argwhere(~np.isfinite(a))
    if not len(bad):
        return None
    i, j = (int(v) for v in bad[0])
    return f"{who} logits are not finite: {len(bad)} values, first at sample {i}, class {j} ({a[i, j]})"


def _topk_kept(ref: np.ndarray, out: np.ndarray, tie: float) -> np.ndarray:
    """Per sample: the artifact's top-k classes are the reference's, in order, up to reference ties."""
    k = min(TOP_K, ref.shape[1])
    r_idx = np.argsort(-ref, axis=1, kind="stable")[:, :k]
    o_idx = np.argsort(-out, axis=1, kind="stable")[:, :k]
    rows = np.arange(len(ref))[:, None]
    gap = np.abs(ref[rows, r_idx] - ref[rows, o_idx])  # 0 where the same class sits at that rank
    return (gap <= tie).all(axis=1)


def compare(ref: np.ndarray, out: np.ndarray, tol: Tolerances, inputs: str, labels: np.ndarray | None = None,
            gated: bool = True) -> Comparison:
    """gated False: only non-finite logits fail; the differences are reported."""
    with np.errstate(all="ignore"):  # overflowing logits are reported by the gate, not as warnings
        c = _compare(ref.astype(np.float64), out.astype(np.float64), tol if gated else _UNGATED, inputs, labels)
    c.gated = gated
    return c


def _compare(ref: np.ndarray, out: np.ndarray, tol: Tolerances, inputs: str, labels: np.ndarray | None) -> Comparison:
    if ref.shape != out.shape:
        raise VerificationError(f"the artifact gives logits of shape {list(out.shape)}, the checkpoint "
                                f"{list(ref.shape)}; they are not the same model")
    diff = np.abs(out - ref)
    rel = diff / np.maximum(np.abs(ref), 1e-12)
    cos = (ref * out).sum(1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1), 1e-30)
    agree = 100.0 * float((ref.argmax(1) == out.argmax(1)).mean())
    kept = _topk_kept(ref, out, tol.atol) if tol.atol is not None else np.ones(len(ref), bool)
    c = Comparison(inputs, len(ref), float(diff.max()), float(diff.mean()), float(rel.max()), float(cos.min()),
                   agree, 100.0 * float(kept.mean()))
    if labels is not None:
        c.ref_top1 = 100.0 * float((ref.argmax(1) == labels).mean())
        c.artifact_top1 = 100.0 * float((out.argmax(1) == labels).mean())
    c.failures = [f for f in (_nonfinite(ref, "the PyTorch reference's"), _nonfinite(out, "the artifact's")) if f]
    if c.failures:  # nothing else is meaningful, and NaN compares False with every bound
        return c
    if tol.atol is not None and c.max_abs > tol.atol:
        c.failures.append(f"max |diff| {c.max_abs:.3g} > atol {tol.atol:g}")
    if tol.rtol is not None and c.max_rel > tol.rtol:
        c.failures.append(f"max rel diff {c.max_rel:.3g} > rtol {tol.rtol:g}")
    if tol.min_cosine is not None and c.min_cosine < tol.min_cosine:
        c.failures.append(f"min cosine {c.min_cosine:.6f} < {tol.min_cosine:g}")
    if c.agreement < tol.min_agreement:
        c.failures.append(f"top-1 agreement {c.agreement:.2f}% < {tol.min_agreement:g}%")
    if tol.max_top1_drop is not None and c.ref_top1 is not None and c.ref_top1 - c.artifact_top1 > tol.max_top1_drop:
        c.failures.append(f"dataset top-1 {c.artifact_top1:.2f}% is {c.ref_top1 - c.artifact_top1:.2f} points below "
                          f"the reference's {c.ref_top1:.2f}% (> {tol.max_top1_drop:g})")
    if tol.topk_order and tol.atol is not None and not kept.all():
        c.failures.append(f"top-{TOP_K} order differs on {int((~kept).sum())} of {len(kept)} samples")
    return c


@dataclass
class InputSet:
    what: str
    x: np.ndarray  # float32 NCHW, preprocessed
    labels: np.ndarray | None
    random: bool = False  # N(0,1) noise, not images


MAX_RANDOM = 4096


def input_sets(run: Run, data: str | None, num_random: int, seed: int = 0) -> list[InputSet]:
    """Random inputs always, plus real images from `data` ('builtin[:name]', a folder with class
    subfolders (gives top-1), or image files). Loaded up front, so a bad --data fails before any work."""
    if isinstance(num_random, bool) or not isinstance(num_random, int) or not 1 <= num_random <= MAX_RANDOM:
        raise UsageError(f"--num-random must be an integer in [1, {MAX_RANDOM}], got {num_random!r}")
    h, w = run.model.img_size
    g = torch.Generator().manual_seed(seed)
    sets = [InputSet(f"random N(0,1) x{num_random}", torch.randn(num_random, 3, h, w, generator=g).numpy(), None,
                     random=True)]
    if data:
        sets.append(_image_set(run, data))
    return sets


def _image_set(run: Run, data: str) -> InputSet:
    from .data import builtin_split, image_folder
    from vfpt_deploy.runtime.preprocess import find_images, load_image

    if data == "builtin" or data.startswith("builtin:"):
        name = data.partition(":")[2] or "digits-shifted"
        images, what = builtin_split(name, "val"), f"builtin {name} val"
        if images.classes != list(run.classes):  # its labels would be scored against another head
            raise InputError(f"--data {data} has the classes {', '.join(images.classes)}, the model "
                             f"{len(run.classes)} others; pass a folder of images without class subfolders "
                             "(no labels), or a folder whose subfolders are the model's classes")
    elif Path(data).is_dir() and any(p.is_dir() for p in Path(data).iterdir()):
        images, what = image_folder(data, classes=run.classes), f"folder {data}"
    else:
        files = find_images([data])
        pics = [load_image(f) for f in files]
        return InputSet(f"{data}: {len(pics)} images", run.preprocess.batch(pics), None)
    pics = [images.image(i) for i in range(len(images))]
    return InputSet(f"{what}: {len(pics)} images", run.preprocess.batch(pics), np.array(images.labels))


@torch.inference_mode()
def reference_logits(run: Run, x: np.ndarray, batch: int = 32, device: str = "cpu") -> np.ndarray:
    model = run.model.eval().float().to(device)
    try:
        return np.concatenate([model(torch.from_numpy(x[i:i + batch]).to(device)).cpu().numpy()
                               for i in range(0, len(x), batch)])
    finally:
        model.cpu()


def graph_precision(predictor, claimed: str) -> tuple[str, str | None]:
    """The precision the tolerances are chosen by: the ONNX graph's own (fp16 if it computes in half,
    read once by the predictor), not the metadata's word for it, so a tampered 'fp16' cannot loosen an
    fp32 model's gate. Engines report theirs through the sidecar TensorRT wrote."""
    actual = predictor.graph_precision
    if actual is None:
        return claimed, None
    if actual != claimed:
        return actual, f"the metadata says {claimed} but the graph computes in {actual}: re-export it"
    return actual, None


def metadata_problems(meta: dict, run: Run) -> list[str]:
    """Where the artifact's metadata does not describe this checkpoint (the runtime would then
    preprocess or name classes differently from the model that was verified)."""
    problems = []
    recorded = meta.get("checkpoint_sha256", "")
    if recorded and recorded != run.sha256:
        problems.append(f"the artifact was exported from checkpoint sha256 {recorded[:12]}, but the checkpoint is "
                        f"{run.sha256[:12]}: verify it against the checkpoint it came from")
    if list(meta.get("classes") or []) != list(run.classes):
        problems.append("the artifact's class names differ from the checkpoint's: re-export it")
    if meta.get("preprocess") != run.preprocess:
        problems.append("the artifact's preprocessing differs from the checkpoint's: re-export it")
    return problems


def _infer(predictor, x: np.ndarray, task_ids: np.ndarray | None = None, batch: int = 32) -> np.ndarray:
    return np.concatenate([predictor.infer(x[i:i + batch], None if task_ids is None else task_ids[i:i + batch])
                           for i in range(0, len(x), batch)])


def task_input_sets(tasks: TaskSet, data: str | list[str | None] | None, num_random: int) -> list[list[InputSet]]:
    """Per task: its own random inputs (seeded by task index, so the tasks of a mixed batch see different
    images) and the images of `data` (one for all, or one per task), checked against that task's classes."""
    out = []
    for t, (name, run) in enumerate(zip(tasks.names, tasks.runs)):
        try:
            out.append(input_sets(run, data[t] if isinstance(data, list) else data, num_random, seed=t))
        except UsageError:
            raise
        except VFPTError as e:
            hint = ("; with several tasks --data must suit each: a folder of images without class subfolders "
                    "does (or verify each task's own single-task export on its data)"
                    if isinstance(data, str) and len(tasks) > 1 else "")
            raise type(e)(f"task {name!r}: {str(e).rstrip('.')}{hint}") from None
    return out


def task_metadata_problems(meta: dict, tasks: TaskSet) -> list[str]:
    """Where a multi-task artifact's tasks are not these checkpoints, in this order."""
    recorded = meta.get("tasks") or []
    if [t.get("name") for t in recorded] != list(tasks.names):
        return [f"the artifact holds tasks {[t.get('name') for t in recorded]}, the checkpoints given are "
                f"{list(tasks.names)}: pass each task's checkpoint (--task NAME=PATH)"]
    problems = []
    backbone = meta.get("backbone") if isinstance(meta.get("backbone"), dict) else {}
    if backbone.get("sha256") != tasks.first.backbone.sha256:
        problems.append("the artifact's backbone sha256 is not the checkpoints' backbone: re-export it")
    for t, run in zip(recorded, tasks.runs):
        for p in metadata_problems({**t, "preprocess": meta.get("preprocess")}, run):
            problems.append(f"task {t['name']!r}: {p}")
        if t.get("config") != run.config.to_dict() or t.get("num_prompts") != run.config.num_prompts:
            problems.append(f"task {t['name']!r}: the artifact's VFPT config is not the checkpoint's: re-export it")
        if t.get("fold") == "kv" and kv_refusal(run.model) is not None:
            problems.append(f"task {t['name']!r}: the artifact says kv fold, which this checkpoint cannot have: re-export it")
    return problems


def _task_comparisons(predictor, tasks: TaskSet, inputs: list[list[InputSet]], tol: Tolerances, device: str,
                      problems: list[str]) -> list[Comparison]:
    """Every task's inputs through the artifact as ONE shuffled mixed-task stream (batches of 32 hold several
    tasks), each sample compared with its own task's unfolded model; padding logits must be -inf."""
    flat = [(t, s) for t, sets in enumerate(inputs) for s in sets]
    x = np.concatenate([s.x for _, s in flat])
    ids = np.concatenate([np.full(len(s.x), t, np.int64) for t, s in flat])
    order = np.random.default_rng(0).permutation(len(x))
    out = np.empty((len(x), predictor.infer(x[:1], ids[:1]).shape[1]), np.float32)
    out[order] = _infer(predictor, x[order], ids[order])
    comparisons, start = [], 0
    for t, s in flat:
        run, name, width = tasks.runs[t], tasks.names[t], len(tasks.runs[t].classes)
        rows = out[start:start + len(s.x)]
        start += len(s.x)
        if not np.all(np.isneginf(rows[:, width:])):
            problems.append(f"task {name!r}: logits past its {width} classes are not -inf (padding must never win); "
                            "re-export the artifact")
        ref = reference_logits(run, s.x, device=device)
        comparisons.append(compare(ref, rows[:, :width], tol, f"task {name}: {s.what}", s.labels,
                                   gated=tol.gate_random or not s.random))
    return comparisons


def verify_artifact(artifact: str | os.PathLike, run: Run | TaskSet, *, data: str | None = None, num_random: int = 16,
                    overrides: dict | None = None, providers: list[str] | None = None,
                    report_path: str | os.PathLike | None = None, inputs: list[InputSet] | None = None,
                    name: str | None = None, threads: int | None = None,
                    allow_fallback: bool = False) -> VerifyReport:
    """Compare an artifact (.onnx, or a TensorRT engine) with the checkpoint's unfolded model and write
    the JSON report (default: beside the artifact). overrides: atol / rtol / min_cosine / min_agreement
    replacing the precision's defaults. name: how the report names the artifact (default: its path).
    run: a multitask.TaskSet for a multi-task artifact (inputs then per task: task_input_sets)."""
    from vfpt_deploy.runtime.onnx_runner import open_predictor

    artifact = Path(artifact)
    kwargs = {"threads": threads, "allow_fallback": allow_fallback} if not is_engine(artifact) else {}
    multi = isinstance(run, TaskSet)
    if inputs is None:
        inputs = task_input_sets(run, data, num_random) if multi else input_sets(run, data, num_random)
    with open_predictor(artifact, providers, **kwargs) as predictor:
        precision, problem = graph_precision(predictor, predictor.metadata.get("precision", "fp32"))
        tol = Tolerances.for_precision(precision).override(**(overrides or {}))
        # A TensorRT engine is compared with the PyTorch reference on the GPU, as it will be served.
        device = "cuda" if is_engine(artifact) and torch.cuda.is_available() else "cpu"
        meta = {**predictor.metadata, "preprocess": predictor.preprocess}
        problems = [problem, *(task_metadata_problems(meta, run) if multi else metadata_problems(meta, run))]
        if multi and not any(problems):
            comparisons = _task_comparisons(predictor, run, inputs, tol, device, problems)
        elif multi:
            comparisons = []  # the tasks do not match the checkpoints: comparing them would say nothing
        else:
            comparisons = [compare(reference_logits(run, s.x, device=device), _infer(predictor, s.x), tol, s.what,
                                   s.labels, gated=tol.gate_random or not s.random) for s in inputs]
        backend = ", ".join(getattr(predictor, "providers", None) or ["TensorRT"])
    checkpoint = ", ".join(str(r.path) for r in run.runs) if multi else str(run.path)
    report = VerifyReport(name or str(artifact), checkpoint, f"{backend}; reference on {device}", precision,
                          tol.describe(), comparisons, [p for p in problems if p],
                          artifact_sha256=file_sha256(artifact), quantization=meta.get("quantization"),
                          tasks=list(run.names) if multi else None)
    if comparisons and not any(c.gated for c in comparisons):
        report.problems.append(f"{precision} artifacts are gated on real images, and none were given: pass --data "
                               "builtin[:name] or a folder of images")
    out_path = Path(report_path) if report_path else default_report_path(artifact)
    if not report.passed and out_path.exists():  # a failed verify never replaces the previous report
        out_path = out_path.with_name(out_path.name.removesuffix(".json") + ".failed.json")
        report.notes.append(f"the earlier report was kept; this one is {out_path.name}")
    atomic_write(out_path, lambda tmp: Path(tmp).write_text(report.to_json() + "\n"))
    return report
