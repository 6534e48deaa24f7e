"""The ViT family's reference importer: checkpoints of the reference VFPT/VPT code (github.com/runtsang/VFPT,
KMnP/vpt) as a VFPTViT (reference/ reads the file and writes the run.pt).

The reference saves torch.save({"model": state_dict}) of its whole model (frozen backbone included) and
no config. Its ViT uses its own layout (separate query/key/value, `enc.transformer.*`); its MAE and
MoCo-v3 models are timm-style (`enc.blocks.*`). Keys are mapped to timm + VFPTViT names, and the
architecture is read off tensor shapes; alpha, location, heads and class names come from the user,
because the file does not hold them. See docs/model.md, section 4 (reference checkpoints).
"""
from __future__ import annotations

import re
from typing import Callable

import torch

from vfpt_deploy.errors import InputError, VFPTError
from vfpt_deploy.models.common import check_tensors
from vfpt_deploy.models.config import VFPTConfig
from vfpt_deploy.models.family import BackboneInfo, Imported
from vfpt_deploy.models.vit.model import VFPTViT


ARCHS = ("vit", "mae", "moco")  # the reference layouts of this family (models/vit/__init__.py registers them)
# Standard ViT heads by width (tiny, small, base, large, huge), and timm size names by (width, depth).
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
_SIZES = {(192, 12): "tiny", (384, 12): "small", (768, 12): "base", (1024, 24): "large", (1280, 32): "huge"}

# Reference ViT layout, under enc.transformer. (timm name -> reference name).
_VIT = "enc.transformer."
_VIT_TOP = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.bias",
    "norm.weight": "encoder.encoder_norm.weight",
    "norm.bias": "encoder.encoder_norm.bias",
}
_VIT_BLOCK = {"norm1": "attention_norm", "attn.proj": "attn.out", "norm2": "ffn_norm",
              "mlp.fc1": "ffn.fc1", "mlp.fc2": "ffn.fc2"}


def _prefix(arch: str) -> str:
    """Where the backbone and prompt tensors live in a reference state dict."""
    return _VIT if arch == "vit" else "enc."


def reference_names(arch: str, timm_key: str) -> list[str]:
    """The reference tensors that make up one timm backbone tensor, concatenated along dim 0 (only the
    fused qkv takes three: query, key, value, in that order)."""
    if arch != "vit":
        return ["enc." + timm_key]
    if timm_key in _VIT_TOP:
        return [_VIT + _VIT_TOP[timm_key]]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", timm_key)
    if m is None:
        raise VFPTError(f"timm tensor {timm_key} has no counterpart in the reference ViT layout")
    i, module, kind = m.groups()
    layer = f"{_VIT}encoder.layer.{i}."
    if module == "attn.qkv":
        return [f"{layer}attn.{n}.{kind}" for n in ("query", "key", "value")]
    if module not in _VIT_BLOCK:
        raise VFPTError(f"timm tensor {timm_key} has no counterpart in the reference ViT layout")
    return [f"{layer}{_VIT_BLOCK[module]}.{kind}"]


def tuned_reference_name(arch: str, name: str) -> str:
    """Reference name of a VFPTViT tuned tensor: prompts keep their names, the head is head.last_layer."""
    if name.startswith("head."):
        return "head.last_layer." + name.removeprefix("head.")
    return _prefix(arch) + name


def _refuse_unsupported(sd: dict[str, torch.Tensor], arch: str) -> None:
    keys = list(sd)
    if any(k.startswith("enc.layers.") or k.startswith("enc.deep_prompt_embeddings_") for k in keys):
        raise VFPTError("this is a Swin checkpoint (enc.layers.*): pass --arch swin")
    if any(k.startswith("head.projection.") for k in keys):
        raise VFPTError("the checkpoint has an MLP head (head.projection.*, MLP_NUM > 0), which is not supported "
                        "yet; only the linear head (MLP_NUM = 0, the reference default) can be imported")
    if any(k.startswith(_VIT + "embeddings.hybrid_model.") for k in keys):
        raise VFPTError("the checkpoint is a ResNet-hybrid ViT, which is not supported; only plain ViTs can be imported")
    has_vit = any(k.startswith(_VIT) for k in keys)
    has_timm = any(k.startswith("enc.blocks.") for k in keys)
    if not has_vit and not has_timm:
        raise VFPTError(f"not a reference VPT/VFPT ViT checkpoint: no enc.transformer.* or enc.blocks.* keys "
                        f"(first keys: {', '.join(keys[:3])})")
    if arch == "vit" and not has_vit:
        raise VFPTError("the keys are in the MAE/MoCo-v3 layout (enc.blocks.*); pass --arch mae or --arch moco")
    if arch != "vit" and not has_timm:
        raise VFPTError("the keys are in the reference ViT layout (enc.transformer.*); pass --arch vit")
    if arch == "mae" and "enc.fc_norm.weight" not in sd and "enc.norm.weight" in sd:
        raise VFPTError("no enc.fc_norm but an enc.norm: this model pools the CLS token; pass --arch moco")
    if arch == "moco" and "enc.norm.weight" not in sd and "enc.fc_norm.weight" in sd:
        raise VFPTError("no enc.norm but an enc.fc_norm: this model mean-pools (MAE); pass --arch mae")


def _need(sd: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise VFPTError(f"missing tensor {key}; the checkpoint is incomplete or not a reference VFPT ViT")
    return sd[key]


def _heads_and_ratio(dim: int, hidden: int, heads: int | None) -> tuple[int, float]:
    """Attention heads (given, or the standard ones for the width) and timm's mlp_ratio for an MLP width."""
    if heads is None:
        if dim not in STANDARD_HEADS:
            raise VFPTError(f"width {dim} is not a standard ViT width ({', '.join(map(str, STANDARD_HEADS))}); "
                            "pass --heads (the checkpoint does not record the number of attention heads)")
        heads = STANDARD_HEADS[dim]
    if heads < 1 or dim % heads:
        raise VFPTError(f"--heads {heads} does not divide the width {dim}")
    mlp_ratio = hidden / dim
    if int(dim * mlp_ratio) != hidden:
        raise VFPTError(f"MLP width {hidden} is not reachable from width {dim} by timm's mlp_ratio")
    return heads, mlp_ratio


def infer_backbone(sd: dict[str, torch.Tensor], arch: str, heads: int | None = None) -> BackboneInfo:
    """The timm model name + kwargs that rebuild the reference backbone, read off tensor shapes.

    LayerNorm eps 1e-6, qkv bias and exact GELU are timm's ViT defaults, as in the reference.
    """
    if arch not in ARCHS:
        raise VFPTError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    vit = arch == "vit"
    P = _prefix(arch)
    patch = _need(sd, P + ("embeddings.patch_embeddings.weight" if vit else "patch_embed.proj.weight"))
    pos = _need(sd, P + ("embeddings.position_embeddings" if vit else "pos_embed"))
    if patch.ndim != 4 or patch.shape[1] != 3 or patch.shape[2] != patch.shape[3]:
        raise VFPTError(f"patch embedding has shape {tuple(patch.shape)}; expected [D, 3, p, p] (square RGB patches)")
    dim, p = int(patch.shape[0]), int(patch.shape[2])
    block_re = re.compile(re.escape(P) + (r"encoder\.layer\.(\d+)\." if vit else r"blocks\.(\d+)\."))
    depth = 1 + max((int(m.group(1)) for k in sd if (m := block_re.match(k))), default=-1)
    fc1 = _need(sd, P + ("encoder.layer.0.ffn.fc1.weight" if vit else "blocks.0.mlp.fc1.weight"))
    hidden = int(fc1.shape[0])
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != dim:
        raise VFPTError(f"position embedding has shape {tuple(pos.shape)}; expected [1, 1 + N, {dim}]")
    n = int(pos.shape[1]) - 1
    grid = int(round(n ** 0.5))
    if grid * grid != n:
        raise VFPTError(f"position embedding holds {n} patch positions, not a square grid; only square images are supported")
    img = grid * p

    heads, mlp_ratio = _heads_and_ratio(dim, hidden, heads)

    size = _SIZES.get((dim, depth))
    name = f"vit_{size}_patch{p}_224"
    import timm

    if size and timm.is_model(name):
        kwargs: dict = {"img_size": img}
        if heads != STANDARD_HEADS[dim]:
            kwargs["num_heads"] = heads
        if mlp_ratio != 4.0:
            kwargs["mlp_ratio"] = mlp_ratio
    else:  # not a standard size: spell the whole architecture out
        name = "vit_base_patch16_224"
        kwargs = {"img_size": img, "patch_size": p, "embed_dim": dim, "depth": depth, "num_heads": heads,
                  "mlp_ratio": mlp_ratio}
    if arch == "mae":
        if f"{name}.mae" in timm.list_pretrained(f"{name}.mae"):
            name = f"{name}.mae"
        kwargs["global_pool"] = "avg"  # mean over every row after CLS, then fc_norm
    return BackboneInfo(name=name, kwargs=kwargs)


def import_state_dict(sd: dict[str, torch.Tensor], *, arch: str = "vit", alpha: float, location: str = "prepend",
                      heads: int | None = None, source: str = "reference checkpoint",
                      create_backbone: Callable[..., torch.nn.Module]) -> Imported:
    """Map a reference state dict (`module.` already stripped) onto a VFPTViT. create_backbone: the bounded
    backbone builder (models.backbone.create_backbone, passed in by reference/).

    Fails on the first missing or mis-shaped reference tensor; returns the unused ones.
    """
    _refuse_unsupported(sd, arch)
    P = _prefix(arch)
    prompts = _need(sd, P + "prompt_embeddings")
    head_w = _need(sd, "head.last_layer.weight")
    if prompts.ndim != 3 or prompts.shape[0] != 1:
        raise VFPTError(f"{P}prompt_embeddings has shape {tuple(prompts.shape)}; expected [1, M, D]")
    if head_w.ndim != 2:
        raise VFPTError(f"head.last_layer.weight has shape {tuple(head_w.shape)}; expected [classes, D]")
    proj = sd.get(P + "prompt_proj.weight")
    config = VFPTConfig(num_prompts=int(prompts.shape[1]), deep=P + "deep_prompt_embeddings" in sd, alpha=alpha,
                        location=location, project=int(proj.shape[1]) if proj is not None and proj.ndim == 2 else 0)
    info = infer_backbone(sd, arch, heads)
    try:  # the architecture read off the tensors is bounded like any other (backbone.check_backbone_kwargs)
        backbone = create_backbone(info.name, **info.kwargs)
    except VFPTError as e:
        raise InputError(f"{source}: the tensors describe a backbone that cannot be built: {e}") from None
    model = VFPTViT(backbone, num_classes=int(head_w.shape[0]), config=config)

    # Every model tensor, with the reference tensors it is made of.
    targets = {f"backbone.{k}": reference_names(arch, k) for k in backbone.state_dict()}
    targets.update({k: [tuned_reference_name(arch, k)] for k in model.tuned_parameters()})
    own = model.state_dict()
    missing = [r for refs in targets.values() for r in refs if r not in sd]
    if missing:
        raise VFPTError(f"{len(missing)} tensors missing from the checkpoint, first {missing[0]}; "
                        "the checkpoint is incomplete or has another architecture")
    check_tensors({r: sd[r] for refs in targets.values() for r in refs}, source)  # floating point, finite
    state = {}
    for k, refs in targets.items():
        want = list(own[k].shape)
        want[0] //= len(refs)
        for r in refs:
            if list(sd[r].shape) != want:
                raise VFPTError(f"tensor {r} has shape {tuple(sd[r].shape)} but {tuple(want)} fits the architecture "
                                f"read off the other tensors ({info.name} {info.kwargs}, M={config.num_prompts}); "
                                "the checkpoint is inconsistent")
        state[k] = torch.cat([sd[r] for r in refs]) if len(refs) > 1 else sd[refs[0]]
    model.load_state_dict(state, strict=True)
    used = {r for refs in targets.values() for r in refs}
    info.source = f"imported from {source}"
    return Imported(model.eval(), info, arch, sorted(k for k in sd if k not in used))
