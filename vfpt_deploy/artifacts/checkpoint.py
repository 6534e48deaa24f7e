"""run.pt: a self-describing VFPT checkpoint that loads with torch.load(weights_only=True).

Layout (plain dicts, lists, strings, numbers and tensors only -- nothing pickled):
  format, version            "vfpt-deploy.run", 1
  config                     VFPTConfig as a dict
  backbone                   {name, kwargs, source, sha256, included}
  classes                    class names, index order
  preprocess                 Preprocess as a dict (resize, crop, mean, std, interpolation)
  tuned                      prompt / projection / head tensors (the model's keys outside "backbone.")
  backbone_state             the frozen backbone's tensors (absent when saved prompts-only)
  meta                       tool version, creation time, training summary

Loading trusts nothing in the file: every field is type- and range-checked, every tensor must be
floating point and finite, and the sizes the metadata implies (depth, width, tokens, prompts, classes)
are checked against the stored tensors and a meta-device skeleton of the backbone before any real
model is built. A damaged or crafted file is one InputError line, never a traceback or a huge build.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from torch import nn

from vfpt_deploy import __version__
from vfpt_deploy.artifacts.files import atomic_write, file_sha256, not_a_file, regular_file
from vfpt_deploy.artifacts.preprocess import Preprocess
from vfpt_deploy.artifacts.run_reader import damaged as _damaged
from vfpt_deploy.artifacts.schema import RUN_SUFFIXES  # noqa: F401 (what train and import write; defined torch-free there)
from vfpt_deploy.errors import InputError, UsageError, VFPTError
from vfpt_deploy.models.backbone import backbone_skeleton, build_backbone, check_backbone_kwargs, materialize, state_sha256
from vfpt_deploy.models.common import check_state_fits, check_tensors
from vfpt_deploy.models.config import VFPTConfig
from vfpt_deploy.models.families import family_of_name, vfpt_model
from vfpt_deploy.models.family import BackboneInfo  # noqa: F401 (re-exported: it was defined here)

FORMAT = "vfpt-deploy.run"
VERSION = 1
_REQUIRED = ("config", "backbone", "classes", "preprocess", "tuned")
MAX_CLASSES = 100_000
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class Run:
    """A loaded run.pt: the model (eval mode) and everything that describes it."""

    model: nn.Module  # its family's prompted model (VFPTViT, VFPTSwin, ...)
    backbone: BackboneInfo
    classes: list[str]
    preprocess: Preprocess
    meta: dict
    path: Path | None = None
    sha256: str = ""  # of the run.pt file

    @property
    def config(self) -> VFPTConfig:
        return self.model.config


def save_run(path: str | os.PathLike, model: nn.Module, backbone: BackboneInfo, classes: list[str],
             preprocess: Preprocess, *, include_backbone: bool = True, meta: dict | None = None) -> None:
    if len(classes) != model.num_classes:
        raise UsageError(f"{len(classes)} class names for a {model.num_classes}-class head")
    if not all(isinstance(c, str) for c in classes):
        raise UsageError("class names must be strings")
    if tuple(preprocess.size) != tuple(model.img_size):
        raise UsageError(f"preprocess gives {preprocess.size[0]}x{preprocess.size[1]} images but the model takes "
                         f"{model.img_size[0]}x{model.img_size[1]}")
    bb_state = {k: v.detach().cpu().clone() for k, v in model.backbone.state_dict().items()}
    backbone.sha256 = state_sha256(bb_state)
    if not include_backbone and backbone.source == "random":
        raise UsageError("a randomly initialised backbone cannot be found again: save it with the backbone included")
    obj = {
        "format": FORMAT,
        "version": VERSION,
        "config": model.config.to_dict(),
        "backbone": backbone.to_dict(included=include_backbone),
        "classes": list(classes),
        "preprocess": preprocess.to_dict(),
        "tuned": {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")},
        "meta": {"tool_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 **(meta or {})},
    }
    if include_backbone:
        obj["backbone_state"] = bb_state
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


# -- reading -----------------------------------------------------------------------------------------
def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def read_run_dict(path: str | os.PathLike) -> dict:
    """torch.load(weights_only=True) with a one-line error for every way a file can be wrong."""
    path = Path(path)
    if not regular_file(path):
        raise InputError(f"checkpoint {path} {not_a_file(path, 'pass the run.pt written by ' + repr('vfpt-deploy train'))}")
    if path.suffix.lower() in (".onnx", ".engine", ".plan"):
        raise InputError(f"{path} is an exported model, not a checkpoint; pass the run.pt it was exported from")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Unsupported global" in str(e):
            why = "it holds pickled Python objects, which are never loaded (weights_only=True)"
        else:
            why = f"it is truncated or not a torch checkpoint ({first[:120]})"
        raise InputError(f"cannot read checkpoint {path}: {why}; re-create it with 'vfpt-deploy train' or 'vfpt-deploy import'") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise InputError(f"{path} is not a vfpt-deploy run checkpoint (no format '{FORMAT}'); "
                         "reference VFPT checkpoints are converted with 'vfpt-deploy import'")
    version = obj.get("version")
    if type(version) is not int or version != VERSION:
        raise InputError(f"{path} has format version {_show(version)}, this vfpt-deploy reads version {VERSION}; "
                         "use the vfpt-deploy release that wrote it")
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise InputError(f"{path} is missing {', '.join(missing)}; the checkpoint is incomplete")
    return obj


@dataclass
class _Parts:
    """The checked contents of a run.pt, before anything is built."""

    config: VFPTConfig
    info: BackboneInfo
    classes: list[str]
    preprocess: Preprocess
    meta: dict
    tuned: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor] | None  # backbone_state, None when saved prompts-only


def parse_run(obj: dict, path: Path) -> _Parts:
    """Every metadata field and tensor of a read_run_dict() result, type- and range-checked."""
    try:
        config = VFPTConfig.from_dict(obj["config"])
    except VFPTError as e:
        raise _damaged(path, f"config: {e}") from None
    info, included = _parse_backbone(obj["backbone"], path)
    try:
        preprocess = Preprocess.from_dict(obj["preprocess"])
    except VFPTError as e:
        raise _damaged(path, str(e)) from None
    state = obj.get("backbone_state")
    if included and state is None:
        raise InputError(f"{path}: backbone.included is true but backbone_state is missing; the checkpoint is incomplete")
    tuned = _parse_tensors(obj["tuned"], path, "tuned")
    if state is not None:
        state = _parse_tensors(state, path, "backbone_state")
    return _Parts(config, info, _parse_classes(obj["classes"], path), preprocess, _parse_meta(obj.get("meta", {}), path),
                  tuned, state)


def _parse_backbone(bb, path: Path) -> tuple[BackboneInfo, bool]:
    if not isinstance(bb, dict):
        raise _damaged(path, f"backbone must be a mapping, got {type(bb).__name__}")
    name, source, sha = bb.get("name"), bb.get("source", ""), bb.get("sha256", "")
    if not isinstance(name, str) or not name or len(name) > 200:
        raise _damaged(path, f"backbone name must be a timm model name, got {_show(name)}")
    if not isinstance(source, str) or len(source) > 4096:
        raise _damaged(path, f"backbone source must be a string, got {_show(source)}")
    if not isinstance(sha, str) or (sha and not _SHA256.fullmatch(sha)):
        raise _damaged(path, f"backbone sha256 must be 64 hex digits, got {_show(sha)}")
    included = bb.get("included", False)
    if not isinstance(included, bool):
        raise _damaged(path, f"backbone included must be true or false, got {_show(included)}")
    kwargs = bb.get("kwargs", {})
    try:
        check_backbone_kwargs(kwargs, name)
    except VFPTError as e:
        raise _damaged(path, str(e)) from None
    return BackboneInfo(name=name, kwargs=dict(kwargs), source=source, sha256=sha), included


def _parse_classes(classes, path: Path) -> list[str]:
    if not isinstance(classes, list) or not 1 <= len(classes) <= MAX_CLASSES:
        raise _damaged(path, f"classes must be a list of 1 to {MAX_CLASSES} names, got {_show(classes)}")
    bad = next((c for c in classes if not isinstance(c, str) or not c or len(c) > 1000), None)
    if bad is not None:
        raise _damaged(path, f"class names must be non-empty strings, got {_show(bad)}")
    return list(classes)


def _parse_meta(meta, path: Path) -> dict:
    if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
        raise _damaged(path, f"meta must be a mapping with string keys, got {type(meta).__name__}")
    for key, kind in (("tool_version", str), ("created", str), ("train", dict), ("import", dict)):
        if key in meta and not isinstance(meta[key], kind):
            raise _damaged(path, f"meta {key} must be a {kind.__name__}, got {type(meta[key]).__name__}")
    return dict(meta)


def _parse_tensors(d, path: Path, what: str) -> dict[str, torch.Tensor]:
    """A mapping of names to floating-point tensors with finite values."""
    if not isinstance(d, dict) or not all(isinstance(k, str) for k in d):
        raise _damaged(path, f"{what} must be a mapping of tensor names to tensors, got {type(d).__name__}")
    check_tensors(d, f"{path} {what}")
    return d


# -- sizes: metadata against the stored tensors -----------------------------------------------------


def _skeleton(info: BackboneInfo, path: Path):
    try:
        return backbone_skeleton(info.name, info.kwargs)
    except VFPTError as e:
        raise _damaged(path, str(e)) from None


def _check_tuned(parts: _Parts, skeleton, path: Path) -> None:
    """The tuned tensors are exactly those the config, backbone and class list imply."""
    tuned, head = parts.tuned, parts.tuned.get("head.weight")
    if head is not None and head.ndim == 2 and head.shape[0] != len(parts.classes):
        raise _damaged(path, f"{len(parts.classes)} class names for a {head.shape[0]}-class head (head.weight "
                             f"{tuple(head.shape)})")
    family = family_of_name(parts.info.name).parts()
    try:
        family.check_config(parts.config)
    except VFPTError as e:
        raise _damaged(path, f"config: {e}") from None
    expected = family.tuned_shapes(parts.config, skeleton, len(parts.classes))
    for k, shape in expected.items():
        if k not in tuned:
            raise InputError(f"{path}: tensor {k} is missing; the checkpoint is incomplete")
        if tuple(tuned[k].shape) != shape:
            raise InputError(f"{path}: tensor {k} has shape {tuple(tuned[k].shape)}, the config implies {shape}")
    extra = sorted(set(tuned) - set(expected))
    if extra:
        raise InputError(f"{path}: unexpected tensors {', '.join(k[:60] for k in extra[:3])}; the checkpoint does "
                         "not match its config")
    size = tuple(int(s) for s in skeleton.patch_embed.img_size)
    if tuple(parts.preprocess.size) != size:
        raise _damaged(path, f"preprocess gives {parts.preprocess.size[0]}x{parts.preprocess.size[1]} images but the "
                             f"backbone takes {size[0]}x{size[1]}")


def check_run(parts: _Parts, path: Path):
    """All sizes the metadata implies against the stored tensors; returns the backbone's meta-device
    skeleton. Nothing real is built or allocated here."""
    try:  # what the family can check before a skeleton exists (a ViT: depth, width, tokens against the tensors)
        family_of_name(parts.info.name).sizes().check_stored(parts.info.kwargs, parts.config, parts.tuned, parts.state)
    except VFPTError as e:
        raise _damaged(path, str(e)) from None
    skeleton = _skeleton(parts.info, path)
    if parts.state is not None:
        check_state_fits(skeleton.state_dict(), parts.state, f"{path} backbone_state")
    _check_tuned(parts, skeleton, path)
    return skeleton


# -- loading -----------------------------------------------------------------------------------------
def _check_hash(info: BackboneInfo, state: dict[str, torch.Tensor], path: Path) -> None:
    got = state_sha256(state)
    if info.sha256 and got != info.sha256:
        raise InputError(f"{path}: backbone weights hash {got[:12]} does not match the recorded {info.sha256[:12]}; "
                         "these are not the weights the prompts were trained on")


def _backbone(parts: _Parts, skeleton, path: Path, weights: str | None):
    if weights is not None and weights != "pretrained" and not regular_file(weights):
        # checked even where the run carries its backbone (and the option is not needed): never ignored unseen
        raise InputError(f"--backbone {weights} {not_a_file(weights, 'pass a weights file or ' + repr('pretrained'))}")
    if parts.state is not None:
        _check_hash(parts.info, parts.state, path)
        return materialize(skeleton, parts.state, parts.info.name, parts.info.kwargs)
    if weights is None:
        raise UsageError(f"{path} was saved without its backbone; pass the backbone weights "
                         f"(--backbone FILE or --backbone pretrained; recorded source: {_show(parts.info.source)})")
    backbone = build_backbone(parts.info.name, parts.info.kwargs, weights, skeleton=skeleton)
    _check_hash(parts.info, backbone.state_dict(), path)
    return backbone


def load_run(path: str | os.PathLike, *, backbone_weights: str | None = None) -> Run:
    """Rebuild the model from run.pt. A prompts-only checkpoint needs backbone_weights ("pretrained" or a
    file) and refuses weights whose hash differs from the one recorded at training time."""
    path = Path(path)
    parts = parse_run(read_run_dict(path), path)
    skeleton = check_run(parts, path)
    backbone = _backbone(parts, skeleton, path, backbone_weights)
    model = vfpt_model(backbone, num_classes=len(parts.classes), config=parts.config)
    model.load_state_dict({**{f"backbone.{k}": v for k, v in backbone.state_dict().items()}, **parts.tuned}, strict=True)
    return Run(model.eval(), parts.info, parts.classes, parts.preprocess, parts.meta, path, file_sha256(path))
