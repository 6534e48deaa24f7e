"""Finding image files for training, verification and serving. Decoding them and the preprocessing an
artifact records live in vfpt_deploy/artifacts/preprocess.py, re-exported here.
"""
from __future__ import annotations

import os
from pathlib import Path

from vfpt_deploy.artifacts.preprocess import (DECODE_SLOTS, IMAGENET_MEAN, IMAGENET_STD, MAX_IMAGE_PIXELS,  # noqa: F401
                                              MAX_SIDE, Preprocess, load_image, to_rgb)
from vfpt_deploy.artifacts.files import not_a_file, regular_file
from vfpt_deploy.errors import ImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def find_images(paths: list[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively, sorted) into image files; folders must hold some."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise ImageError(f"folder {p} holds no images ({', '.join(IMAGE_EXTENSIONS)}); point at a folder of images")
            out.extend(found)
        elif regular_file(p):
            out.append(p)
        else:
            raise ImageError(f"{p} {not_a_file(p, 'pass image files or folders')}")
    return out
