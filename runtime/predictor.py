"""The predictor interface every runtime backend shares: metadata -> preprocessing -> logits -> top-k.

A backend (onnxruntime, TensorRT) implements `infer` on a preprocessed float32 NCHW batch; everything
else -- preprocessing from the artifact's own (checked) metadata, batching, softmax, top-k with class
names, per-file errors -- lives here once. The metadata schema is vfpt_deploy.schema.
Predictors hold sessions or GPU buffers: close() them, or use them as context managers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vfpt_deploy.errors import ImageError
from vfpt_deploy.schema import ARTIFACT_FORMAT, INPUT_NAME, OUTPUT_NAME, decode_metadata, encode_metadata  # noqa: F401

from .preprocess import Preprocess, load_image


@dataclass
class Prediction:
    source: str
    top: list[tuple[str, float]]  # (class name, probability), best first; empty when error is set
    error: str | None = None  # why this input could not be classified (the others still are)


class Predictor:
    """Base class. Subclasses set self.metadata (decoded) and implement infer()."""

    metadata: dict  # decoded, as stored
    preprocess: Preprocess  # checked (schema.check_metadata) when the predictor opens
    graph_precision: str | None = None  # what the ONNX graph itself computes in, where it was read
    max_batch: int = 32

    @property
    def classes(self) -> list[str]:
        return list(self.metadata.get("classes") or [])

    def close(self) -> None:
        """Release the session / device memory. Safe to call twice."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 [B, 3, H, W] -> float32 logits [B, C]."""
        raise NotImplementedError

    def logits(self, images: list[Image.Image]) -> np.ndarray:
        pre = self.preprocess
        outs = [self.infer(pre.batch(images[i:i + self.max_batch])) for i in range(0, len(images), self.max_batch)]
        return np.concatenate(outs) if outs else np.zeros((0, len(self.classes)), np.float32)

    def predict(self, sources: list[str | Path | Image.Image], top_k: int = 5) -> list[Prediction]:
        """Top-k per input, in input order. An unreadable image, or an input whose logits are not
        finite, gets a Prediction with `error` set; the others are still classified."""
        names = [str(s) if not isinstance(s, Image.Image) else "<image>" for s in sources]
        images, errors = [], {}
        for i, s in enumerate(sources):
            try:
                images.append(s if isinstance(s, Image.Image) else load_image(s))
            except ImageError as e:
                errors[i] = str(e)
        ok = [i for i in range(len(sources)) if i not in errors]
        logits = self.logits(images).astype(np.float64)
        out = {i: Prediction(names[i], [], err) for i, err in errors.items()}
        classes = self.classes or [str(c) for c in range(logits.shape[1])]
        for i, row in zip(ok, logits):
            if not np.isfinite(row).all():
                out[i] = Prediction(names[i], [], f"{names[i]}: the model's logits are not finite (NaN or Inf) for this input")
                continue
            z = np.exp(row - row.max())
            p = z / z.sum()
            idx = np.argsort(-p, kind="stable")[:min(top_k, len(p))]
            out[i] = Prediction(names[i], [(classes[j], float(p[j])) for j in idx])
        return [out[i] for i in range(len(sources))]
