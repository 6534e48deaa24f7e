import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach for the hub

import pytest
import torch

from vfpt_deploy.backbone import create_backbone
from vfpt_deploy.config import VFPTConfig
from vfpt_deploy.model import VFPTViT

TINY = "vit_tiny_patch16_224"
TINY_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}


def tiny_backbone(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return create_backbone(TINY, **{**TINY_KWARGS, **overrides})


def tiny_model(num_classes: int = 5, seed: int = 0, scale: float = 1.0, **cfg) -> VFPTViT:
    """A tiny VFPT model; `scale` enlarges the prompts (trained prompts are far from their init)."""
    bb = tiny_backbone(seed)
    torch.manual_seed(seed + 1)
    model = VFPTViT(bb, num_classes, VFPTConfig(**cfg)).eval()
    with torch.no_grad():
        for p in model.tuned_parameters().values():
            p.mul_(scale)
    return model


@pytest.fixture
def images():
    torch.manual_seed(123)
    return torch.randn(4, 3, 32, 32)
