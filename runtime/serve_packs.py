"""Prompt packs in the server: `vfpt-deploy serve B.onnx --packs DIR` (docs/serving.md, "Prompt packs").

One backbone artifact on ONE PackSession (runtime/packs.py) and ONE batcher serves every pack file in DIR as
its own model, named by the file (`cars.pack.safetensors` -> model `cars`); requests for different packs
share inference calls (the batch carries each row's pack), as a multi-task artifact's task models do.

DIR is MLServer's model repository (settings.json: `model_repository_implementation` is PackRepository
below, its args name the backbone and DIR), so the V2 repository extension works on it while the server runs:

    POST /v2/repository/index                 every pack file in DIR, loaded (READY) or not (UNAVAILABLE)
    POST /v2/repository/models/NAME/load      read DIR/NAME.pack.safetensors, check it fits the backbone,
                                              replay its golden set on staged tables, then serve it (a
                                              loaded NAME is replaced: the new pack answers from then on)
    POST /v2/repository/models/NAME/unload    stop serving NAME

A bad pack (another backbone, a corrupt file, beyond the backbone's limits, a golden set that does not
reproduce) is refused with one line and a 400 on the load call; the packs already served keep serving.
Requests in flight when a pack is unloaded are answered (the unload waits for them); requests that come
after get a 404 whose one line says the model was unloaded and how to load it again.

Batching: the batcher takes an integer per request; each model gets a key at load that never changes
(`Backbone.keys`), and the batch resolves keys to pack names against the session's current tables.
Torch-free.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
from mlserver.errors import MLServerError
from mlserver.settings import ModelSettings
from mlserver.utils import get_model_uri

from vfpt_deploy.artifacts.pack import PACK_SUFFIX, Pack, assemble, check_fits, read_pack, served_on_line
from vfpt_deploy.errors import OutputError, UsageError, VFPTError
from vfpt_deploy.threads import resolve_threads
from vfpt_deploy.text import printable

from . import serve_limits, serve_triton, serving
from .batcher import Batcher
from .packs import PackPredictor, PackSession, Tables

IMPLEMENTATION = "vfpt_deploy.runtime.serve_packs.PackModel"
REPOSITORY = "vfpt_deploy.runtime.serve_packs.PackRepository"
PACK_FILE = ".pack" + PACK_SUFFIX
DRAIN_S = 60.0  # longest an unload waits for its requests in flight

log = logging.getLogger("mlserver")

# MLServer re-executes model modules (importlib.reload): process-wide state is taken over, never made anew.
_backbones: dict = globals().get("_backbones", {})  # real path of a backbone artifact -> Backbone
_lock: threading.Lock = globals().get("_lock") or threading.Lock()
_unloaded: dict = globals().get("_unloaded", {})  # model name -> the one line a request for it gets
_refused: dict = globals().get("_refused", {})  # model name -> why its last load was refused (the index's reason)


VERSION_SEP = "@"  # name@N: a pack's name in the session (no model name holds '@': serve_settings.NAME_RE)


def served_name(session_name: str) -> str:
    """The model name a pack in the session serves as (name@N -> name)."""
    return session_name.split(VERSION_SEP, 1)[0]


def model_name(path: Path) -> str | None:
    """The model a pack file serves as: its file name without `.pack.safetensors` (None: not a pack file)."""
    return path.name[:-len(PACK_FILE)] if path.name.endswith(PACK_FILE) and len(path.name) > len(PACK_FILE) else None


def pack_files(folder: Path) -> dict[str, Path]:
    """name -> pack file of the pack files in `folder` (not its subfolders), in name order."""
    from .serve_settings import NAME_RE

    found = {}
    for f in sorted(folder.iterdir()) if folder.is_dir() else []:
        name = model_name(f)
        if name is None or not f.is_file():
            continue
        if not NAME_RE.fullmatch(name):
            log.warning("pack %s: its model name %r is not 1-100 letters, digits, '_', '-', '.'; rename the file",
                        printable(str(f)), name)  # the path as the name: escaped, never raw to a terminal
            continue
        found[name] = f
    return found


def unloaded_line(name: str) -> str:
    return (f"model {name} was unloaded (its prompt pack is no longer served); load it again with "
            f"POST /v2/repository/models/{name}/load")


class ServedPack(PackPredictor):
    """A pack as one served model sees it: the PackPredictor interface (classes, preprocessing, golden set)
    on the backbone's session, optionally on staged tables (the load-time self-check, before it is served)."""

    def __init__(self, packs: PackSession, pack: Pack, staged: Tables | None = None) -> None:
        super().__init__(packs, pack=pack, tables=staged)

    @property
    def session(self):  # the onnxruntime session (runtime/serving.py's Triton config reads its inputs)
        return self.packs.session


@dataclass(eq=False)
class Backbone:
    """A backbone artifact's session and batcher, shared by every pack model on it in this process."""

    name: str  # the label of its batch metrics
    session: PackSession
    batcher: Batcher | None = None
    batching: tuple | None = None
    keys: dict = field(default_factory=dict)  # batcher key (one per loaded model) -> its pack's name@N in the session
    counter: itertools.count = field(default_factory=lambda: itertools.count(1))
    versions: itertools.count = field(default_factory=lambda: itertools.count(1))  # the N of name@N in the session
    loading: threading.Lock = field(default_factory=threading.Lock)  # one load / unload at a time
    preloaded: dict = field(default_factory=dict)  # name -> (pack file, its self-check, Pack) added by `serve`
    batch_sizes: Counter = field(default_factory=Counter)
    timings: dict = field(default_factory=dict)  # name -> the milliseconds of its last load, by step

    def infer(self, batch: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """The batcher's call: rows of several packs, each row's pack named by its model's key."""
        return self.session.infer(batch, [self.keys[int(k)] for k in keys])

    def batcher_for(self, model: str, batching: tuple) -> Batcher:
        return serving.shared_batcher(self, self.infer, model, batching, "packs")

    def stage(self, name: str, path: str | os.PathLike) -> tuple[Pack, Tables]:
        """Read a pack file, served as `name`, and the tables the session would have with it (not swapped in):
        one line when it is not a pack, was made for another backbone or is beyond the backbone's limits.
        In the session the pack is `name@N` (N: this load's number): a reload adds the new version beside the
        old one, so requests the old model has in flight keep the old tables until it unloads (MLServer loads
        the new model, then unloads the old one)."""
        pack = read_pack(path)
        internal = f"{name}{VERSION_SEP}{next(self.versions)}"
        pack = Pack(pack.tables, {**pack.metadata, "name": internal}, pack.preprocess, pack.path)
        check_fits(pack, self.session.geometry, self.session.sha256, str(path))
        others = [n for n in map(served_name, self.session.names) if n.lower() == name.lower() and n != name]
        if others:
            raise UsageError(f"pack {path}: model {others[0]!r} already serves a pack of that name (names are compared "
                             "ignoring case); rename the file")
        keep = [self.session.pack(n) for n in self.session.names] + [pack]
        limit = self.session.geometry["limits"]["tasks"]
        if len({served_name(p.name) for p in keep}) > limit:
            raise UsageError(f"pack {path}: {len(keep)} packs; {self.session.path} takes at most {limit}: unload one "
                             "first")
        arrays = assemble([p.tables for p in keep], self.session.geometry)
        return pack, Tables(tuple(p.name for p in keep), tuple(keep), arrays)

    def load(self, name: str, path: str | os.PathLike, self_check: bool):
        """Check a pack (fit, then its golden set on staged tables) and serve it as `name` (replacing a pack of
        that name). Returns (pack, self-check result or None). Runs in a worker thread."""
        from .selfcheck import check_on_load

        with self.loading:
            t0 = time.perf_counter()
            pack, staged = self.stage(name, path)
            t1 = time.perf_counter()
            result = None
            if pack.metadata["backbone_artifact_sha256"] != self.session.sha256:  # fits by identity: always replayed
                from .packs import replay_golden

                result = replay_golden(self.session, pack, staged, str(path))
            elif self_check:  # beside the batches (serializing it with them was not faster: docs/serving.md)
                result = check_on_load(ServedPack(self.session, pack, staged), str(path))
            t2 = time.perf_counter()
            self.session.add(pack)  # beside an older version of `name`, which its model removes when it unloads
            self.timings[name] = {"read_check_stage_ms": round((t1 - t0) * 1000, 1),
                                  "self_check_ms": round((t2 - t1) * 1000, 1),
                                  "swap_ms": round((time.perf_counter() - t2) * 1000, 1)}
            return pack, result

    def unload(self, name: str, pack: Pack) -> bool:
        """Remove this version of `name` from the session; True when no version of `name` is left (no reload
        replaced it)."""
        with self.loading:
            if pack.name in self.session.names:
                self.session.remove(pack.name)
            return not any(served_name(n) == name for n in self.session.names)


def hand_over(path: str | os.PathLike, backbone: Backbone) -> None:
    """Give `serve`'s opened backbone (with its packs already added and checked) to the pack models."""
    with _lock:
        _backbones[os.path.realpath(path)] = backbone


def attach(path: str, extra: dict) -> Backbone:
    """The Backbone of `path` in this process: handed over by `serve`, else opened now (once)."""
    key = os.path.realpath(path)
    with _lock:
        backbone = _backbones.get(key)
        if backbone is None:
            providers = extra.get("providers")
            session = PackSession(path, providers or None, threads=resolve_threads(extra.get("threads")),
                                  allow_fallback=bool(extra.get("allow_fallback", False)))
            backbone = _backbones[key] = Backbone(Path(path).name.split(".")[0], session)
        return backbone


class PackModel(serving.VFPTModel):
    """One prompt pack served as one model on its backbone's shared session and batcher."""

    def __init__(self, settings: ModelSettings) -> None:
        super().__init__(settings)
        self.backbone: Backbone | None = None
        self.pack: Pack | None = None
        self.unloading, self.inflight, self.drained = False, 0, asyncio.Event()

    async def load(self) -> bool:
        path = await get_model_uri(self.settings)
        extra = dict((self.settings.parameters.extra or {}) if self.settings.parameters else {})
        try:
            backbone = await asyncio.to_thread(attach, str(extra.get("backbone") or ""), extra)
            pre = backbone.preloaded.pop(self.name, None)
            if pre is not None and os.path.realpath(pre[0]) == os.path.realpath(path):
                pack, self.self_check = pre[2], pre[1]  # serve checked it up front
            else:
                pack, self.self_check = await asyncio.to_thread(backbone.load, self.name, path,
                                                                extra.get("self_check", True) is not False)
        except VFPTError as e:
            log.error("model %s: %s", self.name, e)
            _refused[self.name] = f"load refused: {e}"
            raise MLServerError(f"model {self.name}: {e}", 400) from None
        _refused.pop(self.name, None)
        self.backbone, self.pack = backbone, pack
        self.predictor = ServedPack(backbone.session, pack)
        self.classes, self.size, self.task = self.predictor.classes, self.predictor.preprocess.size, None
        batching = self._batching()
        serve_limits.allow_model(self.max_rows, self.size)
        self.batcher = backbone.batcher_for(self.name, batching)
        self.batch_sizes = backbone.batch_sizes
        self.task = next(backbone.counter)
        backbone.keys[self.task] = pack.name  # this model's own version (name@N) of the pack in the session
        _unloaded.pop(self.name, None)
        serve_triton.models[self.name] = self
        serving.started.add(self.name)
        if self.self_check is not None:
            from .selfcheck import describe_check

            log.info("model %s: %s", self.name, describe_check(self.self_check))
        log.info("model %s: %s", self.name, pack_verification(path, backbone.session.path))
        if served_on_line(pack, backbone.session.sha256):
            log.info("model %s: %s", self.name, served_on_line(pack, backbone.session.sha256))
        steps = backbone.timings.get(self.name, {})
        log.info("model %s: pack %s on %s (%s)", self.name, Path(path).name, backbone.session.path.name,
                 ", ".join(f"{k} {v}" for k, v in steps.items()) or "loaded by serve")
        return True

    async def _predict(self, payload, started: int):
        if self.unloading:
            raise MLServerError(unloaded_line(self.name), 404)
        self.inflight += 1
        try:
            return await super()._predict(payload, started)
        finally:
            self.inflight -= 1
            if self.unloading and not self.inflight:
                self.drained.set()

    def _task_metadata(self) -> dict:
        if self.backbone is None:
            return {}
        return {"pack": str(self.pack.path), "backbone": str(self.backbone.session.path),
                "session_models": sorted({served_name(n) for n in self.backbone.session.names})}

    def _check_metadata(self) -> dict:
        if getattr(self, "self_check", None) is None:
            return {"self_check": "off" if "golden" in self.predictor.metadata else "absent"}
        return super()._check_metadata()

    async def unload(self) -> bool:
        """Answer the requests in flight, then stop serving the pack (unless a reload replaced it already)."""
        if serve_triton.models.get(self.name) is self:
            del serve_triton.models[self.name]
        if self.backbone is None:
            return True
        self.unloading = True
        if self.inflight:
            try:
                await asyncio.wait_for(self.drained.wait(), DRAIN_S)
            except asyncio.TimeoutError:
                log.warning("model %s: %d requests still in flight after %.0f s; unloading anyway", self.name,
                            self.inflight, DRAIN_S)
        removed = await asyncio.to_thread(self.backbone.unload, self.name, self.pack)
        if removed:
            _unloaded[self.name] = unloaded_line(self.name)
        self.backbone.keys.pop(self.task, None)
        self.backbone = None
        return True


def _settings_for(name: str, path: Path, backbone: Path, template: dict) -> ModelSettings:
    extra = {**template.get("parameters", {}).get("extra", {}), "backbone": str(backbone)}
    return ModelSettings.model_validate({**template, "name": name, "implementation": IMPLEMENTATION,
                                         "parameters": {"uri": str(path), "extra": extra}})


class PackRepository(serve_triton.ModelRepository):
    """MLServer's model repository for packs: every pack file in `packs` is a model (PackModel on the
    backbone artifact `backbone`; both relative to the settings folder, `root`); model-settings.json files
    in the settings folder are listed as well. `model`: the model-settings every pack model gets."""

    def __init__(self, root: str = "", packs: str = "packs", backbone: str = "", model: dict | None = None,
                 **kwargs) -> None:
        super().__init__(root=root, **kwargs)
        base = Path(root or ".")
        self.packs, self.backbone = (base / packs).resolve(), (base / backbone).resolve()
        self.template = {k: v for k, v in (model or {}).items() if k not in ("name", "implementation")}

    async def list(self) -> list[ModelSettings]:
        own = [s for s in await super().list() if getattr(s, "_source", None)]  # not MLServer's env default
        taken = {s.name for s in own}
        files = await asyncio.to_thread(pack_files, self.packs)
        return own + [_settings_for(n, p, self.backbone, self.template) for n, p in files.items() if n not in taken]

    async def find(self, name: str) -> list[ModelSettings]:
        found = [s for s in await self.list() if s.name == name]
        if not found:
            raise MLServerError(f"model {name}: no pack file {name}{PACK_FILE} in {self.packs} (nor a model-settings."
                                "json naming it); put the pack there first", 404)
        return found


def _install_unloaded_message() -> None:
    """A request for a pack model that was unloaded: MLServer's 404 says so in its one line."""
    from mlserver import errors

    if getattr(errors.ModelNotFound, "vfpt_packs", False):
        return
    init = errors.ModelNotFound.__init__

    def __init__(self, name: str, version: str | None = None) -> None:
        init(self, name, version)
        if name in _unloaded:
            self.args = (_unloaded[name],)

    errors.ModelNotFound.__init__ = __init__
    errors.ModelNotFound.vfpt_packs = True


def _install_index_reasons() -> None:
    """The repository index gives a pack model that is not READY a reason: why its last load was refused,
    that it was unloaded, or that it was never loaded (MLServer's own index leaves it empty)."""
    from mlserver.handlers.model_repository import ModelRepositoryHandlers
    from mlserver.types import State

    if getattr(ModelRepositoryHandlers, "vfpt_packs", False):
        return
    to_item = ModelRepositoryHandlers._to_item

    async def _to_item(self, model_settings: ModelSettings):
        item = await to_item(self, model_settings)
        if item.state != State.READY and not item.reason:
            ours = str(model_settings.implementation_).endswith(".PackModel") or item.name in _refused
            item.reason = _refused.get(item.name) or ("unloaded" if item.name in _unloaded else
                                                      "not loaded" if ours else "")
        return item

    ModelRepositoryHandlers._to_item = _to_item
    ModelRepositoryHandlers.vfpt_packs = True


_install_unloaded_message()
_install_index_reasons()


# -- `vfpt-deploy serve B.onnx --packs DIR` ----------------------------------------------------------------
def model_template(opts) -> dict:
    from .serve_settings import model_settings

    t = model_settings("pack", "", opts)
    return {k: t[k] for k in ("max_batch_size", "max_batch_time")} | {"parameters": {"extra": t["parameters"]["extra"]}}


def settings_json(opts, session: PackSession, packs: str, backbone: str, all_ports: bool) -> dict:
    from .serve_settings import server_settings

    size = tuple(session.geometry["image_size"])
    out = server_settings(opts, {"b": SimpleNamespace(preprocess=SimpleNamespace(size=size))}, all_ports)
    out["model_repository_implementation"] = REPOSITORY
    out["model_repository_implementation_args"] = {"packs": packs, "backbone": backbone, "model": model_template(opts)}
    return out


def _backbone_item(items: list[str]) -> Path:
    if len(items) != 1 or "=" in items[0] and not Path(items[0]).exists():
        raise UsageError("with --packs DIR, pass exactly one backbone artifact (B.onnx, from 'vfpt-deploy export "
                         "--format backbone'); serve other artifacts from another server")
    return Path(items[0])


def pack_verification(path: str | os.PathLike, backbone: str | os.PathLike) -> str:
    """One line: which data and tolerances the pack's report beside it vouches for (LOOSENED flagged),
    or that there is none and the command that writes one."""
    from vfpt_deploy.artifacts.strength import serving_line

    return serving_line(path, f"vfpt-deploy verify {Path(backbone).name} --pack {Path(path).name} --ckpt RUN.pt")


def _packs_dir(packs: str | os.PathLike) -> Path:
    folder = Path(packs)
    if not folder.is_dir():
        raise UsageError(f"--packs {folder} is not a folder; pass the folder that holds the .pack.safetensors files")
    return folder


def open_backbone(items: list[str], packs: Path, opts, on_status: Callable[[str], None]) -> tuple[Backbone, dict]:
    """Open the backbone's session and load every pack in DIR into it (each checked as a load call checks
    it): one line for the first bad one, before anything listens."""
    from vfpt_deploy.artifacts.strength import serving_line

    path = _backbone_item(items)
    on_status(f"opening backbone {path}")
    session = PackSession(path, list(opts.providers) if opts.providers else None,
                          threads=resolve_threads(opts.threads), allow_fallback=opts.allow_fallback)
    backbone = Backbone(path.name.split(".")[0], session)
    on_status(f"backbone {path.name}: {serving_line(path)}")  # which data and tolerances, as for artifacts
    files = pack_files(packs)
    try:
        for name, f in files.items():
            pack, result = backbone.load(name, f, opts.self_check)
            backbone.preloaded[name] = (f, result, pack)
            from .selfcheck import describe_check

            on_status(f"pack {name}: {f.name}" + (f", {describe_check(result)}" if opts.self_check else ""))
            if served_on_line(pack, session.sha256):
                on_status(f"pack {name}: {served_on_line(pack, session.sha256)}")
            on_status(f"pack {name}: {pack_verification(f, path)}")
    except BaseException:
        session.close()
        raise
    on_status(f"{len(files)} pack{'' if len(files) == 1 else 's'} in {packs} on one session and one batcher; load more while it runs with "
              "POST /v2/repository/models/NAME/load")
    return backbone, files


def serve(items: list[str], packs: str | os.PathLike, opts, on_status: Callable[[str], None] = lambda s: None) -> None:
    """`serve B.onnx --packs DIR`: open the backbone, load DIR's packs, serve them until SIGINT / SIGTERM."""
    from mlserver.utils import install_uvloop_event_loop

    from .serve_settings import _run_mlserver, check_ports_free

    opts, folder = opts.check(), _packs_dir(packs)
    check_ports_free(opts.host, opts.ports())
    backbone, _ = open_backbone(items, folder, opts, on_status)
    try:
        with tempfile.TemporaryDirectory(prefix="vfpt-serve-") as tmp:
            from vfpt_deploy.artifacts.files import dumps_json

            Path(tmp, "settings.json").write_text(dumps_json(settings_json(
                opts, backbone.session, str(folder.resolve()), str(backbone.session.path.resolve()), True), indent=2))
            check_ports_free(opts.host, opts.ports())
            hand_over(backbone.session.path, backbone)
            install_uvloop_event_loop()
            try:
                asyncio.run(_run_mlserver(tmp))
            except RuntimeError as e:
                if "bind" not in str(e):
                    raise
                from vfpt_deploy.errors import RuntimeSetupError

                raise RuntimeSetupError(f"cannot listen: {str(e).split(';')[0]}; pass other ports") from None
    finally:
        backbone.session.close()


def write_settings(folder: str | os.PathLike, items: list[str], packs: str | os.PathLike, opts,
                   on_status: Callable[[str], None] = lambda s: None) -> list[Path]:
    """`serve B.onnx --packs DIR --write-settings OUT`: OUT/settings.json, OUT/<backbone> and OUT/packs/ with a
    copy of every pack (each checked first), for `mlserver start OUT`; packs dropped into OUT/packs later are
    loaded with the repository extension."""
    from vfpt_deploy.artifacts.files import atomic_write, dumps_json

    opts, src = opts.check(), _packs_dir(packs)
    out = Path(folder)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"--write-settings {out} exists and is not an empty folder; name a new folder")
    backbone, files = open_backbone(items, src, opts, on_status)
    try:
        path = backbone.session.path
        written = [out / "settings.json", out / path.name]
        atomic_write(written[0], lambda tmp: Path(tmp).write_text(dumps_json(
            settings_json(opts, backbone.session, "packs", path.name, False), indent=2) + "\n"))
        atomic_write(written[1], lambda tmp: shutil.copyfile(path, tmp))
        (out / "packs").mkdir(exist_ok=True)
        for f in files.values():
            atomic_write(out / "packs" / f.name, lambda tmp, f=f: shutil.copyfile(f, tmp))
            written.append(out / "packs" / f.name)
        return written
    finally:
        backbone.session.close()
