"""Frozen timm backbones of every registered family: create by name, load weights from a file or the hub,
hash the weights. What differs by family (the options that size it, what it supports, its weight
layouts) is asked of the family (models/families.py).

Backbone names and keyword arguments come from the command line and from run.pt files alike, so they
are bounded (check_backbone_kwargs: models/options.py, torch-free) and the model is laid out on the meta
device (backbone_skeleton) before any real tensor is allocated.
"""
from __future__ import annotations

import hashlib
import os
import socket
import threading
from urllib.parse import urlparse
from pathlib import Path

import torch
from torch import nn

from vfpt_deploy.errors import InputError, UsageError
from vfpt_deploy.models.common import (MAX_PARAMS, MAX_PATCHES, _first_line, _show, check_state_fits,  # noqa: F401
                                       check_tensors, read_state_dict)
from vfpt_deploy.models.families import family_of_backbone
from vfpt_deploy.models.options import check_backbone_kwargs


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


def backbone_skeleton(name: str, kwargs: dict) -> nn.Module:
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


def create_backbone(name: str, **kwargs) -> nn.Module:
    """A timm ViT with random init and no classifier (VFPT brings its own head). The name and kwargs
    are checked on a meta-device skeleton first (see backbone_skeleton)."""
    backbone_skeleton(name, kwargs)
    model = _timm_create(name, kwargs, pretrained=False)
    check_supported(model, name)
    return model


def check_supported(model: torch.nn.Module, name: str = "backbone") -> None:
    """A backbone VFPT supports, as its family checks it (a model no family claims: the default family's
    check refuses it, naming what is supported)."""
    family_of_backbone(model).parts().check_backbone(model, name)


def load_backbone_weights(model: nn.Module, path: str | os.PathLike, state: dict[str, torch.Tensor] | None = None) -> None:
    """Load backbone weights into model, strictly, in any layout its family reads (ViT: timm, MAE, MoCo-v3,
    JAX .npz; Swin: timm or Microsoft's). `state`: the file's read_state_dict(), where the caller has read
    it already."""
    family_of_backbone(model).parts().load_weights(model, Path(path), state)


def read_weights_for(skeleton: nn.Module, path: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """Read a weights file and refuse it, before the real model is built, when it holds another number of
    blocks than the skeleton. Returns the state dict (None for a file the family's loader reads itself)."""
    return family_of_backbone(skeleton).parts().read_weights(skeleton, Path(path))


def materialize(skeleton: nn.Module, state: dict[str, torch.Tensor], name: str, kwargs: dict) -> nn.Module:
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


def build_backbone(name: str, kwargs: dict, weights: str, *, skeleton: nn.Module | None = None) -> nn.Module:
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


def pretrained_backbone(name: str, kwargs: dict, *, skeleton: nn.Module | None = None) -> nn.Module:
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
