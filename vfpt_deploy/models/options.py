"""Backbone keyword arguments (timm options) from the command line and from run.pt files alike, checked
before anything is built: names, value types, and the bounds of the family the backbone belongs to
(its sizes.py). Torch-free: the CLI and the torch-free run.pt reader (artifacts/run_reader.py) use it;
models/backbone.py re-exports check_backbone_kwargs."""
from __future__ import annotations

import math
import re

from vfpt_deploy.errors import UsageError
from vfpt_deploy.models.families import family_of_name
from vfpt_deploy.models.limits import _show

# create_model arguments that vfpt sets itself, or that would make timm read other files.
_RESERVED = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
             "num_classes", "features_only", "out_indices")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


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


def check_backbone_kwargs(kwargs, name: str = "") -> dict:
    """Refuse, in one line naming the key, backbone keyword arguments that are not a dict of JSON-like
    values, that vfpt sets itself, or that size a backbone out of range (the bounds of the family `name`
    belongs to: models/vit/sizes.py, models/swin/sizes.py). Returns kwargs."""
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
    family_of_name(name).sizes().check_kwargs(kwargs)  # the options that size it, each in range
    return kwargs
