"""Image loading and preprocessing with PIL + numpy, shared by training, verification and serving.

One implementation on both sides means a deployed model sees exactly the pixels it was trained on.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERP = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
           "nearest": Image.Resampling.NEAREST}


class ImageError(ValueError):
    """A file that cannot be read as an image (message names the file)."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open any common image as 8-bit RGB.

    Grayscale, palette, CMYK and alpha images are converted (alpha is dropped, as timm's loader does);
    16-bit and float images are scaled to 8 bits by their type's range instead of being clipped.
    """
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageError(f"{path} is not a readable image ({type(e).__name__}); pass PNG/JPEG/... files") from None


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im).astype(np.float64)
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
        d = dict(d)
        if isinstance(d.get("resize"), (list, tuple)):
            d["resize"] = [int(v) for v in d["resize"]]
        return cls(**d)

    def __call__(self, im: Image.Image) -> np.ndarray:
        im = to_rgb(im)
        interp = _INTERP[self.interpolation]
        if isinstance(self.resize, int):
            w, h = im.size
            s = self.resize / min(w, h)
            im = im.resize((max(1, round(w * s)), max(1, round(h * s))), interp)
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


def find_images(paths: list[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively, sorted) into image files; folders must hold some."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise ImageError(f"folder {p} holds no images ({', '.join(IMAGE_EXTENSIONS)}); point at a folder of images")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise ImageError(f"{p} does not exist; pass image files or folders")
    return out
