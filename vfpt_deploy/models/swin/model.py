"""VFPT on a frozen timm Swin Transformer: the same prompt rows in front of every attention window.

In the style of timm's swin_transformer.py: one module, the model with forward_features / forward_head,
the backbone configured by timm keyword arguments. It follows the reference Swin VFPT (see
docs/model.md, section 5) except where the reference mixes the images of a batch: here every image is
computed on its own, so its logits never depend on the rest of its batch.

The rows of an image: P prompt rows (no position information) and the H x W grid of patch rows.
- Block: norm1 on all rows; the grid is shifted and cut into windows as timm does; the block's P
  (normed) prompt rows go in front of every window of the image; window attention with zero relative
  position bias and zero shift mask in the prompt rows and columns; the prompt outputs are averaged over
  the image's windows; residual; then the MLP (norm2) on every row, prompt rows included.
- Patch merging: the prompt rows are tiled 4x along channels, then the shared LayerNorm and reduction.
- Deep: every block has its own prompts (stage 0 block 0: `prompt_embeddings`; the others:
  `deep_prompt_embeddings_{stage}`); the previous block's prompt outputs are discarded. Shallow: block
  0's prompts flow on through every block and merge.
- Output: final LayerNorm, the mean over ALL rows (prompts included), a linear head.
The Fourier part is the ViT one (fourier.prompt_block, prepend only).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock, WindowAttention
from torch import nn

from vfpt_deploy.errors import UsageError
from vfpt_deploy.models.config import VFPTConfig
from vfpt_deploy.models.fourier import prompt_block
from vfpt_deploy.models.swin.backbone import check_swin_backbone

# -- the Swin blocks with prompt rows ------------------------------------------------------------------
def window_attention(attn: WindowAttention, windows: torch.Tensor, mask: torch.Tensor | None, num_windows: int,
                     num_prompts: int, prompts: torch.Tensor | None = None,
                     prompt_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """timm's WindowAttention (its default, unfused path) with prompt rows joining every window.

    windows [B * nW, A, C] (image-major, as timm's window partition orders them); mask [nW, A, A] or None.
    prompts [B, P, C]: each image's (normed) prompt rows, put in front of each of ITS windows; their
    outputs come back averaged over its windows, [B, P, C]. prompt_kv ([heads, P, head_dim] each): constant
    prompt keys and values instead (the kv fold), which every window's queries attend to; there are no
    prompt queries then. Relative position bias and shift mask are zero in the prompt rows and columns.
    num_prompts is P as a Python int, so an exported graph pads with constants, not sizes read at run time.
    """
    area, heads = attn.window_area, attn.num_heads
    head_dim = attn.qkv.out_features // (3 * heads)

    def qkv(x: torch.Tensor, n: int) -> torch.Tensor:  # [N, n, C] -> [3, N, heads, n, head_dim]
        return attn.qkv(x).reshape(-1, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)

    q, k, v = qkv(windows, area).unbind(0)
    rows = area
    if prompts is not None:
        # The prompt rows are the same in every window of an image: project them once per image, then give
        # each window its image's copies (the same values as projecting per-window copies, a fraction of the work).
        per_window = qkv(prompts, num_prompts).unsqueeze(2).expand(-1, -1, num_windows, -1, -1, -1)
        qp, kp, vp = per_window.reshape(3, -1, heads, num_prompts, head_dim).unbind(0)
        q, k, v = torch.cat([qp, q], dim=2), torch.cat([kp, k], dim=2), torch.cat([vp, v], dim=2)
        rows += num_prompts
    keys = area + num_prompts
    q = q * attn.scale
    logits = q @ k.transpose(-2, -1)
    if prompt_kv is not None:  # the constant keys broadcast over all windows: no per-window copies
        logits = torch.cat([q @ prompt_kv[0].transpose(-2, -1), logits], dim=-1)
    bias = attn._get_rel_pos_bias()[0]  # [heads, A, A]
    if mask is not None:
        bias = mask.unsqueeze(1) + bias  # [nW, heads, A, A]
    if keys > area:
        bias = F.pad(bias, (num_prompts, 0, rows - area, 0))  # zeros for the prompt columns (and rows)
    logits = (logits.reshape(-1, num_windows, heads, rows, keys) + bias).reshape(-1, heads, rows, keys)
    a = attn.attn_drop(attn.softmax(logits))
    y = a @ v if prompt_kv is None else a[..., :num_prompts] @ prompt_kv[1] + a[..., num_prompts:] @ v
    y = y.transpose(1, 2).reshape(-1, rows, attn.proj.in_features)
    out = attn.proj_drop(attn.proj(y[:, rows - area:]))
    if prompts is None:
        return out, None
    # Each image's prompt outputs averaged over ITS windows; the mean before the (linear) projection is
    # the reference's projection-then-mean up to float round-off, once per image instead of per window.
    prompt_out = y[:, :num_prompts].reshape(-1, num_windows, num_prompts, y.shape[-1]).mean(dim=1)
    return out, attn.proj_drop(attn.proj(prompt_out))


# timm's window_partition / window_reverse read the sizes off the tensor; these take them as Python ints,
# so an exported graph reshapes with constants (the batch stays dynamic), a much smaller graph.
def partition(x: torch.Tensor, grid: tuple[int, int], window: tuple[int, int]) -> torch.Tensor:
    """[B, H, W, C] -> [B * nW, wh * ww, C], windows image-major and row-major as timm orders them."""
    (h, w), (wh, ww), c = grid, window, x.shape[-1]
    return x.reshape(-1, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, c)


def unpartition(y: torch.Tensor, grid: tuple[int, int], window: tuple[int, int]) -> torch.Tensor:
    (h, w), (wh, ww), c = grid, window, y.shape[-1]
    return y.reshape(-1, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def shifted_window_attention(blk: SwinTransformerBlock, x: torch.Tensor, num_prompts: int,
                             prompts: torch.Tensor | None = None,
                             prompt_kv=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """timm's SwinTransformerBlock._attn on the normed grid x [B, H, W, C], with prompt rows (see
    window_attention). No padding: check_swin_backbone makes every grid a whole number of windows."""
    (h, w), (wh, ww), shift = blk.input_resolution, blk.window_size, blk.shift_size
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    y, prompt_out = window_attention(blk.attn, partition(x, (h, w), (wh, ww)), blk.attn_mask, (h // wh) * (w // ww),
                                     num_prompts, prompts, prompt_kv)
    y = unpartition(y, (h, w), (wh, ww))
    if any(shift):
        y = torch.roll(y, shifts=shift, dims=(1, 2))
    return y, prompt_out


def prompted_block(blk: SwinTransformerBlock, x: torch.Tensor, p: torch.Tensor | None, num_prompts: int,
                   prompt_kv=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One Swin block on the grid x [B, H, W, C] and prompt rows p [B, P, C] (None: none, or constant
    prompt keys/values in prompt_kv; num_prompts = P). Returns both, updated. Without prompts this is
    timm's block computed the same way as with them (constant sizes), so prompt costs compare like for like."""
    num_prompts = num_prompts if p is not None or prompt_kv is not None else 0
    y, py = shifted_window_attention(blk, blk.norm1(x), num_prompts, None if p is None else blk.norm1(p), prompt_kv)
    x = x + blk.drop_path1(y)
    x = x + blk.drop_path2(blk.mlp(blk.norm2(x)))  # row by row, so on the [B, H, W, C] grid as it is
    if p is not None:  # the prompt rows go through the same MLP on their own
        p = p + blk.drop_path1(py)
        p = p + blk.drop_path2(blk.mlp(blk.norm2(p)))
    return x, p


def merge(stage: nn.Module, x: torch.Tensor, p: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The patch merging at the start of a stage (none in stage 0), as timm's PatchMerging computes it on
    the grid; prompt rows tiled 4x along channels, then the same LayerNorm(4C) and reduction."""
    ds = stage.downsample
    if not isinstance(ds, PatchMerging):
        return x, p
    (h, w), c = stage.input_resolution, ds.dim
    x = x.reshape(-1, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(-1, h // 2, w // 2, 4 * c)
    x = ds.reduction(ds.norm(x))
    if p is not None:
        p = ds.reduction(ds.norm(torch.cat([p, p, p, p], dim=-1)))
    return x, p


def stage_widths(backbone: SwinTransformer) -> list[int]:
    return [stage.blocks[0].dim for stage in backbone.layers]


def stage_depths(backbone: SwinTransformer) -> list[int]:
    return [len(stage.blocks) for stage in backbone.layers]


def check_swin_config(config: VFPTConfig) -> None:
    if config.project:
        raise UsageError("prompt projection (project > 0) is not available for Swin: the reference Swin VFPT "
                         "learns its prompts at each stage's width; use project 0")
    if config.location != "prepend" and config.num_fourier:
        raise UsageError(f"location {config.location!r} is not available for Swin: the reference Swin VFPT puts "
                         "its Fourier prompts first (prepend)")


def prompt_shapes(config: VFPTConfig, backbone: SwinTransformer) -> dict[str, tuple[int, ...]]:
    """The prompt tensors of a VFPTSwin and their shapes (the reference's names, docs/model.md section 5)."""
    widths, depths, m = stage_widths(backbone), stage_depths(backbone), config.num_prompts
    shapes = {"prompt_embeddings": (1, m, widths[0])}
    if config.deep:
        for s, (d, w) in enumerate(zip(depths, widths)):
            shapes[f"deep_prompt_embeddings_{s}"] = (d - (s == 0), m, w)
    return shapes


def tuned_shapes(config: VFPTConfig, backbone: SwinTransformer, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Every tuned tensor of a VFPTSwin and its shape."""
    return {**prompt_shapes(config, backbone), "head.weight": (num_classes, backbone.num_features),
            "head.bias": (num_classes,)}


# -- the model ----------------------------------------------------------------------------------------
class VFPTSwin(nn.Module):
    """A frozen timm Swin with VFPT prompts and a linear head. Only prompts and head train."""

    def __init__(self, backbone: SwinTransformer, num_classes: int, config: VFPTConfig) -> None:
        super().__init__()
        check_swin_backbone(backbone)
        check_swin_config(config)
        self.config = config
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()
        ph, pw = backbone.patch_embed.patch_size
        # Reference init: uniform(-v, v), v = sqrt(6 / (3 * patch_h * patch_w + embed_dim)), every stage alike.
        v = math.sqrt(6.0 / float(3 * ph * pw + stage_widths(backbone)[0]))
        for key, shape in prompt_shapes(config, backbone).items():
            self.register_parameter(key, nn.Parameter(torch.empty(shape).uniform_(-v, v)))
        self.prompt_dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(backbone.num_features, num_classes)

    # -- shape facts ---------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.head.out_features

    @property
    def embed_dim(self) -> int:
        """The stage-0 width (timm's embed_dim may also be given per stage)."""
        return stage_widths(self.backbone)[0]

    @property
    def depths(self) -> list[int]:
        return stage_depths(self.backbone)

    @property
    def depth(self) -> int:
        return sum(self.depths)

    @property
    def img_size(self) -> tuple[int, int]:
        return tuple(self.backbone.patch_embed.img_size)

    @property
    def pool(self) -> str:
        return "avg"  # the mean of every row, prompts included

    def train(self, mode: bool = True) -> "VFPTSwin":
        super().train(mode)
        self.backbone.eval()  # frozen: dropout / drop-path of the backbone never switch on
        return self

    def tuned_parameters(self) -> dict[str, nn.Parameter]:
        return {k: p for k, p in self.named_parameters() if not k.startswith("backbone.")}

    # -- prompts -------------------------------------------------------------------------------------
    def raw_prompts(self, stage: int, index: int) -> torch.Tensor:
        """The prompt parameters of block `index` of `stage`, [1, M, C_stage]."""
        if (stage, index) == (0, 0):
            return self.prompt_embeddings
        i = index - 1 if stage == 0 else index
        return getattr(self, f"deep_prompt_embeddings_{stage}")[i : i + 1]

    def layer_prompts(self, stage: int, index: int, batch: int) -> torch.Tensor:
        """The prompt rows entering a block, [batch, M, C]: dropout (training only), then the FFT of the
        first m; without active dropout computed once and shared by the batch."""
        p = self.raw_prompts(stage, index)
        if self.training and self.prompt_dropout.p > 0:
            p = self.prompt_dropout(p.expand(batch, -1, -1))
        return prompt_block(p, self.config.num_fourier, "prepend").expand(batch, -1, -1)

    # -- forward -------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All rows after the final norm, [B, M + H*W, C]: prompt rows first, then the last stage's grid."""
        bb = self.backbone
        x = bb.patch_embed(x)  # [B, H, W, C], with its LayerNorm
        batch, m, deep = x.shape[0], self.config.num_prompts, self.config.deep
        p = None
        for s, stage in enumerate(bb.layers):
            x, p = merge(stage, x, None if deep else p)  # deep: replaced just below anyway
            for i, blk in enumerate(stage.blocks):
                if m and (deep or (s, i) == (0, 0)):
                    p = self.layer_prompts(s, i, batch)
                x, p = prompted_block(blk, x, p, m)
        rows = x.flatten(1, 2)
        return bb.norm(rows if p is None else torch.cat([p, rows], dim=1))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=1)  # the reference's average pool: every row, prompt rows included
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
