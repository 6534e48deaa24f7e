"""The registered backbone families, one line each, and the questions the rest of the package asks them.

A third family is one folder beside vit/ and swin/ and one line below (docs/model.md, "Adding a
family"). Lookups by timm name, by built backbone, by prompted model and by reference layout (`--arch`)
try every family that claims something and fall back to the default family (the one whose claims_name
is None: ViT). Torch-free to import; the families' torch sides load on first use.
"""
from __future__ import annotations

from vfpt_deploy.errors import VFPTError
from vfpt_deploy.models.family import Family
from vfpt_deploy.models.swin import SWIN
from vfpt_deploy.models.vit import VIT

FAMILIES: tuple[Family, ...] = (
    VIT,
    SWIN,
)
ARCHS = tuple(a for f in FAMILIES for a in f.archs)  # every reference layout, for `import --arch`
DEFAULT = next(f for f in FAMILIES if f.claims_name is None)


def family_of_name(name: str) -> Family:
    """The family a timm model name belongs to, before anything is built."""
    return next((f for f in FAMILIES if f.claims_name is not None and f.claims_name(name)), DEFAULT)


def family_of_backbone(backbone) -> Family:
    """The family a built timm backbone belongs to (by its class)."""
    return next((f for f in FAMILIES if f is not DEFAULT and isinstance(backbone, f.parts().backbone_type)), DEFAULT)


def family_of_model(model) -> Family:
    """The family a prompted VFPT model belongs to (by its class)."""
    return next((f for f in FAMILIES if f is not DEFAULT and isinstance(model, f.parts().model)), DEFAULT)


def family_of_arch(arch: str) -> Family:
    """The family whose reference checkpoints have this layout (`import --arch`)."""
    found = next((f for f in FAMILIES if arch in f.archs), None)
    if found is None:
        raise VFPTError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    return found


def vfpt_model(backbone, num_classes: int, config):
    """The VFPT model for a backbone: its family's prompted model (VFPTViT, VFPTSwin, ...)."""
    return family_of_backbone(backbone).parts().model(backbone, num_classes, config)
