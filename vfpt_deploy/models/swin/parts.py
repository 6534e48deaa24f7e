"""What the Swin family registers: its answers to every question the pipeline asks a family."""
from __future__ import annotations

from timm.models.swin_transformer import SwinTransformer

from vfpt_deploy.models.family import FamilyParts
from vfpt_deploy.models.swin import backbone, fold, reference
from vfpt_deploy.models.swin.model import VFPTSwin, check_swin_config, tuned_shapes

PARTS = FamilyParts(
    backbone_type=SwinTransformer,
    check_backbone=backbone.check_swin_backbone,
    read_weights=backbone.read_weights,
    load_weights=backbone.load_weights,
    model=VFPTSwin,
    check_config=check_swin_config,
    tuned_shapes=tuned_shapes,
    fold=fold.fold_swin,
    kv_refusal=fold.kv_refusal,
    import_state_dict=reference.import_state_dict,
    multitask=False,
)
