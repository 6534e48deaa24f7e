"""Fold a trained VFPT model into a deployable one with no FFT left (docs/model.md, sections 2-3).

Two forms, both plain modules torch can export:
- `tokens`: every layer's prompt block is the constant P_hat_i = cat(F(P_i[:m]), P_i[m:]); blocks run
  on [CLS, P_hat_i, patches] as before, only the FFT is gone.
- `kv`: deep prompts with CLS pooling only matter to the other tokens through their keys and values,
  which are constants: K_i = W_k LN1_i(P_hat_i) + b_k, V_i = W_v LN1_i(P_hat_i) + b_v. Blocks run on
  [CLS, patches] with K_i / V_i prepended to the keys and values: exact, and the prompt rows cost no
  query, projection or MLP compute. With mean pooling over the prompt rows (MAE) the last block still
  needs the prompt outputs, so it alone keeps its prompts as tokens.
`none` keeps the live FFT (the VFPTViT itself) for comparison. folding.fold_model picks the family's fold.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import nn

from vfpt_deploy.errors import VFPTError
from vfpt_deploy.models.folds import FOLD_MODES, LiveVFPT
from vfpt_deploy.models.fourier import prompt_block
from vfpt_deploy.models.vit.model import VFPTViT


def kv_refusal(model: VFPTViT) -> str | None:
    """Why the kv fold would not be exact for this model, or None when it is (docs/model.md, section 3)."""
    cfg = model.config
    if cfg.num_prompts == 0:
        return "the model has no prompts"
    if not cfg.deep:
        return ("shallow prompts flow on through every block and their states depend on the input, so only "
                "block 0 could use constant keys/values; use --fold tokens")
    for i, blk in enumerate(model.backbone.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention or getattr(blk.attn, "gate", None) is not None:
            return f"block {i} is a {type(blk).__name__}/{type(blk.attn).__name__}, not timm's standard Block/Attention"
    return None


def resolve_mode(model: VFPTViT, mode: str) -> str:
    if mode not in FOLD_MODES:
        raise VFPTError(f"fold mode must be one of {', '.join(FOLD_MODES)}, got {mode!r}")
    why = kv_refusal(model)
    if mode == "auto":
        return "kv" if why is None else "tokens"
    if mode == "kv" and why is not None:
        raise VFPTError(f"the kv fold is not exact here: {why}")
    return mode


@torch.no_grad()
def prompt_blocks(model: VFPTViT, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Every layer's constant prompt block P_hat_i, [layers, M, D] (1 layer when shallow), computed in
    `dtype` from the checkpoint's parameters."""
    layers = model.depth if model.config.deep else 1
    proj = copy.deepcopy(model.prompt_proj).to(dtype)
    out = []
    for i in range(layers):
        raw = model.prompt_embeddings if i == 0 else model.deep_prompt_embeddings[i - 1 : i]
        p = proj(raw.to(dtype))
        out.append(prompt_block(p, model.config.num_fourier, model.config.location)[0])
    return torch.stack(out)


@torch.no_grad()
def prompt_keys_values(block: Block, p_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V of a block for its constant prompt rows, [heads, M, head_dim] each, in p_hat's dtype."""
    dtype = p_hat.dtype
    norm1 = copy.deepcopy(block.norm1).to(dtype)
    attn = block.attn
    qkv = F.linear(norm1(p_hat), attn.qkv.weight.to(dtype), None if attn.qkv.bias is None else attn.qkv.bias.to(dtype))
    _, k, v = qkv.reshape(p_hat.shape[0], 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3).unbind(0)
    k = copy.deepcopy(attn.k_norm).to(dtype)(k)
    return k, v


class FoldedViT(nn.Module):
    """A VFPT model with its prompts folded to constants (`tokens` or `kv`). Same inputs, same logits."""

    def __init__(self, model: VFPTViT, mode: str, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        assert mode in ("tokens", "kv")
        self.fold_mode = mode
        self.backbone = model.backbone
        self.head = model.head
        self.pool = getattr(model, "pool", "token")
        self.num_prompts = model.config.num_prompts
        self.deep = model.config.deep
        blocks = prompt_blocks(model, dtype)
        # kv: every block but, under mean pooling, the last, whose prompt outputs are read by the pool.
        self.num_kv = 0 if mode == "tokens" else model.depth - (self.pool != "token")
        if self.num_kv:
            kv = [prompt_keys_values(model.backbone.blocks[i], blocks[i]) for i in range(self.num_kv)]
            self.register_buffer("prompt_keys", torch.stack([k for k, _ in kv]).float())
            self.register_buffer("prompt_values", torch.stack([v for _, v in kv]).float())
        self.register_buffer("prompt_tokens", blocks[self.num_kv:].float())  # [layers without kv, M, D]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        x = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(x))))
        batch, m = x.shape[0], self.num_prompts
        for i, blk in enumerate(bb.blocks):
            if i < self.num_kv:
                x = kv_block(blk, x, self.prompt_keys[i], self.prompt_values[i])
                continue
            j = i - self.num_kv  # index into prompt_tokens
            if m and (j == 0 or self.deep):
                # First token-carrying block inserts the prompts (after kv blocks nothing holds them);
                # deep prompts replace the previous block's prompt outputs.
                rest = x[:, 1:] if j == 0 else x[:, 1 + m :]
                p = self.prompt_tokens[j if self.deep else 0].expand(batch, -1, -1)
                x = torch.cat([x[:, :1], p, rest], dim=1)
            x = blk(x)
        return bb.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, 1:].mean(dim=1) if self.pool == "avg" else x[:, 0]
        return self.head(self.backbone.fc_norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def kv_block(blk: Block, x: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor) -> torch.Tensor:
    """timm Block.forward on [CLS, patches] with constant prompt keys/values [heads, M, head_dim]
    joining the attention. Softmax does not care where in the key order the prompts sit."""
    a = blk.attn
    B, N, C = x.shape
    qkv = a.qkv(blk.norm1(x)).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = a.q_norm(q), a.k_norm(k)
    k = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2)
    v = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)
    if a.fused_attn:  # what timm's Attention does: PyTorch's fused kernels (flash attention on a GPU)
        y = F.scaled_dot_product_attention(q, k, v, scale=a.scale)
    else:  # the export path (exporters/onnx.py turns fused_attn off): plain ops every runtime parses
        y = ((q * a.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    y = y.transpose(1, 2).reshape(B, N, a.attn_dim)
    y = a.proj_drop(a.proj(a.norm(y)))
    x = x + blk.drop_path1(blk.ls1(y))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def fold_vit(model: VFPTViT, mode: str, dtype: torch.dtype) -> nn.Module:
    """folding.fold_model for a ViT: auto (kv where exact, else tokens), tokens, kv, none."""
    mode = resolve_mode(model, mode)
    model.eval()
    folded = LiveVFPT(model) if mode == "none" else FoldedViT(model, mode, dtype)
    return folded.eval()
