"""Prompt packs, the file format both sides share (torch-free): a task's folded tables, head, classes,
preprocessing, the sha256 of the backbone artifact it runs on and its golden set, in one safetensors file
(no pickle); and the backbone artifact's table inputs, which the runtime assembles from the packs it holds.

Pack tensors (float32 unless said; a part the task does not use is absent):
  kv.keys, kv.values   [L_kv, heads, M, head_dim]   kv fold: every kv layer's prompt keys / values
  tokens               [L, M, D]                    prompts kept as tokens: the rows written at each layer
  tokens.write, tokens.live  bool [L]               where they are written, and where they are keys
  head.weight [C, D], head.bias [C]
Pack metadata (safetensors __metadata__, JSON values under vfpt.* keys as in an ONNX artifact): format,
version, name, classes, preprocess, fold, num_prompts, config, backbone (the run's frozen backbone: name,
kwargs, sha256), backbone_artifact_sha256 (the ONNX file it was verified through), backbone_identity (that
file's computation identity: computation_identity), checkpoint_sha256, checkpoint, tool_version and golden
(artifacts/golden.py's record).

A pack fits a backbone artifact with the same computation identity (the frozen weights, model, geometry, opset
and graph: what its numbers depend on, not the limits), so re-exporting the backbone with other --max-* limits
keeps every pack; the runtime then replays the pack's golden set on that artifact before serving it. A pack
without backbone_identity (older) fits only the very file it was made on (backbone_artifact_sha256).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vfpt_deploy.artifacts.files import not_a_file, regular_file
from vfpt_deploy.artifacts.schema import MAX_CLASSES, MAX_TASKS, TASK_NAME, decode_metadata, encode_metadata
from vfpt_deploy.errors import ArtifactError, UsageError, VFPTError

PACK_FORMAT = "vfpt-deploy.pack"
PACK_VERSION = 1
PACK_SUFFIX = ".safetensors"
BACKBONE_KEY = "pack_backbone"  # a backbone artifact's metadata: its geometry, limits and identity
IDENTITY_KEY = "backbone_identity"  # a pack's metadata: the identity of the backbone artifact it was made on
MAX_PACK_BYTES = 2 * 2**30
# Limits a backbone artifact records (export options; the graph's table dimensions are symbolic, so these
# bound memory and a TensorRT profile, not the graph): a pack beyond them is refused in one line.
DEFAULT_LIMITS = {"tasks": MAX_TASKS, "prompts": 512, "classes": 10_000}
# The backbone artifact's table inputs after `images` and `task`, in order, with their dimensions.
TABLE_INPUTS = {
    "prompt_keys": ("tasks", "kv_layers", "heads", "prompts", "head_dim"),
    "prompt_values": ("tasks", "kv_layers", "heads", "prompts", "head_dim"),
    "kv_bias": ("tasks", "kv_layers", "prompts"),
    "prompt_tokens": ("tasks", "depth", "slots", "dim"),
    "token_write": ("tasks", "depth"),
    "token_bias": ("tasks", "depth", "slots"),
    "head_weight": ("tasks", "dim", "classes"),
    "head_bias": ("tasks", "classes"),
}
GEOMETRY_KEYS = {"depth", "kv_layers", "heads", "head_dim", "dim", "pool", "image_size"}


@dataclass
class PackTables:
    """One task's unpadded tables (see the module docstring); None where the task has no such part."""

    fold: str
    head_weight: np.ndarray
    head_bias: np.ndarray
    keys: np.ndarray | None = None
    values: np.ndarray | None = None
    tokens: np.ndarray | None = None
    token_write: np.ndarray | None = None
    token_live: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.head_bias)

    @property
    def kv_prompts(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def token_prompts(self) -> int:
        return 0 if self.tokens is None else self.tokens.shape[1]

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"kv.keys": self.keys, "kv.values": self.values, "tokens": self.tokens,
               "tokens.write": self.token_write, "tokens.live": self.token_live,
               "head.weight": self.head_weight, "head.bias": self.head_bias}
        return {k: np.ascontiguousarray(v) for k, v in out.items() if v is not None}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays().values())


@dataclass
class Pack:
    tables: PackTables
    metadata: dict  # decoded, as stored (format, name, classes, preprocess, golden, ...)
    preprocess: object  # artifacts.preprocess.Preprocess, checked
    path: Path | None = None
    replayed_on: str | None = None  # the backbone artifact sha256 its golden set was last replayed on

    @property
    def name(self) -> str:
        return self.metadata["name"]

    @property
    def classes(self) -> list[str]:
        return list(self.metadata["classes"])


def write_pack(path: str | os.PathLike, tables: PackTables, metadata: dict) -> None:
    """Write a pack file at `path` (the caller stages it: artifacts/files.py)."""
    from safetensors.numpy import save_file

    meta = {"format": PACK_FORMAT, "version": PACK_VERSION, "fold": tables.fold, **metadata}
    save_file(tables.arrays(), str(path), metadata=encode_metadata(meta))


def _bad(source: str, why: str) -> ArtifactError:
    return ArtifactError(f"{source} is not a usable prompt pack ({why}); re-export it with "
                         "'vfpt-deploy export --format pack'")


def read_pack(path: str | os.PathLike) -> Pack:
    """A checked pack: format, names, classes, preprocessing, tensor names, dtypes, shapes and finiteness.
    Whether it fits a backbone is check_fits' question."""
    from safetensors import SafetensorError, safe_open

    from vfpt_deploy.artifacts.preprocess import Preprocess

    path, source = Path(path), str(path)
    if not regular_file(path):  # a FIFO, socket or device is said as such (never opened: a FIFO would block)
        raise ArtifactError(f"pack {path} {not_a_file(path, 'export one with ' + repr('vfpt-deploy export --format pack'))}")
    if path.stat().st_size > MAX_PACK_BYTES:
        raise _bad(source, f"it is over {MAX_PACK_BYTES // 2**30} GiB")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = decode_metadata(f.metadata() or {})
            names = set(f.keys())
            expected = {"kv.keys", "kv.values", "tokens", "tokens.write", "tokens.live", "head.weight", "head.bias"}
            if not names <= expected:
                raise _bad(source, f"unknown tensors {sorted(names - expected)[:3]}")
            arrays = {k: f.get_tensor(k) for k in names}
    except ArtifactError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _bad(source, f"not a readable safetensors file: {str(e).strip()[:100]}") from None
    if meta.get("format") != PACK_FORMAT:
        raise _bad(source, f"format {str(meta.get('format'))[:40]!r}, not {PACK_FORMAT!r}")
    if meta.get("version") != PACK_VERSION:
        raise ArtifactError(f"{source}: pack version {str(meta.get('version'))[:20]!r}; this vfpt-deploy reads version "
                            f"{PACK_VERSION}: upgrade vfpt-deploy, or re-export the pack")
    name = meta.get("name")
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        raise _bad(source, f"its name {str(name)[:80]!r} is not 1-64 letters, digits, '_', '.', '-'")
    classes = meta.get("classes")
    if (not isinstance(classes, list) or not 1 <= len(classes) <= MAX_CLASSES
            or not all(isinstance(c, str) for c in classes)):
        raise _bad(source, "classes must be a non-empty list of names")
    sha = meta.get("backbone_artifact_sha256")
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise _bad(source, "it records no backbone artifact sha256")
    try:
        pre = Preprocess.from_dict(meta.get("preprocess"))
    except (VFPTError, ValueError) as e:
        raise _bad(source, f"preprocess: {str(e)[:100]}") from None
    tables = _tables(arrays, meta, source, len(classes))
    return Pack(tables, meta, pre, path)


def _tables(a: dict[str, np.ndarray], meta: dict, source: str, classes: int) -> PackTables:
    for k, v in a.items():
        want = np.bool_ if k.startswith("tokens.") else np.float32
        if v.dtype != want:
            raise _bad(source, f"{k} is {v.dtype}, not {np.dtype(want)}")
        if want is np.float32 and not np.isfinite(v).all():
            raise _bad(source, f"{k} holds non-finite values")
    w, b = a.get("head.weight"), a.get("head.bias")
    if w is None or b is None or w.ndim != 2 or b.shape != (classes,) or w.shape[0] != classes:
        raise _bad(source, f"its head must be [{classes}, D] and [{classes}] for its {classes} classes")
    kv = [a.get("kv.keys"), a.get("kv.values")]
    if (kv[0] is None) != (kv[1] is None) or (kv[0] is not None and (kv[0].ndim != 4 or kv[0].shape != kv[1].shape)):
        raise _bad(source, "kv.keys and kv.values must both be [L_kv, heads, M, head_dim]")
    tok = [a.get(k) for k in ("tokens", "tokens.write", "tokens.live")]
    if any(t is None for t in tok) != all(t is None for t in tok) or (
            tok[0] is not None and (tok[0].ndim != 3 or tok[1].shape != tok[0].shape[:1] or tok[2].shape != tok[1].shape
                                    or tok[0].shape[2] != w.shape[1])):
        raise _bad(source, "tokens [L, M, D], tokens.write [L] and tokens.live [L] come together")
    fold = meta.get("fold")
    if fold not in ("kv", "tokens") or (fold == "tokens" and kv[0] is not None):
        raise _bad(source, f"fold {str(fold)[:20]!r}")
    return PackTables(fold, w, b, kv[0], kv[1], *tok)


# -- the backbone artifact's side ----------------------------------------------------------------------
def backbone_geometry(meta: dict, source: str) -> dict:
    """A backbone artifact's recorded geometry and limits (metadata pack_backbone), checked."""
    g = meta.get(BACKBONE_KEY)
    if not isinstance(g, dict):
        raise ArtifactError(f"{source} is not a backbone artifact for prompt packs (no vfpt.{BACKBONE_KEY} metadata); "
                            "export one with 'vfpt-deploy export --ckpt run.pt --format backbone'")
    ints = GEOMETRY_KEYS - {"pool", "image_size"}
    if (not GEOMETRY_KEYS <= set(g) or any(isinstance(g[k], bool) or not isinstance(g[k], int) or not 0 < g[k] <= 65536
                                           for k in ints) or g["pool"] not in ("token", "avg")
            or not isinstance(g["image_size"], list) or len(g["image_size"]) != 2):
        raise ArtifactError(f"{source}: vfpt.{BACKBONE_KEY} is malformed ({json.dumps(g)[:120]}); re-export the "
                            "backbone artifact")
    limits = g.get("limits") if isinstance(g.get("limits"), dict) else {}
    g = {**g, "limits": {k: limits.get(k, v) if isinstance(limits.get(k), int) else v for k, v in DEFAULT_LIMITS.items()}}
    return g


def computation_identity(backbone: dict, geometry: dict, opset: int, graph_sha256: str) -> dict:
    """What a backbone artifact computes, as a pack sees it: the frozen backbone (model name, keyword arguments,
    weights sha256), its geometry without the limits, the opset and the graph's sha256 without the metadata."""
    return {"backbone": {k: backbone.get(k) for k in ("name", "kwargs", "sha256")},
            "geometry": {k: v for k, v in geometry.items() if k != "limits"}, "opset": opset,
            "graph_sha256": graph_sha256}


def _identity_difference(mine: dict, theirs: dict) -> str:
    """The first thing two computation identities differ in, in words."""
    pairs = [("backbone weights sha256", lambda i: str((i.get("backbone") or {}).get("sha256"))[:12]),
             ("backbone model", lambda i: str((i.get("backbone") or {}).get("name"))[:40]),
             ("backbone keyword arguments", lambda i: json.dumps((i.get("backbone") or {}).get("kwargs"))[:60]),
             ("geometry", lambda i: json.dumps(i.get("geometry"))[:80]), ("opset", lambda i: str(i.get("opset"))),
             ("graph sha256", lambda i: str(i.get("graph_sha256"))[:12])]
    for what, get in pairs:
        if get(mine) != get(theirs):
            return f"{what} {get(mine)}, this one {get(theirs)}"
    return "identity recorded differently"


def fits_line(meta: dict) -> str:
    """Which backbone artifacts a pack (its metadata) runs on, in words (inspect)."""
    ident = meta.get(IDENTITY_KEY)
    if not isinstance(ident, dict):
        return (f"only the backbone artifact with sha256 {str(meta.get('backbone_artifact_sha256'))[:12]} (made before "
                "packs recorded a backbone identity)")
    bb = ident.get("backbone") if isinstance(ident.get("backbone"), dict) else {}
    return (f"any backbone artifact with its backbone identity ({str(bb.get('name'))[:40]}, weights sha256 "
            f"{str(bb.get('sha256'))[:12]}, graph sha256 {str(ident.get('graph_sha256'))[:12]}) within its limits; made "
            f"on sha256 {str(meta.get('backbone_artifact_sha256'))[:12]}")


def served_on_line(pack: Pack, backbone_sha256: str) -> str | None:
    """None when a pack runs on the very file it was made on; else one line saying so (serve's status)."""
    made = pack.metadata["backbone_artifact_sha256"]
    if made == backbone_sha256:
        return None
    return (f"made on backbone artifact sha256 {made[:12]}, served on {backbone_sha256[:12]} with the same backbone "
            "identity (its golden set replayed here)")


def check_fits(pack: Pack, geometry: dict, backbone_sha256: str, source: str) -> str:
    """One line when a pack cannot run on this backbone artifact: made for another one, or shaped for another
    backbone, or beyond the limits the artifact records. Returns how it fits: "file" (the very file it was made
    on) or "identity" (another file with the same computation identity, whose limits it is within: the caller
    replays its golden set there before serving it)."""
    t, g, lim = pack.tables, geometry, geometry["limits"]
    recorded = pack.metadata["backbone_artifact_sha256"]
    mine, theirs = pack.metadata.get(IDENTITY_KEY), g.get("identity")
    fits = "file" if recorded == backbone_sha256 else "identity"
    if fits == "identity" and isinstance(mine, dict) and isinstance(theirs, dict):
        if mine != theirs:
            raise ArtifactError(f"{source} was made for another backbone artifact (its {_identity_difference(mine, theirs)}"
                                "); load it with a backbone artifact exported from the backbone it was made on, or "
                                "re-export the pack with --backbone-artifact THIS.onnx")
    elif fits == "identity":
        raise ArtifactError(f"{source} was made for another backbone artifact (sha256 {recorded[:12]}, this one is "
                            f"{backbone_sha256[:12]}); load it with the backbone it was exported for, or re-export "
                            "the pack with --backbone-artifact THIS.onnx")
    shapes = []
    if t.keys is not None:
        shapes.append(("kv.keys", t.keys.shape, (g["kv_layers"], g["heads"], t.kv_prompts, g["head_dim"])))
    if t.tokens is not None:
        shapes.append(("tokens", t.tokens.shape, (g["depth"], t.token_prompts, g["dim"])))
    shapes.append(("head.weight", t.head_weight.shape, (t.num_classes, g["dim"])))
    for what, got, want in shapes:
        if tuple(got) != tuple(want):
            raise ArtifactError(f"{source}: {what} is {list(got)}, this backbone takes {list(want)}; re-export the pack "
                                "for this backbone")
    if tuple(pack.preprocess.size) != tuple(g["image_size"]):
        raise ArtifactError(f"{source}: its preprocessing makes {list(pack.preprocess.size)} images, the "
                            f"backbone takes {g['image_size']}; re-export the pack")
    for what, n, key in (("prompts", max(t.kv_prompts, t.token_prompts), "prompts"),
                         ("classes", t.num_classes, "classes")):
        if n > lim[key]:
            raise UsageError(f"{source} has {n} {what}; this backbone artifact takes at most {lim[key]} (re-export the "
                             f"backbone with --max-{what} {n} or more)")
    return fits


def assemble(tables: list[PackTables], geometry: dict) -> dict[str, np.ndarray]:
    """The backbone artifact's table inputs for these tasks (task index = position), padded to the widest and
    masked: a padded key or slot has -inf bias, a padded class weight 0 and bias -inf."""
    g, n = geometry, len(tables)
    if n == 0:
        raise UsageError("no prompt packs are loaded; add one")
    m = max(t.kv_prompts for t in tables)
    s = max(t.token_prompts for t in tables)
    c = max(t.num_classes for t in tables)
    keys = np.zeros((n, g["kv_layers"], g["heads"], m, g["head_dim"]), np.float32)
    values = np.zeros_like(keys)
    kv_bias = np.full((n, g["kv_layers"], m), -np.inf, np.float32)
    tokens = np.zeros((n, g["depth"], s, g["dim"]), np.float32)
    write = np.zeros((n, g["depth"]), bool)
    token_bias = np.full((n, g["depth"], s), -np.inf, np.float32)
    head_w = np.zeros((n, g["dim"], c), np.float32)
    head_b = np.full((n, c), -np.inf, np.float32)
    for i, t in enumerate(tables):
        if t.keys is not None:
            k = t.kv_prompts
            keys[i, :, :, :k], values[i, :, :, :k] = t.keys, t.values
            kv_bias[i, :, :k] = 0.0
        if t.tokens is not None:
            k = t.token_prompts
            tokens[i, :, :k] = t.tokens
            write[i] = t.token_write
            token_bias[i, t.token_live, :k] = 0.0
        head_w[i, :, :t.num_classes] = t.head_weight.T
        head_b[i, :t.num_classes] = t.head_bias
    out = {"prompt_keys": keys, "prompt_values": values, "kv_bias": kv_bias, "prompt_tokens": tokens,
           "token_write": write, "token_bias": token_bias, "head_weight": head_w, "head_bias": head_b}
    assert list(out) == list(TABLE_INPUTS)
    return out


def table_dims(arrays: dict[str, np.ndarray]) -> dict[str, int]:
    """The symbolic dimensions (tasks, prompts, slots, classes) of assembled tables (assemble's output)."""
    return {"tasks": arrays["head_bias"].shape[0], "prompts": arrays["prompt_keys"].shape[3],
            "slots": arrays["prompt_tokens"].shape[2], "classes": arrays["head_bias"].shape[1]}


RANGE_FIX = {"tasks": "unload a pack, or rebuild the engine with a larger --max-tasks",
             "prompts": "drop the packs with more prompts, or rebuild the backbone with a larger --max-prompts",
             "slots": "drop the packs with more prompt tokens, or rebuild the backbone with a larger --max-prompts",
             "classes": "drop the packs with more classes, or rebuild the backbone with a larger --max-classes",
             "batch": "send smaller batches, or rebuild the engine with a larger --max-batch"}


def check_engine_ranges(ranges: dict, dims: dict[str, int], source: str) -> None:
    """One line when tables (table_dims) or a batch fall outside a backbone engine's profile (its sidecar's
    profile.ranges {dim: [min, opt, max]}, exporters/tensorrt_pack.py); TensorRT would fail on them later."""
    for dim, n in dims.items():
        lo, _, hi = ranges[dim]
        if not lo <= n <= hi:
            what = {"slots": "prompt-token slots", "batch": "images in a batch"}.get(dim, dim)
            raise UsageError(f"{source}: {n} {what} is outside this TensorRT engine's profile ({lo}..{hi}); "
                             f"{RANGE_FIX[dim]}")
