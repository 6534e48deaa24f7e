"""run.pt: a self-describing VFPT checkpoint that loads with torch.load(weights_only=True).

Layout (plain dicts, lists, strings, numbers and tensors only -- nothing pickled):
  format, version            "vfpt-deploy.run", 1
  config                     VFPTConfig as a dict
  backbone                   {name, kwargs, source, sha256, included}
  classes                    class names, index order
  preprocess                 Preprocess as a dict (resize, crop, mean, std, interpolation)
  tuned                      prompt / projection / head tensors (the VFPTViT keys outside "backbone.")
  backbone_state             the frozen backbone's tensors (absent when saved prompts-only)
  meta                       tool version, creation time, training summary
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .backbone import build_backbone, load_state_strict, state_sha256
from .config import VFPTConfig
from .errors import VFPTError
from .files import atomic_write, file_sha256
from .model import VFPTViT
from vfpt_deploy.runtime.preprocess import Preprocess

FORMAT = "vfpt-deploy.run"
VERSION = 1
_REQUIRED = ("config", "backbone", "classes", "preprocess", "tuned")


@dataclass
class BackboneInfo:
    """Where a frozen backbone comes from: timm name + keyword arguments, and its weights."""

    name: str
    kwargs: dict = field(default_factory=dict)
    source: str = "random"  # "random", "pretrained", a file path, or how the tool made it
    sha256: str = ""  # state_sha256 of the backbone tensors

    def to_dict(self, included: bool) -> dict:
        return {"name": self.name, "kwargs": dict(self.kwargs), "source": self.source,
                "sha256": self.sha256, "included": included}


@dataclass
class Run:
    """A loaded run.pt: the model (eval mode) and everything that describes it."""

    model: VFPTViT
    backbone: BackboneInfo
    classes: list[str]
    preprocess: Preprocess
    meta: dict
    path: Path | None = None
    sha256: str = ""  # of the run.pt file

    @property
    def config(self) -> VFPTConfig:
        return self.model.config


def save_run(path: str | os.PathLike, model: VFPTViT, backbone: BackboneInfo, classes: list[str],
             preprocess: Preprocess, *, include_backbone: bool = True, meta: dict | None = None) -> None:
    if len(classes) != model.num_classes:
        raise VFPTError(f"{len(classes)} class names for a {model.num_classes}-class head")
    bb_state = {k: v.detach().cpu().clone() for k, v in model.backbone.state_dict().items()}
    backbone.sha256 = state_sha256(bb_state)
    if not include_backbone and backbone.source == "random":
        raise VFPTError("a randomly initialised backbone cannot be found again: save it with the backbone included")
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


def read_run_dict(path: str | os.PathLike) -> dict:
    """torch.load(weights_only=True) with a one-line error for every way a file can be wrong."""
    path = Path(path)
    if not path.is_file():
        raise VFPTError(f"checkpoint {path} does not exist; pass the run.pt written by 'vfpt-deploy train'")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Unsupported global" in str(e):
            why = "it holds pickled Python objects, which are never loaded (weights_only=True)"
        else:
            why = f"it is truncated or not a torch checkpoint ({first[:120]})"
        raise VFPTError(f"cannot read checkpoint {path}: {why}; re-create it with 'vfpt-deploy train' or 'vfpt-deploy import'") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise VFPTError(f"{path} is not a vfpt-deploy run checkpoint (no format '{FORMAT}'); "
                        "reference VFPT checkpoints are converted with 'vfpt-deploy import'")
    if obj.get("version") != VERSION:
        raise VFPTError(f"{path} has format version {obj.get('version')!r}, this vfpt-deploy reads version {VERSION}; "
                        "use the vfpt-deploy release that wrote it")
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise VFPTError(f"{path} is missing {', '.join(missing)}; the checkpoint is incomplete")
    return obj


def load_run(path: str | os.PathLike, *, backbone_weights: str | None = None) -> Run:
    """Rebuild the model from run.pt. A prompts-only checkpoint needs backbone_weights ("pretrained" or a
    file) and refuses weights whose hash differs from the one recorded at training time."""
    path = Path(path)
    obj = read_run_dict(path)
    try:
        config = VFPTConfig.from_dict(obj["config"])
        bb = obj["backbone"]
        info = BackboneInfo(name=bb["name"], kwargs=dict(bb.get("kwargs", {})), source=bb["source"], sha256=bb["sha256"])
        preprocess = Preprocess.from_dict(obj["preprocess"])
        classes = [str(c) for c in obj["classes"]]
    except (KeyError, TypeError) as e:
        raise VFPTError(f"{path}: malformed metadata ({e}); the checkpoint is damaged") from None

    if "backbone_state" in obj:
        backbone = build_backbone(info.name, info.kwargs, "random")
        state = obj["backbone_state"]
        load_state_strict(backbone, state, f"{path} backbone")
    else:
        if backbone_weights is None:
            raise VFPTError(f"{path} was saved without its backbone; pass the backbone weights "
                            f"(--backbone FILE or --backbone pretrained; recorded source: {info.source})")
        backbone = build_backbone(info.name, info.kwargs, backbone_weights)
        state = backbone.state_dict()
    got = state_sha256(state)
    if info.sha256 and got != info.sha256:
        raise VFPTError(f"{path}: backbone weights hash {got[:12]} does not match the recorded {info.sha256[:12]}; "
                        "these are not the weights the prompts were trained on")

    model = VFPTViT(backbone, num_classes=len(classes), config=config)
    tuned = obj["tuned"]
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    for k, v in expected.items():
        if k not in tuned:
            raise VFPTError(f"{path}: tensor {k} is missing; the checkpoint is incomplete")
        if tuple(tuned[k].shape) != tuple(v.shape):
            raise VFPTError(f"{path}: tensor {k} has shape {tuple(tuned[k].shape)}, the config implies {tuple(v.shape)}")
    extra = sorted(set(tuned) - set(expected))
    if extra:
        raise VFPTError(f"{path}: unexpected tensors {extra[:3]}; the checkpoint does not match its config")
    model.load_state_dict({**{f"backbone.{k}": v for k, v in backbone.state_dict().items()}, **tuned}, strict=True)
    return Run(model.eval(), info, classes, preprocess, dict(obj.get("meta", {})), path, file_sha256(path))

