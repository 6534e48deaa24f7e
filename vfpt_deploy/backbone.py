"""Frozen timm ViT backbones: create by name, load weights from a file or the hub, hash the weights."""
from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import VFPTError

POOLS = ("token", "avg")
log = logging.getLogger("vfpt_deploy")


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
    if model.cls_token is None:
        raise VFPTError(f"{name} has no class token; VFPT places prompts after the CLS token")
    # 'token' pools the CLS token; 'avg' (MAE) means all rows after the CLS token, prompts included.
    if model.global_pool not in POOLS or model.attn_pool is not None or model.pool_include_prefix:
        raise VFPTError(f"{name} pools with global_pool={model.global_pool!r}; VFPT supports "
                        f"{' or '.join(repr(p) for p in POOLS)} (e.g. --model-arg global_pool=avg for MAE)")
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
    """Load backbone weights into model, strictly: a timm-layout state dict (.pth/.pt/.bin/.safetensors;
    also MAE's {'model': ...} and MoCo-v3's {'state_dict': ...} files) or a JAX .npz through timm's loader."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    path = Path(path)
    if path.suffix == ".npz":
        load_npz_weights(model, path)
        return
    sd = self_supervised_to_timm(read_state_dict(path), model, str(path))
    check_shapes_fit(model, sd, str(path))
    try:
        sd = checkpoint_filter_fn(sd, model)
    except Exception as e:
        raise VFPTError(f"{path}: timm could not adapt these weights to the model ({type(e).__name__}: "
                        f"{str(e)[:160]}); are they for this ViT?") from None
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}  # VFPT brings its own head
    load_state_strict(model, sd, source=str(path))


def self_supervised_to_timm(sd: dict[str, torch.Tensor], model: VisionTransformer, source: str) -> dict[str, torch.Tensor]:
    """The MoCo-v3 and MAE file layouts, as timm names them (`module.` is already stripped).

    MoCo-v3 pretraining files hold a query and a momentum encoder: the query (`base_encoder.`) one is
    kept. MAE pretraining files may carry the decoder: dropped. With global_pool='avg' timm puts the
    final LayerNorm after pooling (fc_norm, norm=Identity); MAE's pretrained encoder `norm` is then
    discarded and fc_norm starts as the identity LayerNorm, as MAE fine-tuning and the VPT/VFPT
    reference do (they load with strict=False after deleting `norm`).
    """
    if any(k.startswith("base_encoder.") for k in sd):
        dropped = sorted({k.split(".")[0] for k in sd if not k.startswith("base_encoder.")})
        if dropped:
            log.info("%s: using base_encoder.*, not %s", source, ", ".join(dropped))
        sd = {k.removeprefix("base_encoder."): v for k, v in sd.items() if k.startswith("base_encoder.")}
    sd = {k: v for k, v in sd.items() if not k.startswith("decoder_")}
    avg_pool_norm = isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.LayerNorm)
    if avg_pool_norm and "fc_norm.weight" not in sd and "norm.weight" in sd:
        log.warning("%s: global_pool='avg' puts the final LayerNorm after pooling (fc_norm); the file's "
                    "norm.weight/bias are not used and fc_norm starts as identity, as in MAE fine-tuning", source)
        sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}
        sd["fc_norm.weight"] = torch.ones_like(model.fc_norm.weight)
        sd["fc_norm.bias"] = torch.zeros_like(model.fc_norm.bias)
    return sd


def check_shapes_fit(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Name the first tensor, in the model's order, that cannot fit. timm resamples the position
    embedding grid and the patch kernel size, so for those only the widths must agree."""
    for k, own in model.state_dict().items():
        if k not in sd:
            continue
        got, want = tuple(sd[k].shape), tuple(own.shape)
        if k == "pos_embed":
            fits = got[-1:] == want[-1:]
        elif k == "patch_embed.proj.weight":
            fits = got[:1] == want[:1]
        else:
            fits = got == want
        if not fits:
            raise VFPTError(f"{source}: tensor {k} has shape {got} but the model expects {want}; "
                            "the weights are for a different architecture (check the model name and --model-arg)")


class _NameMisfitCopies(TorchFunctionMode):
    """timm's .npz loader fills parameters with copy_(); turn a shape mismatch there into an error
    that names the parameter."""

    def __init__(self, model: torch.nn.Module, source: str) -> None:
        super().__init__()
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.source = source

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.copy_ and id(args[0]) in self.names and tuple(args[0].shape) != tuple(args[1].shape):
            raise VFPTError(f"{self.source}: tensor {self.names[id(args[0])]} gets shape {tuple(args[1].shape)} from "
                            f"the file but the model expects {tuple(args[0].shape)}; the weights are for a different "
                            "architecture (check the model name and --model-arg)")
        return func(*args, **(kwargs or {}))


def load_npz_weights(model: VisionTransformer, path: Path) -> None:
    """A JAX / big_vision ViT .npz (e.g. imagenet21k_ViT-B_16.npz) through timm's loader, refusing a
    file with a different depth (timm would silently ignore extra blocks)."""
    import numpy as np

    if not path.is_file():
        raise VFPTError(f"weights file {path} does not exist")
    try:
        with np.load(path) as f:  # allow_pickle=False: arrays only
            stacked = [k for k in f.files if k.endswith("Transformer/encoderblock/LayerNorm_0/scale")]
            if stacked:
                file_depth = int(f[stacked[0]].shape[0])
            else:
                file_depth = 1 + max((int(m.group(1)) for k in f.files if (m := re.search(r"encoderblock_(\d+)/", k))),
                                     default=-1)
    except Exception as e:
        raise VFPTError(f"{path} is not a readable .npz file ({type(e).__name__}); pass the JAX ViT .npz as downloaded") from None
    if file_depth != len(model.blocks):
        raise VFPTError(f"{path} holds {file_depth} transformer blocks but the model has {len(model.blocks)}; "
                        "the weights are for a different architecture")
    try:
        with _NameMisfitCopies(model, str(path)):
            model.load_pretrained(str(path))
    except VFPTError:
        raise
    except Exception as e:
        raise VFPTError(f"{path}: timm's .npz loader failed ({type(e).__name__}: {str(e)[:160]}); "
                        "is it a ViT .npz of this size?") from None


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
