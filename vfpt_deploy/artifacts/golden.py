"""Golden sets: a few inputs, the unfolded PyTorch model's float32 logits for them, the gate of the
artifact's precision and the machine the reference ran on, carried inside every artifact so that it can be
checked where it runs, without PyTorch (`verify ARTIFACT`, the serving self-check, `predict --self-check`).

Where: ONNX metadata `vfpt.golden` (so the file's sha256 covers it); an engine's sidecar metadata (copied
from the ONNX it was built from); a multi-task artifact holds one golden set whose rows name their task.
The record (JSON):

    {"format": "vfpt-deploy.golden", "version": 1, "precision": "fp32", "tolerances": {Tolerances fields},
     "sets": [{"what": "...", "start": 0, "stop": 2, "random": true, "task": null}, ...],
     "reference": {"model": "unfolded PyTorch, float32", "hardware": {...}},
     "sha256": "<of the payload bytes>", "payload": "<base64 of an .npz>"}

The .npz (no pickles) holds `x` float16 [N, 3, H, W] (the inputs, stored at half size: the reference was
computed on exactly these values), `logits` float32 [N, C], `labels` int64 [N] (-1: none) and, for a
multi-task artifact, `task` int64 [N]. Reading is bounded: the payload's size, the members' unpacked sizes,
dtypes, shapes, finiteness and the sha256 are checked before anything is used; a crafted record is refused
in one line. Torch-free.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import zipfile
from dataclasses import asdict, dataclass, field

import numpy as np

from vfpt_deploy.artifacts.compare import Tolerances
from vfpt_deploy.errors import ArtifactError, VFPTError

FORMAT = "vfpt-deploy.golden"
VERSION = 1
KEY = "golden"  # the metadata key (vfpt.golden in an ONNX file)
MAX_ROWS = 256
MAX_PAYLOAD = 96 * 2**20  # base64 characters
MAX_UNPACKED = 256 * 2**20  # bytes, all members together
MEMBERS = {"x": np.float16, "logits": np.float32, "labels": np.int64, "task": np.int64}
SET_KEYS = {"what", "start", "stop", "random", "task"}
TOLERANCE_KEYS = {f for f in Tolerances.__dataclass_fields__}


@dataclass
class GoldenSet:
    """Inputs (float32 views of the stored float16 values), reference logits, labels (-1: none), task
    indices (None: single-task), the named row ranges, and the gate."""

    x: np.ndarray
    logits: np.ndarray
    labels: np.ndarray
    task: np.ndarray | None
    sets: list[dict]
    precision: str
    tolerances: Tolerances
    reference: dict = field(default_factory=dict)
    sha256: str = ""

    @property
    def rows(self) -> int:
        return len(self.x)


def encode(g: GoldenSet) -> dict:
    """The JSON record of a golden set (sha256 computed here)."""
    arrays = {"x": np.asarray(g.x, np.float16), "logits": np.asarray(g.logits, np.float32),
              "labels": np.asarray(g.labels, np.int64)}
    if g.task is not None:
        arrays["task"] = np.asarray(g.task, np.int64)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    payload = buf.getvalue()
    return {"format": FORMAT, "version": VERSION, "precision": g.precision, "tolerances": asdict(g.tolerances),
            "sets": g.sets, "reference": g.reference, "sha256": hashlib.sha256(payload).hexdigest(),
            "payload": base64.b64encode(payload).decode("ascii")}


def _bad(source: str, why: str) -> ArtifactError:
    return ArtifactError(f"{source}: its golden set is unusable ({why}); re-export the artifact")


def decode(record, source: str, *, image_size: tuple[int, int], width: int, num_tasks: int = 0) -> GoldenSet:
    """A checked GoldenSet from a metadata record. image_size: the model's input H, W; width: its logits'
    width; num_tasks: a multi-task artifact's task count (0: single-task)."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise _bad(source, f"not a {FORMAT} record")
    if record.get("version") != VERSION:
        raise ArtifactError(f"{source}: golden set version {str(record.get('version'))[:20]!r}; this vfpt-deploy reads "
                            f"version {VERSION}: upgrade vfpt-deploy, or re-export the artifact")
    payload = record.get("payload")
    if not isinstance(payload, str) or not 0 < len(payload) <= MAX_PAYLOAD:
        raise _bad(source, f"the payload must be base64 text of at most {MAX_PAYLOAD // 2**20} MiB")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(source, "the payload is not base64") from None
    if hashlib.sha256(raw).hexdigest() != record.get("sha256"):
        raise _bad(source, "its sha256 does not match its data: it was altered")
    arrays = _read_npz(raw, source)
    g = GoldenSet(arrays["x"].astype(np.float32), arrays["logits"], arrays["labels"], arrays.get("task"),
                  _sets(record.get("sets"), source), _precision(record.get("precision"), source),
                  _tolerances(record.get("tolerances"), source),
                  record.get("reference") if isinstance(record.get("reference"), dict) else {}, record["sha256"])
    _check_shapes(g, source, image_size, width, num_tasks)
    return g


def _read_npz(raw: bytes, source: str) -> dict[str, np.ndarray]:
    """The .npz's members, each unpacked only after its declared size was checked (a zip bomb is refused)."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            infos = z.infolist()
            names = [i.filename.removesuffix(".npy") for i in infos]
            if len(infos) > len(MEMBERS) or not set(names) <= set(MEMBERS) or len(set(names)) != len(names):
                raise _bad(source, f"the payload holds {sorted(names)[:6]}, not x, logits, labels[, task]")
            if sum(i.file_size for i in infos) > MAX_UNPACKED:
                raise _bad(source, f"the payload unpacks to over {MAX_UNPACKED // 2**20} MiB")
            out = {}
            for info, name in zip(infos, names):
                with z.open(info) as f:
                    a = np.lib.format.read_array(f, allow_pickle=False)
                if a.dtype != MEMBERS[name]:
                    raise _bad(source, f"{name} is {a.dtype}, not {np.dtype(MEMBERS[name])}")
                out[name] = a
    except VFPTError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError, RuntimeError) as e:
        raise _bad(source, f"the payload is not a readable .npz: {str(e)[:80]}") from None
    missing = sorted({"x", "logits", "labels"} - set(out))
    if missing:
        raise _bad(source, f"the payload lacks {', '.join(missing)}")
    return out


def _sets(sets, source: str) -> list[dict]:
    if not isinstance(sets, list) or not 1 <= len(sets) <= MAX_ROWS:
        raise _bad(source, "sets must be a non-empty list")
    for s in sets:
        if (not isinstance(s, dict) or not set(s) <= SET_KEYS or not isinstance(s.get("what"), str)
                or len(s["what"]) > 300 or not isinstance(s.get("random"), bool)
                or any(isinstance(s.get(k), bool) or not isinstance(s.get(k), int) for k in ("start", "stop"))
                or (s.get("task") is not None and (isinstance(s["task"], bool) or not isinstance(s["task"], int)))):
            raise _bad(source, f"a set must be {{what, start, stop, random, task}}, got {str(s)[:80]}")
    return sets


def _precision(p, source: str) -> str:
    if p not in ("fp32", "fp16", "int8"):
        raise _bad(source, f"precision {str(p)[:20]!r}")
    return p


def _tolerances(t, source: str) -> Tolerances:
    if not isinstance(t, dict) or not set(t) <= TOLERANCE_KEYS:
        raise _bad(source, "tolerances must be an object of Tolerances fields")
    try:
        return Tolerances(**t)
    except (VFPTError, TypeError) as e:
        raise _bad(source, f"tolerances: {e}") from None


def _check_shapes(g: GoldenSet, source: str, image_size: tuple[int, int], width: int, num_tasks: int) -> None:
    n = g.rows
    if not 1 <= n <= MAX_ROWS or g.x.shape != (n, 3, *image_size):
        raise _bad(source, f"its inputs are {list(g.x.shape)}, the model takes [N<={MAX_ROWS}, 3, {image_size[0]}, "
                           f"{image_size[1]}]")
    if g.logits.shape != (n, width) or g.labels.shape != (n,):
        raise _bad(source, f"its logits are {list(g.logits.shape)}, the model gives [{n}, {width}]")
    if not (np.isfinite(g.x).all() and np.isfinite(g.logits).all()):
        raise _bad(source, "it holds non-finite values")
    if (g.task is None) != (num_tasks == 0):
        raise _bad(source, "task indices must be present exactly for a multi-task artifact")
    if g.task is not None and (g.task.shape != (n,) or g.task.min() < 0 or g.task.max() >= num_tasks):
        raise _bad(source, f"its task indices must be [{n}] in 0..{num_tasks - 1}")
    covered = np.zeros(n, bool)
    for s in g.sets:
        if not 0 <= s["start"] < s["stop"] <= n or covered[s["start"]:s["stop"]].any():
            raise _bad(source, f"set {s['what'][:40]!r} has rows {s['start']}..{s['stop']} of {n}, or overlaps another")
        covered[s["start"]:s["stop"]] = True
        t = s.get("task")
        if g.task is not None and (t is None or not (g.task[s["start"]:s["stop"]] == t).all()):
            raise _bad(source, f"set {s['what'][:40]!r} names task {t}, its rows another")
    if not covered.all():
        raise _bad(source, "some rows belong to no set")


def read(meta: dict, source: str, *, image_size: tuple[int, int], width: int) -> GoldenSet | None:
    """The golden set of an artifact's (decoded) metadata, checked; None when it has none (exported before
    golden sets existed)."""
    if KEY not in meta:
        return None
    return decode(meta[KEY], source, image_size=image_size, width=width, num_tasks=len(meta.get("tasks") or []))


def summary(meta: dict) -> dict | None:
    """What `inspect` shows of a golden set without decoding its payload: rows per set, precision, gate,
    where the reference ran."""
    record = meta.get(KEY)
    if not isinstance(record, dict):
        return None
    sets = record.get("sets") if isinstance(record.get("sets"), list) else []
    hw = (record.get("reference") or {}).get("hardware") if isinstance(record.get("reference"), dict) else None
    cpu = hw.get("cpu") if isinstance(hw, dict) and isinstance(hw.get("cpu"), dict) else {}
    return {"sets": [str(s.get("what"))[:120] for s in sets if isinstance(s, dict)],
            "precision": str(record.get("precision"))[:10], "sha256": str(record.get("sha256"))[:64],
            "bytes": len(record.get("payload") or "") * 3 // 4,
            "reference_cpu": str(cpu.get("model", "?"))[:120], "reference_isa": [str(f)[:20] for f in
                                                                                 (cpu.get("isa") or [])[:12]]}
