"""The Swin family's sizes, torch-free: bounds on the timm options that size a Swin (check_kwargs). A
Swin's stored tensors are checked against its meta-device skeleton (artifacts/checkpoint.py), so there is
nothing to check_stored before one is built; expected() is that skeleton's tensor shapes, torch-free, for
the known timm names (the run.pt reader shows a run torch-free when they agree)."""
from __future__ import annotations

import math

from vfpt_deploy.errors import UsageError
from vfpt_deploy.models.family import FamilySizes
from vfpt_deploy.models.limits import MAX_PARAMS

# Bounds for the timm options that size a Swin (Swin-L is width 192, depths 2/2/18/2; see models/limits.py).
MAX_STAGES = 8
MAX_BLOCKS = 256
MAX_WIDTH = 16384
MAX_HEADS = 1024
MAX_WINDOW = 1024
MAX_IMG_SIDE = 8192


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


def _nothing_stored_to_check(kwargs, config, tuned, state) -> None:
    """A Swin's sizes are bounded by check_swin_kwargs, then checked against its meta-device skeleton."""


# -- the tensors a timm Swin has, torch-free (run_reader: a run.pt shown without building its skeleton) -----
# timm names whose architecture is known here: name -> (image side, patch, width, depths, heads, window);
# tests/test_swin.py checks every entry against timm. Any other name or option is left to timm.
KNOWN_SWINS = {
    "swin_tiny_patch4_window7_224": (224, 4, 96, (2, 2, 6, 2), (3, 6, 12, 24), 7),
    "swin_small_patch4_window7_224": (224, 4, 96, (2, 2, 18, 2), (3, 6, 12, 24), 7),
    "swin_base_patch4_window7_224": (224, 4, 128, (2, 2, 18, 2), (4, 8, 16, 32), 7),
    "swin_base_patch4_window12_384": (384, 4, 128, (2, 2, 18, 2), (4, 8, 16, 32), 12),
    "swin_large_patch4_window7_224": (224, 4, 192, (2, 2, 18, 2), (6, 12, 24, 48), 7),
    "swin_large_patch4_window12_384": (384, 4, 192, (2, 2, 18, 2), (6, 12, 24, 48), 12),
}
_SHAPING = ("img_size", "patch_size", "embed_dim", "depths", "num_heads", "window_size", "mlp_ratio")


def _side_pair(v, default: int) -> tuple[int, int] | None:
    if v is None:
        return default, default
    if isinstance(v, int) and not isinstance(v, bool):
        return v, v
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        return v[0], v[1]
    return None


def expected(name: str, kwargs: dict, config, num_classes: int):
    """The backbone_state and tuned shapes, and the image size, of the Swin `name` built with `kwargs`
    (checked by check_swin_kwargs), as the meta-device skeleton has them and as check_swin_backbone and
    check_swin_config accept them; None for anything not known here (the torch path decides)."""
    known = KNOWN_SWINS.get(name)
    if known is None or any(k not in _SHAPING for k in kwargs) or config.project \
            or (config.location != "prepend" and config.num_fourier):
        return None
    side, patch, width, depths, heads, window = known
    img, psize = _side_pair(kwargs.get("img_size"), side), _side_pair(kwargs.get("patch_size"), patch)
    win = _side_pair(kwargs.get("window_size"), window)
    width, depths, heads = kwargs.get("embed_dim", width), list(kwargs.get("depths", depths)), kwargs.get("num_heads", heads)
    # (an int num_heads is not taken by timm's Swin: None, the torch path refuses it)
    ratio = kwargs.get("mlp_ratio", 4.0)
    if None in (img, psize, win) or not isinstance(width, int) or not isinstance(heads, (list, tuple)) \
            or len(heads) != len(depths) or psize[0] != psize[1]:
        return None
    grid = [img[0] // psize[0], img[1] // psize[1]]
    state = {"patch_embed.proj.weight": (width, 3, *psize), "patch_embed.proj.bias": (width,),
             "patch_embed.norm.weight": (width,), "patch_embed.norm.bias": (width,)}
    tuned = {"prompt_embeddings": (1, config.num_prompts, width)}
    dim = width
    for s, (depth, h) in enumerate(zip(depths, heads)):
        if s:
            if grid[0] % 2 or grid[1] % 2:
                return None
            grid = [grid[0] // 2, grid[1] // 2]
            state.update({f"layers.{s}.downsample.norm.weight": (4 * dim,), f"layers.{s}.downsample.norm.bias": (4 * dim,),
                          f"layers.{s}.downsample.reduction.weight": (2 * dim, 4 * dim)})
            dim *= 2
        wh, ww = min(grid[0], win[0]), min(grid[1], win[1])
        hidden = int(dim * ratio)
        if min(grid) < 1 or grid[0] % wh or grid[1] % ww or dim % h or hidden < 1:
            return None
        for i in range(depth):
            b = f"layers.{s}.blocks.{i}."
            state.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
                          b + "attn.relative_position_bias_table": ((2 * wh - 1) * (2 * ww - 1), h),
                          b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                          b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                          b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
                          b + "mlp.fc1.weight": (hidden, dim), b + "mlp.fc1.bias": (hidden,),
                          b + "mlp.fc2.weight": (dim, hidden), b + "mlp.fc2.bias": (dim,)})
        if config.deep:
            tuned[f"deep_prompt_embeddings_{s}"] = (depth - (s == 0), config.num_prompts, dim)
    state.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    if sum(math.prod(v) for v in state.values()) > MAX_PARAMS:
        return None
    tuned.update({"head.weight": (num_classes, dim), "head.bias": (num_classes,)})
    return state, tuned, (img[0], img[1])


SIZES = FamilySizes(check_kwargs=check_swin_kwargs, check_stored=_nothing_stored_to_check, expected=expected)
