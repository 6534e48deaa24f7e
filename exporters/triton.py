"""A verified ONNX or TensorRT artifact -> one model in an NVIDIA Triton Inference Server model repository.

    REPO/NAME/config.pbtxt      platform onnxruntime_onnx or tensorrt_plan, max_batch_size, input/output
                                names, dtypes and dims (without the batch dim), dynamic_batching,
                                instance_group; the output names labels.txt (Triton's classification
                                extension)
    REPO/NAME/labels.txt        the class names, one a line, in logit order
    REPO/NAME/1/model.onnx      the ONNX file (and its external-data files, same relative places), or
    REPO/NAME/1/model.plan      the TensorRT engine

config.pbtxt is built as Triton's own protobuf message (tritonclient's model_config_pb2.ModelConfig) and
printed with protobuf's text_format, so it is valid against Triton's schema by construction. Shapes
and dtypes come from the artifact itself (the ONNX graph; an engine's sidecar profile and the ONNX it
was built from); max_batch_size from the engine's profile, or DEFAULT_MAX_BATCH for an ONNX with a
dynamic batch. Triton feeds the model preprocessed tensors: clients apply the artifact's preprocessing
(`vfpt-deploy inspect` shows it).

The artifact must have passed verification (NAME.verify.json passed, and its artifact_sha256 is this
file's) unless the caller opts out. The files are built in a staging folder inside REPO, then moved in with
renames: the version folder 1/ is replaced as a whole, config.pbtxt and labels.txt are replaced (a different
earlier one is kept as config.pbtxt.previous / labels.txt.previous), and everything else in NAME (other
version folders, a user's notes) is kept and named in the result's notes (Triton serves the highest version
by default: another version folder above 1 is served instead, which the note says). A failure leaves the
folder as it was. Torch-free.

Multi-task artifacts (metadata `tasks`: inputs `images` and `task`, logits as wide as the widest task) are
refused: Triton's classification extension maps an output to ONE labels file, while their class names
depend on each request's task. `vfpt-deploy serve` serves them, each task under its own model name.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from vfpt_deploy.errors import ArtifactError, OutputError, UsageError, VerificationError, VFPTError
from vfpt_deploy.artifacts.files import Staging, file_sha256, umask_mode
from vfpt_deploy.inspect_artifact import inspect_artifact, printable
from vfpt_deploy.runtime.triton_config import (DEFAULT_MAX_BATCH, DEFAULT_QUEUE_DELAY_US, KINDS, LABELS_FILE,  # noqa: F401
                                               PLATFORMS, Tensor, TritonModel, TritonSettings, model_config,
                                               model_config_pb2)
from vfpt_deploy.artifacts.schema import (INPUT_NAME, ONNX_SUFFIXES, OUTPUT_NAME, check_output_width, is_engine,
                                read_graph, report_path)

VERSION = "1"
CONFIG_FILE = "config.pbtxt"


@dataclass
class TritonResult:
    folder: Path  # REPO/NAME
    name: str
    platform: str
    max_batch_size: int
    config_text: str  # config.pbtxt as written
    files: list[Path]
    notes: list[str]


# -- reading the artifact ------------------------------------------------------------------------------
def _tensor(t: dict) -> Tensor:
    shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in t["shape"] or ())
    return Tensor(t["name"], t["dtype"], shape)


def _onnx_model(path: Path, info: dict) -> TritonModel:
    if info["task"] is None and info.get("pack_backbone"):
        raise ArtifactError(f"{path} is a backbone artifact for prompt packs: Triton cannot load packs into it; serve "
                            "it with 'vfpt-deploy serve B.onnx --packs DIR', or give Triton a single-task export "
                            "('vfpt-deploy export --ckpt RUN.pt --format onnx')")
    if info["task"] is None:
        raise ArtifactError(f"{path} has no vfpt-deploy metadata (class names); export it with 'vfpt-deploy export'")
    if len(info["inputs"]) != 1 or len(info["outputs"]) != 1:
        raise ArtifactError(f"{path} has {len(info['inputs'])} inputs and {len(info['outputs'])} outputs; vfpt-deploy "
                            f"models take one ('{INPUT_NAME}') and give one ('{OUTPUT_NAME}'): re-export it")
    inp, out = _tensor(info["inputs"][0]), _tensor(info["outputs"][0])
    if len(inp.shape) != 4 or len(out.shape) != 2:
        raise ArtifactError(f"{path}: input {list(inp.shape)} / output {list(out.shape)} are not [batch, 3, H, W] / "
                            "[batch, classes]; re-export it")
    check_output_width(out.shape[1] if out.shape[1] > 0 else None, {"classes": info["classes"]}, str(path))
    fixed = inp.shape[0] if inp.shape[0] > 0 else None
    batch = None if fixed else (1, DEFAULT_MAX_BATCH, DEFAULT_MAX_BATCH)
    files = [(path, PLATFORMS["onnx"][1])] + [(path.parent / f["file"], f["file"]) for f in info["external_data"]]
    missing = [rel for src, rel in files[1:] if not src.is_file()]
    if missing:
        raise ArtifactError(f"{path} keeps weights in {missing[0]!r}, which is not beside it; copy it there")
    return TritonModel("onnx", inp, out, info["classes"], batch, files, info["sha256"])


def _engine_model(path: Path, info: dict) -> TritonModel:
    if not info["sha256_matches_sidecar"]:
        raise ArtifactError(f"{path} does not have the sha256 its sidecar records: the engine file was changed or "
                            "replaced; rebuild it")
    trt = info["tensorrt"]
    if trt.get("flavor") == "trt-rtx":
        raise ArtifactError(f"{path} is a TensorRT-RTX engine; Triton's tensorrt_plan backend runs engines of full "
                            "TensorRT (the version its container ships), not TensorRT-RTX: serve the .onnx it was "
                            "built from, or build with --format trt where that TensorRT runs")
    prof, src = info["profile"], info["source_onnx"]
    lo, opt, hi = prof["min"][0], prof["opt"][0], prof["max"][0]
    if lo != 1 and lo != hi:
        raise ArtifactError(f"{path}: its profile takes batches {lo}..{hi}, but Triton sends any batch from 1 up to "
                            "max_batch_size; rebuild it with --min-batch 1 (or one fixed --batch)")
    n = len(info["classes"])
    inp, out = Tensor(INPUT_NAME, "float32", (-1, *prof["max"][1:])), Tensor(OUTPUT_NAME, "float32", (-1, n))
    notes = [_engine_note(info)]
    g = inspect_artifact(path.parent / src["file"]) if src["present"] and src["sha256_matches"] else None
    if g and len(g["inputs"]) == len(g["outputs"]) == 1:  # the graph it was built from says names and dtypes
        inp, out = (Tensor(t["name"], t["dtype"], s.shape) for t, s in ((g["inputs"][0], inp), (g["outputs"][0], out)))
    else:
        notes.append("input/output dtypes: float32, as vfpt-deploy exports (the ONNX the engine was built from is "
                     "not beside it to confirm)")
    if lo == hi:
        inp, out = Tensor(inp.name, inp.dtype, (hi, *inp.shape[1:])), Tensor(out.name, out.dtype, (hi, n))
    return TritonModel("engine", inp, out, info["classes"], None if lo == hi else (lo, opt, hi),
                       [(path, PLATFORMS["engine"][1])], info["sha256"], notes)


def _engine_note(info: dict) -> str:
    """Where Triton can load the engine: an engine is valid for one TensorRT version and GPU family."""
    build, gpu = info["build"], info["gpu"] or {}
    version = printable(info["tensorrt"].get("version")) + (" or later" if build.get("version_compatible") else "")
    where = ("any Ampere or newer GPU" if build.get("hardware_compatibility") == "ampere_plus" else
             f"a GPU like the one it was built on ({printable(gpu.get('name', 'not recorded'), 80)})")
    return f"Triton must run TensorRT {version} (pick the tritonserver release that ships it) on {where}"


def _refuse_multitask(path: Path) -> None:
    """One line for a multi-task artifact (see the module docstring); anything unreadable is left to
    inspect_artifact to report."""
    try:
        if is_engine(path):
            from vfpt_deploy.artifacts.schema import read_sidecar

            meta = read_sidecar(path)["metadata"]
        else:
            meta = read_graph(path).metadata
    except VFPTError:
        return
    if "tasks" in meta:
        raise UsageError(f"{path} is a multi-task artifact: Triton's classification extension takes one labels file "
                         "per output, but its class names depend on each request's task; serve it with "
                         "'vfpt-deploy serve' (each task its own model name), or export the tasks one by one for Triton")


def read_model(path: str | os.PathLike) -> tuple[TritonModel, dict]:
    """The artifact as Triton will see it (an ONNX file or a TensorRT engine with its sidecar), and
    its inspection."""
    path = Path(path)
    if not is_engine(path) and path.suffix.lower() not in ONNX_SUFFIXES:
        raise UsageError(f"{path}: Triton serves an exported .onnx or a TensorRT .engine/.plan; export the run "
                         "first ('vfpt-deploy export')")
    _refuse_multitask(path)
    info = inspect_artifact(path)
    model = _engine_model(path, info) if info["kind"] == "engine" else _onnx_model(path, info)
    bad = next((c for c in model.classes if c and c.splitlines() != [c]), None)
    if bad is not None:
        raise ArtifactError(f"{path}: class name {bad[:40]!r} holds a line break, which a labels file cannot keep; "
                            "re-export with other class names")
    return model, info


def check_verified(path: Path, info: dict) -> str:
    """A passing verification report about this very file (an engine: the engine itself, run on its GPU),
    or VerificationError."""
    v = info["verification"]
    if v["state"] == "passed":  # loosened (or unrecorded) tolerances are never a plain "verified"
        head = "verified" if v.get("loosened") == [] else "verified with LOOSENED tolerances"
        return f"{head}: {v['report']} passed for this file (same sha256) {v.get('covers', '')}".rstrip()
    why = {"missing": f"there is no {v['report']}", "failed": f"{v['report']} says it failed",
           "stale": f"{v['report']} is about another file (sha256 differs)",
           "unhashed": f"{v['report']} does not record the file's sha256 (written by an older vfpt-deploy)",
           "unreadable": f"{v['report']} is unreadable"}[v["state"]]
    raise VerificationError(f"{path} has not passed verification ({why}); run 'vfpt-deploy verify {path} --ckpt RUN.pt' "
                            "first, or pass --no-verify-check to write the repository anyway")


# -- writing ------------------------------------------------------------------------------------------------
def default_name(path: Path) -> str:
    """The artifact's file stem as a Triton model name ('run.fp16.onnx' -> 'run.fp16')."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem).lstrip(".-")[:128]
    return name or "model"


def _check_paths(repo: Path, final: Path, inputs: list[Path]) -> None:
    """Nothing the command reads may lie inside the folder it replaces."""
    if repo.exists() and not repo.is_dir():
        raise OutputError(f"--out {repo} is a file; name a folder for the Triton model repository")
    if final.is_symlink() or (final.exists() and not (final.is_dir() and _replaceable(final))):
        raise OutputError(f"{final} exists and is not a Triton model folder (no {CONFIG_FILE}); it is not replaced: "
                          "remove it or choose another --name")
    replaced = [(final / rel).resolve() for rel in (VERSION, CONFIG_FILE, LABELS_FILE)]
    for p in inputs:
        if any(p.resolve().is_relative_to(t) for t in replaced):
            raise OutputError(f"{p} lies inside {final}/{VERSION} (or is its config or labels), which this command "
                              "replaces: writing it would destroy the input; choose another --out or --name")


def _replaceable(folder: Path) -> bool:
    """An existing folder this command may replace: a Triton model folder, or an empty one."""
    return (folder / CONFIG_FILE).is_file() or not any(folder.iterdir())


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    os.chmod(dst, umask_mode())


def _write_folder(folder: Path, model: TritonModel, config_text: str) -> list[Path]:
    """NAME/config.pbtxt, NAME/labels.txt and NAME/1/..., in a staging folder; the model copy is checked
    against the sha256 that was inspected (and verified), so the repository holds exactly that file."""
    files = []
    for src, rel in model.files:
        _copy(src, folder / VERSION / rel)
        files.append(folder / VERSION / rel)
    if file_sha256(files[0]) != model.sha256:
        raise ArtifactError(f"{model.files[0][0]} changed while it was copied; run the command again")
    for rel, text in ((CONFIG_FILE, config_text), (LABELS_FILE, "".join(c + "\n" for c in model.classes))):
        (folder / rel).write_text(text, encoding="utf-8")
        os.chmod(folder / rel, umask_mode())
        files.append(folder / rel)
    return files


def _move_in(new: Path, final: Path, trash: Path) -> list[str]:
    """Move the staged model folder's entries (1/, config.pbtxt, labels.txt) into `final`, keeping everything
    else there. The old 1/ goes to `trash` (removed with the staging folder); an old config or labels file
    that differs is kept beside as NAME.previous. Every step is undone if a later one fails. Returns notes."""
    created = not final.exists()
    final.mkdir(parents=True, exist_ok=True)
    ours = [VERSION, CONFIG_FILE, LABELS_FILE]
    kept = sorted(p.name + ("/" if p.is_dir() else "") for p in final.iterdir()
                  if p.name not in ours and not p.name.endswith(".previous"))
    done: list[tuple[Path, Path]] = []  # renames, undone in reverse if a later one fails
    kept_as_previous = []

    def move(a: Path, b: Path) -> None:
        os.replace(a, b)
        done.append((a, b))

    try:
        for rel in ours:
            src, dst = new / rel, final / rel
            if dst.exists() or dst.is_symlink():
                same = dst.is_file() and not dst.is_symlink() and dst.read_bytes() == src.read_bytes()
                if rel == VERSION or same:
                    move(dst, trash / f"old-{rel}")
                else:  # never delete a config or labels file that is not the one written now
                    move(dst, final / f"{rel}.previous")
                    kept_as_previous.append(rel)
            move(src, dst)
    except OSError:
        for a, b in reversed(done):
            os.replace(b, a)
        if created:
            final.rmdir()
        raise
    notes = []
    if kept:
        notes.append(f"{final} keeps what was there besides {VERSION}/, {CONFIG_FILE}, {LABELS_FILE}: "
                     f"{', '.join(kept[:8])}{' ...' if len(kept) > 8 else ''}")
    higher = [k.rstrip("/") for k in kept if k.endswith("/") and k.rstrip("/").isdigit() and int(k.rstrip("/")) > 1]
    if higher:
        notes.append(f"Triton serves the highest version by default: {final.name} version {max(higher, key=int)} "
                     f"will be served, not the {VERSION}/ written now (remove it, or set a version_policy)")
    notes += [f"the earlier {rel} differed and was kept as {rel}.previous" for rel in kept_as_previous]
    return notes


def _companions(artifact: Path, info: dict) -> list[Path]:
    """The files beside an artifact that describe it: report, sidecar, the ONNX an engine was built from."""
    names = [info["verification"]["report"], info.get("sidecar")]
    src = (info.get("source_onnx") or {}).get("file")
    if src and Path(src).name == src:
        names += [src, report_path(artifact.with_name(src)).name]
    return [artifact.with_name(n) for n in names if n]


def write_triton_repository(artifact: str | os.PathLike, repo_dir: str | os.PathLike,
                            settings: TritonSettings | None = None, *, require_verified: bool = True,
                            **options) -> TritonResult:
    """Write REPO_DIR/NAME for a verified .onnx or TensorRT engine. settings: a TritonSettings, or its
    fields as keyword options (name=, max_batch_size=, instances=, kind=, preferred_batch_sizes=,
    max_queue_delay_us=, dynamic_batching=). require_verified=False skips the verification check
    (the result's notes say so)."""
    from google.protobuf import text_format

    settings = (settings or TritonSettings(**options)).check()
    artifact, repo = Path(artifact), Path(repo_dir)
    model, info = read_model(artifact)
    notes = [check_verified(artifact, info) if require_verified else "verification NOT checked (--no-verify-check)"]
    name = settings.name or default_name(artifact)
    cfg = model_config(model, settings, name, artifact)
    text = text_format.MessageToString(cfg)
    final = repo / name
    _check_paths(repo, final, [src for src, _ in model.files] + _companions(artifact, info))
    with Staging(repo) as stage:
        staged = _write_folder(stage.dir / name, model, text)
        files = [final / p.relative_to(stage.dir / name) for p in staged]
        notes += _move_in(stage.dir / name, final, stage.dir)
    return TritonResult(final, name, cfg.platform, cfg.max_batch_size, text, files, notes + model.notes)
