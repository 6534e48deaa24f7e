"""What every family's backbone code builds on: reading, checking and loading weights (state dicts) with
one-line errors; the limits on a backbone's size are in models/limits.py (torch-free) and re-exported here.
No family lookups here (models/backbone.py)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from vfpt_deploy.errors import InputError
from vfpt_deploy.models.limits import MAX_PARAMS, MAX_PATCHES, _show  # noqa: F401  (torch-free, re-exported)

log = logging.getLogger("vfpt_deploy")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:160]


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file without unpickling objects: .safetensors, or .pth/.pt/.bin with weights_only.

    Unwraps the usual containers ('model', 'state_dict', 'model_ema') and strips 'module.' prefixes.
    """
    path = Path(path)
    if not path.is_file():  # (models/ sits below artifacts/: no files.not_a_file here)
        what = "is not a regular file (a folder, pipe or device)" if os.path.exists(path) else "does not exist"
        raise InputError(f"weights file {path} {what}; pass an existing .pth/.safetensors/.npz file")
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
