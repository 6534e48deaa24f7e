"""The Swin family's backbones: timm SwinTransformer (v1): what VFPT supports (docs/model.md, section 5) and
its weight files (timm's layout or Microsoft's). The options that size one are checked torch-free in
models/swin/sizes.py."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock, WindowAttention
from torch import nn

from vfpt_deploy.errors import InputError, UsageError
from vfpt_deploy.models.common import check_shapes_fit, load_state_strict, read_state_dict
from vfpt_deploy.models.swin.sizes import check_swin_kwargs  # noqa: F401  (torch-free, re-exported)


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
