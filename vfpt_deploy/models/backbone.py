"""Frozen timm ViT and Swin backbones: create by name, load weights from a file or the hub, hash the weights.

Backbone names and keyword arguments come from the command line and from run.pt files alike, so they
are bounded (check_backbone_kwargs) and the model is laid out on the meta device (backbone_skeleton)
before any real tensor is allocated.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import socket
import threading
from urllib.parse import urlparse
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.overrides import TorchFunctionMode

from vfpt_deploy.errors import InputError, UsageError, VFPTError
from vfpt_deploy.models.swin.model import check_swin_backbone, check_swin_kwargs, is_swin_name

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


# -- backbone keyword arguments --------------------------------------------------------------------
# Bounds for the timm options that size a ViT. They hold for every ViT this tool supports (ViT-g/14 is
# depth 40, width 1408) and stop a typo or a crafted run.pt from building a model for minutes or
# allocating tens of GB before anything can check it.
MAX_IMG_SIDE = 8192
MAX_DEPTH = 256
MAX_EMBED_DIM = 16384
MAX_HEADS = 1024
MAX_MLP_RATIO = 64
MAX_PATCHES = 65_536  # a 256 x 256 patch grid
MAX_PARAMS = 2_500_000_000  # 10 GB of float32 weights; ViT-G/14 has 1.8 billion
# create_model arguments that vfpt sets itself, or that would make timm read other files.
_RESERVED = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
             "num_classes", "features_only", "out_indices")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_like(v, level: int = 0) -> bool:
    """None, bool, finite numbers, short strings, and short lists / string-keyed dicts of these."""
    if v is None or isinstance(v, (bool, str)):
        return not isinstance(v, str) or len(v) <= 256
    if isinstance(v, (int, float)):
        return math.isfinite(v) and abs(v) <= 2**53
    if level >= 3:
        return False
    if isinstance(v, (list, tuple)):
        return len(v) <= 64 and all(_json_like(x, level + 1) for x in v)
    if isinstance(v, dict):
        return len(v) <= 64 and all(isinstance(k, str) and _json_like(x, level + 1) for k, x in v.items())
    return False


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


def check_backbone_kwargs(kwargs, name: str = "") -> dict:
    """Refuse, in one line naming the key, backbone keyword arguments that are not a dict of JSON-like
    values, that vfpt sets itself, or that size a ViT (or, for a Swin `name`, a Swin) out of range (see
    MAX_*). Returns kwargs."""
    if not isinstance(kwargs, dict):
        raise UsageError(f"backbone options must be a mapping of timm keyword arguments, got {type(kwargs).__name__}")
    if len(kwargs) > 64:
        raise UsageError(f"{len(kwargs)} backbone options; a timm ViT takes at most a few dozen")
    for key, value in kwargs.items():
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise UsageError(f"backbone option name {_show(key)} is not a keyword argument name")
        if key in _RESERVED:
            raise UsageError(f"backbone option {key} is set by vfpt-deploy itself; remove it")
        if not _json_like(value):
            raise UsageError(f"backbone option {key}={_show(value)}: values must be numbers, strings, "
                             "booleans or short lists of these")
    check_swin_kwargs(kwargs) if is_swin_name(name) else _check_sizes(kwargs)
    return kwargs


def _check_name(name) -> None:
    if not isinstance(name, str) or not name or len(name) > 200:
        raise UsageError(f"backbone name must be a timm model name such as 'vit_base_patch16_224', got {_show(name)}")


def _timm_create(name: str, kwargs: dict, **extra) -> torch.nn.Module:
    """timm.create_model with no classifier; any failure to build becomes one line."""
    import timm

    try:
        return timm.create_model(name, num_classes=0, **kwargs, **extra)
    except RuntimeError as e:  # timm: "Unknown model (...)", "Invalid pretrained tag (...)"
        if "nknown model" in str(e) or "pretrained tag" in str(e):
            raise UsageError(f"cannot create timm model {name!r}: {_first_line(e)}; list names with "
                             "timm.list_models('vit_*')") from None
        raise UsageError(f"timm cannot build {name!r} with options {_show(kwargs)}: {_first_line(e)}") from None
    except Exception as e:  # TypeError for an option the model does not take, AssertionError, ValueError ...
        raise UsageError(f"timm cannot build {name!r} with options {_show(kwargs)} "
                         f"({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:160]


def backbone_skeleton(name: str, kwargs: dict) -> VisionTransformer:
    """The backbone built on the meta device: every tensor shape, no memory, no initialisation.

    Checks the name and kwargs, then the model (a ViT VFPT supports, at most MAX_PARAMS parameters and
    MAX_PATCHES patches) before any real tensor is allocated."""
    _check_name(name)
    check_backbone_kwargs(kwargs, name)
    with torch.device("meta"):
        try:
            model = _timm_create(name, {**kwargs, "weight_init": "skip"}, pretrained=False)
        except UsageError as e:
            if "weight_init" not in str(e):
                raise
            model = _timm_create(name, kwargs, pretrained=False)  # not a timm ViT: refused just below
    check_supported(model, name)
    params = sum(t.numel() for t in model.state_dict().values())
    if params > MAX_PARAMS:
        raise UsageError(f"{name} with options {_show(kwargs)} has {params / 1e9:.1f} billion parameters, "
                         f"over the {MAX_PARAMS / 1e9:g} billion limit; check the backbone options")
    patches = model.patch_embed.num_patches
    if patches > MAX_PATCHES:
        raise UsageError(f"{name} with options {_show(kwargs)} has {patches} patches, over the {MAX_PATCHES} limit")
    return model


def create_backbone(name: str, **kwargs) -> VisionTransformer:
    """A timm ViT with random init and no classifier (VFPT brings its own head). The name and kwargs
    are checked on a meta-device skeleton first (see backbone_skeleton)."""
    backbone_skeleton(name, kwargs)
    model = _timm_create(name, kwargs, pretrained=False)
    check_supported(model, name)
    return model


def check_supported(model: torch.nn.Module, name: str = "backbone") -> None:
    """A backbone VFPT supports: a timm Swin Transformer (swin.check_swin_backbone) or ViT (check_backbone)."""
    from timm.models.swin_transformer import SwinTransformer

    check_swin_backbone(model, name) if isinstance(model, SwinTransformer) else check_backbone(model, name)


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


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file without unpickling objects: .safetensors, or .pth/.pt/.bin with weights_only.

    Unwraps the usual containers ('model', 'state_dict', 'model_ema') and strips 'module.' prefixes.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file {path} does not exist; pass an existing .pth/.safetensors/.npz file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise InputError(f"{path} is not a readable safetensors file ({e}); re-save it with safetensors") from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(
                f"{path} could not be loaded as plain tensors ({str(e).splitlines()[0][:200]}); "
                "only tensor-only files are read (weights_only=True): re-save with torch.save(state_dict) "
                "or safetensors"
            ) from None
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise InputError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_backbone_weights(model: VisionTransformer, path: str | os.PathLike,
                          state: dict[str, torch.Tensor] | None = None) -> None:
    """Load backbone weights into model, strictly: a timm-layout state dict (.pth/.pt/.bin/.safetensors;
    also MAE's {'model': ...} and MoCo-v3's {'state_dict': ...} files) or a JAX .npz through timm's loader.
    `state`: the file's read_state_dict(), where the caller has read it already."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    path = Path(path)
    if is_swin(model):
        load_swin_weights(model, path, read_state_dict(path) if state is None else state)
        return
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


def read_weights_for(skeleton: VisionTransformer, path: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """Read a weights file and refuse it, before the real model is built, when it holds another number
    of transformer blocks than the skeleton. Returns the state dict (None for a .npz, read by timm)."""
    path = Path(path)
    if is_swin(skeleton):
        sd = read_state_dict(path)
        check_swin_depths(skeleton, sd, path)
        return sd
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
            raise InputError(f"{source}: tensor {k} has shape {got} but the model expects {want}; "
                            "the weights are for a different architecture (check the model name and --model-arg)")


def is_swin(model: torch.nn.Module) -> bool:
    from timm.models.swin_transformer import SwinTransformer

    return isinstance(model, SwinTransformer)


def check_swin_depths(skeleton: torch.nn.Module, sd: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse, before the real Swin is built, weights with other stage depths (layers.S.blocks.I names are
    the same in timm's and Microsoft's layouts)."""
    found: dict[int, set[int]] = {}
    for k in sd:
        if m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", k):
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    depths = [len(found.get(s, ())) for s in range(max(found, default=-1) + 1)]
    want = [len(stage.blocks) for stage in skeleton.layers]
    if depths != want:
        raise InputError(f"{path} holds a Swin with stage depths {depths} but the model has {want}; the weights are "
                         "for a different architecture (check the model name and --model-arg)")


def load_swin_weights(model: torch.nn.Module, path: Path, sd: dict[str, torch.Tensor]) -> None:
    """Swin weights in timm's layout or Microsoft's (e.g. swin_base_patch4_window7_224_22k.pth: merging at
    the end of a stage, saved position indices and masks, a `head.*` classifier), through timm's own Swin
    checkpoint filter; the classifier is dropped (VFPT brings its own head), the rest loads strictly."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    try:
        sd = checkpoint_filter_fn(sd, model)
    except Exception as e:
        raise InputError(f"{path}: timm could not adapt these weights to the Swin ({type(e).__name__}: "
                         f"{str(e)[:160]}); are they for this Swin?") from None
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    check_shapes_fit(model, sd, str(path))
    load_state_strict(model, sd, source=str(path))


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


def check_tensors(state: dict, source: str) -> None:
    """Every value a floating-point tensor with finite values (a cheap torch.isfinite pass); the
    message names the first that is not."""
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise InputError(f"{source}: {_show(k)} is a {type(v).__name__}, not a tensor; the file is damaged")
        if v.layout != torch.strided or v.is_meta:
            raise InputError(f"{source}: tensor {k} is a {'meta' if v.is_meta else str(v.layout).removeprefix('torch.')} "
                             "tensor, not a dense one with values; the file is damaged")
        if not v.is_floating_point():
            raise InputError(f"{source}: tensor {k} is {str(v.dtype).removeprefix('torch.')}, not floating point; "
                             "the file is damaged")
        if not bool(torch.isfinite(v).all()):
            raise InputError(f"{source}: tensor {k} holds non-finite values (NaN or Inf); the weights are damaged "
                             "(a diverged training run or a corrupt file)")


def load_state_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict that names the first missing, unexpected, mis-shaped or non-finite tensor in one line."""
    check_state_fits(model.state_dict(), sd, source)
    check_tensors(sd, source)
    model.load_state_dict(sd, strict=True)


def check_state_fits(own: dict, sd: dict, source: str) -> None:
    """The names and shapes of sd are exactly those of own (a state dict, or a meta-device skeleton's)."""
    for k, v in sd.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise InputError(
                f"{source}: tensor {k} has shape {tuple(v.shape)} but the model expects {tuple(own[k].shape)}; "
                "the weights are for a different architecture"
            )
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing:
        raise InputError(f"{source}: {len(missing)} tensors missing, first {missing[0]}; the weights are for a different architecture")
    if unexpected:
        raise InputError(f"{source}: {len(unexpected)} unexpected tensors, first {str(unexpected[0])[:100]}; "
                         "the weights are for a different architecture")


def materialize(skeleton: VisionTransformer, state: dict[str, torch.Tensor], name: str, kwargs: dict) -> VisionTransformer:
    """The skeleton with `state` as its tensors (checked to fit: check_state_fits), converted to the
    skeleton's dtypes. Nothing is initialised only to be overwritten; a model that keeps other tensors
    outside its state dict is built for real instead."""
    own = skeleton.state_dict()
    check_state_fits(own, state, f"{name} weights")
    state = {k: v.to(own[k].dtype) for k, v in state.items()}
    unsaved = [n for n, _ in skeleton.named_buffers() if n not in own]
    loose = [v for m in skeleton.modules() for v in vars(m).values() if isinstance(v, torch.Tensor) and v.is_meta]
    if unsaved or loose:
        model = create_backbone(name, **kwargs)
        model.load_state_dict(state, strict=True)
        return model
    skeleton.load_state_dict(state, strict=True, assign=True)
    return skeleton


def build_backbone(name: str, kwargs: dict, weights: str, *, skeleton: VisionTransformer | None = None) -> VisionTransformer:
    """A frozen-to-be backbone from a timm name + keyword arguments and a weights source.

    weights: "random" (random init, for tests and the built-in demo), "pretrained" (timm / HF hub), or
    a local file path (.pth/.pt/.bin/.safetensors in timm layout, or a JAX .npz). The name and kwargs
    are checked (backbone_skeleton; pass `skeleton` where it is built already) before anything is built,
    read or downloaded.
    """
    if not isinstance(weights, str) or not weights:
        raise UsageError(f"backbone weights must be 'pretrained', 'random' or a file path, got {_show(weights)}")
    skeleton = skeleton if skeleton is not None else backbone_skeleton(name, kwargs)
    if weights == "pretrained":
        return pretrained_backbone(name, kwargs, skeleton=skeleton)
    state = read_weights_for(skeleton, weights) if weights != "random" else None
    model = _timm_create(name, kwargs, pretrained=False)
    if weights != "random":
        load_backbone_weights(model, weights, state)
    return model


# -- pretrained weights ------------------------------------------------------------------------------
# Offline, timm's hub download retries for most of a minute; instead look in the local caches first
# and, when the weights are not there, try one quick connection before handing over to timm.
PROBE_TIMEOUT_S = 3.0


def pretrained_backbone(name: str, kwargs: dict, *, skeleton: VisionTransformer | None = None) -> VisionTransformer:
    """timm's pretrained weights for `name`: from the local Hugging Face / torch hub cache without any
    network access when they are there, else downloaded. Fails in seconds, in one line naming
    --weights FILE as the fix, when they are not cached and the hub cannot be reached."""
    if skeleton is None:
        backbone_skeleton(name, kwargs)
    cfg = _pretrained_cfg(name)
    cached = _cached_pretrained_file(cfg)
    if cached is None:
        host = _download_host(cfg)
        fix = "pass local weights with --weights FILE (.pth/.safetensors/.npz), or --weights random for a test run"
        if _hub_offline():
            raise InputError(f"pretrained weights for {name!r} are not in the local cache and HF_HUB_OFFLINE is set; {fix}")
        if not _reachable(host):
            raise InputError(f"pretrained weights for {name!r} are not in the local cache and {host[0]} cannot be "
                             f"reached (offline?); {fix}")
    overlay = {"pretrained_cfg_overlay": {"file": cached}} if cached else {}
    try:
        model = _timm_create(name, kwargs, pretrained=True, **overlay)
    except UsageError as e:
        raise InputError(f"could not load pretrained weights for {name!r} ({e}); pass local weights with "
                         "--weights FILE, or --weights random for a test run") from None
    check_supported(model, name)
    check_tensors(model.state_dict(), f"pretrained weights for {name}")
    return model


def _pretrained_cfg(name: str) -> dict:
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except Exception as e:  # "Invalid pretrained tag (...)"
        raise UsageError(f"timm has no pretrained weights {name!r}: {_first_line(e)}") from None
    cfg = cfg.to_dict() if cfg is not None else {}
    if not (cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file")):
        raise InputError(f"timm has no pretrained weights for {name!r}; pass local weights with --weights FILE")
    return cfg


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return env["HF_HUB_CACHE"]
    if env.get("HF_HOME"):
        return os.path.join(env["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def _cached_pretrained_file(cfg: dict) -> str | None:
    """The local file timm would download for this pretrained config, if it is already cached."""
    if cfg.get("file"):
        return str(cfg["file"])
    if cfg.get("hf_hub_id"):
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = str(cfg["hf_hub_id"]).partition("@")
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
        for filename in names:
            try:
                found = try_to_load_from_cache(repo, filename, cache_dir=_hf_cache_dir(), revision=revision or None)
            except Exception:  # a malformed cache entry: treat as not cached
                found = None
            if isinstance(found, str) and os.path.isfile(found):
                return found
    if cfg.get("url"):
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg["url"]).path))
        if os.path.isfile(path):
            return path
    return None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return flag in ("1", "ON", "YES", "TRUE") or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _download_host(cfg: dict) -> tuple[str, int]:
    """Where the download would connect first: the HTTPS proxy if one is set, else the hub (or url) host."""
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(k)), "")
    if proxy:
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    elif cfg.get("hf_hub_id"):
        url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    else:
        url = urlparse(str(cfg["url"]))
    try:
        port = url.port or (80 if url.scheme == "http" else 443)
    except ValueError:
        port = 443
    return url.hostname or "huggingface.co", port


def _reachable(host: tuple[str, int], timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connection attempt, name lookup included, given up after `timeout` seconds."""
    ok = []

    def probe() -> None:
        try:
            socket.create_connection(host, timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok)
