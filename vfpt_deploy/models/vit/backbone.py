"""The ViT family's backbones: timm VisionTransformer with a class token (supervised, MAE, MoCo-v3):
the options that size one, what VFPT supports, its weight files (timm, MAE, MoCo-v3, JAX .npz).
The options that size one and a run.pt's recorded sizes are checked torch-free in models/vit/sizes.py."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.overrides import TorchFunctionMode

from vfpt_deploy.errors import InputError, UsageError, VFPTError
from vfpt_deploy.models.common import check_shapes_fit, check_tensors, load_state_strict, log, read_state_dict
from vfpt_deploy.models.config import VFPTConfig
from vfpt_deploy.models.vit.sizes import tuned_shapes  # torch-free (the run.pt reader uses it too)

POOLS = ("token", "avg")


def check_backbone(model: torch.nn.Module, name: str = "backbone") -> None:
    if not isinstance(model, VisionTransformer):
        raise UsageError(
            f"{name} is a {type(model).__name__}, not a timm VisionTransformer or SwinTransformer; VFPT here "
            "supports ViTs with a class token (vit_tiny/small/base/large, patch 16/32) and Swin Transformers (swin_*)"
        )
    if model.cls_token is None:
        raise UsageError(f"{name} has no class token; VFPT places prompts after the CLS token")
    # 'token' pools the CLS token; 'avg' (MAE) means all rows after the CLS token, prompts included.
    if model.global_pool not in POOLS or model.attn_pool is not None or model.pool_include_prefix:
        raise UsageError(f"{name} pools with global_pool={model.global_pool!r}; VFPT supports "
                        f"{' or '.join(repr(p) for p in POOLS)} (e.g. --model-arg global_pool=avg for MAE)")
    if model.num_reg_tokens:
        raise UsageError(f"{name} has {model.num_reg_tokens} register tokens, which VFPT does not place")
    if model.dynamic_img_size:
        raise UsageError(f"{name} uses dynamic_img_size; create it with a fixed image size")

def load_weights(model: VisionTransformer, path: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Load backbone weights into model, strictly: a timm-layout state dict (.pth/.pt/.bin/.safetensors;
    also MAE's {'model': ...} and MoCo-v3's {'state_dict': ...} files) or a JAX .npz through timm's loader.
    `state`: the file's read_state_dict(), where the caller has read it already."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    if path.suffix == ".npz":
        load_npz_weights(model, path)
        return
    sd = self_supervised_to_timm(read_state_dict(path) if state is None else state, model, str(path))
    check_shapes_fit(model, sd, str(path))
    try:
        sd = checkpoint_filter_fn(sd, model)
    except Exception as e:
        raise InputError(f"{path}: timm could not adapt these weights to the model ({type(e).__name__}: "
                         f"{str(e)[:160]}); are they for this ViT?") from None
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}  # VFPT brings its own head
    load_state_strict(model, sd, source=str(path))

def read_weights(skeleton: VisionTransformer, path: Path) -> dict[str, torch.Tensor] | None:
    """Read a weights file and refuse it, before the real model is built, when it holds another number
    of transformer blocks than the skeleton. Returns the state dict (None for a .npz, read by timm)."""
    if path.suffix == ".npz":
        sd, depth = None, npz_depth(path)
    else:
        sd = read_state_dict(path)
        names = [k.removeprefix("base_encoder.") for k in sd if k.startswith("base_encoder.")] or list(sd)
        depth = len({m.group(1) for k in names if (m := re.match(r"blocks\.(\d+)\.", k))})
    if depth != len(skeleton.blocks):
        raise InputError(f"{path} holds {depth} transformer blocks but the model has {len(skeleton.blocks)}; "
                         "the weights are for a different architecture (check the model name and --model-arg)")
    return sd

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


class _NameMisfitCopies(TorchFunctionMode):
    """timm's .npz loader fills parameters with copy_(); turn a shape mismatch there into an error
    that names the parameter."""

    def __init__(self, model: torch.nn.Module, source: str) -> None:
        super().__init__()
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.source = source

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.copy_ and id(args[0]) in self.names and tuple(args[0].shape) != tuple(args[1].shape):
            raise InputError(f"{self.source}: tensor {self.names[id(args[0])]} gets shape {tuple(args[1].shape)} from "
                             f"the file but the model expects {tuple(args[0].shape)}; the weights are for a different "
                             "architecture (check the model name and --model-arg)")
        return func(*args, **(kwargs or {}))


def npz_depth(path: Path) -> int:
    """The number of transformer blocks in a JAX / big_vision ViT .npz, read off its array names."""
    import numpy as np

    if not path.is_file():
        raise InputError(f"weights file {path} does not exist")
    try:
        with np.load(path) as f:  # allow_pickle=False: arrays only
            stacked = [k for k in f.files if k.endswith("Transformer/encoderblock/LayerNorm_0/scale")]
            if stacked:
                return int(f[stacked[0]].shape[0])
            return 1 + max((int(m.group(1)) for k in f.files if (m := re.search(r"encoderblock_(\d+)/", k))),
                           default=-1)
    except Exception as e:
        raise InputError(f"{path} is not a readable .npz file ({type(e).__name__}); pass the JAX ViT .npz as downloaded") from None


def load_npz_weights(model: VisionTransformer, path: Path) -> None:
    """A JAX / big_vision ViT .npz (e.g. imagenet21k_ViT-B_16.npz) through timm's loader, refusing a
    file with a different depth (timm would silently ignore extra blocks)."""
    file_depth = npz_depth(path)
    if file_depth != len(model.blocks):
        raise InputError(f"{path} holds {file_depth} transformer blocks but the model has {len(model.blocks)}; "
                         "the weights are for a different architecture")
    try:
        with _NameMisfitCopies(model, str(path)):
            model.load_pretrained(str(path))
    except VFPTError:
        raise
    except Exception as e:
        raise InputError(f"{path}: timm's .npz loader failed ({type(e).__name__}: {str(e)[:160]}); "
                         "is it a ViT .npz of this size?") from None
    check_tensors(model.state_dict(), str(path))


def tuned_shapes_of(config: VFPTConfig, skeleton: VisionTransformer, num_classes: int) -> dict[str, tuple[int, ...]]:
    return tuned_shapes(config, skeleton.embed_dim, len(skeleton.blocks), num_classes)
