"""The Swin family's sizes, torch-free: bounds on the timm options that size a Swin (check_kwargs). A
Swin's stored tensors are checked against its meta-device skeleton (artifacts/checkpoint.py), so there is
nothing to check_stored before one is built."""
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


SIZES = FamilySizes(check_kwargs=check_swin_kwargs, check_stored=_nothing_stored_to_check)
