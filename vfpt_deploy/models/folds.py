"""What every family's fold shares: the fold modes and `none`, the unfolded model behind the folded
models' interface (docs/model.md, section 3)."""
from __future__ import annotations

import torch
from torch import nn

FOLD_MODES = ("auto", "tokens", "kv", "none")


class LiveVFPT(nn.Module):
    """`none`: the unfolded model, FFT and all, behind the same interface."""

    fold_mode = "none"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
