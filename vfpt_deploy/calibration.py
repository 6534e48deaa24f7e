"""Calibration images for static INT8 quantization: a deterministic sample, preprocessed exactly as the
run's own preprocessing says (the pixels the deployed model will see).

Sources: 'builtin[:name]' takes the built-in set's *train* split (never the val split that the int8 gate
then measures accuracy on); a folder with train/ (the training layout) takes train/; any other folder
takes every image under it. The sample: the sorted file list, a seeded permutation, the first N picked,
then put back in sorted order. The metadata records the source, the count and a sha256 of the picked
sample ids, so two exports can be told apart (or proven alike) by their calibration sets.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vfpt_deploy.artifacts.checkpoint import Run
from .errors import InputError, UsageError

DEFAULT_SAMPLES = 128
MAX_SAMPLES = 4096
SEED = 0


@dataclass
class CalibrationSet:
    x: np.ndarray  # float32 NCHW, preprocessed by the run's preprocessing
    info: dict  # source, split, count, of, seed, sha256 of the sample ids


def _builtin(name: str):
    from .data import builtin_split

    images = builtin_split(name, "train")
    ids = [f"builtin:{name}/train/{i:05d}" for i in range(len(images))]
    return ids, images.image, f"builtin:{name}", "train"


def _folder(root: Path):
    from vfpt_deploy.runtime.preprocess import ImageError, find_images

    split = "train" if (root / "train").is_dir() else "all"
    base = root / "train" if split == "train" else root
    try:
        files = find_images([base])
    except ImageError as e:
        raise InputError(f"--calib: {e}") from None
    ids = [f.relative_to(base).as_posix() for f in files]
    return ids, lambda i: files[i], str(root), split  # a file: preprocess.batch decodes it when its turn comes


def calibration_set(run: Run, source: str, samples: int = DEFAULT_SAMPLES, seed: int = SEED) -> CalibrationSet:
    """`samples` images from `source` ('builtin[:name]' or a folder), preprocessed for `run`."""
    if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= MAX_SAMPLES:
        raise UsageError(f"--calib-samples must be an integer in [1, {MAX_SAMPLES}], got {samples!r}")
    if source == "builtin" or source.startswith("builtin:"):
        ids, load, name, split = _builtin(source.partition(":")[2] or "digits-shifted")
    elif Path(source).is_dir():
        ids, load, name, split = _folder(Path(source))
    else:
        raise InputError(f"--calib {source}: not a folder; pass a folder of images (or one with train/) or builtin[:name]")
    order = sorted(range(len(ids)), key=ids.__getitem__)
    picked = sorted((order[i] for i in np.random.default_rng(seed).permutation(len(order))[:samples]),
                    key=ids.__getitem__)
    picked_ids = [ids[i] for i in picked]
    x = run.preprocess.batch([load(i) for i in picked]).astype(np.float32)
    sha = hashlib.sha256("\n".join(picked_ids).encode()).hexdigest()
    return CalibrationSet(x, {"source": name, "split": split, "count": len(picked), "of": len(ids), "seed": seed,
                              "sample_sha256": sha})
