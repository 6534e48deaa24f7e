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

Loading trusts nothing in the file: every field is type- and range-checked, every tensor must be
floating point and finite, and the sizes the metadata implies (depth, width, tokens, prompts, classes)
are checked against the stored tensors and a meta-device skeleton of the backbone before any real
model is built. A damaged or crafted file is one InputError line, never a traceback or a huge build.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .backbone import (backbone_skeleton, build_backbone, check_backbone_kwargs, check_state_fits, check_tensors,
                       materialize, state_sha256)
from .config import VFPTConfig
from .errors import InputError, UsageError, VFPTError
from .files import atomic_write, file_sha256
from .model import VFPTViT
from .schema import RUN_SUFFIXES  # noqa: F401 (what train and import write; defined torch-free there)
from .swin import check_swin_config, is_swin_name, vfpt_model
from .swin import tuned_shapes as swin_tuned_shapes
from vfpt_deploy.runtime.preprocess import Preprocess

FORMAT = "vfpt-deploy.run"
VERSION = 1
_REQUIRED = ("config", "backbone", "classes", "preprocess", "tuned")
MAX_CLASSES = 100_000
_SHA256 = re.compile(r"[0-9a-f]{64}")
_BLOCK = re.compile(r"blocks\.(\d+)\.")


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
def _damaged(path: Path, what: str) -> InputError:
    return InputError(f"{path}: {what}; the checkpoint is damaged or was not written by vfpt-deploy")


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def read_run_dict(path: str | os.PathLike) -> dict:
    """torch.load(weights_only=True) with a one-line error for every way a file can be wrong."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise InputError(f"checkpoint {path} {what}; pass the run.pt written by 'vfpt-deploy train'")
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
def _stored_facts(state: dict[str, torch.Tensor], path: Path) -> tuple[int, int, int]:
    """(depth, width, tokens) of a stored backbone: distinct blocks.N, cls_token's width, pos_embed's rows."""
    blocks = {int(m.group(1)) for k in state if (m := _BLOCK.match(k))}
    if blocks != set(range(len(blocks))) or not blocks:
        raise _damaged(path, f"backbone_state blocks are not numbered 0..N-1 (found {len(blocks)} block indices)")
    for key in ("cls_token", "pos_embed"):
        if key not in state or state[key].ndim != 3 or state[key].shape[0] != 1:
            got = tuple(state[key].shape) if key in state else "nothing"
            raise _damaged(path, f"backbone_state {key} has shape {got}, expected (1, tokens, width)")
    width = int(state["cls_token"].shape[2])
    if state["pos_embed"].shape[2] != width:
        raise _damaged(path, f"backbone_state pos_embed has shape {tuple(state['pos_embed'].shape)} but cls_token "
                             f"is {width} wide")
    return len(blocks), width, int(state["pos_embed"].shape[1])


def _explicit_tokens(kwargs: dict) -> int | None:
    """1 + patches where img_size and patch_size are both given and nothing else changes the token count."""
    if "img_size" not in kwargs or "patch_size" not in kwargs or \
            any(k in kwargs for k in ("class_token", "no_embed_class", "reg_tokens", "pos_embed", "dynamic_img_size")):
        return None
    img, patch = kwargs["img_size"], kwargs["patch_size"]
    (h, w), (ph, pw) = (img if isinstance(img, (list, tuple)) else (img, img),
                        patch if isinstance(patch, (list, tuple)) else (patch, patch))
    return 1 + (h // ph) * (w // pw)


def _check_stored_backbone(kwargs: dict, state: dict[str, torch.Tensor], path: Path) -> None:
    """Backbone options that disagree with the stored tensors are refused before anything is built."""
    depth, width, tokens = _stored_facts(state, path)
    if "depth" in kwargs and kwargs["depth"] != depth:
        raise _damaged(path, f"backbone option depth={kwargs['depth']} but backbone_state holds {depth} blocks")
    if "embed_dim" in kwargs and kwargs["embed_dim"] != width:
        raise _damaged(path, f"backbone option embed_dim={kwargs['embed_dim']} but backbone_state cls_token is "
                             f"{width} wide")
    want = _explicit_tokens(kwargs)
    if want is not None and want != tokens:
        raise _damaged(path, f"backbone_state pos_embed has shape {tuple(state['pos_embed'].shape)}: {tokens} tokens, "
                             f"but img_size={kwargs['img_size']} patch_size={kwargs['patch_size']} imply {want} "
                             f"(1 + {want - 1} patches)")


def _check_prompts_only(kwargs: dict, config: VFPTConfig, tuned: dict[str, torch.Tensor], path: Path) -> None:
    """Without a stored backbone, the tuned tensors still fix the width (head) and, when deep, the depth."""
    head, deep = tuned.get("head.weight"), tuned.get("deep_prompt_embeddings")
    if "embed_dim" in kwargs and head is not None and head.ndim == 2 and head.shape[1] != kwargs["embed_dim"]:
        raise _damaged(path, f"backbone option embed_dim={kwargs['embed_dim']} but head.weight has shape "
                             f"{tuple(head.shape)}")
    if config.deep and "depth" in kwargs and deep is not None and deep.ndim == 3 and deep.shape[0] != kwargs["depth"] - 1:
        raise _damaged(path, f"backbone option depth={kwargs['depth']} but deep_prompt_embeddings has "
                             f"{deep.shape[0]} layers (depth - 1 = {kwargs['depth'] - 1})")


def _skeleton(info: BackboneInfo, path: Path):
    try:
        return backbone_skeleton(info.name, info.kwargs)
    except VFPTError as e:
        raise _damaged(path, str(e)) from None


def tuned_shapes(config: VFPTConfig, width: int, depth: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    """The tuned tensors a VFPTViT has, and their shapes (docs/model.md, section 1)."""
    p = config.project or width
    shapes = {"prompt_embeddings": (1, config.num_prompts, p)}
    if config.deep:
        shapes["deep_prompt_embeddings"] = (depth - 1, config.num_prompts, p)
    if config.project:
        shapes.update({"prompt_proj.weight": (width, config.project), "prompt_proj.bias": (width,)})
    shapes.update({"head.weight": (num_classes, width), "head.bias": (num_classes,)})
    return shapes


def _check_tuned(parts: _Parts, skeleton, path: Path) -> None:
    """The tuned tensors are exactly those the config, backbone and class list imply."""
    tuned, head = parts.tuned, parts.tuned.get("head.weight")
    if head is not None and head.ndim == 2 and head.shape[0] != len(parts.classes):
        raise _damaged(path, f"{len(parts.classes)} class names for a {head.shape[0]}-class head (head.weight "
                             f"{tuple(head.shape)})")
    if is_swin_name(parts.info.name):
        try:
            check_swin_config(parts.config)
        except VFPTError as e:
            raise _damaged(path, f"config: {e}") from None
        expected = swin_tuned_shapes(parts.config, skeleton, len(parts.classes))
    else:
        expected = tuned_shapes(parts.config, skeleton.embed_dim, len(skeleton.blocks), len(parts.classes))
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
    vit = not is_swin_name(parts.info.name)  # a Swin's sizes: bounded by swin.check_swin_kwargs, then the skeleton
    if vit and parts.state is not None:
        _check_stored_backbone(parts.info.kwargs, parts.state, path)
    elif vit:
        _check_prompts_only(parts.info.kwargs, parts.config, parts.tuned, path)
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
    if weights is not None and weights != "pretrained" and not Path(weights).is_file():
        # checked even where the run carries its backbone (and the option is not needed): never ignored unseen
        raise InputError(f"--backbone {weights} does not exist (or is a folder); pass a weights file or 'pretrained'")
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
