"""Folding a trained VFPT model into a deployable one with no FFT left (docs/model.md, sections 2-3): the
model's family does it (models/vit/fold.py, models/swin/fold.py). Many tasks on one backbone fold into
one graph in multitask.py."""
from __future__ import annotations

import torch
from torch import nn

from vfpt_deploy.errors import VFPTError
from vfpt_deploy.models.families import family_of_model
from vfpt_deploy.models.folds import FOLD_MODES, LiveVFPT  # noqa: F401 (re-exported)


def fold_model(model: nn.Module, mode: str = "auto", dtype: torch.dtype = torch.float32) -> nn.Module:
    """Deployable form of `model` (eval mode). mode: auto (kv where exact, else tokens), tokens, kv, none.
    dtype: the precision the constants are computed in (float32 or float64); they are stored as float32."""
    if dtype not in (torch.float32, torch.float64):
        raise VFPTError(f"fold in float32 or float64, not {dtype}")
    return family_of_model(model).parts().fold(model, mode, dtype)
