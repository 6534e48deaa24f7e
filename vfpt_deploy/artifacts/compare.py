"""Comparing logits, Polygraphy-comparator style: tolerances stated up front, then a report of what was
compared, on what inputs, and by how much it differed. Torch-free: `verify` (against the PyTorch model),
the golden-set replay on a target machine and the serving self-check all apply this one gate.

The gate: a comparison fails on any non-finite logit (reference or artifact), on max |diff| > atol,
max relative diff > rtol, a per-sample cosine < min_cosine, top-1 agreement < min_agreement, or a
top-k order that differs where the reference's own logits are not tied.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vfpt_deploy.errors import UsageError, VerificationError
from vfpt_deploy.artifacts.files import atomic_write, dumps_json

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
    hardware: dict | None = None  # where the artifact ran: CPU and its numeric ISA flags, GPUs, providers, libraries
    golden_sha256: str = ""  # the golden set replayed (its payload's sha256), where one was
    # what the report vouches with (artifacts/strength.py): the data sets compared ({set, samples, random}),
    # the tolerances as numbers (asdict of Tolerances; `tolerances` is their text), the checkpoints' sha256s
    data: list[dict] = field(default_factory=list)
    limits: dict | None = None
    checkpoint_sha256: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems and bool(self.comparisons) and all(not c.failures for c in self.comparisons)

    def to_json(self) -> str:
        return dumps_json({**asdict(self), "passed": self.passed}, indent=2)

    def write(self, path) -> Path:
        """Write the report to `path`; a failed one never replaces an earlier report there: it goes to
        NAME.failed.json instead, and its notes say so. Returns where it was written."""
        path = Path(path)
        if not self.passed and path.exists():
            path = path.with_name(path.name.removesuffix(".json") + ".failed.json")
            self.notes.append(f"the earlier report was kept; this one is {path.name}")
        atomic_write(path, lambda tmp: Path(tmp).write_text(self.to_json() + "\n"))
        return path


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
