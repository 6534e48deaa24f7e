"""Read a run.pt without PyTorch: its dict, with every tensor as a NumPy array. What `inspect run.pt` uses, so
showing a 1 MB checkpoint does not import torch (650 MB, seconds) and timm, nor build a model.

A run.pt is torch.save's zip: data.pkl (a pickle of plain dicts, lists, strings and numbers, whose tensors
are torch._utils._rebuild_tensor_v2 calls on storages kept as data/N entries) and a byteorder entry. The
pickle is read by an Unpickler that knows exactly three globals (_rebuild_tensor_v2, a typed storage class
such as torch.FloatStorage, collections.OrderedDict) and nothing else: no code runs. Every storage must be
an uncompressed zip entry of exactly the bytes its tensors need, so nothing outsized is allocated.

read_run_arrays() returns None for anything else (another torch format, an unknown global, a compressed or
short entry, a big-endian file): the caller then reads the file with torch, whose loader gives the one-line
errors for damaged and crafted files. Returning None is never an error here.
"""
from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np

from vfpt_deploy.errors import InputError, VFPTError

# typed storage class -> (numpy dtype, torch's dtype name, as state_sha256 hashes it)
STORAGES = {
    "FloatStorage": (np.float32, "torch.float32"),
    "DoubleStorage": (np.float64, "torch.float64"),
    "HalfStorage": (np.float16, "torch.float16"),
    "BFloat16Storage": (np.uint16, "torch.bfloat16"),  # raw bits; to_float32() widens them
    "LongStorage": (np.int64, "torch.int64"),
    "IntStorage": (np.int32, "torch.int32"),
    "ShortStorage": (np.int16, "torch.int16"),
    "CharStorage": (np.int8, "torch.int8"),
    "ByteStorage": (np.uint8, "torch.uint8"),
    "BoolStorage": (np.bool_, "torch.bool"),
}
MAX_PICKLE_BYTES = 64 * 2**20  # data.pkl of a run.pt is a few kB (metadata and tensor headers)


class _Unusual(Exception):
    """Not a file this reader vouches for: read it with torch instead."""


class Array(np.ndarray):
    """A tensor read from a run.pt: a NumPy array that remembers torch's dtype name (bfloat16 is kept as
    its raw uint16 bits)."""

    torch_dtype: str = ""


class _StorageType:
    def __init__(self, name: str) -> None:
        self.name = name


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    data, torch_dtype = storage
    if not (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) and all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride))):
        raise _Unusual("tensor header")
    count = int(np.prod(size, dtype=np.int64)) if size else 1
    if count > data.size - offset:  # more values than the storage holds (a stride-0 claim of a huge tensor)
        raise _Unusual("tensor larger than its storage")
    if count == 0:
        arr = np.empty(size, dtype=data.dtype)
    else:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= data.size:
            raise _Unusual("tensor outside its storage")
        arr = np.lib.stride_tricks.as_strided(data[offset:], shape=size,
                                              strides=tuple(s * data.itemsize for s in stride)).copy()
    out = arr.view(Array)
    out.torch_dtype = torch_dtype
    return out


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in STORAGES:
            return _StorageType(name)
        raise _Unusual(f"global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise _Unusual("storage id")
        kind, key, numel = pid[1].name, pid[2], pid[4]
        if key not in self.storages:
            dtype, torch_dtype = STORAGES[kind]
            try:
                info = self.archive.getinfo(f"{self.prefix}data/{key}")
            except KeyError:
                raise _Unusual("missing storage") from None
            if info.compress_type != zipfile.ZIP_STORED or info.file_size != numel * np.dtype(dtype).itemsize:
                raise _Unusual("storage entry size")
            self.storages[key] = (np.frombuffer(self.archive.read(info), dtype=dtype), torch_dtype)
        return self.storages[key]


def read_run_arrays(path: str | os.PathLike) -> dict | None:
    """The run.pt's top-level dict with tensors as Array (NumPy), or None when the file is anything but a
    plain little-endian torch zip of known tensors (the caller reads it with torch then)."""
    try:
        with zipfile.ZipFile(Path(path)) as z:
            names = z.namelist()
            pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkl) != 1:
                return None
            prefix = pkl[0][: -len("data.pkl")]
            order = f"{prefix}byteorder"
            if order in names and z.read(order) != b"little":
                return None
            info = z.getinfo(pkl[0])
            if info.file_size > MAX_PICKLE_BYTES:
                return None
            obj = _Unpickler(z.read(info), z, prefix).load()
    except (_Unusual, zipfile.BadZipFile, pickle.UnpicklingError, OSError, EOFError, ValueError, TypeError,
            KeyError, IndexError, AttributeError, RecursionError, MemoryError, NotImplementedError):
        return None
    return obj if isinstance(obj, dict) else None


def to_float32(a: Array) -> np.ndarray:
    """The values as float32 (bfloat16's raw bits widened)."""
    if a.torch_dtype == "torch.bfloat16":
        return (np.asarray(a, dtype=np.uint32) << 16).view(np.float32)
    return np.asarray(a, dtype=np.float32)


def is_float(a) -> bool:
    return isinstance(a, Array) and a.torch_dtype in ("torch.float32", "torch.float64", "torch.float16",
                                                      "torch.bfloat16")


def arrays_sha256(state: dict) -> str:
    """models.backbone.state_sha256 of the same tensors, torch-free: names, torch dtype names, shapes and raw
    little-endian bytes, in sorted key order."""
    h = hashlib.sha256()
    for k in sorted(state):
        a = state[k]
        h.update(f"{k}|{a.torch_dtype}|{tuple(a.shape)}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# -- inspect's view of a run.pt, torch-free ----------------------------------------------------------------
RUN_FORMAT, RUN_VERSION = "vfpt-deploy.run", 1  # artifacts.checkpoint.FORMAT / VERSION (a test keeps them equal)
_REQUIRED = ("config", "backbone", "classes", "preprocess", "tuned")
_HEX = set("0123456789abcdef")


def _tensors(d) -> dict | None:
    """A mapping of names to finite floating-point arrays, else None."""
    if not isinstance(d, dict) or not all(isinstance(k, str) for k in d):
        return None
    if not all(is_float(a) and bool(np.isfinite(to_float32(a)).all()) for a in d.values()):
        return None
    return d


def _json_like(v, depth: int = 0) -> bool:
    if v is None or isinstance(v, (bool, int, str)):
        return not isinstance(v, str) or len(v) <= 1000
    if isinstance(v, float):
        return bool(np.isfinite(v))
    if isinstance(v, (list, tuple)) and depth < 3 and len(v) <= 64:
        return all(_json_like(x, depth + 1) for x in v)
    if isinstance(v, dict) and depth < 3 and len(v) <= 64:
        return all(isinstance(k, str) and _json_like(x, depth + 1) for k, x in v.items())
    return False


def _shapes(d: dict) -> dict:
    return {k: tuple(int(n) for n in a.shape) for k, a in d.items()}


def damaged(path, what: str) -> InputError:
    """The one-line error for a run.pt field or size a load refuses (artifacts.checkpoint uses it too)."""
    return InputError(f"{path}: {what}; the checkpoint is damaged or was not written by vfpt-deploy")


def read_run_facts(path: str | os.PathLike) -> dict | None:
    """What inspect shows of a run.pt that carries its backbone, read without torch or timm: every field
    type- and range-checked, every tensor floating point and finite, the backbone's hash recomputed (the
    bytes models.backbone.state_sha256 hashes), parameter counts from the stored tensors. Returns classes,
    preprocess (a Preprocess), config (a VFPTConfig), backbone (name, kwargs, source, sha256, stored_sha256),
    tuned and frozen (parameter counts) and meta; None for anything else (a prompts-only run, any field or
    tensor a load would refuse, a file this reader does not vouch for): inspect then reads the file with
    torch, which says in one line what is wrong.

    Once everything else has passed, the family's torch-free size checks run as a load runs them
    (models/options.py check_backbone_kwargs, then the family's check_stored on the NumPy arrays) and raise
    the load's one-line InputError: the backbone options in range, and depth, width and tokens against the
    stored tensors. Then what a load checks on the meta-device skeleton -- the timm name, every stored and
    tuned tensor's name and shape, the preprocess size -- against the family's torch-free template
    (FamilySizes.expected: a ViT of a known timm name and options); a name, an option or a family it does
    not know, or any difference, returns None: the torch path builds the skeleton and refuses in one line."""
    from vfpt_deploy.artifacts.preprocess import Preprocess
    from vfpt_deploy.models.config import VFPTConfig
    from vfpt_deploy.models.families import family_of_name
    from vfpt_deploy.models.options import check_backbone_kwargs

    obj = read_run_arrays(path)
    if obj is None or obj.get("format") != RUN_FORMAT or type(obj.get("version")) is not int \
            or obj["version"] != RUN_VERSION or any(k not in obj for k in _REQUIRED):
        return None
    bb, classes, meta = obj["backbone"], obj["classes"], obj.get("meta", {})
    if not isinstance(bb, dict) or bb.get("included") is not True or "backbone_state" not in obj:
        return None  # prompts-only: the frozen count needs the skeleton (the torch path)
    name, source, sha, kwargs = bb.get("name"), bb.get("source", ""), bb.get("sha256", ""), bb.get("kwargs", {})
    if not (isinstance(name, str) and 0 < len(name) <= 200 and isinstance(source, str) and len(source) <= 4096
            and isinstance(sha, str) and (sha == "" or (len(sha) == 64 and set(sha) <= _HEX))
            and isinstance(kwargs, dict) and len(kwargs) <= 64 and _json_like(kwargs)):
        return None  # (plain values only: a refusal below then shows them as the torch path does)
    if not (isinstance(classes, list) and 1 <= len(classes) <= 100_000
            and all(isinstance(c, str) and 0 < len(c) <= 1000 for c in classes)):
        return None
    if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta) or any(
            k in meta and not isinstance(meta[k], t) for k, t in
            (("tool_version", str), ("created", str), ("train", dict), ("import", dict))):
        return None
    tuned, state = _tensors(obj["tuned"]), _tensors(obj["backbone_state"])
    if tuned is None or state is None:
        return None
    head = tuned.get("head.weight")
    if head is not None and (head.ndim != 2 or head.shape[0] != len(classes)):
        return None
    try:
        config = VFPTConfig.from_dict(obj["config"])
        preprocess = Preprocess.from_dict(obj["preprocess"])
    except (VFPTError, TypeError, ValueError, KeyError, AttributeError):
        return None
    # Everything a load parses before the backbone options is fine (or it was left to torch above), so a
    # refusal here is the one the load gives first: the same line, without torch.
    sizes = family_of_name(name).sizes()
    try:
        check_backbone_kwargs(kwargs, name)
        sizes.check_stored(kwargs, config, tuned, state)
    except VFPTError as e:
        raise damaged(Path(path), str(e)) from None
    # What the load checks next, on the meta-device skeleton (the name, the options timm takes, every tensor
    # name and shape, the image size), torch-free where the family knows the architecture; anything it
    # does not know, or any difference, is left to the torch path, which refuses it in its own words.
    want = sizes.expected(name, kwargs, config, len(classes)) if sizes.expected else None
    if want is None or not (_shapes(state) == want[0] and _shapes(tuned) == want[1]
                            and tuple(preprocess.size) == tuple(want[2])):
        return None
    return {"classes": classes, "preprocess": preprocess, "config": config, "meta": meta,
            "backbone": {"name": name, "kwargs": kwargs, "source": source, "sha256": sha,
                         "stored_sha256": arrays_sha256(state)},
            "tuned": sum(int(a.size) for a in tuned.values()), "frozen": sum(int(a.size) for a in state.values())}
