"""`vfpt-deploy serve`: open the artifacts, write MLServer's settings folder, run MLServer on it in-process.

The folder is what `mlserver start FOLDER` (and KServe's MLServer runtime) reads:

    FOLDER/settings.json              server: parallel_workers 0, debug off, gRPC message limit, ports given
    FOLDER/NAME/model-settings.json   one per model: VFPTModel, batching, uri, onnxruntime settings
    FOLDER/NAME/<artifact>            only with --write-settings (a self-contained copy to upload)

A multi-task artifact NAME is served as one model per task, each in its own folder inside the artifact's:

    FOLDER/NAME/<artifact>                    once (only with --write-settings)
    FOLDER/NAME/MODEL/model-settings.json     uri ../<artifact>, parameters.extra {task, artifact: NAME}

MODEL is the task's name, or NAME.TASK when the artifact was named on the command line (NAME=PATH), so
two artifacts holding tasks of the same name can be served side by side; model names must be unique.
In one process the task models of an artifact share one session and one batcher (runtime/serving.py).

`serve` writes it to a temporary folder (the uri then points at the artifact where it is) and serves;
`--write-settings DIR` writes it with copies of the artifacts and exits. Every artifact is opened once, up
front, so a bad one fails in one line before anything listens. Torch-free.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

from vfpt_deploy.errors import ArtifactError, OutputError, RuntimeSetupError, UsageError
from vfpt_deploy.artifacts.files import atomic_write, check_outputs, dumps_json
from vfpt_deploy.artifacts.schema import MAX_BATCH, is_engine, sidecar_path

from .triton_config import DEFAULT_MAX_BATCH

DEFAULT_PORTS = {"http_port": 8080, "grpc_port": 8081, "metrics_port": 8082}  # MLServer's own defaults
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
MIN_GRPC_MESSAGE = 64 * 2**20  # room for a batch of encoded photos; raised for the largest FP32 request


@dataclass(frozen=True)
class ServeOptions:
    """What `serve` takes besides the models. Ports left None: MLServer's defaults (and, in a written
    settings folder, whatever MLSERVER_HTTP_PORT / ..._GRPC_PORT / ..._METRICS_PORT say, as under KServe)."""

    host: str = "0.0.0.0"
    http_port: int | None = None
    grpc_port: int | None = None
    metrics_port: int | None = None
    max_batch_size: int = DEFAULT_MAX_BATCH  # the same default as `vfpt-deploy triton` writes for an ONNX
    max_batch_delay_ms: float = 5.0
    threads: int | None = None
    providers: tuple[str, ...] | None = None
    allow_fallback: bool = False
    self_check: bool = True  # replay each artifact's golden set at load; refuse a model that does not reproduce

    def check(self) -> "ServeOptions":
        for key in DEFAULT_PORTS:
            port = getattr(self, key)
            if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535):
                raise UsageError(f"--{key.replace('_', '-').replace('http-', '')} must be a port in [1, 65535], got {port!r}")
        ports = list(self.ports().values())
        if len(set(ports)) != len(ports):
            raise UsageError(f"the HTTP, gRPC and metrics ports must differ, got {ports}; pass --port, --grpc-port "
                             "and --metrics-port")
        if isinstance(self.max_batch_size, bool) or not 1 <= self.max_batch_size <= MAX_BATCH:
            raise UsageError(f"--max-batch-size must be in [1, {MAX_BATCH}], got {self.max_batch_size!r}")
        if not 0 <= self.max_batch_delay_ms <= 60_000:  # also refuses NaN
            raise UsageError(f"--max-batch-delay-ms must be in [0, 60000], got {self.max_batch_delay_ms!r}")
        if not self.host or any(c.isspace() for c in self.host):
            raise UsageError(f"--host must be an address or host name, got {self.host!r}")
        return self

    def ports(self) -> dict[str, int]:
        return {k: getattr(self, k) or v for k, v in DEFAULT_PORTS.items()}


class Item(NamedTuple):
    """One MODEL argument: the artifact's name, its path, and whether the name was given (NAME=PATH)."""

    name: str
    path: Path
    named: bool = False


class Served(NamedTuple):
    """One model the server will have: its name, the artifact it comes from, and its task (multi-task)."""

    name: str
    item: Item
    task: str | None = None


def parse_models(items: list[str]) -> list[Item]:
    """MODEL arguments -> Item: PATH (named by its file stem) or NAME=PATH; names unique."""
    out: list[Item] = []
    for item in items:
        name, eq, rest = item.partition("=")
        named = bool(eq) and not os.path.exists(item)  # (False, not OSError, for a name over NAME_MAX)
        if named:
            path = Path(rest)
        else:
            name, path = Path(item).stem, Path(item)
        if not NAME_RE.fullmatch(name):
            raise UsageError(f"model name {name!r} (from {item!r}) must be 1-100 letters, digits, '_', '-' or '.', "
                             "starting with a letter or digit; pass NAME=PATH")
        if not path.name:
            raise UsageError(f"{item!r} names no artifact file; pass PATH or NAME=PATH")
        if name in {i.name for i in out}:
            raise UsageError(f"two models are named {name!r}; name them with NAME=PATH")
        out.append(Item(name, path, named))
    if not out:
        raise UsageError("pass at least one exported model (.onnx, .engine or .plan)")
    return out


def served_models(items: list[Item], predictors: dict) -> list[Served]:
    """The models to serve: one per single-task artifact, one per task of a multi-task artifact (named by
    the task, or NAME.TASK for an artifact named NAME=PATH); one line if two would share a name."""
    served: list[Served] = []
    for item in items:
        tasks = predictors[item.name].tasks
        served += [Served(f"{item.name}.{t}" if item.named else t, item, t) for t in tasks] or [Served(item.name, item)]
    seen: dict[str, Served] = {}
    for s in served:
        where = lambda s: f"task {s.task!r} of {s.item.path}" if s.task else str(s.item.path)  # noqa: E731
        if s.name in seen:
            fix = ("choose artifact names that keep NAME.TASK apart (a '.' in a name can make two of them equal)"
                   if s.item.named and seen[s.name].item.named else
                   "name the artifacts with NAME=PATH (a multi-task artifact's models are then NAME.TASK)")
            raise UsageError(f"two served models would be named {s.name!r} ({where(seen[s.name])} and {where(s)}); "
                             f"{fix}")
        if not NAME_RE.fullmatch(s.name):
            raise UsageError(f"model name {s.name!r} ({where(s)}) is over 100 characters; name {s.item.path} with a "
                             "shorter NAME=PATH, or pass PATH alone")
        if s.task is not None and s.name in (s.item.path.name, sidecar_path(s.item.path).name):
            # its settings folder would sit where the artifact's copy goes (NAME/<file>)
            raise UsageError(f"model {s.name!r} ({where(s)}) has the name of its artifact's file; rename the file, "
                             "or name the artifact with NAME=PATH (its models are then NAME.TASK)")
        seen[s.name] = s
    return served


def model_settings(name: str, uri: str, opts: ServeOptions, task: str | None = None,
                   artifact: str | None = None) -> dict:
    """One model's model-settings.json. Batching: MLServer's own field names (see runtime/serving.py). A
    task model names its task and its artifact: the models of one artifact share its session in a process."""
    from .serving import IMPLEMENTATION

    extra = {"threads": opts.threads, "allow_fallback": opts.allow_fallback,
             "providers": list(opts.providers) if opts.providers else None, "task": task,
             "artifact": artifact if task is not None else None, "self_check": False if not opts.self_check else None}
    return {"name": name, "implementation": IMPLEMENTATION, "max_batch_size": opts.max_batch_size,
            "max_batch_time": opts.max_batch_delay_ms / 1000.0,
            "parameters": {"uri": uri, "extra": {k: v for k, v in extra.items() if v is not None}}}


def server_settings(opts: ServeOptions, predictors: dict, all_ports: bool) -> dict:
    """settings.json: one in-process worker (onnxruntime's threads use the cores, and the batch histogram
    stays in the process /metrics reads), no per-request access log, a gRPC limit that fits the largest
    FP32 request. Ports: all of them for `serve`; only those given for a folder meant for KServe."""
    need = max(p.preprocess.size[0] * p.preprocess.size[1] * 3 * 4 * opts.max_batch_size for p in predictors.values())
    ports = opts.ports() if all_ports else {k: getattr(opts, k) for k in DEFAULT_PORTS if getattr(opts, k)}
    from .serve_triton import EXTENSIONS

    # model_repository_implementation: MLServer's own folder repository, named through runtime/serve_triton.py
    # so that `mlserver start` imports it (and its Triton layer) before building its servers
    return {"parallel_workers": 0, "debug": False, "grpc_max_message_length": max(MIN_GRPC_MESSAGE, need + 2**20),
            "model_repository_implementation": "vfpt_deploy.runtime.serve_triton.ModelRepository",
            "extensions": EXTENSIONS,
            **({"host": opts.host} if all_ports or opts.host != ServeOptions.host else {}), **ports}


def open_models(models: list[Item], opts: ServeOptions, on_status: Callable[[str], None]) -> dict:
    """Open every artifact once (name -> predictor); close them all if one fails."""
    from vfpt_deploy.artifacts.strength import serving_line

    from .serving import open_artifact

    opened: dict = {}
    try:
        for name, path, _ in models:
            on_status(f"opening {name}: {path}")
            predictor = opened[name] = open_artifact(path, opts.providers, opts.threads, opts.allow_fallback)
            on_status(f"{name}: {serving_line(path)}")  # which data and tolerances it was verified with
            if opts.self_check:  # before the server starts: a model that does not reproduce here is one line
                from .selfcheck import check_on_load, describe_check

                on_status(f"{name}: {describe_check(check_on_load(predictor, str(path)))}")
            limit = getattr(predictor, "profile_max", None)
            if limit is not None and opts.max_batch_size > limit:
                raise UsageError(f"--max-batch-size {opts.max_batch_size} is over the largest batch of {path}'s "
                                 f"profile ({limit}); lower it or rebuild the engine")
            if predictor.tasks:
                on_status(f"{name} holds {len(predictor.tasks)} tasks ({', '.join(predictor.tasks)}): one model "
                          "per task, all on this one session and one batcher")
    except BaseException:
        for p in opened.values():
            p.close()
        raise
    return opened


def write_folder(folder: Path, served: list[Served], opts: ServeOptions, predictors: dict,
                 copy: bool) -> list[Path]:
    """settings.json, NAME/model-settings.json per single-task artifact, NAME/MODEL/model-settings.json per
    task of a multi-task one (with one copy of each artifact, in NAME/, when `copy`)."""
    written = [folder / "settings.json"]
    atomic_write(written[0], lambda tmp: Path(tmp).write_text(dumps_json(
        server_settings(opts, predictors, all_ports=not copy), indent=2) + "\n"))
    items = list(dict.fromkeys(s.item for s in served))
    for name, path, _ in items if copy else []:
        files = [path, sidecar_path(path)] if is_engine(path) else [path]
        targets = {f"{name}/{f.name}": folder / name / f.name for f in files}
        check_outputs(targets, {str(f): f for i in items for f in [i.path, sidecar_path(i.path)]})
        for f, dst in zip(files, targets.values()):
            atomic_write(dst, lambda tmp, f=f: shutil.copyfile(f, tmp))
            written.append(dst)
    for name, (artifact, path, _), task in served:
        sub = Path(artifact, name) if task is not None else Path(name)
        uri = (f"../{path.name}" if task is not None else f"./{path.name}") if copy else str(path.resolve())
        dst = folder / sub / "model-settings.json"
        atomic_write(dst, lambda tmp, n=name, u=uri, t=task, a=artifact: Path(tmp).write_text(dumps_json(
            model_settings(n, u, opts, t, a), indent=2) + "\n"))
        written.append(dst)
    return written


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """Bind each port as the servers will (SO_REUSEADDR, like uvicorn) and let go: one line if one is taken.
    gRPC would otherwise share a port with another gRPC server (SO_REUSEPORT) without a word."""
    flags = {"http_port": "--port", "grpc_port": "--grpc-port", "metrics_port": "--metrics-port"}
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"--host {host!r} cannot be resolved ({e.strerror}); pass an address like 0.0.0.0") from None
    family, _, _, _, addr = infos[0]
    for key, port in ports.items():
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((addr[0], port, *addr[2:]))
            except OSError as e:
                raise RuntimeSetupError(f"cannot listen on {host}:{port} ({e.strerror}); stop what uses it or pass "
                                        f"another {flags[key]}") from None


def write_settings(folder: str | os.PathLike, items: list[str], opts: ServeOptions,
                   on_status: Callable[[str], None] = lambda s: None) -> list[Path]:
    """`serve --write-settings DIR`: check and open every artifact, then write the folder with copies of
    them (upload it as a KServe storageUri, or run `mlserver start DIR`). Returns the files written."""
    models, opts = parse_models(items), opts.check()
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise OutputError(f"--write-settings {folder} exists and is not an empty folder; name a new folder "
                          "(MLServer would also serve any model-settings.json already in it)")
    predictors = open_models(models, opts, on_status)
    try:
        served = served_models(models, predictors)
        try:
            return write_folder(folder, served, opts, predictors, copy=True)
        except BaseException:  # the folder was new or empty: leave it so, not half written
            if folder.is_dir():
                for child in folder.iterdir():
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            raise
    finally:
        for p in predictors.values():
            p.close()


def serve(items: list[str], opts: ServeOptions, on_status: Callable[[str], None] = lambda s: None) -> None:
    """Open every artifact, write the settings folder (temporary), run MLServer on it in this process
    until SIGINT / SIGTERM (MLServer's own handlers stop it cleanly)."""
    from mlserver.utils import install_uvloop_event_loop

    from . import serving

    models, opts = parse_models(items), opts.check()
    check_ports_free(opts.host, opts.ports())
    predictors = open_models(models, opts, on_status)
    try:
        served = served_models(models, predictors)
        with tempfile.TemporaryDirectory(prefix="vfpt-serve-") as folder:
            write_folder(Path(folder), served, opts, predictors, copy=False)
            check_ports_free(opts.host, opts.ports())  # again: opening a large model takes a while
            for name, path, _ in models:  # a multi-task artifact: one predictor for all its task models
                (serving.hand_over_tasks if predictors[name].tasks else serving.hand_over)(name, path, predictors[name])
            install_uvloop_event_loop()
            try:
                asyncio.run(_run_mlserver(folder))
            except RuntimeError as e:  # gRPC's bind, when a port was taken after the check above
                if "bind" not in str(e):
                    raise
                raise RuntimeSetupError(f"cannot listen: {str(e).split(';')[0]}; pass other ports") from None
    finally:
        for p in predictors.values():
            p.close()
    failed = [s.name for s in served if s.name not in serving.started]
    if failed:
        raise ArtifactError(f"MLServer could not load model {failed[0]} (its log above says why); the server stopped")


async def _run_mlserver(folder: str) -> None:
    from mlserver import MLServer
    from mlserver.cli.serve import load_settings

    logging.getLogger("mlserver").propagate = False  # MLServer prints its own lines; not twice via the CLI's

    settings, models_settings = await load_settings(folder)  # what `mlserver start FOLDER` reads
    await MLServer(settings).start(models_settings)
