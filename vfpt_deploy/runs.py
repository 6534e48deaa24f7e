"""Train a VFPT run end to end: backbone, data, model, fit, best-by-val run.pt. What `train` calls."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from vfpt_deploy.models.backbone import build_backbone
from vfpt_deploy.artifacts.checkpoint import RUN_SUFFIXES, BackboneInfo, save_run
from vfpt_deploy.models.config import VFPTConfig, check_crop_pct
from .data import TensorDataset, load_splits
from .errors import UsageError
from vfpt_deploy.artifacts.files import check_outputs, check_suffix
from vfpt_deploy.models.families import vfpt_model
from .train import EpochResult, History, TrainSettings, fit, seed_everything
from vfpt_deploy.artifacts.preprocess import Preprocess

log = logging.getLogger("vfpt_deploy")


def preprocess_for(backbone, crop_pct: float = 1.0) -> Preprocess:
    """The backbone's own normalization; VTAB-style exact resize (crop_pct 1) or FGVC-style
    resize-shorter-side-then-center-crop (crop_pct < 1, e.g. 0.875 = 256 -> 224)."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    mean = list(cfg.get("mean", (0.5, 0.5, 0.5)))
    std = list(cfg.get("std", (0.5, 0.5, 0.5)))
    h, w = (int(v) for v in backbone.patch_embed.img_size)
    check_crop_pct(crop_pct)
    if crop_pct == 1.0:
        return Preprocess(resize=[h, w], crop=None, mean=mean, std=std, interpolation="bilinear")
    return Preprocess(resize=int(round(min(h, w) / crop_pct)), crop=[h, w], mean=mean, std=std, interpolation="bilinear")


@dataclass
class TrainResult:
    history: History
    out: Path
    model: torch.nn.Module


def train_run(out: str | Path, *, data: str, model_name: str, model_kwargs: dict, weights: str,
              config: VFPTConfig, settings: TrainSettings, crop_pct: float = 1.0,
              include_backbone: bool = True, device: torch.device | None = None,
              backbone: torch.nn.Module | None = None, backbone_source: str | None = None,
              on_epoch: Callable[[EpochResult, bool], None] | None = None,
              on_step: Callable[[int, int], None] | None = None) -> TrainResult:
    """Train VFPT on `data` ('builtin[:name]' or a folder with train/ and val/) and write the best
    epoch to `out` atomically after every improvement. The same settings and seed on the same machine
    (and thread count) give bit-identical tensors: everything random is drawn after seeding."""
    out = check_suffix(out, RUN_SUFFIXES, "run checkpoint")
    check_outputs({"--out": out}, {"--data": data, "--weights": weights})
    settings.check()
    seed_everything(settings.seed)
    train_images, val_images = load_splits(data)  # file lists only: a bad data folder fails before any work
    if backbone is None:
        if weights == "random":
            log.warning("the backbone is randomly initialised: fine for tests, meaningless for real use")
        backbone = build_backbone(model_name, model_kwargs, weights)
    preprocess = preprocess_for(backbone, crop_pct)
    train_set, val_set = TensorDataset(train_images, preprocess), TensorDataset(val_images, preprocess)
    model = vfpt_model(backbone, num_classes=len(train_images.classes), config=config)  # a ViT or a Swin
    info = BackboneInfo(name=model_name, kwargs=model_kwargs, source=backbone_source or weights)
    meta = {"train": {"data": data, **settings.__dict__}}

    def epoch_done(result: EpochResult, best: bool) -> None:
        if best:
            meta["train"].update(best_epoch=result.epoch, best_val_top1=result.val_top1)
            save_run(out, model, info, train_images.classes, preprocess, include_backbone=include_backbone, meta=meta)
        if on_epoch:
            on_epoch(result, best)

    history = fit(model, train_set, val_set, settings, device=device, on_epoch=epoch_done, on_step=on_step)
    return TrainResult(history, out, model.cpu())
