"""The ViT family's backbones: timm VisionTransformer with a class token (supervised, MAE, MoCo-v3):
the options that size one, what VFPT supports, its weight files (timm, MAE, MoCo-v3, JAX .npz), and
the sizes a run.pt records against its stored tensors."""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.overrides import TorchFunctionMode

from vfpt_deploy.errors import InputError, UsageError, VFPTError
from vfpt_deploy.models.common import (MAX_PARAMS, MAX_PATCHES, _show, check_shapes_fit, check_tensors, load_state_strict,
                                       log, read_state_dict)
from vfpt_deploy.models.config import VFPTConfig

# Bounds for the timm options that size a ViT. They hold for every ViT this tool supports (ViT-g/14 is
# depth 40, width 1408) and stop a typo or a crafted run.pt from building a model for minutes or
# allocating tens of GB before anything can check it (MAX_PARAMS, MAX_PATCHES: models/common.py).
POOLS = ("token", "avg")
MAX_IMG_SIDE = 8192
MAX_DEPTH = 256
MAX_EMBED_DIM = 16384
MAX_HEADS = 1024
MAX_MLP_RATIO = 64

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _bounded_int(kwargs: dict, key: str, lo: int, hi: int):
    v = kwargs.get(key)
    if v is not None and (not _is_int(v) or not lo <= v <= hi):
        raise UsageError(f"backbone option {key}={_show(v)}: {key} must be an integer in [{lo}, {hi}]")
    return v


def _pair(kwargs: dict, key: str, hi: tuple[int, int]) -> tuple[int, int] | None:
    """img_size / patch_size: an integer or [h, w], each side in [1, hi]."""
    v = kwargs.get(key)
    if v is None:
        return None
    sides = [v, v] if _is_int(v) else list(v) if isinstance(v, (list, tuple)) else None
    if sides is None or len(sides) != 2 or not all(_is_int(s) and 1 <= s <= h for s, h in zip(sides, hi)):
        limit = f"{hi[0]}" if hi[0] == hi[1] else f"{hi[0]}x{hi[1]}"
        raise UsageError(f"backbone option {key}={_show(v)}: {key} must be an integer or [height, width], "
                         f"each side in [1, {limit}]")
    return sides[0], sides[1]


def _check_sizes(kwargs: dict) -> None:
    """The options that size a ViT, each in range, and consistent where several are given."""
    img = _pair(kwargs, "img_size", (MAX_IMG_SIDE, MAX_IMG_SIDE))
    patch = _pair(kwargs, "patch_size", img or (MAX_IMG_SIDE, MAX_IMG_SIDE))
    if img and patch and (img[0] // patch[0]) * (img[1] // patch[1]) > MAX_PATCHES:
        raise UsageError(f"backbone options img_size={_show(kwargs['img_size'])} patch_size={_show(kwargs['patch_size'])} "
                         f"give {(img[0] // patch[0]) * (img[1] // patch[1])} patches, over the {MAX_PATCHES} limit")
    if kwargs.get("in_chans", 3) != 3 or isinstance(kwargs.get("in_chans"), bool):
        raise UsageError(f"backbone option in_chans={_show(kwargs['in_chans'])}: VFPT feeds RGB images, in_chans must be 3")
    depth = _bounded_int(kwargs, "depth", 1, MAX_DEPTH)
    dim = _bounded_int(kwargs, "embed_dim", 1, MAX_EMBED_DIM)
    heads = _bounded_int(kwargs, "num_heads", 1, MAX_HEADS)
    if dim and heads and dim % heads:
        raise UsageError(f"backbone option num_heads={heads} does not divide embed_dim={dim}")
    ratio = kwargs.get("mlp_ratio", 4.0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) \
            or not 0 < ratio <= MAX_MLP_RATIO:
        raise UsageError(f"backbone option mlp_ratio={_show(ratio)}: mlp_ratio must be a number in (0, {MAX_MLP_RATIO}]")
    if depth and dim and depth * (4 + 2 * ratio) * dim * dim > MAX_PARAMS:
        raise UsageError(f"backbone options depth={depth} embed_dim={dim} make a ViT of over "
                         f"{depth * (4 + 2 * ratio) * dim * dim / 1e9:.0f} billion parameters "
                         f"(limit {MAX_PARAMS / 1e9:g} billion)")

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


# -- a run.pt's recorded sizes against its stored tensors (checkpoint.check_run) ------------------------
_BLOCK = re.compile(r"blocks\.(\d+)\.")


def _stored_facts(state: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(depth, width, tokens) of a stored backbone: distinct blocks.N, cls_token's width, pos_embed's rows."""
    blocks = {int(m.group(1)) for k in state if (m := _BLOCK.match(k))}
    if blocks != set(range(len(blocks))) or not blocks:
        raise InputError(f"backbone_state blocks are not numbered 0..N-1 (found {len(blocks)} block indices)")
    for key in ("cls_token", "pos_embed"):
        if key not in state or state[key].ndim != 3 or state[key].shape[0] != 1:
            got = tuple(state[key].shape) if key in state else "nothing"
            raise InputError(f"backbone_state {key} has shape {got}, expected (1, tokens, width)")
    width = int(state["cls_token"].shape[2])
    if state["pos_embed"].shape[2] != width:
        raise InputError(f"backbone_state pos_embed has shape {tuple(state['pos_embed'].shape)} but cls_token "
                             f"is {width} wide")
    return len(blocks), width, int(state["pos_embed"].shape[1])


def _explicit_tokens(kwargs: dict) -> int | None:
    """1 + patches where img_size and patch_size are both given and nothing else changes the token count."""
    if "img_size" not in kwargs or "patch_size" not in kwargs or \
            any(k in kwargs for k in ("class_token", "no_embed_class", "reg_tokens", "pos_embed", "dynamic_img_size")):
        return None
    img, patch = kwargs["img_size"], kwargs["patch_size"]
    (h, w), (ph, pw) = (img if isinstance(img, (list, tuple)) else (img, img),
                        patch if isinstance(patch, (list, tuple)) else (patch, patch))
    return 1 + (h // ph) * (w // pw)


def _check_stored_backbone(kwargs: dict, state: dict[str, torch.Tensor]) -> None:
    """Backbone options that disagree with the stored tensors are refused before anything is built."""
    depth, width, tokens = _stored_facts(state)
    if "depth" in kwargs and kwargs["depth"] != depth:
        raise InputError(f"backbone option depth={kwargs['depth']} but backbone_state holds {depth} blocks")
    if "embed_dim" in kwargs and kwargs["embed_dim"] != width:
        raise InputError(f"backbone option embed_dim={kwargs['embed_dim']} but backbone_state cls_token is "
                             f"{width} wide")
    want = _explicit_tokens(kwargs)
    if want is not None and want != tokens:
        raise InputError(f"backbone_state pos_embed has shape {tuple(state['pos_embed'].shape)}: {tokens} tokens, "
                             f"but img_size={kwargs['img_size']} patch_size={kwargs['patch_size']} imply {want} "
                             f"(1 + {want - 1} patches)")


def _check_prompts_only(kwargs: dict, config: VFPTConfig, tuned: dict[str, torch.Tensor]) -> None:
    """Without a stored backbone, the tuned tensors still fix the width (head) and, when deep, the depth."""
    head, deep = tuned.get("head.weight"), tuned.get("deep_prompt_embeddings")
    if "embed_dim" in kwargs and head is not None and head.ndim == 2 and head.shape[1] != kwargs["embed_dim"]:
        raise InputError(f"backbone option embed_dim={kwargs['embed_dim']} but head.weight has shape "
                             f"{tuple(head.shape)}")
    if config.deep and "depth" in kwargs and deep is not None and deep.ndim == 3 and deep.shape[0] != kwargs["depth"] - 1:
        raise InputError(f"backbone option depth={kwargs['depth']} but deep_prompt_embeddings has "
                             f"{deep.shape[0]} layers (depth - 1 = {kwargs['depth'] - 1})")


def tuned_shapes(config: VFPTConfig, width: int, depth: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    """The tuned tensors a VFPTViT has, and their shapes (docs/model.md, section 1)."""
    p = config.project or width
    shapes = {"prompt_embeddings": (1, config.num_prompts, p)}
    if config.deep:
        shapes["deep_prompt_embeddings"] = (depth - 1, config.num_prompts, p)
    if config.project:
        shapes.update({"prompt_proj.weight": (width, config.project), "prompt_proj.bias": (width,)})
    shapes.update({"head.weight": (num_classes, width), "head.bias": (num_classes,)})
    return shapes


def check_stored(kwargs: dict, config: VFPTConfig, tuned: dict[str, torch.Tensor],
                 state: dict[str, torch.Tensor] | None) -> None:
    """Backbone options that disagree with the stored backbone tensors (or, saved prompts-only, with the
    tuned ones) are refused before anything is built."""
    if state is not None:
        _check_stored_backbone(kwargs, state)
    else:
        _check_prompts_only(kwargs, config, tuned)


def tuned_shapes_of(config: VFPTConfig, skeleton: VisionTransformer, num_classes: int) -> dict[str, tuple[int, ...]]:
    return tuned_shapes(config, skeleton.embed_dim, len(skeleton.blocks), num_classes)
