"""Verify an exported artifact against the unfolded PyTorch model, Polygraphy-comparator style:
tolerances stated up front, then a report of what was compared, on what inputs, and by how much it
differed. The reference is always the unfolded model from the checkpoint (live FFT), in float32."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Run
from .files import atomic_write, dumps_json
from .errors import VFPTError


@dataclass(frozen=True)
class Tolerances:
    """Pass criteria. atol / rtol gate the max abs / max rel difference of the logits when set;
    min_cosine gates the smallest per-sample cosine similarity of the logits; min_agreement the top-1
    agreement with the reference, in percent."""

    atol: float | None = None
    rtol: float | None = None
    min_cosine: float | None = None
    min_agreement: float = 100.0

    @classmethod
    def for_precision(cls, precision: str) -> "Tolerances":
        if precision == "fp16":
            return cls(atol=None, min_cosine=0.999, min_agreement=99.0)
        return cls(atol=1e-4, min_agreement=100.0)

    def describe(self) -> str:
        parts = []
        if self.atol is not None:
            parts.append(f"max |diff| <= {self.atol:g}")
        if self.rtol is not None:
            parts.append(f"max rel diff <= {self.rtol:g}")
        if self.min_cosine is not None:
            parts.append(f"min cosine >= {self.min_cosine:g}")
        parts.append(f"top-1 agreement >= {self.min_agreement:g}%")
        return ", ".join(parts)


@dataclass
class Comparison:
    inputs: str  # what was compared on
    samples: int
    max_abs: float
    mean_abs: float
    max_rel: float
    min_cosine: float
    agreement: float  # top-1 agreement, percent
    ref_top1: float | None = None  # dataset top-1 when labels are known
    artifact_top1: float | None = None
    failures: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    artifact: str
    checkpoint: str
    backend: str
    precision: str
    tolerances: str
    comparisons: list[Comparison]

    @property
    def passed(self) -> bool:
        return all(not c.failures for c in self.comparisons)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "passed": self.passed}, indent=2)


def compare(ref: np.ndarray, out: np.ndarray, tol: Tolerances, inputs: str, labels: np.ndarray | None = None) -> Comparison:
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    diff = np.abs(out - ref)
    rel = diff / np.maximum(np.abs(ref), 1e-12)
    cos = (ref * out).sum(1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1), 1e-30)
    agree = 100.0 * float((ref.argmax(1) == out.argmax(1)).mean())
    c = Comparison(inputs, len(ref), float(diff.max()), float(diff.mean()), float(rel.max()), float(cos.min()), agree)
    if labels is not None:
        c.ref_top1 = 100.0 * float((ref.argmax(1) == labels).mean())
        c.artifact_top1 = 100.0 * float((out.argmax(1) == labels).mean())
    if tol.atol is not None and c.max_abs > tol.atol:
        c.failures.append(f"max |diff| {c.max_abs:.3g} > atol {tol.atol:g}")
    if tol.rtol is not None and c.max_rel > tol.rtol:
        c.failures.append(f"max rel diff {c.max_rel:.3g} > rtol {tol.rtol:g}")
    if tol.min_cosine is not None and c.min_cosine < tol.min_cosine:
        c.failures.append(f"min cosine {c.min_cosine:.6f} < {tol.min_cosine:g}")
    if c.agreement < tol.min_agreement:
        c.failures.append(f"top-1 agreement {c.agreement:.2f}% < {tol.min_agreement:g}%")
    return c


def input_sets(run: Run, data: str | None, num_random: int, seed: int = 0):
    """(description, float32 NCHW inputs, labels or None): random inputs always, plus real images."""
    h, w = run.model.img_size
    g = torch.Generator().manual_seed(seed)
    yield f"random N(0,1) x{num_random}", torch.randn(num_random, 3, h, w, generator=g).numpy(), None
    if not data:
        return
    from .data import builtin_split, image_folder
    from vfpt_deploy.runtime.preprocess import find_images, load_image

    if data == "builtin" or data.startswith("builtin:"):
        name = data.partition(":")[2] or "digits-shifted"
        images = builtin_split(name, "val")
        pics, labels = [images.image(i) for i in range(len(images))], np.array(images.labels)
        what = f"builtin {name} val"
    elif Path(data).is_dir() and any(p.is_dir() for p in Path(data).iterdir()):
        images = image_folder(data, classes=run.classes)
        pics, labels = [images.image(i) for i in range(len(images))], np.array(images.labels)
        what = f"folder {data}"
    else:
        files = find_images([data])
        pics, labels, what = [load_image(f) for f in files], None, str(data)
    yield f"{what}: {len(pics)} images", run.preprocess.batch(pics), labels


@torch.inference_mode()
def reference_logits(run: Run, x: np.ndarray, batch: int = 32, device: str = "cpu") -> np.ndarray:
    model = run.model.eval().float().to(device)
    try:
        return np.concatenate([model(torch.from_numpy(x[i:i + batch]).to(device)).cpu().numpy()
                               for i in range(0, len(x), batch)])
    finally:
        model.cpu()


def verify_artifact(artifact: str | os.PathLike, run: Run, *, data: str | None = None, num_random: int = 16,
                    tolerances: Tolerances | None = None, providers: list[str] | None = None,
                    report_path: str | os.PathLike | None = None) -> VerifyReport:
    """Compare an artifact (.onnx, or a TensorRT engine) with the checkpoint's unfolded model; write the
    JSON report beside the artifact (or to report_path)."""
    from vfpt_deploy.runtime.onnx_runner import RuntimeSetupError, open_predictor

    artifact = Path(artifact)
    try:
        predictor = open_predictor(artifact, providers)
    except RuntimeSetupError as e:
        raise VFPTError(str(e)) from None
    meta = predictor.metadata
    recorded = meta.get("checkpoint_sha256", "")
    if recorded and recorded != run.sha256:
        raise VFPTError(f"{artifact} was exported from checkpoint sha256 {recorded[:12]}, but {run.path} is "
                        f"{run.sha256[:12]}; verify it against the checkpoint it came from")
    precision = str(meta.get("precision", "fp32"))
    tol = tolerances or Tolerances.for_precision(precision)
    # A TensorRT engine is compared with the PyTorch reference on the GPU, as it will be served.
    engine = artifact.suffix.lower() in (".engine", ".plan", ".trt")
    device = "cuda" if engine and torch.cuda.is_available() else "cpu"
    comparisons = []
    for what, x, labels in input_sets(run, data, num_random):
        ref = reference_logits(run, x, device=device)
        out = np.concatenate([predictor.infer(x[i:i + 32]) for i in range(0, len(x), 32)])
        comparisons.append(compare(ref, out, tol, what, labels))
    backend = ", ".join(getattr(predictor, "providers", ["TensorRT"]))
    report = VerifyReport(str(artifact), str(run.path), f"{backend}; reference on {device}", precision,
                          tol.describe(), comparisons)
    out_path = Path(report_path) if report_path else artifact.with_name(artifact.name + ".verify.json")
    atomic_write(out_path, lambda tmp: Path(tmp).write_text(report.to_json()))
    return report
