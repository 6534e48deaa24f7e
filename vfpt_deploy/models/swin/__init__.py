"""The Swin family: timm SwinTransformer (v1) backbones (docs/model.md, section 5).

backbone.py   what VFPT supports, weight files (timm's or Microsoft's layout)
model.py      VFPTSwin, the prompted Swin
fold.py       its tokens and kv folds
reference.py  its reference checkpoint importer (`import --arch swin`)
sizes.py      the options that size it and a run.pt's recorded sizes, torch-free (FamilySizes)
parts.py      what it registers (models/family.py, FamilyParts)

Torch-free to import.
"""
from __future__ import annotations

from vfpt_deploy.models.family import Family, FamilyParts, FamilySizes


def is_swin_name(name: str) -> bool:
    """timm's Swin Transformer (v1) model names: swin_tiny/small/base/large_*, swin_s3_*."""
    return isinstance(name, str) and name.split(".")[0].startswith("swin_")


def _parts() -> FamilyParts:
    from vfpt_deploy.models.swin.parts import PARTS

    return PARTS


def _sizes() -> FamilySizes:
    from vfpt_deploy.models.swin.sizes import SIZES

    return SIZES


SWIN = Family(name="swin", archs=("swin",), claims_name=is_swin_name, parts=_parts, sizes=_sizes)
