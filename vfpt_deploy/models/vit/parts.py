"""What the ViT family registers: its answers to every question the pipeline asks a family."""
from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer

from vfpt_deploy.models.family import FamilyParts
from vfpt_deploy.models.vit import backbone, fold, reference
from vfpt_deploy.models.vit.model import VFPTViT


def _no_config_limits(config) -> None:
    """Every VFPT setting works on a ViT (docs/model.md, sections 1-2)."""


PARTS = FamilyParts(
    backbone_type=VisionTransformer,
    check_backbone=backbone.check_backbone,
    read_weights=backbone.read_weights,
    load_weights=backbone.load_weights,
    model=VFPTViT,
    check_config=_no_config_limits,
    tuned_shapes=backbone.tuned_shapes_of,
    fold=fold.fold_vit,
    kv_refusal=fold.kv_refusal,
    import_state_dict=reference.import_state_dict,
    multitask=True,
)
