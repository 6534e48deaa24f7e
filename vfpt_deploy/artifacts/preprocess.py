"""The preprocessing an artifact records (resize, crop, mean, std, interpolation) and its application to an
image, with PIL + numpy: one implementation for training, verification and serving, so a deployed model
sees exactly the pixels it was trained on. Torch-free. Reading image files is runtime/preprocess.py.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from vfpt_deploy.errors import ArtifactError, ImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERP = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
           "nearest": Image.Resampling.NEAREST}
MAX_SIDE = 8192  # largest resize / crop side the metadata may ask for


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im).astype(np.float64)
        if not np.isfinite(a).all():
            raise ImageError(f"a {im.mode}-mode image holds NaN or Inf pixels; save it as 8/16-bit or clean it")
        top = 65535.0 if im.mode.startswith("I;16") or (im.mode == "I" and a.max() > 255) else 255.0
        if im.mode == "F":
            top = max(1.0, float(a.max()))
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        im = Image.fromarray(a, mode="L")
    return im if im.mode == "RGB" else im.convert("RGB")


@dataclass(frozen=True)
class Preprocess:
    """What the model expects: resize (an int resizes the shorter side, [h, w] resizes exactly), an
    optional center crop [h, w], then /255 and per-channel mean/std normalization, CHW float32."""

    resize: int | list[int] = field(default_factory=lambda: [224, 224])
    crop: list[int] | None = None
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    interpolation: str = "bilinear"

    @property
    def size(self) -> tuple[int, int]:
        """The (h, w) of the tensor fed to the model."""
        if self.crop is not None:
            return (int(self.crop[0]), int(self.crop[1]))
        if isinstance(self.resize, int):
            raise ValueError("resize by the shorter side needs a crop to fix the output size")
        return (int(self.resize[0]), int(self.resize[1]))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        """Checked: a crafted file gets a one-line ArtifactError, never a huge allocation later."""
        if not isinstance(d, dict):
            raise ArtifactError(f"preprocess must be an object, got {type(d).__name__}")
        unknown = sorted(set(d) - {"resize", "crop", "mean", "std", "interpolation"})
        if unknown:
            raise ArtifactError(f"preprocess has unknown keys {unknown}")
        resize = d.get("resize", [224, 224])
        resize = _side(resize, "resize") if isinstance(resize, int) else _hw(resize, "resize")
        crop = None if d.get("crop") is None else _hw(d["crop"], "crop")
        if crop is None and isinstance(resize, int):
            raise ArtifactError("preprocess resizes the shorter side (an integer resize) but has no crop; "
                                "the output size would depend on the image")
        if crop is not None:
            room = [resize, resize] if isinstance(resize, int) else resize
            if crop[0] > room[0] or crop[1] > room[1]:
                raise ArtifactError(f"preprocess crop {crop} does not fit in resize {resize}")
        mean, std = _triple(d.get("mean", IMAGENET_MEAN), "mean"), _triple(d.get("std", IMAGENET_STD), "std")
        if any(s < 1e-6 for s in std):  # a subnormal std is 0 in float32: every pixel would become Inf
            raise ArtifactError(f"preprocess std must be >= 1e-6, got {std}")
        interp = d.get("interpolation", "bilinear")
        if interp not in _INTERP:
            raise ArtifactError(f"preprocess interpolation must be one of {', '.join(_INTERP)}, got {interp!r}")
        return cls(resize=resize, crop=crop, mean=mean, std=std, interpolation=interp)

    def __call__(self, im: Image.Image) -> np.ndarray:
        im = to_rgb(im)
        interp = _INTERP[self.interpolation]
        if isinstance(self.resize, int):
            w, h = im.size
            s = self.resize / min(w, h)
            size = (max(1, round(w * s)), max(1, round(h * s)))
            if max(size) > 4 * MAX_SIDE:  # a 1 x 40000 strip would become gigapixels
                raise ImageError(f"an image of {w}x{h} pixels is too elongated to resize its shorter side to "
                                 f"{self.resize}; crop it first")
            im = im.resize(size, interp)
        else:
            im = im.resize((self.resize[1], self.resize[0]), interp)
        if self.crop is not None:
            ch, cw = self.crop
            w, h = im.size
            left, top = int(round((w - cw) / 2.0)), int(round((h - ch) / 2.0))
            im = im.crop((left, top, left + cw, top + ch))
        a = np.asarray(im, dtype=np.float32) / 255.0
        a = (a - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(a.transpose(2, 0, 1))

    def batch(self, images: list[Image.Image]) -> np.ndarray:
        return np.stack([self(im) for im in images]) if images else np.zeros((0, 3, *self.size), np.float32)


def _side(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_SIDE:
        raise ArtifactError(f"preprocess {what} must be an integer in [1, {MAX_SIDE}], got {v!r}")
    return v


def _hw(v, what: str) -> list[int]:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise ArtifactError(f"preprocess {what} must be [height, width], got {v!r}")
    return [_side(x, what) for x in v]


def _triple(v, what: str) -> list[float]:
    if (not isinstance(v, (list, tuple)) or len(v) != 3
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)):
        raise ArtifactError(f"preprocess {what} must be 3 finite numbers (one per RGB channel), got {v!r}")
    return [float(x) for x in v]
