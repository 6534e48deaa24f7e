"""Import checkpoints of the reference VFPT/VPT code (github.com/runtsang/VFPT, KMnP/vpt) as run.pt.

The reference saves torch.save({"model": state_dict}) of its whole model (frozen backbone included) and
no config. `--arch` names its layout, and the family that reads that layout maps it (models/vit/reference.py:
vit, mae, moco; models/swin/reference.py: swin); alpha, location, heads and class names come from the
user, because the file does not hold them. See docs/model.md, sections 4 and 5.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from vfpt_deploy.artifacts.checkpoint import FORMAT, RUN_SUFFIXES, save_run
from vfpt_deploy.artifacts.files import check_outputs, check_suffix, file_sha256, not_a_file, regular_file
from vfpt_deploy.artifacts.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from vfpt_deploy.errors import InputError, VFPTError
from vfpt_deploy.models.backbone import create_backbone
from vfpt_deploy.models.families import ARCHS, family_of_arch  # noqa: F401 (ARCHS re-exported)
from vfpt_deploy.models.family import Imported  # noqa: F401 (re-exported)


def import_state_dict(sd: dict[str, torch.Tensor], *, arch: str = "vit", alpha: float, location: str = "prepend",
                      heads: int | None = None, source: str = "reference checkpoint") -> Imported:
    """Map a reference state dict (`module.` already stripped) onto the VFPT model of the family whose
    layout `arch` is. Fails on the first missing or mis-shaped reference tensor; returns the unused ones."""
    return family_of_arch(arch).parts().import_state_dict(sd, arch=arch, alpha=alpha, location=location, heads=heads,
                                                          source=source, create_backbone=create_backbone)


def read_reference_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """{"model": state_dict} or a bare state dict, read without unpickling objects; `module.` stripped."""
    path = Path(path)
    if not regular_file(path):
        raise VFPTError(f"checkpoint {path} {not_a_file(path, 'pass the reference' + chr(39) + 's saved .pth')}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Unsupported global" in str(e) or "weights_only" in str(e):
            why = "it holds pickled Python objects, which are never loaded (weights_only=True)"
        else:
            why = f"it is truncated or not a torch checkpoint ({first[:120]})"
        raise VFPTError(f"cannot read {path}: {why}; pass the .pth the reference saved") from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        raise VFPTError(f"{path} is already a vfpt-deploy run checkpoint; use it directly (no import needed)")
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not (isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())):
        raise VFPTError(f"{path} does not hold a state dict of tensors ({{'model': state_dict}} or a bare state dict)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def parse_classes(spec: str | None, num_classes: int) -> list[str]:
    """Class names from a comma list or a file (one per line); default "0" .. "C-1"."""
    if spec is None:
        return [str(i) for i in range(num_classes)]
    path = Path(spec)
    if path.is_file():
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--classes file {path} is not readable UTF-8 text ({type(e).__name__}); give a text "
                             "file with one class name a line, or a comma list") from None
    else:
        names = [c.strip() for c in spec.split(",")]
    if any(not c for c in names):
        raise VFPTError(f"empty class name in {spec!r}; give a comma list like 'cat,dog' or a file with one name a line")
    if len(names) != num_classes:
        raise VFPTError(f"{len(names)} class names for the checkpoint's {num_classes}-class head; give exactly {num_classes}")
    if len(set(names)) != len(names):
        raise VFPTError(f"duplicate class names in {spec!r}")
    return names


def reference_preprocess(img_size: tuple[int, int], crop_pct: float = 1.0) -> Preprocess:
    """The reference's preprocessing: VTAB resizes to the model size (crop_pct 1), FGVC resizes the
    shorter side to size / crop_pct and center-crops (0.875: 256 -> 224); ImageNet mean/std."""
    h, w = img_size
    if not 0 < crop_pct <= 1:
        raise VFPTError(f"crop_pct must be in (0, 1], got {crop_pct}")
    common = dict(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), interpolation="bilinear")
    if crop_pct == 1.0:
        return Preprocess(resize=[h, w], crop=None, **common)
    return Preprocess(resize=int(round(min(h, w) / crop_pct)), crop=[h, w], **common)


def import_checkpoint(path: str | os.PathLike, out: str | os.PathLike, *, arch: str = "vit", alpha: float,
                      location: str = "prepend", classes: str | None = None, heads: int | None = None,
                      crop_pct: float = 1.0) -> Imported:
    """Read a reference checkpoint and write it as a run.pt (backbone included). The output must be a
    .pt/.pth file other than the input (and the class-names file), checked before any work."""
    path = Path(path)
    out = check_suffix(out, RUN_SUFFIXES, "run checkpoint")
    check_outputs({"--out": out}, {"--ckpt": path, "--classes": classes if classes and Path(classes).is_file() else None})
    result = import_state_dict(read_reference_checkpoint(path), arch=arch, alpha=alpha, location=location,
                               heads=heads, source=str(path))
    names = parse_classes(classes, result.model.num_classes)
    meta = {"import": {"source": str(path), "file_sha256": file_sha256(path), "arch": arch,
                       "unused_keys": result.unused}}
    save_run(out, result.model, result.backbone, names, reference_preprocess(result.model.img_size, crop_pct),
             include_backbone=True, meta=meta)
    return result
