"""Datasets: image folders (train/ and val/, a subfolder per class) and the built-in offline data.

The built-in data is scikit-learn's digits (1797 8x8 images, shipped inside the package, no download),
in two domains: `digits` (white strokes on black, upscaled) and `digits-shifted` (the same kind of
digits inverted, tinted and overlaid with a fixed high-frequency stripe texture: a deliberate
pixel- and frequency-domain shift for transfer experiments). The split is by sample, so the source
domain used to pretrain a backbone never shares images with the shifted domain's train/val sets.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vfpt_deploy.runtime.preprocess import IMAGE_EXTENSIONS, ImageError, Preprocess, load_image  # noqa: F401

from .errors import InputError, VFPTError

BUILTIN = ("digits", "digits-shifted")
BUILTIN_SIZE = 32


@dataclass
class ImageSet:
    """A list of samples that yield PIL RGB images, with labels and class names."""

    items: list  # Path or PIL.Image
    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.items)

    def image(self, i: int) -> Image.Image:
        it = self.items[i]
        return it if isinstance(it, Image.Image) else load_image(it)


class TensorDataset(torch.utils.data.Dataset):
    """ImageSet + Preprocess -> (CHW float tensor, label); images decoded lazily."""

    def __init__(self, images: ImageSet, preprocess: Preprocess) -> None:
        self.images, self.preprocess = images, preprocess
        # In-memory (built-in) images are small: preprocess them once instead of every epoch.
        self._cache = None
        if all(isinstance(it, Image.Image) for it in images.items):
            self._cache = torch.from_numpy(preprocess.batch(images.items))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        if self._cache is not None:
            return self._cache[i], self.images.labels[i]
        try:
            it = self.images.items[i]
            x = self.preprocess(it) if isinstance(it, Image.Image) else self.preprocess.load(it)
        except ImageError as e:
            raise VFPTError(str(e)) from None
        return torch.from_numpy(x), self.images.labels[i]


def image_folder(root: str | Path, classes: list[str] | None = None) -> ImageSet:
    root = Path(root)
    if not root.is_dir():
        raise VFPTError(f"dataset folder {root} does not exist; expected train/ and val/ with a subfolder per class")
    found = sorted(d.name for d in root.iterdir() if d.is_dir())
    classes = classes or found
    if not classes:
        raise VFPTError(f"{root} has no class subfolders; put each class's images in {root}/<class>/")
    missing = [c for c in found if c not in classes]
    if missing:
        raise VFPTError(f"{root} has classes {missing} that the training split does not have")
    items, labels = [], []
    for idx, c in enumerate(classes):
        d = root / c
        if not d.is_dir():
            continue
        files = sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        items += files
        labels += [idx] * len(files)
    if not items:
        raise VFPTError(f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return ImageSet(items, labels, list(classes))


def load_splits(data: str) -> tuple[ImageSet, ImageSet]:
    """'builtin' / 'builtin:<name>' or a folder with train/ and val/ subfolders."""
    if data == "builtin" or data.startswith("builtin:"):
        name = data.partition(":")[2] or "digits-shifted"
        return builtin_split(name, "train"), builtin_split(name, "val")
    root = Path(data)
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise VFPTError(f"{root} needs train/ and val/ subfolders (each with a subfolder per class), or use --data builtin")
    train = image_folder(root / "train")
    check_split(train, root / "train")
    val = image_folder(root / "val", classes=train.classes)
    check_split(val, root / "val", train=False)
    return train, val


def check_split(images: ImageSet, root: Path, train: bool = True) -> None:
    """Every class of a training set has images in train/ and in val/, and there are two classes at least:
    a class without training images is never learned, and a val/ without some classes scores only the rest
    (an empty class folder once gave 'best val top-1 100.00%'). InputError naming the classes."""
    from .text import printable

    counts = np.bincount(np.asarray(images.labels, dtype=np.int64), minlength=len(images.classes))
    empty = [c for c, n in zip(images.classes, counts) if n == 0]
    names = printable(", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else ""), 200)
    if empty and train:
        raise InputError(f"{root}: class folder{'s' if len(empty) > 1 else ''} {names} hold{'' if len(empty) > 1 else 's'} "
                         f"no images ({', '.join(IMAGE_EXTENSIONS)}); add images, or remove the folder from train/ "
                         "and val/")
    if empty:
        raise InputError(f"{root} has no images of class{'es' if len(empty) > 1 else ''} {names}, which train/ has; "
                         f"the validation top-1 would leave {'them' if len(empty) > 1 else 'it'} out: add images to "
                         f"{root}/<class>/")
    if train and len(images.classes) < 2:
        raise InputError(f"{root} has one class ({printable(images.classes[0], 80)}); a classifier needs two at "
                         "least: add a subfolder per class")


# -- built-in offline data ------------------------------------------------------------------

def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)  # [N, 8, 8] in [0, 1]


def _split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """A fixed, stratified split: half for the source domain, then target train (~28%) / val (~22%)."""
    rng = np.random.default_rng(0)
    parts: dict[str, list] = {"source": [], "train": [], "val": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = len(idx)
        a, b = n // 2, n // 2 + int(round(n * 0.28))
        parts["source"] += idx[:a].tolist()
        parts["train"] += idx[a:b].tolist()
        parts["val"] += idx[b:].tolist()
    return {k: np.array(sorted(v)) for k, v in parts.items()}


def _render(img8: np.ndarray, shifted: bool, seed: int) -> Image.Image:
    """One 8x8 digit as a BUILTIN_SIZE RGB image, in the clean or the shifted domain."""
    s = BUILTIN_SIZE
    a = np.asarray(Image.fromarray((img8 * 255).astype(np.uint8)).resize((s, s), Image.Resampling.BILINEAR),
                   dtype=np.float32) / 255.0
    if not shifted:
        rgb = np.repeat(a[..., None], 3, axis=2)
    else:
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:s, 0:s]
        theta = rng.uniform(0, np.pi)
        stripes = 0.5 + 0.5 * np.cos(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / 3.0)
        tint = np.array([0.9, 0.6, 0.3], np.float32)[rng.permutation(3)]
        background = 0.55 + 0.35 * stripes[..., None] * tint
        rgb = background * (1.0 - a[..., None]) + 0.05 * a[..., None]  # dark strokes on a striped tint
    return Image.fromarray((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8), mode="RGB")


def builtin_split(name: str, split: str) -> ImageSet:
    """Built-in data: name in BUILTIN; split 'train' or 'val' ('digits' also has 'source', all its data
    for pretraining). The clean domain's train/val come from the source half."""
    if name not in BUILTIN:
        raise VFPTError(f"unknown built-in dataset {name!r}; choose one of {', '.join(BUILTIN)}")
    images, labels = _digits()
    parts = _split_indices(labels)
    if name == "digits":
        src = parts["source"]
        cut = int(len(src) * 0.85)
        idx = {"source": src, "train": src[:cut], "val": src[cut:]}.get(split)
    else:
        idx = parts.get(split) if split in ("train", "val") else None
    if idx is None:
        raise VFPTError(f"built-in dataset {name!r} has no split {split!r}")
    shifted = name == "digits-shifted"
    items = [_render(images[i], shifted, seed=int(i)) for i in idx]
    return ImageSet(items, labels[idx].tolist(), [str(c) for c in range(10)])

