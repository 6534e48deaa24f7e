"""The predictor interface every runtime backend shares: metadata -> preprocessing -> logits -> top-k.

A backend (onnxruntime, TensorRT) implements `infer` on a preprocessed float32 NCHW batch; everything
else -- preprocessing from the artifact's own metadata, batching, softmax, top-k with class names --
lives here once.

Artifact metadata (ONNX metadata_props, or a TensorRT engine's JSON sidecar), keys and JSON values:
  vfpt.format          "vfpt-deploy.artifact"
  vfpt.classes         list of class names
  vfpt.preprocess      Preprocess as a dict
  vfpt.config          VFPT config dict
  vfpt.backbone        backbone identity dict
  vfpt.checkpoint_sha256, vfpt.tool_version, vfpt.fold, vfpt.precision (strings), vfpt.opset (int)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .preprocess import Preprocess, load_image

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
ARTIFACT_FORMAT = "vfpt-deploy.artifact"


def encode_metadata(meta: dict) -> dict[str, str]:
    """Plain dict -> string props, 'vfpt.' prefixed, every value JSON (so decoding is lossless)."""
    return {f"vfpt.{k}": json.dumps(v) for k, v in meta.items()}


def decode_metadata(props: dict[str, str]) -> dict:
    """String props -> plain dict (JSON values decoded where they parse); non-vfpt keys dropped."""
    out = {}
    for k, v in props.items():
        if not k.startswith("vfpt."):
            continue
        try:
            out[k[5:]] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            out[k[5:]] = v
    return out


@dataclass
class Prediction:
    source: str
    top: list[tuple[str, float]]  # (class name, probability), best first


class Predictor:
    """Base class. Subclasses set self.metadata (decoded) and implement infer()."""

    metadata: dict
    max_batch: int = 32

    @property
    def classes(self) -> list[str]:
        return list(self.metadata.get("classes") or [])

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess.from_dict(self.metadata["preprocess"])

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 [B, 3, H, W] -> float32 logits [B, C]."""
        raise NotImplementedError

    def logits(self, images: list[Image.Image]) -> np.ndarray:
        pre = self.preprocess
        outs = [self.infer(pre.batch(images[i:i + self.max_batch])) for i in range(0, len(images), self.max_batch)]
        return np.concatenate(outs) if outs else np.zeros((0, len(self.classes)), np.float32)

    def predict(self, sources: list[str | Path | Image.Image], top_k: int = 5) -> list[Prediction]:
        images = [s if isinstance(s, Image.Image) else load_image(s) for s in sources]
        logits = self.logits(images).astype(np.float64)
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = z / z.sum(axis=1, keepdims=True)
        names = self.classes or [str(i) for i in range(probs.shape[1])]
        k = min(top_k, probs.shape[1])
        out = []
        for src, p in zip(sources, probs):
            idx = np.argsort(-p, kind="stable")[:k]
            out.append(Prediction(str(src) if not isinstance(src, Image.Image) else "<image>",
                                  [(names[i], float(p[i])) for i in idx]))
        return out
