"""Prompt packs at run time (torch-free): one onnxruntime session of a backbone artifact serves every pack it
holds; packs are added and removed while it runs, without a new session (docs/serving.md, "Prompt packs").

    with PackSession("vit.backbone.onnx", ["cpu"]) as s:
        s.add("cars.pack.safetensors"); s.add_many(["birds.pack.safetensors", "flat.pack.safetensors"])
        logits = s.infer(batch, ["cars", "birds", "cars"])   # [3, widest classes], -inf past a task's own
        s.remove("birds")

Thread safety: add / remove build new tables and swap them in under a lock; `infer` takes the current tables
once (an immutable snapshot: its names, padded arrays and packs), resolves the batch's task names against
that snapshot and runs on it, so a request in flight while a pack is added or removed is answered with the
tables it started with, and never indexes another task's rows. onnxruntime's `run` may be called from several
threads at once on one session. A name unknown to the snapshot is a one-line UsageError.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vfpt_deploy.artifacts.files import file_sha256
from vfpt_deploy.artifacts.pack import TABLE_INPUTS, Pack, assemble, backbone_geometry, check_fits, read_pack
from vfpt_deploy.artifacts.schema import INPUT_NAME, OUTPUT_NAME, TASK_INPUT, decode_metadata, read_graph
from vfpt_deploy.errors import ArtifactError, RuntimeSetupError, UsageError
from vfpt_deploy.extras import import_onnxruntime

from .onnx_runner import _QUIET_SEVERITY, RUN_FAILURE_FIX, make_session, ort_cause, refuse_control_flow
from .predictor import Predictor


@dataclass(frozen=True)
class Tables:
    """What one inference runs with: task names in index order, their packs, and the padded table inputs."""

    names: tuple[str, ...]
    packs: tuple[Pack, ...]
    arrays: dict

    def index(self, tasks) -> np.ndarray:
        """int64 task indices of one name per sample (or one name for all `count`): one line for a wrong one."""
        where = {n: i for i, n in enumerate(self.names)}
        bad = next((t for t in tasks if t not in where), None)
        if bad is not None:
            held = ", ".join(self.names) or "none"
            raise UsageError(f"no prompt pack named {str(bad)[:80]!r} is loaded (loaded: {held})")
        return np.array([where[t] for t in tasks], dtype=np.int64)


def return_freed_memory() -> bool:
    """Have glibc give every freed block of 128 KiB or more back to the system (a fixed M_MMAP_THRESHOLD, which
    also stops glibc raising it): by default, once a large block is freed (the graph read, onnxruntime's
    transient buffers while it builds the session) glibc raises its threshold and later large blocks come from a
    heap that never shrinks, so the session's load peak stayed resident under the tables and the arena (ViT-B/16
    with 16 packs: 932 MB peak, 747 MB with this; docs/serving.md, "Prompt packs"). Process-wide; the cost is an
    mmap per large temporary. False where there is no glibc (the default then stays)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, 128 * 1024))  # M_MMAP_THRESHOLD, glibc's default value
    except (OSError, AttributeError):
        return False


class PackSession:
    """A backbone artifact on one InferenceSession and the packs it serves (see the module docstring)."""

    def __init__(self, backbone: str | os.PathLike, providers: list[str] | None = None, *, threads: int | None = None,
                 optimization: str = "all", allow_fallback: bool = False,
                 provider_options: dict[str, dict] | None = None) -> None:
        self.path = Path(backbone)
        return_freed_memory()
        facts = read_graph(self.path, strict=False) if self.path.is_file() else None
        if facts is not None:
            refuse_control_flow(self.path, facts.ops)
        self.graph_precision = facts.precision if facts is not None else None
        self.session = make_session(self.path, providers, threads=threads, optimization=optimization,
                                    provider_options=provider_options, allow_fallback=allow_fallback)
        self.metadata = decode_metadata(self.session.get_modelmeta().custom_metadata_map)
        self.geometry = backbone_geometry(self.metadata, str(self.path))
        want = [INPUT_NAME, TASK_INPUT, *TABLE_INPUTS]
        got = [i.name for i in self.session.get_inputs()]
        if got != want or [o.name for o in self.session.get_outputs()] != [OUTPUT_NAME]:
            self.close()
            raise ArtifactError(f"{self.path} takes inputs {got[:12]}, not a backbone artifact's {want}; re-export it "
                                "with 'vfpt-deploy export --format backbone'")
        self.sha256 = file_sha256(self.path)
        self._quiet_run = import_onnxruntime().RunOptions()
        self._quiet_run.log_severity_level = _QUIET_SEVERITY
        self._lock = threading.Lock()  # add / remove: one at a time
        self._tables = Tables((), (), {})

    # -- the packs ---------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._tables.names)

    def pack(self, name: str) -> Pack:
        tables = self._tables
        return tables.packs[int(tables.index([name])[0])]

    def add(self, pack: Pack | str | os.PathLike, *, replace: bool = False) -> Pack:
        """Load a pack (a path, or a read Pack) and serve it from the next inference on. Refused in one line:
        a pack for another backbone, beyond the artifact's limits, or (unless replace) a name already loaded
        (names are compared ignoring case, as serving model names are)."""
        return self.add_many([pack], replace=replace)[0]

    def add_many(self, packs: list[Pack | str | os.PathLike], *, replace: bool = False) -> list[Pack]:
        """add() for several packs with one table rebuild (a server starting on a folder of packs): all are
        loaded, or none (the first refusal is raised)."""
        packs = [p if isinstance(p, Pack) else read_pack(p) for p in packs]
        fits = [check_fits(p, self.geometry, self.sha256, str(p.path or p.name)) for p in packs]
        with self._lock:
            old = self._tables
            new = {p.name.lower(): p for p in packs}
            if len(new) < len(packs):
                raise UsageError("two of the packs given have the same name (ignoring case); rename one")
            same = {i for i, n in enumerate(old.names) if n.lower() in new}
            if same and not replace:
                raise UsageError(f"a prompt pack named {old.names[min(same)]!r} is already loaded; remove it first, or "
                                 "give the new pack another name")
            kept = [p for i, p in enumerate(old.packs) if i not in same] + packs
            if len(kept) > self.geometry["limits"]["tasks"]:
                raise UsageError(f"{len(kept)} packs; this backbone artifact takes at most "
                                 f"{self.geometry['limits']['tasks']}: remove one first")
            tables = self._build(kept)
            for p, how in zip(packs, fits):  # made on another file of the same identity: its golden set first
                if how == "identity" and p.replayed_on != self.sha256:
                    replay_golden(self, p, tables, str(p.path or p.name))
            self._tables = tables
        return packs

    def remove(self, name: str) -> Pack:
        """Stop serving a pack; requests already running finish with the tables they started with."""
        with self._lock:
            old = self._tables
            i = int(old.index([name])[0])
            packs = [p for j, p in enumerate(old.packs) if j != i]
            self._tables = self._build(packs) if packs else Tables((), (), {})
        return old.packs[i]

    def _build(self, packs: list[Pack]) -> Tables:
        """New padded tables; each pack's own arrays then become views into them, so a pack's tables are held
        once (the previous tables go when no request in flight holds them)."""
        arrays = assemble([p.tables for p in packs], self.geometry)
        for a in arrays.values():
            a.setflags(write=False)
        for i, p in enumerate(packs):
            t = p.tables
            if t.keys is not None:
                t.keys = arrays["prompt_keys"][i, :, :, :t.kv_prompts]
                t.values = arrays["prompt_values"][i, :, :, :t.kv_prompts]
            if t.tokens is not None:
                t.tokens = arrays["prompt_tokens"][i, :, :t.token_prompts]
            t.head_weight = arrays["head_weight"][i, :, :t.num_classes].T
        return Tables(tuple(p.name for p in packs), tuple(packs), arrays)

    # -- inference ---------------------------------------------------------------------------------------
    def infer(self, batch: np.ndarray, tasks: str | list[str], tables: Tables | None = None) -> np.ndarray:
        """float32 [B, 3, H, W] and one pack name per sample (or one for all) -> logits [B, C] where C is the
        widest loaded pack's class count; a sample's logits past its own pack's classes are -inf."""
        tables = tables or self._tables
        tasks = [tasks] * len(batch) if isinstance(tasks, str) else list(tasks)
        if len(tasks) != len(batch):
            raise UsageError(f"{len(tasks)} task names for {len(batch)} inputs; give one, or one per input")
        ids = tables.index(tasks)
        if not len(batch):
            return np.zeros((0, max([p.tables.num_classes for p in tables.packs] or [0])), np.float32)
        return self.run(np.ascontiguousarray(batch, dtype=np.float32), ids, tables)

    def run(self, batch: np.ndarray, ids: np.ndarray, tables: Tables) -> np.ndarray:
        """The session run itself, on task indices into `tables` (checked by the caller)."""
        if self.session is None:
            raise RuntimeSetupError(f"the pack session of {self.path} is closed; open a new one")
        feed = {INPUT_NAME: batch, TASK_INPUT: ids, **tables.arrays}
        try:
            return self.session.run(None, feed, self._quiet_run)[0]
        except Exception as e:  # onnxruntime's own Fail / RuntimeException types
            raise ArtifactError(f"onnxruntime failed to run {self.path} on a batch of {len(batch)}: {ort_cause(e)}; "
                                f"{RUN_FAILURE_FIX}") from None

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers()) if self.session is not None else []

    def close(self) -> None:
        self.session = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PackPredictor(Predictor):
    """One pack on a PackSession behind the single-task Predictor interface (predict, verify and the golden
    replay use it as they use an ONNX artifact): its classes, preprocessing and golden set."""

    def __init__(self, session: PackSession, name: str | None = None, *, owns_session: bool = False,
                 pack: Pack | None = None, tables: Tables | None = None) -> None:
        """The pack `name` of the session, or `pack` run on `tables` (staged ones, not yet served)."""
        self.packs, self.owns_session, self.staged = session, owns_session, tables
        pack = pack if pack is not None else session.pack(name)
        self.name, self.pack_path = pack.name, pack.path
        self.metadata = {k: v for k, v in pack.metadata.items() if k not in ("tasks",)}
        self.preprocess = pack.preprocess
        self.graph_precision = session.graph_precision
        self.notes = ()

    @property
    def providers(self) -> list[str]:
        return self.packs.providers

    def infer(self, batch: np.ndarray, task_ids: np.ndarray | None = None) -> np.ndarray:
        self.check_task_ids(batch, task_ids)
        return self.packs.infer(batch, self.name, tables=self.staged)[:, :len(self.classes)]

    def close(self) -> None:
        if self.owns_session:
            self.packs.close()


class StagedPack(PackPredictor):
    """A pack on given tables of its session (not necessarily the ones served): the golden replay before a
    pack is served."""

    def __init__(self, packs: PackSession, pack: Pack, staged: Tables) -> None:
        self.packs, self.owns_session, self.staged = packs, False, staged
        self.name, self.pack_path = pack.name, pack.path
        self.metadata = {k: v for k, v in pack.metadata.items() if k not in ("tasks",)}
        self.preprocess = pack.preprocess
        self.graph_precision = packs.graph_precision
        self.notes = ()

    def infer(self, batch: np.ndarray, task_ids: np.ndarray | None = None) -> np.ndarray:
        self.check_task_ids(batch, task_ids)
        return self.packs.infer(batch, self.name, tables=self.staged)[:, :len(self.classes)]

    def close(self) -> None:
        pass


def replay_golden(session: PackSession, pack: Pack, tables: Tables, source: str):
    """A pack made on another backbone artifact file with the same computation identity (check_fits: "identity")
    is served only once its golden set reproduces on this one (the proof that it computes the same); one line
    otherwise. Returns the self-check result."""
    from .selfcheck import check_on_load

    result = check_on_load(StagedPack(session, pack, tables), source)
    if result is None:
        raise ArtifactError(f"{source} was made on another backbone artifact file (sha256 "
                            f"{pack.metadata['backbone_artifact_sha256'][:12]}) and carries no golden set to show that "
                            f"{session.path.name} computes the same; load it with the file it was made on, or re-export "
                            "the pack with --backbone-artifact THIS.onnx")
    pack.replayed_on = session.sha256
    return result


def open_pack_predictor(backbone: str | os.PathLike, packs: list[str | os.PathLike], task: str | None = None,
                        providers: list[str] | None = None, **kwargs) -> PackPredictor:
    """A PackPredictor for `task` (default: the one pack given) on a new session holding every pack given."""
    if not packs:
        raise UsageError("pass at least one --pack PACK")
    session = PackSession(backbone, providers, **kwargs)
    try:
        loaded = [session.add(p) for p in packs]
        if task is None and len(loaded) > 1:
            raise UsageError(f"{len(loaded)} packs are loaded ({', '.join(p.name for p in loaded)}); pick one with "
                             "--task NAME")
        return PackPredictor(session, task or loaded[0].name, owns_session=True)
    except BaseException:
        session.close()
        raise
