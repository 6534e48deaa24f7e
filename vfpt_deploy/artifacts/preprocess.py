"""Images in, model input out: decoding an image file (any common format, EXIF orientation applied,
decompression bombs refused, at most DECODE_SLOTS at once) and the preprocessing an artifact records
(resize, crop, mean, std, interpolation), with PIL + numpy. One implementation for training, verification
and serving, so a deployed model sees exactly the pixels it was trained on. Torch-free; finding the image
files in folders is runtime/preprocess.py.
"""
from __future__ import annotations

import math
import os
import threading
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vfpt_deploy.errors import ArtifactError, ImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERP = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
           "nearest": Image.Resampling.NEAREST}
# Refuse images above this many pixels before decoding them (a 20000x20000 PNG is a few KB on disk and
# 1.2 GB decoded): 40 megapixels is well above any camera photo a classifier is fed.
MAX_IMAGE_PIXELS = 40_000_000
MAX_SIDE = 8192  # largest resize / crop side the metadata may ask for
# Images decoded at once in this process (every thread together): with MAX_IMAGE_PIXELS each, at most
# DECODE_SLOTS x 40 MP x 3 bytes (240 MB) of decoded pixels are held, however many files or requests arrive.
# Everything that reads many images (predict, verify --data, calibration, training, serve) keeps only the
# preprocessed arrays (3 x H x W floats each), never the decoded images.
DECODE_SLOTS = 2
_decoding = threading.BoundedSemaphore(DECODE_SLOTS)


def load_image(path: str | os.PathLike, draft: tuple[int, int] | None = None) -> Image.Image:
    """Open any common image as 8-bit RGB, upright (EXIF orientation applied, as PIL's exif_transpose).

    Grayscale, palette, CMYK and alpha images are converted (alpha is dropped, as timm's loader does);
    16-bit and float images are scaled to 8 bits by their type's range instead of being clipped.
    Images over MAX_IMAGE_PIXELS are refused before they are decoded. draft (w, h): a JPEG at least twice
    that size is decoded at a power-of-two reduced scale that still covers it (libjpeg's DCT scaling, as PIL's
    thumbnail does), so a photo that claims 6000x6000 costs a fraction of its full size.
    """
    try:
        with warnings.catch_warnings(), _decoding:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise ImageError(f"{path} is {w}x{h} pixels, over the {MAX_IMAGE_PIXELS // 10**6} megapixel "
                                     "limit (a decompression bomb or a huge scan); resize it first")
                if draft is not None and im.format == "JPEG":
                    im.draft("RGB", _oriented(im, draft))
                im.load()
                im = ImageOps.exif_transpose(im) or im
                try:
                    return to_rgb(im)
                except ImageError as e:
                    raise ImageError(f"{path}: {e}") from None
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{path} declares more pixels than the {MAX_IMAGE_PIXELS // 10**6} megapixel limit (a "
                         "decompression bomb or a huge scan); resize it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{path} is not a readable image ({type(e).__name__}); pass PNG/JPEG/... files") from None


def _oriented(im: Image.Image, size: tuple[int, int]) -> tuple[int, int]:
    """The draft size in the file's own orientation (EXIF rotations by 90 degrees swap width and height)."""
    try:
        turned = im.getexif().get(0x0112) in (5, 6, 7, 8)
    except Exception:  # a broken EXIF block: exif_transpose will ignore it too
        turned = False
    return (size[1], size[0]) if turned else size


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

    def batch(self, images: list) -> np.ndarray:
        """Images (PIL images, or files: each decoded, preprocessed and let go before the next) -> [N, 3, H, W]."""
        return (np.stack([self(im) if isinstance(im, Image.Image) else self.load(im) for im in images]) if images
                else np.zeros((0, 3, *self.size), np.float32))

    @property
    def draft_size(self) -> tuple[int, int]:
        """(w, h) a decoder may reduce an image to and still give resize all the pixels it uses."""
        if isinstance(self.resize, int):
            return (self.resize, self.resize)
        return (int(self.resize[1]), int(self.resize[0]))

    def load(self, path) -> np.ndarray:
        """One image file -> its preprocessed array; the decoded image is dropped at once (and a large JPEG
        decoded at a reduced scale: load_image's draft)."""
        return self(load_image(path, draft=self.draft_size))


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
