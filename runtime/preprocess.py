"""Reading images (any common format, EXIF orientation applied, decompression bombs refused) for
training, verification and serving. The preprocessing itself is vfpt_deploy/artifacts/preprocess.py,
re-exported here.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from vfpt_deploy.artifacts.preprocess import (IMAGENET_MEAN, IMAGENET_STD, MAX_SIDE, Preprocess,  # noqa: F401 (re-exported)
                                              to_rgb)
from vfpt_deploy.errors import ImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# Refuse images above this many pixels before decoding them (a 20000x20000 PNG is a few KB on disk and
# 1.2 GB decoded): 40 megapixels is well above any camera photo a classifier is fed.
MAX_IMAGE_PIXELS = 40_000_000


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open any common image as 8-bit RGB, upright (EXIF orientation applied, as PIL's exif_transpose).

    Grayscale, palette, CMYK and alpha images are converted (alpha is dropped, as timm's loader does);
    16-bit and float images are scaled to 8 bits by their type's range instead of being clipped.
    Images over MAX_IMAGE_PIXELS are refused before they are decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise ImageError(f"{path} is {w}x{h} pixels, over the {MAX_IMAGE_PIXELS // 10**6} megapixel "
                                     "limit (a decompression bomb or a huge scan); resize it first")
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
