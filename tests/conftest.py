import os
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach for the hub

import pytest
import torch

from vfpt_deploy.backbone import create_backbone
from vfpt_deploy.config import VFPTConfig
from vfpt_deploy.model import VFPTViT

TINY = "vit_tiny_patch16_224"
TINY_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}


def tiny_backbone(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return create_backbone(TINY, **{**TINY_KWARGS, **overrides})


def tiny_model(num_classes: int = 5, seed: int = 0, scale: float = 1.0, **cfg) -> VFPTViT:
    """A tiny VFPT model; `scale` enlarges the prompts (trained prompts are far from their init)."""
    bb = tiny_backbone(seed)
    torch.manual_seed(seed + 1)
    model = VFPTViT(bb, num_classes, VFPTConfig(**cfg)).eval()
    with torch.no_grad():
        for p in model.tuned_parameters().values():
            p.mul_(scale)
    return model


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on loopback (all held open at once, so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def color_image_folder(root, per_class: int = 3) -> None:
    """root/train and root/val, classes red and blue: noisy solid 40x48 PNGs (an image-folder dataset)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, color in (("red", (200, 20, 20)), ("blue", (20, 20, 200))):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                a = np.clip(np.array(color) + rng.integers(-20, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(d / f"{i}.png")


@pytest.fixture
def images():
    torch.manual_seed(123)
    return torch.randn(4, 3, 32, 32)


@pytest.fixture(scope="session")
def exported_run(tmp_path_factory):
    """A tiny deep VFPT run.pt (classes a..d) and its verified kv ONNX export."""
    from vfpt_deploy.checkpoint import BackboneInfo, load_run, save_run
    from vfpt_deploy.exporters.onnx import export_onnx
    from vfpt_deploy.runtime.preprocess import Preprocess

    d = tmp_path_factory.mktemp("exported")
    model = tiny_model(num_classes=4, scale=4.0, num_prompts=6, alpha=0.5)
    pre = Preprocess(resize=[32, 32], mean=[0.5] * 3, std=[0.5] * 3)
    save_run(d / "run.pt", model, BackboneInfo(TINY, dict(TINY_KWARGS)), ["a", "b", "c", "d"], pre)
    run = load_run(d / "run.pt")
    return run, export_onnx(run, d / "run.onnx").path
