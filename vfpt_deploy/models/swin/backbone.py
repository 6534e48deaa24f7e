"""The Swin family's backbones: timm SwinTransformer (v1): the options that size one, what VFPT supports
(docs/model.md, section 5), and its weight files (timm's layout or Microsoft's)."""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock, WindowAttention
from torch import nn

from vfpt_deploy.errors import InputError, UsageError
from vfpt_deploy.models.common import check_shapes_fit, load_state_strict, read_state_dict

# Bounds for the timm options that size a Swin (Swin-L is width 192, depths 2/2/18/2; see models/common.py).
MAX_STAGES = 8
MAX_BLOCKS = 256
MAX_WIDTH = 16384
MAX_HEADS = 1024
MAX_WINDOW = 1024
MAX_IMG_SIDE = 8192
MAX_PARAMS = 2_500_000_000


def _flat_ints(v) -> list[int] | None:
    """An int, or a (nested, two levels at most) list of ints, flattened; None for anything else."""
    if isinstance(v, (list, tuple)):
        items = [i for w in v for i in (w if isinstance(w, (list, tuple)) else [w])]
    else:
        items = [v]
    return items if items and all(isinstance(i, int) and not isinstance(i, bool) for i in items) else None


def _refuse(key: str, value, why: str) -> UsageError:
    text = repr(value)
    return UsageError(f"backbone option {key}={text if len(text) <= 60 else text[:57] + '...'}: {why}")


def check_swin_kwargs(kwargs: dict) -> None:
    """The timm options that size a Swin, each in range, so a typo or a crafted run.pt cannot build a huge
    model (backbone.check_backbone_kwargs has checked the names and value types already)."""
    depths = kwargs.get("depths")
    if depths is not None:
        d = _flat_ints(depths) if isinstance(depths, (list, tuple)) else None
        if d is None or len(d) != len(depths) or not 1 <= len(d) <= MAX_STAGES or min(d) < 1 or sum(d) > MAX_BLOCKS:
            raise _refuse("depths", depths, f"depths must be a list of 1 to {MAX_STAGES} block counts, each >= 1, "
                                            f"at most {MAX_BLOCKS} blocks in all")
    stages = len(depths) if depths is not None else 4
    for key, hi in (("num_heads", MAX_HEADS), ("window_size", MAX_WINDOW), ("patch_size", MAX_IMG_SIDE),
                    ("img_size", MAX_IMG_SIDE), ("embed_dim", MAX_WIDTH)):
        v = kwargs.get(key)
        flat = None if v is None else _flat_ints(v)
        if v is not None and (flat is None or not all(1 <= x <= hi for x in flat)):
            raise _refuse(key, v, f"{key} must be an integer (or a list of them) in [1, {hi}]")
    width = kwargs.get("embed_dim")
    if isinstance(width, int) and width * 2 ** (stages - 1) > MAX_WIDTH:
        raise _refuse("embed_dim", width, f"the last stage would be {width * 2 ** (stages - 1)} wide (embed_dim * "
                                          f"2^(stages - 1)), over the {MAX_WIDTH} limit")
    ratio = kwargs.get("mlp_ratio", 4.0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or not 0 < ratio <= 64:
        raise _refuse("mlp_ratio", ratio, "mlp_ratio must be a number in (0, 64]")
    if kwargs.get("in_chans", 3) != 3 or isinstance(kwargs.get("in_chans"), bool):
        raise _refuse("in_chans", kwargs["in_chans"], "VFPT feeds RGB images, in_chans must be 3")
    if depths is not None and isinstance(width, int):
        params = sum(n * (4 + 2 * ratio) * (width * 2 ** s) ** 2 for s, n in enumerate(depths))
        if params > MAX_PARAMS:
            raise UsageError(f"backbone options depths={depths} embed_dim={width} make a Swin of over "
                             f"{params / 1e9:.0f} billion parameters (limit {MAX_PARAMS / 1e9:g} billion)")


def check_swin_backbone(model: nn.Module, name: str = "backbone") -> None:
    """A timm SwinTransformer laid out as the reference Swin VFPT runs: average pooling, a fixed image size,
    every stage's grid a whole number of windows (no padding) and even before a merge."""
    if not isinstance(model, SwinTransformer):
        raise UsageError(f"{name} is a {type(model).__name__}, not a timm SwinTransformer")
    if model.global_pool != "avg":
        raise UsageError(f"{name} pools with global_pool={model.global_pool!r}; Swin VFPT averages over all rows "
                         "(global_pool='avg')")
    if model.dynamic_img_size:
        raise UsageError(f"{name} uses a dynamic image size; create it with a fixed image size")
    for s, stage in enumerate(model.layers):
        if not isinstance(stage.downsample, (PatchMerging, nn.Identity)):
            raise UsageError(f"{name} stage {s} downsamples with a {type(stage.downsample).__name__}, not timm's "
                             "PatchMerging")
        if isinstance(stage.downsample, PatchMerging) and any(r % 2 for r in stage.input_resolution):
            raise UsageError(f"{name} stage {s} merges a {stage.input_resolution[0]}x{stage.input_resolution[1]} "
                             "grid, which is not even; choose an image size that halves evenly")
        for i, blk in enumerate(stage.blocks):
            where = f"{name} stage {s} block {i}"
            if type(blk) is not SwinTransformerBlock or type(blk.attn) is not WindowAttention:
                raise UsageError(f"{where} is a {type(blk).__name__}/{type(blk.attn).__name__}, not timm's "
                                 "SwinTransformerBlock/WindowAttention")
            (h, w), (wh, ww) = blk.input_resolution, blk.window_size
            if blk.dynamic_mask or h % wh or w % ww:
                raise UsageError(f"{where}: its {h}x{w} grid is not a whole number of {wh}x{ww} windows; choose "
                                 "an image size whose grids divide into windows (e.g. 224 with window 7)")


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


def read_weights(skeleton: SwinTransformer, path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file and refuse it, before the real Swin is built, when its stage depths differ."""
    sd = read_state_dict(path)
    check_swin_depths(skeleton, sd, path)
    return sd


def load_weights(model: SwinTransformer, path: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    load_swin_weights(model, path, read_state_dict(path) if state is None else state)
