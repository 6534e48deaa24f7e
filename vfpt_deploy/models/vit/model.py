"""VFPT on a frozen timm VisionTransformer: prompt tokens in every layer, some passed through a 2-D FFT.

Follows the reference (github.com/runtsang/VFPT, built on KMnP/vpt): the sequence into block 0 is
[CLS, prompts, patches] with prompts added after the position embedding; deep prompts overwrite rows
1..M before every later block; final norm, CLS token, linear head. See docs/model.md (sections 1-2).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from vfpt_deploy.models.config import VFPTConfig
from vfpt_deploy.models.fourier import prompt_block
from vfpt_deploy.models.vit.backbone import check_backbone


class VFPTViT(nn.Module):
    """A frozen ViT with VFPT prompts and a linear head. Only prompts, projection and head train."""

    def __init__(self, backbone: VisionTransformer, num_classes: int, config: VFPTConfig) -> None:
        super().__init__()
        check_backbone(backbone)
        self.config = config
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()

        dim = backbone.embed_dim
        depth = len(backbone.blocks)
        m = config.num_prompts
        prompt_dim = config.project or dim
        ph, pw = backbone.patch_embed.patch_size
        # Reference init: uniform(-v, v), v = sqrt(6 / (3 * patch_h * patch_w + prompt_dim)).
        v = math.sqrt(6.0 / float(3 * ph * pw + prompt_dim))
        self.prompt_embeddings = nn.Parameter(torch.empty(1, m, prompt_dim).uniform_(-v, v))
        if config.deep:
            self.deep_prompt_embeddings = nn.Parameter(torch.empty(depth - 1, m, prompt_dim).uniform_(-v, v))
        else:
            self.register_parameter("deep_prompt_embeddings", None)
        if config.project:
            self.prompt_proj = nn.Linear(config.project, dim)
            nn.init.kaiming_normal_(self.prompt_proj.weight, a=0, mode="fan_out")
        else:
            self.prompt_proj = nn.Identity()
        self.prompt_dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(dim, num_classes)

    # -- shape facts -------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.head.out_features

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    @property
    def depth(self) -> int:
        return len(self.backbone.blocks)

    @property
    def img_size(self) -> tuple[int, int]:
        return tuple(self.backbone.patch_embed.img_size)

    @property
    def pool(self) -> str:
        """Pooling: "token" (the CLS row) or "avg" (mean of all rows after CLS, prompts included: MAE)."""
        return self.backbone.global_pool

    def train(self, mode: bool = True) -> "VFPTViT":
        super().train(mode)
        self.backbone.eval()  # frozen: dropout / drop-path of the backbone never switch on
        return self

    def tuned_parameters(self) -> dict[str, nn.Parameter]:
        return {k: p for k, p in self.named_parameters() if not k.startswith("backbone.")}

    # -- prompts -----------------------------------------------------------------------------
    def raw_prompts(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s prompt parameters after the optional projection, [1, M, D]."""
        p = self.prompt_embeddings if layer == 0 else self.deep_prompt_embeddings[layer - 1 : layer]
        return self.prompt_proj(p)

    def layer_prompts(self, layer: int, batch: int) -> torch.Tensor:
        """The prompt block entering block `layer`, [batch, M, D]. Reference order: projection,
        expand, dropout, FFT. Without active dropout every sample shares one block, so it is
        computed once and expanded."""
        p = self.raw_prompts(layer)
        if self.training and self.prompt_dropout.p > 0:
            p = self.prompt_dropout(p.expand(batch, -1, -1))
        p = prompt_block(p, self.config.num_fourier, self.config.location)
        return p.expand(batch, -1, -1)

    # -- forward -----------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding + CLS + position embedding, as the backbone does it: [B, 1 + N, D]."""
        bb = self.backbone
        x = bb.patch_embed(x)
        x = bb._pos_embed(x)
        x = bb.patch_drop(x)
        return bb.norm_pre(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        batch, m = x.shape[0], self.config.num_prompts
        if m:
            # Prompts go in after the position embedding: they get none.
            x = torch.cat([x[:, :1], self.layer_prompts(0, batch), x[:, 1:]], dim=1)
        for i, blk in enumerate(self.backbone.blocks):
            if i > 0 and m and self.config.deep:
                # Deep: this layer's prompts replace the previous block's prompt outputs.
                x = torch.cat([x[:, :1], self.layer_prompts(i, batch), x[:, 1 + m :]], dim=1)
            x = blk(x)
        return self.backbone.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # Pooling, docs/model.md (section 1). token: the CLS row. avg (MAE): the mean of every row after
        # CLS, the last block's prompt outputs included, as the reference pools; then fc_norm (a LayerNorm
        # there, Identity for token).
        x = x[:, 0] if self.pool == "token" else x[:, 1:].mean(dim=1)
        x = self.backbone.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
