"""Frozen timm ViT backbones: create by name, load weights from a file or the hub, hash the weights."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

from .errors import VFPTError


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """A content hash of a state dict: names, dtypes, shapes and raw bytes, in sorted key order.

    Independent of the file format the weights came in, so a .pth and a .safetensors of the same
    weights hash alike.
    """
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def create_backbone(name: str, **kwargs) -> VisionTransformer:
    """A timm ViT with random init and no classifier (VFPT brings its own head)."""
    import timm

    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise VFPTError(f"cannot create timm model {name!r}: {e}; list names with timm.list_models('vit_*')") from None
    except TypeError as e:
        raise VFPTError(f"timm model {name!r} does not take these options {kwargs}: {e}") from None
    check_backbone(model, name)
    return model


def check_backbone(model: torch.nn.Module, name: str = "backbone") -> None:
    if not isinstance(model, VisionTransformer):
        raise VFPTError(
            f"{name} is a {type(model).__name__}, not a timm VisionTransformer; VFPT here supports "
            "ViTs with a class token (vit_tiny/small/base/large, patch 16/32)"
        )
    if model.cls_token is None or model.global_pool != "token":
        raise VFPTError(f"{name} has no class-token pooling; VFPT classifies from the CLS token")
    if model.num_reg_tokens:
        raise VFPTError(f"{name} has {model.num_reg_tokens} register tokens, which VFPT does not place")
    if model.dynamic_img_size:
        raise VFPTError(f"{name} uses dynamic_img_size; create it with a fixed image size")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file without unpickling objects: .safetensors, or .pth/.pt/.bin with weights_only.

    Unwraps the usual containers ('model', 'state_dict', 'model_ema') and strips 'module.' prefixes.
    """
    path = Path(path)
    if not path.is_file():
        raise VFPTError(f"weights file {path} does not exist; pass an existing .pth/.safetensors/.npz file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise VFPTError(f"{path} is not a readable safetensors file ({e}); re-save it with safetensors") from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise VFPTError(
                f"{path} could not be loaded as plain tensors ({str(e).splitlines()[0][:200]}); "
                "only tensor-only files are read (weights_only=True): re-save with torch.save(state_dict) "
                "or safetensors"
            ) from None
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise VFPTError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_backbone_weights(model: VisionTransformer, path: str | os.PathLike) -> None:
    """Load a timm-layout state dict (or a JAX .npz, through timm's loader) into model, strictly."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    path = Path(path)
    if path.suffix == ".npz":
        if not path.is_file():
            raise VFPTError(f"weights file {path} does not exist")
        try:
            model.load_pretrained(str(path))
        except Exception as e:
            raise VFPTError(f"{path}: timm's .npz loader failed ({e}); is it a ViT of this size?") from None
        return
    sd = checkpoint_filter_fn(read_state_dict(path), model)
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}  # VFPT brings its own head
    load_state_strict(model, sd, source=str(path))


def load_state_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict that names the first missing, unexpected or mis-shaped tensor in one line."""
    own = model.state_dict()
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise VFPTError(
                f"{source}: tensor {k} has shape {tuple(v.shape)} but the model expects {tuple(own[k].shape)}; "
                "the weights are for a different architecture"
            )
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing:
        raise VFPTError(f"{source}: {len(missing)} tensors missing, first {missing[0]}; the weights are for a different architecture")
    if unexpected:
        raise VFPTError(f"{source}: {len(unexpected)} unexpected tensors, first {unexpected[0]}; the weights are for a different architecture")
    model.load_state_dict(sd, strict=True)


def build_backbone(name: str, kwargs: dict, weights: str) -> VisionTransformer:
    """A frozen-to-be backbone from a timm name + keyword arguments and a weights source.

    weights: "random" (random init, for tests and the built-in demo), "pretrained" (timm / HF hub), or
    a local file path (.pth/.pt/.bin/.safetensors in timm layout, or a JAX .npz).
    """
    if weights == "pretrained":
        import timm

        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
        try:
            model = timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
        except Exception as e:
            raise VFPTError(
                f"could not fetch pretrained weights for {name!r} ({type(e).__name__}: {str(e)[:120]}); "
                "offline? pass a local file with --weights FILE, or --weights random for a test run"
            ) from None
        check_backbone(model, name)
        return model
    model = create_backbone(name, **kwargs)
    if weights != "random":
        load_backbone_weights(model, weights)
    return model
