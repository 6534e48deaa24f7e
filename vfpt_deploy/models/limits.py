"""The limits every backbone is held to before a real tensor is allocated (backbone.backbone_skeleton,
each family's sizes.py), and how an offending value is shown. Torch-free."""
from __future__ import annotations

MAX_PATCHES = 65_536  # a 256 x 256 patch grid
MAX_PARAMS = 2_500_000_000  # 10 GB of float32 weights; ViT-G/14 has 1.8 billion


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
