"""Prompt packs, the torch side: the frozen ViT with every task's folded constants as graph INPUTS (the
backbone artifact), and a run folded into its pack's tables (docs/serving.md, "Prompt packs").

The backbone module is multitask.MultiTaskViT with the per-task tables moved out of the graph: the runtime
passes them (artifacts/pack.py assembles them from the packs it holds, padded to the widest) with a task
index per sample, so a task is added by growing a table, not by exporting or reloading the graph.
Padding is masked exactly as in the multi-task artifact:
- kv: prompt_keys / prompt_values [T, L_kv, heads, M, head_dim]; a padded key gets -inf added to its
  attention score by kv_bias [T, L_kv, M] (softmax weight exactly 0; its zero value adds 0).
- tokens: the sequence is [CLS, S prompt slots, patches]; prompt_tokens [T, L, S, D] is written into the
  slots at the layers token_write [T, L] says, and token_bias [T, L, S] makes a slot a key only where the
  task's prompts are live there; mean pooling averages the last layer's live slots and the patches.
- head: head_weight [T, D, C], head_bias [T, C]; a padded class has weight 0 and bias -inf, so its logit is
  exactly -inf (the runtime trims it).
Every table dimension but D, heads and head_dim is symbolic in the graph: T, M, S and C are whatever the
runtime's tables hold (0 included: no token slots when no loaded pack keeps prompts as tokens).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vfpt_deploy.artifacts.checkpoint import Run
from vfpt_deploy.artifacts.pack import TABLE_INPUTS, PackTables
from vfpt_deploy.artifacts.schema import INPUT_NAME, TASK_INPUT
from vfpt_deploy.errors import UsageError, VFPTError
from vfpt_deploy.models.vit.fold import FoldedViT, resolve_mode
from vfpt_deploy.models.vit.model import VFPTViT


def check_packable(run: Run, what: str = "the run") -> None:
    if not isinstance(run.model, VFPTViT):
        raise UsageError(f"{what} is a {type(run.model).__name__}: prompt packs hold ViT runs only for now; "
                         "export Swin runs as single-task artifacts")
    if not run.backbone.sha256:
        raise UsageError(f"{what} records no backbone sha256, so its backbone cannot be matched to a backbone "
                         "artifact; re-save it with 'vfpt-deploy train' or 'import'")


def geometry(model: VFPTViT) -> dict:
    """What the backbone artifact's tables are shaped by (recorded in its metadata, checked by the runtime)."""
    bb = model.backbone
    attn = bb.blocks[0].attn
    pool = getattr(model, "pool", "token")
    depth = len(bb.blocks)
    return {"depth": depth, "kv_layers": depth - (pool != "token"), "heads": attn.num_heads,
            "head_dim": attn.head_dim, "dim": bb.embed_dim, "pool": pool, "image_size": list(model.img_size)}


def pack_tables(run: Run, fold: str = "auto", dtype: torch.dtype = torch.float32) -> PackTables:
    """A run folded as it would be alone (kv where exact, else tokens), as its pack's unpadded tables."""
    check_packable(run)
    try:
        mode = resolve_mode(run.model, fold)
    except VFPTError as e:
        raise UsageError(str(e)) from None
    if mode == "none":
        raise UsageError("fold 'none' (the live FFT) has no pack form; use --fold auto, kv or tokens")
    f = FoldedViT(run.model.eval(), mode, dtype)
    g = geometry(run.model)
    depth, m = g["depth"], f.num_prompts
    keys = values = None
    if f.num_kv and m:
        keys, values = f.prompt_keys.numpy(), f.prompt_values.numpy()
    tokens = write = live = None
    if f.num_kv < depth and m:
        tokens = np.zeros((depth, m, g["dim"]), np.float32)
        write, live = np.zeros(depth, bool), np.zeros(depth, bool)
        for i in range(f.num_kv, depth):
            j = i - f.num_kv  # index into f.prompt_tokens, as FoldedViT.forward_features
            if j == 0 or f.deep:
                write[i] = True
                tokens[i] = f.prompt_tokens[j if f.deep else 0].numpy()
            live[i] = True
    return PackTables(fold=mode, keys=keys, values=values, tokens=tokens, token_write=write, token_live=live,
                      head_weight=f.head.weight.detach().float().numpy().copy(),
                      head_bias=f.head.bias.detach().float().numpy().copy())


class PackBackbone(nn.Module):
    """The frozen ViT of a run; forward(images, task, *tables) -> logits [B, C] (TABLE_INPUTS order)."""

    fold_mode = "pack"

    def __init__(self, model: VFPTViT) -> None:
        super().__init__()
        self.backbone, self.geometry = model.backbone, geometry(model)
        self.pool, self.kv_layers = self.geometry["pool"], self.geometry["kv_layers"]

    def onnx_inputs(self, image_size: tuple[int, int]):
        """Example inputs, names and symbolic axes for the ONNX export (exporters/onnx.py asks for them)."""
        g = self.geometry
        t, m, s, c = 2, 3, 2, 4  # any sizes: every one of them is symbolic in the graph
        tables = {"prompt_keys": torch.randn(t, self.kv_layers, g["heads"], m, g["head_dim"]),
                  "prompt_values": torch.randn(t, self.kv_layers, g["heads"], m, g["head_dim"]),
                  "kv_bias": torch.zeros(t, self.kv_layers, m),
                  "prompt_tokens": torch.randn(t, g["depth"], s, g["dim"]),
                  "token_write": torch.ones(t, g["depth"], dtype=torch.bool),
                  "token_bias": torch.zeros(t, g["depth"], s),
                  "head_weight": torch.randn(t, g["dim"], c), "head_bias": torch.zeros(t, c)}
        assert list(tables) == list(TABLE_INPUTS)
        args = (torch.randn(2, 3, *image_size), torch.tensor([0, t - 1]), *tables.values())
        axes = {INPUT_NAME: {0: "batch"}, TASK_INPUT: {0: "batch"}}
        for name, dims in TABLE_INPUTS.items():
            axes[name] = {i: d for i, d in enumerate(dims) if d in ("tasks", "prompts", "slots", "classes")}
        return args, [INPUT_NAME, TASK_INPUT, *tables], axes

    def forward(self, images, task, prompt_keys, prompt_values, kv_bias, prompt_tokens, token_write, token_bias,
                head_weight, head_bias):
        bb = self.backbone
        x = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(images))))
        keys, values, kvb = prompt_keys[task], prompt_values[task], kv_bias[task]  # [B, L_kv, h, M, hd], [B, L_kv, M]
        toks, write, tb = prompt_tokens[task], token_write[task], token_bias[task]  # [B, L, S, D], [B, L], [B, L, S]
        s = toks.shape[2]
        x = torch.cat([x[:, :1], toks[:, 0], x[:, 1:]], dim=1)
        for i, blk in enumerate(bb.blocks):
            if i > 0:
                slots = torch.where(write[:, i].view(-1, 1, 1), toks[:, i], x[:, 1:1 + s])
                x = torch.cat([x[:, :1], slots, x[:, 1 + s:]], dim=1)
            kv = (keys[:, i], values[:, i], kvb[:, i]) if i < self.kv_layers else None
            x = self._block(blk, x, kv, tb[:, i], s)
        x = bb.norm(x)
        if self.pool == "avg":  # mean over the live prompt slots and the patches
            live = (tb[:, -1] == 0).to(x.dtype)
            w = torch.cat([live, torch.ones_like(x[:, 1 + s:, 0])], dim=1)
            x = (x[:, 1:] * w.unsqueeze(-1)).sum(dim=1) / w.sum(dim=1, keepdim=True)
        else:
            x = x[:, 0]
        feats = bb.fc_norm(x)
        return torch.matmul(feats.unsqueeze(1), head_weight[task]).squeeze(1) + head_bias[task]

    @staticmethod
    def _block(blk, x, kv, slot_bias, s):
        """timm Block.forward with the sample's prompt keys/values prepended and the key mask added."""
        a = blk.attn
        B, N, C = x.shape
        q, k, v = a.qkv(blk.norm1(x)).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        rest = torch.zeros_like(x[:, :, 0])  # [B, N]: CLS and patches are always keys
        parts = [rest[:, :1], slot_bias, rest[:, 1 + s:]]
        if kv is not None:
            pk, pv, kvb = kv
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
            parts.insert(0, kvb)
        mask = torch.cat(parts, dim=1)[:, None, None, :]
        if a.fused_attn:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=a.scale)
        else:  # the export path: plain ops every runtime parses
            y = ((q * a.scale) @ k.transpose(-2, -1) + mask).softmax(dim=-1) @ v
        y = y.transpose(1, 2).reshape(B, N, a.attn_dim)
        x = x + blk.drop_path1(blk.ls1(a.proj_drop(a.proj(a.norm(y)))))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
