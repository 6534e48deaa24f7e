"""The Swin family's reference importer, `import --arch swin`: the reference's Swin VFPT checkpoints as a
VFPTSwin (docs/model.md, section 5; reference/ reads the file and writes the run.pt).

The reference saves {"model": state_dict} with the Swin under `enc.` in Microsoft's Swin layout (patch
merging at the END of a stage, as `enc.layers.{s}.downsample`; relative position indices and shift
masks saved as tensors) and a linear head `head.last_layer`. The architecture is read off the tensors:
widths and patch size from the patch embedding, stages and depths from the block names, heads and
window sizes from the relative position tables, the image size from the shift masks. The saved indices
and masks must equal the ones timm computes for that architecture, which checks the reading. timm's own
Swin checkpoint filter moves the merging layers to timm's layout (at the start of the next stage).
"""
from __future__ import annotations

import math
import re
from typing import Callable

import torch

from vfpt_deploy.errors import InputError, UsageError, VFPTError
from vfpt_deploy.models.common import check_tensors
from vfpt_deploy.models.config import VFPTConfig
from vfpt_deploy.models.family import BackboneInfo, Imported
from vfpt_deploy.models.swin.model import VFPTSwin, prompt_shapes

E = "enc."
_BLOCK = re.compile(r"enc\.layers\.(\d+)\.blocks\.(\d+)\.")
# timm's Swin names by (embed_dim, depths, heads, window, image size); patch 4, MLP ratio 4, qkv bias.
_STANDARD = {
    (96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 224): "swin_tiny_patch4_window7_224",
    (96, (2, 2, 18, 2), (3, 6, 12, 24), 7, 224): "swin_small_patch4_window7_224",
    (128, (2, 2, 18, 2), (4, 8, 16, 32), 7, 224): "swin_base_patch4_window7_224",
    (128, (2, 2, 18, 2), (4, 8, 16, 32), 12, 384): "swin_base_patch4_window12_384",
    (192, (2, 2, 18, 2), (6, 12, 24, 48), 7, 224): "swin_large_patch4_window7_224",
    (192, (2, 2, 18, 2), (6, 12, 24, 48), 12, 384): "swin_large_patch4_window12_384",
}


def _need(sd: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise VFPTError(f"missing tensor {key}; the checkpoint is incomplete or not a reference Swin VFPT")
    return sd[key]


def _refuse_unsupported(sd: dict[str, torch.Tensor]) -> None:
    if E + "layers.0.blocks.0.attn.qkv.weight" not in sd:
        what = "a ViT checkpoint (enc.transformer.* or enc.blocks.*): pass --arch vit, mae or moco" \
            if any(k.startswith((E + "transformer.", E + "blocks.")) for k in sd) else \
            f"no enc.layers.0.blocks.0 tensors (first keys: {', '.join(list(sd)[:3])})"
        raise VFPTError(f"not a reference Swin VFPT checkpoint: {what}")
    if E + "absolute_pos_embed" in sd:
        raise VFPTError("the Swin has an absolute position embedding (ape=True), which timm's Swin does not have")
    if E + "patch_embed.norm.weight" not in sd:
        raise VFPTError("the Swin has no patch-embedding LayerNorm (patch_norm=False), which timm's Swin always has")
    if E + "prompt_proj.weight" in sd:
        raise VFPTError("the checkpoint has a prompt projection (enc.prompt_proj.*), which the Swin model here does "
                        "not take; only PROJECT = -1 (the reference default) can be imported")
    if any(k.startswith("head.projection.") for k in sd):
        raise VFPTError("the checkpoint has an MLP head (head.projection.*, MLP_NUM > 0), which is not supported "
                        "yet; only the linear head (MLP_NUM = 0, the reference default) can be imported")
    if E + "prompt_embeddings" in sd and sd[E + "prompt_embeddings"].ndim != 3:
        raise VFPTError(f"enc.prompt_embeddings has shape {tuple(sd[E + 'prompt_embeddings'].shape)}: not prepended "
                        "prompt rows [1, M, C] (the reference's 'below'/'pad' locations are not supported)")


def _depths(sd: dict[str, torch.Tensor]) -> list[int]:
    found: dict[int, set[int]] = {}
    for k in sd:
        if m := _BLOCK.match(k):
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if sorted(found) != list(range(len(found))) or any(sorted(b) != list(range(len(b))) for b in found.values()):
        raise VFPTError("the Swin stages and blocks (enc.layers.S.blocks.I) are not numbered 0..N-1")
    return [len(found[s]) for s in range(len(found))]


def _table_window(sd: dict[str, torch.Tensor], s: int, i: int) -> tuple[int, int]:
    """(window side, heads) of a block, from its relative position table [(2w - 1)^2, heads]."""
    key = f"{E}layers.{s}.blocks.{i}.attn.relative_position_bias_table"
    table = _need(sd, key)
    side = math.isqrt(table.shape[0]) if table.ndim == 2 else 0
    if table.ndim != 2 or side * side != table.shape[0] or side % 2 == 0:
        raise VFPTError(f"{key} has shape {tuple(table.shape)}; expected [(2w - 1)^2, heads] for a square window w")
    return (side + 1) // 2, int(table.shape[1])


def _grid(sd: dict[str, torch.Tensor], windows: list[int], depths: list[int], patch: int) -> int:
    """The stage-0 grid side, from the first shift mask [nW, A, A] (a shifted block keeps its full window)."""
    for s, d in enumerate(depths):
        for i in range(d):
            mask = sd.get(f"{E}layers.{s}.blocks.{i}.attn_mask")
            if mask is not None:
                per_side = math.isqrt(mask.shape[0]) if mask.ndim == 3 else 0
                if mask.ndim != 3 or per_side * per_side != mask.shape[0]:
                    raise VFPTError(f"enc.layers.{s}.blocks.{i}.attn_mask has shape {tuple(mask.shape)}; expected "
                                    "[windows, area, area] for a square grid")
                return per_side * windows[s] * 2 ** s
    # No shifted block moves its windows: every stage is one window (the window shrank to the grid).
    side = windows[-1] * 2 ** (len(depths) - 1)
    if all(windows[s] == side // 2 ** s for s in range(len(depths))):
        return side
    raise VFPTError("cannot read the image size off the checkpoint: it has no shifted-window masks (attn_mask)")


def infer_swin_backbone(sd: dict[str, torch.Tensor]) -> BackboneInfo:
    """The timm Swin name + keyword arguments that rebuild the reference backbone, read off tensor shapes."""
    patch = _need(sd, E + "patch_embed.proj.weight")
    if patch.ndim != 4 or patch.shape[1] != 3 or patch.shape[2] != patch.shape[3]:
        raise VFPTError(f"patch embedding has shape {tuple(patch.shape)}; expected [C, 3, p, p] (square RGB patches)")
    dim, p = int(patch.shape[0]), int(patch.shape[2])
    depths = _depths(sd)
    found = [_table_window(sd, s, 0) for s in range(len(depths))]
    windows, heads = [w for w, _ in found], [h for _, h in found]
    fc1 = _need(sd, E + "layers.0.blocks.0.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] / dim
    if int(dim * mlp_ratio) != fc1.shape[0]:
        raise VFPTError(f"MLP width {fc1.shape[0]} is not reachable from width {dim} by timm's mlp_ratio")
    grid = _grid(sd, windows, depths, p)
    nominal = windows[0]  # a window larger than a stage's grid shrinks to it (and does not shift)
    per_stage = [min(nominal, grid // 2 ** s) for s in range(len(depths))]
    window = nominal if per_stage == windows else [[w, w] for w in windows]
    img, qkv_bias = grid * p, E + "layers.0.blocks.0.attn.qkv.bias" in sd
    name = _STANDARD.get((dim, tuple(depths), tuple(heads), window, img)) if p == 4 and mlp_ratio == 4 and qkv_bias \
        else None
    if name:
        return BackboneInfo(name=name, kwargs={})
    kwargs = {"img_size": img, "patch_size": p, "embed_dim": dim, "depths": depths, "num_heads": heads,
              "window_size": window, "mlp_ratio": mlp_ratio}
    if not qkv_bias:
        kwargs["qkv_bias"] = False
    return BackboneInfo(name="swin_tiny_patch4_window7_224", kwargs=kwargs)


def _check_derived(sd: dict[str, torch.Tensor], backbone) -> list[str]:
    """The saved relative position indices and shift masks equal timm's for the architecture read off the
    tensors (so the window sizes, shifts and image size were read right). Returns their keys."""
    keys = []
    for s, stage in enumerate(backbone.layers):
        for i, blk in enumerate(stage.blocks):
            where = f"{E}layers.{s}.blocks.{i}."
            index, mask = sd.get(where + "attn.relative_position_index"), sd.get(where + "attn_mask")
            if index is not None:
                keys.append(where + "attn.relative_position_index")
                if tuple(index.shape) != tuple(blk.attn.relative_position_index.shape) or \
                        not torch.equal(index.long(), blk.attn.relative_position_index):
                    raise VFPTError(f"{where}attn.relative_position_index is not the index of a "
                                    f"{blk.window_size[0]}x{blk.window_size[1]} window; the checkpoint is inconsistent")
            if (mask is None) != (blk.attn_mask is None):
                raise VFPTError(f"{where}attn_mask is {'missing' if mask is None else 'present'} but the architecture "
                                f"read off the other tensors ({'shifted' if blk.attn_mask is not None else 'unshifted'} "
                                "windows there) says otherwise; the checkpoint is inconsistent")
            if mask is not None:
                keys.append(where + "attn_mask")
                if tuple(mask.shape) != tuple(blk.attn_mask.shape) or not torch.equal(mask.float(), blk.attn_mask):
                    raise VFPTError(f"{where}attn_mask is not the shift mask of a {blk.input_resolution[0]}x"
                                    f"{blk.input_resolution[1]} grid; the checkpoint is inconsistent")
    return keys


def import_state_dict(sd: dict[str, torch.Tensor], *, arch: str = "swin", alpha: float, location: str = "prepend",
                      heads: int | None = None, source: str = "reference checkpoint",
                      create_backbone: Callable[..., torch.nn.Module]) -> Imported:
    """The family's importer (models/family.py): import_swin_state_dict, refusing --heads."""
    if heads is not None:
        raise UsageError("--heads does not apply to --arch swin: a Swin's heads are read off its relative "
                         "position tables; drop --heads")
    return import_swin_state_dict(sd, alpha=alpha, location=location, source=source, create_backbone=create_backbone)


def import_swin_state_dict(sd: dict[str, torch.Tensor], *, alpha: float, location: str = "prepend",
                           source: str = "reference checkpoint",
                           create_backbone: Callable[..., torch.nn.Module]) -> Imported:
    """Map a reference Swin VFPT state dict (`module.` already stripped) onto a VFPTSwin. create_backbone:
    the bounded backbone builder (models.backbone.create_backbone, passed in by reference/).

    Fails on the first missing, mis-shaped or inconsistent tensor."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    _refuse_unsupported(sd)
    prompts, head_w = _need(sd, E + "prompt_embeddings"), _need(sd, "head.last_layer.weight")
    if head_w.ndim != 2:
        raise VFPTError(f"head.last_layer.weight has shape {tuple(head_w.shape)}; expected [classes, C]")
    config = VFPTConfig(num_prompts=int(prompts.shape[1]), deep=E + "deep_prompt_embeddings_0" in sd, alpha=alpha,
                        location=location)
    info = infer_swin_backbone(sd)
    try:  # the architecture read off the tensors is bounded like any other (backbone.check_backbone_kwargs)
        backbone = create_backbone(info.name, **info.kwargs)
    except VFPTError as e:
        raise InputError(f"{source}: the tensors describe a Swin that cannot be built: {e}") from None
    model = VFPTSwin(backbone, num_classes=int(head_w.shape[0]), config=config)
    derived = _check_derived(sd, backbone)

    own = backbone.state_dict()
    prompt_keys = {E + k: k for k in prompt_shapes(config, backbone)}
    refs = {k: v for k, v in sd.items() if k.startswith(E) and k not in prompt_keys and k not in derived}
    timm_sd = checkpoint_filter_fn({k.removeprefix(E): v for k, v in refs.items()}, backbone)
    missing = [k for k in own if k not in timm_sd]
    if missing:
        raise VFPTError(f"{len(missing)} tensors missing from the checkpoint, first {E + _ref_name(missing[0])}; the "
                        "checkpoint is incomplete or has another architecture")
    tuned = {k: _need(sd, ref) for ref, k in prompt_keys.items()}
    tuned.update({"head.weight": head_w, "head.bias": _need(sd, "head.last_layer.bias")})
    want = {**{f"backbone.{k}": tuple(v.shape) for k, v in own.items()},
            **{k: tuple(v.shape) for k, v in model.tuned_parameters().items()}}
    state = {**{f"backbone.{k}": timm_sd[k] for k in own}, **tuned}
    for k, shape in want.items():
        if tuple(state[k].shape) != shape:
            name = E + _ref_name(k.removeprefix("backbone.")) if k.startswith("backbone.") else _tuned_ref(k)
            raise VFPTError(f"tensor {name} has shape {tuple(state[k].shape)} but {shape} fits the architecture read "
                            f"off the other tensors ({info.name} {info.kwargs}, M={config.num_prompts}); the "
                            "checkpoint is inconsistent")
    check_tensors(state, source)  # floating point, finite
    model.load_state_dict(state, strict=True)
    used = {E + _ref_name(k) for k in own} | set(prompt_keys) | set(derived) | {"head.last_layer.weight",
                                                                                "head.last_layer.bias"}
    info.source = f"imported from {source}"
    return Imported(model.eval(), info, "swin", sorted(k for k in sd if k not in used))


def _ref_name(timm_key: str) -> str:
    """The reference (Microsoft layout) name of a timm Swin tensor: merging moves back to the stage before."""
    m = re.match(r"layers\.(\d+)\.downsample\.(.+)", timm_key)
    return f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else timm_key


def _tuned_ref(name: str) -> str:
    return "head.last_layer." + name.removeprefix("head.") if name.startswith("head.") else E + name
