"""Training: VFPT prompts + head on a frozen backbone (paper recipe: SGD, momentum 0.9, cosine with
warmup, batch 64), with per-epoch validation and a best-by-val callback."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from vfpt_deploy.models.config import TrainSettings, check_device_name  # noqa: F401 (TrainSettings re-exported)
from .errors import RuntimeSetupError, UsageError, VFPTError


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    val_top1: float
    lr: float


@dataclass
class History:
    epochs: list[EpochResult] = field(default_factory=list)
    best_epoch: int = -1
    best_val_top1: float = -1.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | None, allow_fallback: bool = False) -> torch.device:
    """--device: None (CUDA when present), cpu, cuda, cuda:N. Asking for CUDA where torch sees none is an
    error, unless allow_fallback (then the CPU, said by the caller)."""
    if device is None:
        return default_device()
    check_device_name(device)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            if allow_fallback:
                return torch.device("cpu")
            raise RuntimeSetupError(f"--device {device}: torch sees {count} CUDA GPU(s) here; use --device cpu, "
                                    "or --allow-fallback to run on the CPU")
    return dev


def check_finite(loss: torch.Tensor, params: list[torch.Tensor], epoch: int, step: int, lr: float) -> None:
    """Stop at the first non-finite loss or tuned tensor: a diverged run must not be saved or go on."""
    if not torch.isfinite(loss).all():
        raise VFPTError(f"training diverged at epoch {epoch}, step {step}: the loss is {loss.item()}; "
                        f"lower --lr (now {lr:g})")
    if not all(torch.isfinite(p).all() for p in params):
        raise VFPTError(f"training diverged at epoch {epoch}, step {step}: a tuned tensor became NaN/Inf; "
                        f"lower --lr (now {lr:g})")


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to 0."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.inference_mode()
def evaluate(model: nn.Module, loader, device: torch.device) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        pred = model(x.to(device)).argmax(-1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    return 100.0 * correct / max(1, total)


def fit(model: nn.Module, train_set, val_set, settings: TrainSettings, *,
        device: torch.device | None = None,
        on_epoch: Callable[[EpochResult, bool], None] | None = None,
        on_step: Callable[[int, int], None] | None = None) -> History:
    """Train the tuned parameters only. on_epoch(result, is_best) runs after every validation (save the
    checkpoint there); on_step(step, total) drives a progress bar."""
    settings.check()
    seed_everything(settings.seed)
    device = device or default_device()
    model.to(device)
    params = [p for p in model.tuned_parameters().values() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    g = torch.Generator().manual_seed(settings.seed)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=settings.batch_size, shuffle=True,
                                               generator=g, drop_last=False)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=max(64, settings.batch_size))
    steps_per_epoch = len(train_loader)
    total = settings.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_with_warmup(s, total, settings.warmup_epochs * steps_per_epoch))
    loss_fn = nn.CrossEntropyLoss()
    history = History()
    best_state: dict[str, torch.Tensor] = {}
    step = 0
    for epoch in range(settings.epochs):
        model.train()  # the backbone stays in eval (VFPTViT.train, VFPTSwin.train)
        losses = []
        lr = opt.param_groups[0]["lr"]
        for x, y in train_loader:
            loss = loss_fn(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            check_finite(loss, params, epoch + 1, step, settings.lr)
            losses.append(loss.item())
            if on_step:
                on_step(step, total)
        top1 = evaluate(model, val_loader, device)
        result = EpochResult(epoch + 1, float(np.mean(losses)), top1, lr)
        history.epochs.append(result)
        best = top1 > history.best_val_top1
        if best:
            history.best_epoch, history.best_val_top1 = epoch + 1, top1
            best_state = {k: p.detach().clone() for k, p in model.tuned_parameters().items()}
        if on_epoch:
            on_epoch(result, best)
    # Hand back the best-by-val model, the one the checkpoint holds.
    with torch.no_grad():
        for k, p in model.tuned_parameters().items():
            p.copy_(best_state[k])
    model.eval()
    return history


def pretrain_backbone(backbone: nn.Module, train_set, *, epochs: int, lr: float = 2e-3, batch_size: int = 64,
                      seed: int = 0, device: torch.device | None = None,
                      on_step: Callable[[int, int], None] | None = None) -> None:
    """Fully train a (small) backbone with a temporary linear head: AdamW, cosine, random 2-px shifts.

    Used by the built-in demo to make its frozen backbone meaningful without any download.
    """
    seed_everything(seed)
    device = device or default_device()
    num_classes = int(max(train_set.images.labels)) + 1
    net = nn.Sequential(backbone, nn.Linear(backbone.embed_dim, num_classes)).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=g)
    total = epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, total, len(loader)))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    step = 0
    net.train()
    for _ in range(epochs):
        for x, y in loader:
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = loss_fn(net(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            check_finite(loss, list(net.parameters()), step // len(loader) + 1, step, lr)
            if on_step:
                on_step(step, total)
    backbone.eval()
