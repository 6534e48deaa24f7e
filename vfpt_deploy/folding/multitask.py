"""Many tasks, one backbone: VFPT runs that share a frozen ViT folded into one module (docs/model.md,
section 6). Inputs: `images` [B, 3, H, W] and `task` int64 [B]; every sample uses its own task's
prompts and head, so requests for different tasks share a batch.

Each task is folded as it would be alone (fold.py): `kv` where that is exact (deep prompts, CLS pooling),
else `tokens`. The module keeps the backbone once and, per task, its constants, padded to the largest
task and masked so that padding changes nothing:
- kv: per layer every kv task's prompt keys/values side by side (unpadded); each sample gathers its task's
  rows, padded to the largest M_kv, and a padded key gets -inf added to its attention score (softmax
  weight exactly 0).
- tokens: the sequence is [CLS, M_tok prompt slots, patches]; per layer a task writes its prompt tokens
  into the slots (deep: every layer; shallow: layer 0; kv + mean pooling: the last layer only) and a slot
  is a key only where the task's prompts are live there; mean pooling averages live slots and patches.
- head: every task's head in one matrix [sum of classes, D]; the sample's own columns of its output are
  gathered, and its logits past the task's classes are -inf (the runtime trims them).
With only kv tasks (the usual case: deep runs) there are no slots, and a layer whose tasks all have the
same M has no mask: the graph is the single-task kv graph plus a few Gathers per layer and one for the head.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vfpt_deploy.artifacts.checkpoint import Run
from vfpt_deploy.errors import UsageError, VFPTError
from vfpt_deploy.models.vit.fold import FoldedViT, resolve_mode
from vfpt_deploy.models.families import family_of_model
from vfpt_deploy.models.vit.model import VFPTViT
from vfpt_deploy.artifacts.task_sources import match_tasks, source_labels, task_sources  # noqa: F401 (torch-free)

NEG_INF = float("-inf")


@dataclass
class TaskSet:
    """Named runs that share one backbone and preprocessing (check_task_set), in task-index order."""

    names: list[str]
    runs: list[Run]

    def __len__(self) -> int:
        return len(self.runs)

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def preprocess(self):
        return self.first.preprocess

    @property
    def paths(self) -> list[Path | None]:
        return [r.path for r in self.runs]


def check_task_set(names: list[str], runs: list[Run]) -> TaskSet:
    """Runs that may share one graph: the same ViT backbone (name, keyword arguments, weights) and the same
    preprocessing. Otherwise one line saying which differs, and between which tasks."""
    if not runs:
        raise UsageError("pass at least one checkpoint with --ckpt or --task NAME=PATH")
    a, first = names[0], runs[0]
    for name, run in zip(names, runs):
        if not family_of_model(run.model).parts().multitask or not isinstance(run.model, VFPTViT):
            raise UsageError(f"task {name!r} is a {type(run.model).__name__}: multi-task artifacts hold ViT runs "
                             "only for now; export Swin runs one by one")
        keys = sorted(k for k in {**run.backbone.kwargs, **first.backbone.kwargs}
                      if run.backbone.kwargs.get(k) != first.backbone.kwargs.get(k))
        model = "backbone model" + (f" ({run.backbone.name} vs {first.backbone.name})" if run.backbone.name !=
                                    first.backbone.name else f" (keyword arguments {', '.join(keys)[:120]})")
        for what, mine, theirs in (
                (model, (run.backbone.name, run.backbone.kwargs), (first.backbone.name, first.backbone.kwargs)),
                ("backbone weights (sha256)", run.backbone.sha256, first.backbone.sha256),
                ("preprocessing", run.preprocess, first.preprocess)):
            if mine != theirs:
                raise UsageError(f"tasks {a!r} and {name!r} differ in {what}: one artifact shares one backbone and "
                                 "one preprocessing; export them separately")
        if not run.backbone.sha256:
            raise UsageError(f"task {name!r} records no backbone sha256, so sharing its backbone cannot be checked; "
                             "re-save it with 'vfpt-deploy train' or 'import'")
    for run in runs[1:]:  # the same weights (sha256 above): keep one copy in memory
        run.model.backbone = first.model.backbone
    return TaskSet(list(names), list(runs))


def load_tasks(sources: list[tuple[str, Path]], backbone_weights: str | None = None) -> TaskSet:
    """Load every task's run.pt (task_sources) and check that they can share one backbone. A file that
    fails to load is named with its task."""
    from vfpt_deploy.artifacts.checkpoint import load_run

    names, runs = [], []
    for name, path in sources:
        runs.append(load_run(path, backbone_weights=backbone_weights))
        names.append(name)
        check_task_set(names, runs)  # refuse a mismatch before loading the rest
    return check_task_set(names, runs)


def task_fold_modes(tasks: TaskSet, fold: str) -> list[str]:
    """Each task's fold: auto picks kv where it is exact; kv refuses (naming the task) where it is not."""
    modes = []
    for name, run in zip(tasks.names, tasks.runs):
        try:
            modes.append(resolve_mode(run.model, fold))
        except VFPTError as e:
            raise UsageError(f"task {name!r}: {e}") from None
    if "none" in modes:
        raise UsageError("fold 'none' (the live FFT) has no multi-task form; use --fold auto, kv or tokens")
    return modes


class MultiTaskViT(nn.Module):
    """T folded VFPT tasks on one frozen ViT. forward(images, task) -> logits [B, C_max]."""

    fold_mode = "multi"

    def __init__(self, tasks: TaskSet, fold: str = "auto", dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        modes = task_fold_modes(tasks, fold)
        folded = [FoldedViT(run.model, mode, dtype) for run, mode in zip(tasks.runs, modes)]
        bb = tasks.first.model.backbone
        self.backbone, self.pool = bb, folded[0].pool
        self.task_folds = modes
        depth, attn = len(bb.blocks), bb.blocks[0].attn
        self.num_tasks = len(folded)
        self.num_classes = [f.head.out_features for f in folded]
        self.num_prompts = [f.num_prompts for f in folded]
        self._kv_constants(folded, depth, attn.num_heads, attn.head_dim)
        self._token_constants(folded, depth, bb.embed_dim)
        self._heads(folded)

    # -- constants -------------------------------------------------------------------------------
    def _kv_constants(self, folded: list[FoldedViT], depth: int, heads: int, head_dim: int) -> None:
        """Per layer, every kv task's prompt keys and values side by side, [heads, sum of M, head_dim] (nothing
        padded is stored); per task the rows it reads, padded to the largest M by repeating its last row,
        and the -inf key bias that gives those repeats no weight."""
        kv = [f for f in folded if f.num_kv]
        m = max([f.num_prompts for f in kv] or [0])
        layers = max(f.num_kv for f in folded)  # the same for every kv task: depth, or depth - 1 (mean pooling)
        offsets, start = [], 0
        for f in folded:
            offsets.append(start)
            start += f.num_prompts if f.num_kv else 0
        rows = torch.tensor([[o + min(j, f.num_prompts - 1) if f.num_kv else 0 for j in range(m)]
                             for o, f in zip(offsets, folded)], dtype=torch.long).reshape(len(folded), m)
        bias = torch.full((layers, self.num_tasks, m), NEG_INF)
        for t, f in enumerate(folded):
            bias[:f.num_kv, t, :f.num_prompts] = 0.0
        self.kv_layers, self.kv_slots = layers, m
        if layers:
            self.register_buffer("prompt_keys", torch.cat([f.prompt_keys for f in kv], dim=2))  # [layers, h, R, hd]
            self.register_buffer("prompt_values", torch.cat([f.prompt_values for f in kv], dim=2))
        self.register_buffer("kv_rows", rows)  # [T, M_kv] rows of prompt_keys each task reads
        self.register_buffer("kv_bias", bias)
        self.kv_masked = [bool((bias[i] != 0).any()) for i in range(layers)]  # a layer without padding needs no mask

    def task_keys_values(self, i: int, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's prompt keys and values of each sample's task, [B, heads, M_kv, head_dim] each."""
        rows = self.kv_rows[task].reshape(-1)  # B * M_kv row numbers: one Gather per tensor in ONNX
        out = []
        for const in (self.prompt_keys[i], self.prompt_values[i]):  # [heads, R, head_dim]
            picked = const.index_select(1, rows).reshape(const.shape[0], task.shape[0], self.kv_slots, -1)
            out.append(picked.transpose(0, 1))
        return out[0], out[1]

    def _token_constants(self, folded: list[FoldedViT], depth: int, dim: int) -> None:
        """Prompt slots for the tasks (or layers) that keep prompts as tokens. Stored: only the rows a task
        writes at a layer, after one zero row; token_rows[i, t] picks a task's M_tok slots at layer i (the
        zero row where it writes nothing or has fewer prompts)."""
        users = [f for f in folded if f.num_kv < depth and f.num_prompts]
        m = max([f.num_prompts for f in users] or [0])
        blocks = [torch.zeros(1, dim)]  # row 0: what an unwritten or padded slot starts from
        rows = torch.zeros(depth, self.num_tasks, m, dtype=torch.long)
        write = torch.zeros(depth, self.num_tasks, dtype=torch.bool)
        live = torch.zeros(depth, self.num_tasks, m, dtype=torch.bool)
        for t, f in enumerate(folded):
            if f.num_kv == depth or not f.num_prompts:
                continue
            for i in range(f.num_kv, depth):
                j = i - f.num_kv  # index into f.prompt_tokens, as FoldedViT.forward_features
                if j == 0 or f.deep:
                    write[i, t] = True
                    start = sum(len(b) for b in blocks)
                    rows[i, t, :f.num_prompts] = torch.arange(start, start + f.num_prompts)
                    blocks.append(f.prompt_tokens[j if f.deep else 0])
                live[i, t, :f.num_prompts] = True
        self.token_slots = m
        self.write_layers = [bool(write[i].any()) for i in range(depth)]
        self.register_buffer("prompt_tokens", torch.cat(blocks))  # [1 + written rows, D]
        self.register_buffer("token_rows", rows)  # [layers, T, M_tok]
        self.register_buffer("token_write", write)
        self.register_buffer("token_bias", torch.zeros(live.shape).masked_fill(~live, NEG_INF))
        # mean pooling reads the last block's live slots: their count per task
        self.register_buffer("pool_weight", live[-1].float())

    def task_tokens(self, i: int, task: torch.Tensor) -> torch.Tensor:
        """The prompt tokens each sample's task writes into the slots at layer i, [B, M_tok, D]."""
        return self.prompt_tokens[self.token_rows[i][task]]

    def _heads(self, folded: list[FoldedViT]) -> None:
        """Every head's rows in one [sum of classes, D] matrix (no padding stored); per task the columns of
        its logits in that output, padded to C_max by repeating its last one (masked to -inf after)."""
        c = max(self.num_classes)
        offsets = [sum(self.num_classes[:t]) for t in range(self.num_tasks)]
        columns = torch.tensor([[o + min(j, n - 1) for j in range(c)] for o, n in zip(offsets, self.num_classes)])
        self.max_classes = c
        self.register_buffer("head_weight", torch.cat([f.head.weight.detach() for f in folded]))
        self.register_buffer("head_bias", torch.cat([f.head.bias.detach() for f in folded]))
        self.register_buffer("head_columns", columns)  # [T, C_max]
        self.register_buffer("class_valid", torch.arange(c)[None, :] < torch.tensor(self.num_classes)[:, None])

    # -- forward ---------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        x = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(x))))
        m = self.token_slots
        if m:
            x = torch.cat([x[:, :1], self.task_tokens(0, task), x[:, 1:]], dim=1)
        for i, blk in enumerate(bb.blocks):
            if m and i > 0 and self.write_layers[i]:
                keep = self.token_write[i][task].view(-1, 1, 1)
                slots = torch.where(keep, self.task_tokens(i, task), x[:, 1:1 + m])
                x = torch.cat([x[:, :1], slots, x[:, 1 + m:]], dim=1)
            x = self._block(i, blk, x, task)
        return bb.norm(x)

    def _block(self, i: int, blk, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """timm Block.forward with this layer's per-sample prompt keys/values and key mask."""
        a = blk.attn
        B, N, C = x.shape
        q, k, v = a.qkv(blk.norm1(x)).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        parts = []  # additive key bias, [B, keys]; None where every key of that part is live
        if i < self.kv_layers and self.kv_slots:
            pk, pv = self.task_keys_values(i, task)
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
            parts.append(self.kv_bias[i][task] if self.kv_masked[i] else None)
        if self.token_slots:
            parts += [None, self.token_bias[i][task], None]  # CLS, prompt slots, patches
            sizes = [1, self.token_slots, N - 1 - self.token_slots]
        else:
            parts.append(None)
            sizes = [N]
        mask = None
        if any(p is not None for p in parts):
            if i < self.kv_layers and self.kv_slots:
                sizes = [self.kv_slots] + sizes
            mask = torch.cat([p if p is not None else x.new_zeros(B, n) for p, n in zip(parts, sizes)], dim=1)
            mask = mask[:, None, None, :]
        if a.fused_attn:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=a.scale)
        else:  # the export path: plain ops every runtime parses
            s = (q * a.scale) @ k.transpose(-2, -1)
            y = (s if mask is None else s + mask).softmax(dim=-1) @ v
        y = y.transpose(1, 2).reshape(B, N, a.attn_dim)
        x = x + blk.drop_path1(blk.ls1(a.proj_drop(a.proj(a.norm(y)))))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    def forward_head(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        if self.pool == "avg":  # mean over the live prompt slots and the patches (docs/model.md, section 1)
            m, patches = self.token_slots, x.shape[1] - 1 - self.token_slots
            w = torch.cat([self.pool_weight[task], x.new_ones(x.shape[0], patches)], dim=1)
            x = (x[:, 1:] * w.unsqueeze(-1)).sum(dim=1) / w.sum(dim=1, keepdim=True)
        else:
            x = x[:, 0]
        every = F.linear(self.backbone.fc_norm(x), self.head_weight, self.head_bias)  # [B, sum of classes]
        logits = torch.gather(every, 1, self.head_columns[task])
        return torch.where(self.class_valid[task], logits, torch.full_like(logits, NEG_INF))

    def forward(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, task), task)


def fold_tasks(tasks: TaskSet, fold: str = "auto", dtype: torch.dtype = torch.float32) -> MultiTaskViT:
    if dtype not in (torch.float32, torch.float64):
        raise UsageError(f"fold in float32 or float64, not {dtype}")
    return MultiTaskViT(tasks, fold, dtype).eval()
