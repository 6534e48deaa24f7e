"""Many tasks, one backbone: VFPT runs that share a frozen ViT folded into one module (docs/model.md,
section 6). Inputs: `images` [B, 3, H, W] and `task` int64 [B]; every sample uses its own task's
prompts and head, so requests for different tasks share a batch.

Each task is folded as it would be alone (fold.py): `kv` where that is exact (deep prompts, CLS pooling),
else `tokens`. The module keeps the backbone once and, per task, its constants, padded to the largest
task and masked so that padding changes nothing:
- kv: per layer [T, heads, M_kv, head_dim] keys/values; a padded prompt key gets -inf added to its
  attention score (softmax weight exactly 0).
- tokens: the sequence is [CLS, M_tok prompt slots, patches]; per layer a task writes its prompt tokens
  into the slots (deep: every layer; shallow: layer 0; kv + mean pooling: the last layer only) and a slot
  is a key only where the task's prompts are live there; mean pooling averages live slots and patches.
- head: every task's head in one matrix [sum of classes, D]; the sample's own columns of its output are
  gathered, and its logits past the task's classes are -inf (the runtime trims them).
With only kv tasks (the usual case: deep runs) there are no slots, and a layer whose tasks all have the
same M has no mask: the graph is the single-task kv graph plus one Gather per layer and one for the head.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import Run
from .errors import UsageError, VFPTError
from .fold import FoldedViT, resolve_mode
from .model import VFPTViT
from .schema import MAX_TASKS, TASK_NAME

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


def task_sources(ckpts: list[Path], tasks: list[str]) -> list[tuple[str, Path]]:
    """(name, path) per task from `--ckpt PATH` (named by the file stem) and `--task NAME=PATH`, in the
    order given (--ckpt first). Names must be unique and usable as model names (serve, Triton)."""
    out = [(Path(p).stem, Path(p)) for p in ckpts]
    for item in tasks:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise UsageError(f"--task takes NAME=PATH (e.g. cars=cars.pt), got {item!r}")
        out.append((name, Path(path)))
    seen: dict[str, Path] = {}
    for name, path in out:
        if not TASK_NAME.fullmatch(name):
            raise UsageError(f"task name {name!r} (from {path}) must be 1-64 letters, digits, '_', '.' or '-', "
                             "starting with a letter or digit; name it with --task NAME=PATH")
        if name in seen:
            raise UsageError(f"two tasks are named {name!r} ({seen[name]} and {path}); name them apart with "
                             "--task NAME=PATH")
        seen[name] = path
    if len(out) > MAX_TASKS:
        raise UsageError(f"{len(out)} tasks; one artifact holds at most {MAX_TASKS}")
    return out


def match_tasks(recorded: list[dict], ckpts: list[Path], named: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """Each recorded task's checkpoint, in the artifact's order: by name from --task NAME=PATH, else the
    --ckpt file whose sha256 the artifact recorded for it. Every task needs one; every file must match."""
    from .files import file_sha256

    by_name = dict(named)
    unknown = [n for n in by_name if n not in {t["name"] for t in recorded}]
    if unknown:
        raise UsageError(f"--task {unknown[0]}: the artifact has no such task (it holds "
                         f"{', '.join(t['name'] for t in recorded)})")
    by_sha = {}
    for p in ckpts:
        if not Path(p).is_file():
            raise UsageError(f"checkpoint {p} does not exist; pass each task's run.pt")
        by_sha.setdefault(file_sha256(p), p)
    out, used = [], set()
    for t in recorded:
        path = by_name.get(t["name"]) or by_sha.get(t.get("checkpoint_sha256"))
        if path is None:
            raise UsageError(f"no checkpoint given for task {t['name']!r} (exported from "
                             f"{t.get('checkpoint') or 'a run.pt'}); pass it with --ckpt or --task {t['name']}=PATH")
        out.append((t["name"], Path(path)))
        used.add(Path(path))
    extra = [p for p in ckpts if Path(p) not in used]
    if extra:
        raise UsageError(f"--ckpt {extra[0]} is none of the artifact's tasks (its sha256 matches no recorded "
                         "checkpoint); name its task with --task NAME=PATH")
    return out


def check_task_set(names: list[str], runs: list[Run]) -> TaskSet:
    """Runs that may share one graph: the same ViT backbone (name, keyword arguments, weights) and the same
    preprocessing. Otherwise one line saying which differs, and between which tasks."""
    if not runs:
        raise UsageError("pass at least one checkpoint with --ckpt or --task NAME=PATH")
    from .swin import VFPTSwin

    a, first = names[0], runs[0]
    for name, run in zip(names, runs):
        if isinstance(run.model, VFPTSwin) or not isinstance(run.model, VFPTViT):
            raise UsageError(f"task {name!r} is a {type(run.model).__name__}: multi-task artifacts hold ViT runs "
                             "only for now; export Swin runs one by one")
        for what, mine, theirs in (
                ("backbone model", (run.backbone.name, run.backbone.kwargs), (first.backbone.name, first.backbone.kwargs)),
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
    from .checkpoint import load_run

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
        m = max([f.num_prompts for f in folded if f.num_kv] or [0])
        layers = max(f.num_kv for f in folded)
        keys = torch.zeros(layers, self.num_tasks, heads, m, head_dim)
        values = torch.zeros_like(keys)
        bias = torch.full((layers, self.num_tasks, m), NEG_INF)
        for t, f in enumerate(folded):
            for i in range(f.num_kv):
                keys[i, t, :, :f.num_prompts] = f.prompt_keys[i]
                values[i, t, :, :f.num_prompts] = f.prompt_values[i]
                bias[i, t, :f.num_prompts] = 0.0
        self.kv_layers, self.kv_slots = layers, m
        self.register_buffer("prompt_keys", keys)
        self.register_buffer("prompt_values", values)
        self.register_buffer("kv_bias", bias)
        self.kv_masked = [bool((bias[i] != 0).any()) for i in range(layers)]  # a layer without padding needs no mask

    def _token_constants(self, folded: list[FoldedViT], depth: int, dim: int) -> None:
        """Prompt slots for the tasks (or layers) that keep prompts as tokens."""
        users = [f for f in folded if f.num_kv < depth and f.num_prompts]
        m = max([f.num_prompts for f in users] or [0])
        tokens = torch.zeros(depth, self.num_tasks, m, dim)
        write = torch.zeros(depth, self.num_tasks, dtype=torch.bool)
        live = torch.zeros(depth, self.num_tasks, m, dtype=torch.bool)
        for t, f in enumerate(folded):
            if f.num_kv == depth or not f.num_prompts:
                continue
            for i in range(f.num_kv, depth):
                j = i - f.num_kv  # index into f.prompt_tokens, as FoldedViT.forward_features
                if j == 0 or f.deep:
                    write[i, t] = True
                    tokens[i, t, :f.num_prompts] = f.prompt_tokens[j if f.deep else 0]
                live[i, t, :f.num_prompts] = True
        self.token_slots = m
        self.write_layers = [bool(write[i].any()) for i in range(depth)]
        self.register_buffer("prompt_tokens", tokens)
        self.register_buffer("token_write", write)
        self.register_buffer("token_bias", torch.zeros(live.shape).masked_fill(~live, NEG_INF))
        # mean pooling reads the last block's live slots: their count per task
        self.register_buffer("pool_weight", live[-1].float())

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
            x = torch.cat([x[:, :1], self.prompt_tokens[0][task], x[:, 1:]], dim=1)
        for i, blk in enumerate(bb.blocks):
            if m and i > 0 and self.write_layers[i]:
                keep = self.token_write[i][task].view(-1, 1, 1)
                slots = torch.where(keep, self.prompt_tokens[i][task], x[:, 1:1 + m])
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
            k = torch.cat([self.prompt_keys[i][task], k], dim=2)
            v = torch.cat([self.prompt_values[i][task], v], dim=2)
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
