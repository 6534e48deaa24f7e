"""The ViT family's sizes, torch-free: bounds on the timm options that size a ViT (check_kwargs), and a
run.pt's recorded sizes against its stored tensors (check_stored). Only plain values and the tensors'
.shape / .ndim are read, so the same checks run on torch tensors (artifacts/checkpoint.py) and on the
NumPy arrays of the torch-free run.pt reader (artifacts/run_reader.py)."""
from __future__ import annotations

import math
import re

from vfpt_deploy.errors import InputError, UsageError
from vfpt_deploy.models.family import FamilySizes
from vfpt_deploy.models.limits import MAX_PARAMS, MAX_PATCHES, _show

# Bounds for the timm options that size a ViT. They hold for every ViT this tool supports (ViT-g/14 is
# depth 40, width 1408) and stop a typo or a crafted run.pt from building a model for minutes or
# allocating tens of GB before anything can check it (MAX_PARAMS, MAX_PATCHES: models/limits.py).
MAX_IMG_SIDE = 8192
MAX_DEPTH = 256
MAX_EMBED_DIM = 16384
MAX_HEADS = 1024
MAX_MLP_RATIO = 64

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _bounded_int(kwargs: dict, key: str, lo: int, hi: int):
    v = kwargs.get(key)
    if v is not None and (not _is_int(v) or not lo <= v <= hi):
        raise UsageError(f"backbone option {key}={_show(v)}: {key} must be an integer in [{lo}, {hi}]")
    return v


def _pair(kwargs: dict, key: str, hi: tuple[int, int]) -> tuple[int, int] | None:
    """img_size / patch_size: an integer or [h, w], each side in [1, hi]."""
    v = kwargs.get(key)
    if v is None:
        return None
    sides = [v, v] if _is_int(v) else list(v) if isinstance(v, (list, tuple)) else None
    if sides is None or len(sides) != 2 or not all(_is_int(s) and 1 <= s <= h for s, h in zip(sides, hi)):
        limit = f"{hi[0]}" if hi[0] == hi[1] else f"{hi[0]}x{hi[1]}"
        raise UsageError(f"backbone option {key}={_show(v)}: {key} must be an integer or [height, width], "
                         f"each side in [1, {limit}]")
    return sides[0], sides[1]


def _check_sizes(kwargs: dict) -> None:
    """The options that size a ViT, each in range, and consistent where several are given."""
    img = _pair(kwargs, "img_size", (MAX_IMG_SIDE, MAX_IMG_SIDE))
    patch = _pair(kwargs, "patch_size", img or (MAX_IMG_SIDE, MAX_IMG_SIDE))
    if img and patch and (img[0] // patch[0]) * (img[1] // patch[1]) > MAX_PATCHES:
        raise UsageError(f"backbone options img_size={_show(kwargs['img_size'])} patch_size={_show(kwargs['patch_size'])} "
                         f"give {(img[0] // patch[0]) * (img[1] // patch[1])} patches, over the {MAX_PATCHES} limit")
    if kwargs.get("in_chans", 3) != 3 or isinstance(kwargs.get("in_chans"), bool):
        raise UsageError(f"backbone option in_chans={_show(kwargs['in_chans'])}: VFPT feeds RGB images, in_chans must be 3")
    depth = _bounded_int(kwargs, "depth", 1, MAX_DEPTH)
    dim = _bounded_int(kwargs, "embed_dim", 1, MAX_EMBED_DIM)
    heads = _bounded_int(kwargs, "num_heads", 1, MAX_HEADS)
    if dim and heads and dim % heads:
        raise UsageError(f"backbone option num_heads={heads} does not divide embed_dim={dim}")
    ratio = kwargs.get("mlp_ratio", 4.0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) \
            or not 0 < ratio <= MAX_MLP_RATIO:
        raise UsageError(f"backbone option mlp_ratio={_show(ratio)}: mlp_ratio must be a number in (0, {MAX_MLP_RATIO}]")
    if depth and dim and depth * (4 + 2 * ratio) * dim * dim > MAX_PARAMS:
        raise UsageError(f"backbone options depth={depth} embed_dim={dim} make a ViT of over "
                         f"{depth * (4 + 2 * ratio) * dim * dim / 1e9:.0f} billion parameters "
                         f"(limit {MAX_PARAMS / 1e9:g} billion)")


# -- a run.pt's recorded sizes against its stored tensors (checkpoint.check_run, run_reader) ------------
_BLOCK = re.compile(r"blocks\.(\d+)\.")


def _stored_facts(state: dict) -> tuple[int, int, int]:
    """(depth, width, tokens) of a stored backbone: distinct blocks.N, cls_token's width, pos_embed's rows."""
    blocks = {int(m.group(1)) for k in state if (m := _BLOCK.match(k))}
    if blocks != set(range(len(blocks))) or not blocks:
        raise InputError(f"backbone_state blocks are not numbered 0..N-1 (found {len(blocks)} block indices)")
    for key in ("cls_token", "pos_embed"):
        if key not in state or state[key].ndim != 3 or state[key].shape[0] != 1:
            got = tuple(state[key].shape) if key in state else "nothing"
            raise InputError(f"backbone_state {key} has shape {got}, expected (1, tokens, width)")
    width = int(state["cls_token"].shape[2])
    if state["pos_embed"].shape[2] != width:
        raise InputError(f"backbone_state pos_embed has shape {tuple(state['pos_embed'].shape)} but cls_token "
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


def _check_stored_backbone(kwargs: dict, state: dict) -> None:
    """Backbone options that disagree with the stored tensors are refused before anything is built."""
    depth, width, tokens = _stored_facts(state)
    if "depth" in kwargs and kwargs["depth"] != depth:
        raise InputError(f"backbone option depth={kwargs['depth']} but backbone_state holds {depth} blocks")
    if "embed_dim" in kwargs and kwargs["embed_dim"] != width:
        raise InputError(f"backbone option embed_dim={kwargs['embed_dim']} but backbone_state cls_token is "
                             f"{width} wide")
    want = _explicit_tokens(kwargs)
    if want is not None and want != tokens:
        raise InputError(f"backbone_state pos_embed has shape {tuple(state['pos_embed'].shape)}: {tokens} tokens, "
                             f"but img_size={kwargs['img_size']} patch_size={kwargs['patch_size']} imply {want} "
                             f"(1 + {want - 1} patches)")


def _check_prompts_only(kwargs: dict, config, tuned: dict) -> None:
    """Without a stored backbone, the tuned tensors still fix the width (head) and, when deep, the depth."""
    head, deep = tuned.get("head.weight"), tuned.get("deep_prompt_embeddings")
    if "embed_dim" in kwargs and head is not None and head.ndim == 2 and head.shape[1] != kwargs["embed_dim"]:
        raise InputError(f"backbone option embed_dim={kwargs['embed_dim']} but head.weight has shape "
                             f"{tuple(head.shape)}")
    if config.deep and "depth" in kwargs and deep is not None and deep.ndim == 3 and deep.shape[0] != kwargs["depth"] - 1:
        raise InputError(f"backbone option depth={kwargs['depth']} but deep_prompt_embeddings has "
                             f"{deep.shape[0]} layers (depth - 1 = {kwargs['depth'] - 1})")


def check_stored(kwargs: dict, config, tuned: dict, state: dict | None) -> None:
    """Backbone options that disagree with the stored backbone tensors (or, saved prompts-only, with the
    tuned ones) are refused before anything is built. Tensors: torch's or run_reader's NumPy arrays."""
    if state is not None:
        _check_stored_backbone(kwargs, state)
    else:
        _check_prompts_only(kwargs, config, tuned)


# -- the tensors a timm ViT has, torch-free (run_reader: a run.pt shown without building its skeleton) ------
# timm names whose architecture is known here: name -> (patch, image side, width, depth, heads); each a plain
# class-token ViT (qkv bias, mlp_ratio 4, LayerNorm, 'token' pooling). tests/test_crafted_files.py checks
# every entry against timm. Any other name, or a name with a pretrained tag, is left to timm.
KNOWN_VITS = {
    "vit_tiny_patch16_224": (16, 224, 192, 12, 3), "vit_tiny_patch16_384": (16, 384, 192, 12, 3),
    "vit_small_patch32_224": (32, 224, 384, 12, 6), "vit_small_patch32_384": (32, 384, 384, 12, 6),
    "vit_small_patch16_224": (16, 224, 384, 12, 6), "vit_small_patch16_384": (16, 384, 384, 12, 6),
    "vit_small_patch8_224": (8, 224, 384, 12, 6),
    "vit_base_patch32_224": (32, 224, 768, 12, 12), "vit_base_patch32_384": (32, 384, 768, 12, 12),
    "vit_base_patch16_224": (16, 224, 768, 12, 12), "vit_base_patch16_384": (16, 384, 768, 12, 12),
    "vit_base_patch8_224": (8, 224, 768, 12, 12),
    "vit_large_patch32_384": (32, 384, 1024, 24, 16),
    "vit_large_patch16_224": (16, 224, 1024, 24, 16), "vit_large_patch16_384": (16, 384, 1024, 24, 16),
    "vit_huge_patch14_224": (14, 224, 1280, 32, 16),
}
# the options whose effect on the tensors is known here; any other option is left to timm
_SHAPING = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
_BLOCK_TENSORS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                  "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                  "mlp.fc2.weight", "mlp.fc2.bias")


def tuned_shapes(config, width: int, depth: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    """The tuned tensors a VFPTViT has, and their shapes (docs/model.md, section 1; vit/backbone.py uses it)."""
    p = config.project or width
    shapes = {"prompt_embeddings": (1, config.num_prompts, p)}
    if config.deep:
        shapes["deep_prompt_embeddings"] = (depth - 1, config.num_prompts, p)
    if config.project:
        shapes.update({"prompt_proj.weight": (width, config.project), "prompt_proj.bias": (width,)})
    shapes.update({"head.weight": (num_classes, width), "head.bias": (num_classes,)})
    return shapes


def expected(name: str, kwargs: dict, config, num_classes: int):
    """The backbone_state and tuned shapes, and the image size, of `name` built with `kwargs` (options
    already checked by _check_sizes), as the meta-device skeleton would have them; None for a name or an
    option not known here (timm decides: the torch path builds the skeleton)."""
    known = KNOWN_VITS.get(name)
    if known is None or any(k not in _SHAPING for k in kwargs):
        return None
    patch, side, width, depth, heads = known
    (h, w), (ph, pw) = (_pair(kwargs, "img_size", (MAX_IMG_SIDE,) * 2) or (side, side),
                        _pair(kwargs, "patch_size", (MAX_IMG_SIDE,) * 2) or (patch, patch))
    width, depth, heads = kwargs.get("embed_dim", width), kwargs.get("depth", depth), kwargs.get("num_heads", heads)
    hidden = int(width * kwargs.get("mlp_ratio", 4.0))
    patches = (h // ph) * (w // pw)
    if width % heads or not 1 <= patches <= MAX_PATCHES or hidden < 1:
        return None  # timm refuses it, or the skeleton's bounds do: the torch path says which
    state = {"cls_token": (1, 1, width), "pos_embed": (1, 1 + patches, width),
             "patch_embed.proj.weight": (width, 3, ph, pw), "patch_embed.proj.bias": (width,)}
    block = dict(zip(_BLOCK_TENSORS, ((width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,),
                                      (width,), (width,), (hidden, width), (hidden,), (width, hidden), (width,))))
    for i in range(depth):
        state.update({f"blocks.{i}.{k}": shape for k, shape in block.items()})
    state.update({"norm.weight": (width,), "norm.bias": (width,)})
    if sum(math.prod(s) for s in state.values()) > MAX_PARAMS:
        return None
    return state, tuned_shapes(config, width, depth, num_classes), (h, w)


SIZES = FamilySizes(check_kwargs=_check_sizes, check_stored=check_stored, expected=expected)
