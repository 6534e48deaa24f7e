"""The built-in offline main job: a meaningful frozen backbone with no download, then VFPT vs VPT vs
linear probe on a shifted domain.

1. A small ViT is pretrained by the tool itself on the clean `digits` domain (cached as
   backbone-seed{S}-epochs{E}.safetensors in the output folder and reused by the same seed and epochs).
2. It is frozen and tuned on `digits-shifted` (inverted, tinted, striped) three ways, same recipe and
   seed: linear probe (no prompts), VPT (deep prompts, alpha 0) and VFPT (deep prompts, alpha 0.5).
3. The VFPT run is written as run.pt, folded (kv) and exported to run.onnx, and the ONNX model is
   verified against the unfolded PyTorch model on random inputs and the shifted-domain val images.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vfpt_deploy.models.backbone import create_backbone, load_backbone_weights, state_sha256
from vfpt_deploy.models.config import VFPTConfig
from .data import TensorDataset, builtin_split
from .errors import OutputError
from vfpt_deploy.artifacts.files import atomic_write, make_dirs, remove_new_dirs
from .runs import preprocess_for, train_run
from .train import TrainSettings, pretrain_backbone, seed_everything

DEMO_MODEL = "vit_tiny_patch16_224"
DEMO_KWARGS = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4}
DEMO_VARIANTS = {  # name -> VFPT config
    "linear probe": VFPTConfig(num_prompts=0, deep=True, alpha=0.0),
    "VPT (alpha 0)": VFPTConfig(num_prompts=8, deep=True, alpha=0.0),
    "VFPT (alpha 0.5)": VFPTConfig(num_prompts=8, deep=True, alpha=0.5),
}


@dataclass
class DemoRow:
    name: str
    config: VFPTConfig
    val_top1: float
    best_epoch: int
    tuned_params: int
    path: Path


def run_demo(out: str | Path, *, pretrain_epochs: int = 60, epochs: int = 40, lr: float = 1.0, seed: int = 0,
             status: Callable[[str], None] = print,
             on_step: Callable[[str, int, int], None] | None = None) -> tuple[list[DemoRow], float]:
    """Returns the rows (linear probe, VPT, VFPT) and the backbone's top-1 on the clean domain."""
    import torch
    from safetensors.torch import save_file

    settings = TrainSettings(epochs=epochs, lr=lr, warmup_epochs=max(1, epochs // 10), seed=seed).check()
    out, created = demo_folder(out)
    try:
        # The cached backbone is named by what made it, so another seed or epoch count pretrains anew.
        weights = out / f"backbone-seed{seed}-epochs{pretrain_epochs}.safetensors"
        seed_everything(seed)  # before the backbone is created: its init is part of the result
        backbone = create_backbone(DEMO_MODEL, **DEMO_KWARGS)
        preprocess = preprocess_for(backbone)
        if weights.is_file():
            status(f"reusing the pretrained backbone {weights}")
            load_backbone_weights(backbone, weights)
        else:
            status(f"pretraining a {DEMO_KWARGS['depth']}-block ViT (width {DEMO_KWARGS['embed_dim']}) on the clean digits domain")
            source = TensorDataset(builtin_split("digits", "train"), preprocess)
            # On the CPU like the tuning below, GPU or not: the demo's numbers and run.pt bytes for a seed are
            # then the same on every machine, and the backbone stays where _clean_top1 and the tuning expect it.
            pretrain_backbone(backbone, source, epochs=pretrain_epochs, seed=seed, device=torch.device("cpu"),
                              on_step=(lambda s, t: on_step("pretrain", s, t)) if on_step else None)
            state = {k: v.contiguous() for k, v in backbone.state_dict().items()}
            atomic_write(weights, lambda tmp: save_file(state, tmp))
        clean_top1 = _clean_top1(backbone, preprocess)
        rows = []
        for name, cfg in DEMO_VARIANTS.items():
            status(f"tuning {name} on the shifted domain")
            fname = "run.pt" if cfg.alpha > 0 else f"run_{'linear' if cfg.num_prompts == 0 else 'vpt'}.pt"
            bb = create_backbone(DEMO_MODEL, **DEMO_KWARGS)
            bb.load_state_dict(backbone.state_dict())
            res = train_run(out / fname, data="builtin:digits-shifted", model_name=DEMO_MODEL, model_kwargs=DEMO_KWARGS,
                            weights=str(weights), config=cfg, settings=settings, backbone=bb,
                            backbone_source=f"pretrained by vfpt-deploy demo on built-in digits ({state_sha256(bb.state_dict())[:12]})",
                            device=torch.device("cpu"),
                            on_step=(lambda s, t, n=name: on_step(n, s, t)) if on_step else None)
            tuned = sum(p.numel() for p in res.model.tuned_parameters().values())
            rows.append(DemoRow(name, cfg, res.history.best_val_top1, res.history.best_epoch, tuned, res.out))
        return rows, clean_top1
    except BaseException:  # a failed demo (full disk, Ctrl-C) leaves no new empty folder behind
        remove_new_dirs(created)
        raise


def _clean_top1(backbone, preprocess) -> float:
    """How well the pretrained backbone does on its own domain (a kNN-free sanity number: a linear
    probe is not needed; we report the nearest-class-mean accuracy of its CLS features)."""
    import torch

    train = TensorDataset(builtin_split("digits", "train"), preprocess)
    val = TensorDataset(builtin_split("digits", "val"), preprocess)
    with torch.inference_mode():
        ft = backbone(train._cache)
        fv = backbone(val._cache)
    yt = torch.tensor(train.images.labels)
    means = torch.stack([ft[yt == c].mean(0) for c in range(10)])
    pred = torch.cdist(fv, means).argmin(1)
    return 100.0 * float((pred == torch.tensor(val.images.labels)).float().mean())


def demo_folder(out: str | Path) -> tuple[Path, list[Path]]:
    """The demo's output folder, made if missing; and the folders that made (removed again on failure)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; the demo writes a folder (runs, backbone, ONNX): name a folder")
    try:
        return out, make_dirs(out)
    except OSError as e:
        raise OutputError(f"cannot create {out} ({e.strerror}); choose a writable --out folder") from None


def export_demo(out: str | Path, threads: int | None = None):
    """Fold + export the demo's VFPT run to ONNX through the export pipeline, verified on the built-in
    val images."""
    from vfpt_deploy.artifacts.checkpoint import load_run
    from .pipeline import ExportSettings, export_run

    run = load_run(Path(out) / "run.pt")
    return export_run(run, ExportSettings(data="builtin:digits-shifted", threads=threads), Path(out) / "run.onnx")
