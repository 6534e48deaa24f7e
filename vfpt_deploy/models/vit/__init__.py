"""The ViT family: timm VisionTransformer backbones with a class token (supervised, MAE, MoCo-v3).

backbone.py   what VFPT supports, weight files (timm, MAE, MoCo-v3, .npz)
model.py      VFPTViT, the prompted ViT (docs/model.md, sections 1-2)
fold.py       its tokens and kv folds (section 3)
reference.py  its reference checkpoint importer (section 4)
sizes.py      the options that size it and a run.pt's recorded sizes, torch-free (FamilySizes)
parts.py      what it registers (models/family.py, FamilyParts)

The default family: it takes every timm name and backbone no other family claims, and refuses what is
not a ViT it supports. Torch-free to import.
"""
from __future__ import annotations

from vfpt_deploy.models.family import Family, FamilyParts, FamilySizes


def _parts() -> FamilyParts:
    from vfpt_deploy.models.vit.parts import PARTS

    return PARTS


def _sizes() -> FamilySizes:
    from vfpt_deploy.models.vit.sizes import SIZES

    return SIZES


VIT = Family(name="vit", archs=("vit", "mae", "moco"), claims_name=None, parts=_parts, sizes=_sizes)
