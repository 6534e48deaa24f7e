"""Fold a Swin VFPT model into a deployable one with no FFT left (docs/model.md, sections 3 and 5).

- `tokens`: every block's prompt rows are the constant P_hat = cat(F(P[:m]), P[m:]); the blocks run as
  the live model does, prompts in front of every window, only the FFT is gone. Exact for every model.
- `kv` (deep prompts only): block j's prompt rows enter the image rows only through their keys and
  values, K_j = W_k norm1_j(P_hat_j) + b_k and V_j likewise, constants that join every window's keys and
  values; the prompt rows themselves are discarded before the next block, so they need no query,
  projection or MLP work. The LAST block keeps its prompt rows as tokens, because the average pool reads
  its prompt outputs. Not exact for shallow prompts (their rows depend on the image after block 0).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn

from vfpt_deploy.errors import VFPTError
from vfpt_deploy.models.folds import FOLD_MODES, LiveVFPT
from vfpt_deploy.models.fourier import prompt_block
from vfpt_deploy.models.swin.model import VFPTSwin, merge, prompted_block


def kv_refusal(model: VFPTSwin) -> str | None:
    """Why the kv fold would not be exact for this model, or None when it is."""
    if model.config.num_prompts == 0:
        return "the model has no prompts"
    if not model.config.deep:
        return ("shallow prompts flow on through every block and their states depend on the input, so only "
                "block 0 could use constant keys/values; use --fold tokens")
    return None


@torch.no_grad()
def prompt_blocks(model: VFPTSwin, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Every block's constant prompt rows P_hat, [M, C_stage] each, in block order (one when shallow)."""
    blocks = [(s, i) for s, d in enumerate(model.depths) for i in range(d)]
    if not model.config.deep:
        blocks = blocks[:1]
    return [prompt_block(model.raw_prompts(s, i).to(dtype), model.config.num_fourier, "prepend")[0] for s, i in blocks]


@torch.no_grad()
def prompt_keys_values(blk: SwinTransformerBlock, p_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V of a block for its constant prompt rows, [heads, M, head_dim] each, in p_hat's dtype."""
    dtype, attn = p_hat.dtype, blk.attn
    qkv = attn.qkv
    y = F.linear(copy.deepcopy(blk.norm1).to(dtype)(p_hat), qkv.weight.to(dtype),
                 None if qkv.bias is None else qkv.bias.to(dtype))
    _, k, v = y.reshape(p_hat.shape[0], 3, attn.num_heads, -1).permute(1, 2, 0, 3).unbind(0)
    return k, v


class FoldedSwin(nn.Module):
    """A Swin VFPT model with its prompts folded to constants (`tokens` or `kv`). Same inputs, same logits."""

    def __init__(self, model: VFPTSwin, mode: str, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        assert mode in ("tokens", "kv")
        self.fold_mode = mode
        self.backbone, self.head = model.backbone, model.head
        self.num_prompts, self.deep = model.config.num_prompts, model.config.deep
        blocks = [blk for stage in model.backbone.layers for blk in stage.blocks]
        p_hat = prompt_blocks(model, dtype) if self.num_prompts else []
        # kv: every block but the last, whose prompt outputs the average pool reads.
        self.num_kv = len(blocks) - 1 if mode == "kv" else 0
        for j in range(self.num_kv):
            k, v = prompt_keys_values(blocks[j], p_hat[j])
            self.register_buffer(f"prompt_keys_{j}", k.float())
            self.register_buffer(f"prompt_values_{j}", v.float())
        for j in range(self.num_kv, len(p_hat)):
            self.register_buffer(f"prompt_tokens_{j}", p_hat[j].float())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        x = bb.patch_embed(x)
        batch, p, j = x.shape[0], None, 0
        for stage in bb.layers:
            x, p = merge(stage, x, None if self.deep else p)
            for blk in stage.blocks:
                if j < self.num_kv:
                    kv = (getattr(self, f"prompt_keys_{j}"), getattr(self, f"prompt_values_{j}"))
                    x, _ = prompted_block(blk, x, None, self.num_prompts, prompt_kv=kv)
                else:
                    if self.num_prompts and (self.deep or j == 0):
                        p = getattr(self, f"prompt_tokens_{j}").expand(batch, -1, -1)
                    x, p = prompted_block(blk, x, p, self.num_prompts)
                j += 1
        rows = x.flatten(1, 2)
        return bb.norm(rows if p is None else torch.cat([p, rows], dim=1))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def fold_swin(model: VFPTSwin, mode: str, dtype: torch.dtype) -> nn.Module:
    """folding.fold_model for a Swin: auto (kv where exact, else tokens), tokens, kv, none."""
    if mode not in FOLD_MODES:
        raise VFPTError(f"fold mode must be one of {', '.join(FOLD_MODES)}, got {mode!r}")
    why = kv_refusal(model)
    if mode == "auto":
        mode = "kv" if why is None else "tokens"
    if mode == "kv" and why is not None:
        raise VFPTError(f"the kv fold is not exact here: {why}")
    model.eval()
    folded = LiveVFPT(model) if mode == "none" else FoldedSwin(model, mode, dtype)
    return folded.eval()
