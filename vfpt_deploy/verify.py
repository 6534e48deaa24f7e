"""Verify an exported artifact against the unfolded PyTorch model, Polygraphy-comparator style:
tolerances stated up front, then a report of what was compared, on what inputs, and by how much it
differed. The reference is always the unfolded model from the checkpoint (live FFT), in float32.

The gate: a comparison fails on any non-finite logit (reference or artifact), on max |diff| > atol,
max relative diff > rtol, a per-sample cosine < min_cosine, top-1 agreement < min_agreement, or a
top-k order that differs where the reference's own logits are not tied. The artifact's metadata must
be usable by the runtime (the predictor checks it when it opens) and must describe the checkpoint
(classes, preprocessing, source hash).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vfpt_deploy.artifacts.checkpoint import Run
from vfpt_deploy.artifacts.compare import TOP_K, Comparison, Tolerances, VerifyReport, compare  # noqa: F401 (re-exported)
from .errors import InputError, UsageError, VFPTError
from vfpt_deploy.artifacts.files import file_sha256
from vfpt_deploy.models.families import family_of_model
from vfpt_deploy.folding.multitask import TaskSet
from vfpt_deploy.artifacts.schema import is_engine, report_path as default_report_path
from vfpt_deploy.artifacts.strength import data_record, destination


@dataclass
class InputSet:
    what: str
    x: np.ndarray  # float32 NCHW, preprocessed
    labels: np.ndarray | None
    random: bool = False  # N(0,1) noise, not images


MAX_RANDOM = 4096


def input_sets(run: Run, data: str | None, num_random: int, seed: int = 0) -> list[InputSet]:
    """Random inputs always, plus real images from `data` ('builtin[:name]', a folder with class
    subfolders (gives top-1), or image files). Loaded up front, so a bad --data fails before any work."""
    if isinstance(num_random, bool) or not isinstance(num_random, int) or not 1 <= num_random <= MAX_RANDOM:
        raise UsageError(f"--num-random must be an integer in [1, {MAX_RANDOM}], got {num_random!r}")
    h, w = run.model.img_size
    g = torch.Generator().manual_seed(seed)
    sets = [InputSet(f"random N(0,1) x{num_random}", torch.randn(num_random, 3, h, w, generator=g).numpy(), None,
                     random=True)]
    if data:
        sets.append(_image_set(run, data))
    return sets


def _image_set(run: Run, data: str) -> InputSet:
    from .data import builtin_split, image_folder
    from vfpt_deploy.runtime.preprocess import find_images

    if data == "builtin" or data.startswith("builtin:"):
        name = data.partition(":")[2] or "digits-shifted"
        images, what = builtin_split(name, "val"), f"builtin {name} val"
        if images.classes != list(run.classes):  # its labels would be scored against another head
            raise InputError(f"--data {data} has the classes {', '.join(images.classes)}, the model "
                             f"{len(run.classes)} others; pass a folder of images without class subfolders "
                             "(no labels), or a folder whose subfolders are the model's classes")
    elif Path(data).is_dir() and any(p.is_dir() for p in Path(data).iterdir()):
        images, what = image_folder(data, classes=run.classes), f"folder {data}"
    else:
        files = find_images([data])  # decoded one at a time, only the preprocessed arrays kept
        return InputSet(f"{data}: {len(files)} images", run.preprocess.batch(files), None)
    return InputSet(f"{what}: {len(images)} images", run.preprocess.batch(images.items), np.array(images.labels))


@torch.inference_mode()
def reference_logits(run: Run, x: np.ndarray, batch: int = 32, device: str = "cpu") -> np.ndarray:
    model = run.model.eval().float().to(device)
    try:
        return np.concatenate([model(torch.from_numpy(x[i:i + batch]).to(device)).cpu().numpy()
                               for i in range(0, len(x), batch)])
    finally:
        model.cpu()


GOLDEN_RANDOM, GOLDEN_IMAGES = 2, 4  # golden rows per task: random inputs, real images (halved per task
GOLDEN_CANDIDATES = 32  # when there are several); chosen by the clearest top-1 margin among this many


def _margins(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 logit, relative to the row's largest |logit|: how far a row is from a top-1 tie."""
    if logits.shape[1] < 2:
        return np.ones(len(logits))
    top2 = np.sort(logits, axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) / np.maximum(np.abs(logits).max(1), 1e-12)


def _pick(run: Run, s: InputSet, count: int, device: str) -> np.ndarray:
    """The `count` inputs of a set (of its first GOLDEN_CANDIDATES) whose reference top-1 is clearest, so a
    replay on another machine tests the artifact, not a coin-flip between two near-equal classes."""
    cand = s.x[:GOLDEN_CANDIDATES]
    keep = np.sort(np.argsort(-_margins(reference_logits(run, cand, device=device)), kind="stable")[:count])
    return keep


def make_golden(run: Run | TaskSet, sets: list[InputSet] | list[list[InputSet]], tol: Tolerances, precision: str,
                width: int | None = None, device: str = "cpu", rows: tuple[int, int] | None = None):
    """The golden set an export writes into its artifact (vfpt_deploy/golden.py): per task up to 2 of the
    verification's random inputs and up to 4 of its real images (1 and 2 per task for several tasks), stored
    as float16, with the unfolded float32 model's logits computed on exactly those stored values. rows: (random,
    images) per task instead (a prompt pack keeps its file small with (1, 2))."""
    from vfpt_deploy.runtime import hardware

    from vfpt_deploy.artifacts.golden import GoldenSet

    multi = isinstance(run, TaskSet)
    runs, per_task = (run.runs, sets) if multi else ([run], [sets])
    n_rand, n_img = rows or ((1, 2) if multi and len(runs) > 1 else (GOLDEN_RANDOM, GOLDEN_IMAGES))
    width = width or max(len(r.classes) for r in runs)
    xs, logits, labels, tasks, records, start = [], [], [], [], [], 0
    for t, (r, task_sets) in enumerate(zip(runs, per_task)):
        for s in task_sets:
            keep = _pick(r, s, n_rand if s.random else n_img, device)
            x16 = s.x[keep].astype(np.float16)
            ref = reference_logits(r, x16.astype(np.float32), device=device)
            padded = np.zeros((len(keep), width), np.float32)
            padded[:, :ref.shape[1]] = ref
            xs.append(x16), logits.append(padded), tasks.append(np.full(len(keep), t, np.int64))
            labels.append(s.labels[keep].astype(np.int64) if s.labels is not None else np.full(len(keep), -1, np.int64))
            what = f"{len(keep)} of {s.what}" + ("" if s.random else " (clearest top-1)")
            records.append({"what": (f"task {run.names[t]}: " if multi else "") + what, "start": start,
                            "stop": start + len(keep), "random": s.random, "task": t if multi else None})
            start += len(keep)
    ref_hw = hardware.describe([f"PyTorch {device}"], gpu=device.startswith("cuda"))
    return GoldenSet(np.concatenate(xs), np.concatenate(logits), np.concatenate(labels),
                     np.concatenate(tasks) if multi else None, records, precision, tol,
                     {"model": "unfolded PyTorch, float32", "hardware": ref_hw})


def golden_problems(golden, run: Run | TaskSet, device: str = "cpu") -> list[str]:
    """Where the artifact's golden reference is not this checkpoint's unfolded model on the stored inputs (it
    belongs to another run, or was altered): held to the fp32 gate."""
    multi = isinstance(run, TaskSet)
    fp32 = Tolerances.for_precision("fp32")
    problems = []
    for s in golden.sets:
        r = run.runs[s["task"]] if multi else run
        rows = slice(s["start"], s["stop"])
        ref = reference_logits(r, golden.x[rows], device=device)
        c = compare(ref, golden.logits[rows, :ref.shape[1]], fp32, s["what"])
        if c.failures:
            problems.append(f"the golden set's reference for {s['what']!r} is not this checkpoint's model "
                            f"({c.failures[0]}): it came from another run or was altered; re-export the artifact")
    return problems


def graph_precision(predictor, claimed: str) -> tuple[str, str | None]:
    """The precision the tolerances are chosen by: the ONNX graph's own (fp16 if it computes in half,
    read once by the predictor), not the metadata's word for it, so a tampered 'fp16' cannot loosen an
    fp32 model's gate. Engines report theirs through the sidecar TensorRT wrote."""
    actual = predictor.graph_precision
    if actual is None:
        return claimed, None
    if actual != claimed:
        return actual, f"the metadata says {claimed} but the graph computes in {actual}: re-export it"
    return actual, None


def metadata_problems(meta: dict, run: Run) -> list[str]:
    """Where the artifact's metadata does not describe this checkpoint (the runtime would then
    preprocess or name classes differently from the model that was verified)."""
    problems = []
    recorded = meta.get("checkpoint_sha256", "")
    if recorded and recorded != run.sha256:
        problems.append(f"the artifact was exported from checkpoint sha256 {recorded[:12]}, but the checkpoint is "
                        f"{run.sha256[:12]}: verify it against the checkpoint it came from")
    if list(meta.get("classes") or []) != list(run.classes):
        problems.append("the artifact's class names differ from the checkpoint's: re-export it")
    if meta.get("preprocess") != run.preprocess:
        problems.append("the artifact's preprocessing differs from the checkpoint's: re-export it")
    return problems


def _infer(predictor, x: np.ndarray, task_ids: np.ndarray | None = None, batch: int = 32) -> np.ndarray:
    return np.concatenate([predictor.infer(x[i:i + batch], None if task_ids is None else task_ids[i:i + batch])
                           for i in range(0, len(x), batch)])


def task_input_sets(tasks: TaskSet, data: str | list[str | None] | None, num_random: int) -> list[list[InputSet]]:
    """Per task: its own random inputs (seeded by task index, so the tasks of a mixed batch see different
    images) and the images of `data` (one for all, or one per task), checked against that task's classes."""
    out = []
    for t, (name, run) in enumerate(zip(tasks.names, tasks.runs)):
        try:
            out.append(input_sets(run, data[t] if isinstance(data, list) else data, num_random, seed=t))
        except UsageError:
            raise
        except VFPTError as e:
            one = isinstance(data, str) or (isinstance(data, list) and len(set(data)) == 1)  # one source for all
            hint = ("; with several tasks --data must suit each: a folder of images without class subfolders "
                    "does (or verify each task's own single-task export on its data)" if one and len(tasks) > 1 else "")
            raise type(e)(f"task {name!r}: {str(e).rstrip('.')}{hint}") from None
    return out


def task_metadata_problems(meta: dict, tasks: TaskSet) -> list[str]:
    """Where a multi-task artifact's tasks are not these checkpoints, in this order."""
    recorded = meta.get("tasks") or []
    if [t.get("name") for t in recorded] != list(tasks.names):
        return [f"the artifact holds tasks {[t.get('name') for t in recorded]}, the checkpoints given are "
                f"{list(tasks.names)}: pass each task's checkpoint (--task NAME=PATH)"]
    problems = []
    backbone = meta.get("backbone") if isinstance(meta.get("backbone"), dict) else {}
    if backbone.get("sha256") != tasks.first.backbone.sha256:
        problems.append("the artifact's backbone sha256 is not the checkpoints' backbone: re-export it")
    for t, run in zip(recorded, tasks.runs):
        for p in metadata_problems({**t, "preprocess": meta.get("preprocess")}, run):
            problems.append(f"task {t['name']!r}: {p}")
        if t.get("config") != run.config.to_dict() or t.get("num_prompts") != run.config.num_prompts:
            problems.append(f"task {t['name']!r}: the artifact's VFPT config is not the checkpoint's: re-export it")
        if t.get("fold") == "kv" and family_of_model(run.model).parts().kv_refusal(run.model) is not None:
            problems.append(f"task {t['name']!r}: the artifact says kv fold, which this checkpoint cannot have: re-export it")
    return problems


def _task_comparisons(predictor, tasks: TaskSet, inputs: list[list[InputSet]], tol: Tolerances, device: str,
                      problems: list[str]) -> list[Comparison]:
    """Every task's inputs through the artifact as ONE shuffled mixed-task stream (batches of 32 hold several
    tasks), each sample compared with its own task's unfolded model; padding logits must be -inf."""
    flat = [(t, s) for t, sets in enumerate(inputs) for s in sets]
    x = np.concatenate([s.x for _, s in flat])
    ids = np.concatenate([np.full(len(s.x), t, np.int64) for t, s in flat])
    order = np.random.default_rng(0).permutation(len(x))
    out = np.empty((len(x), predictor.infer(x[:1], ids[:1]).shape[1]), np.float32)
    out[order] = _infer(predictor, x[order], ids[order])
    comparisons, start = [], 0
    for t, s in flat:
        run, name, width = tasks.runs[t], tasks.names[t], len(tasks.runs[t].classes)
        rows = out[start:start + len(s.x)]
        start += len(s.x)
        if not np.all(np.isneginf(rows[:, width:])):
            problems.append(f"task {name!r}: logits past its {width} classes are not -inf (padding must never win); "
                            "re-export the artifact")
        ref = reference_logits(run, s.x, device=device)
        comparisons.append(compare(ref, rows[:, :width], tol, f"task {name}: {s.what}", s.labels,
                                   gated=tol.gate_random or not s.random))
    return comparisons


def verify_artifact(artifact: str | os.PathLike, run: Run | TaskSet, *, data: str | None = None, num_random: int = 16,
                    overrides: dict | None = None, providers: list[str] | None = None,
                    report_path: str | os.PathLike | None = None, inputs: list[InputSet] | None = None,
                    name: str | None = None, threads: int | None = None,
                    allow_fallback: bool = False, notes: list[str] | None = None, predictor=None) -> VerifyReport:
    """Compare an artifact (.onnx, or a TensorRT engine) with the checkpoint's unfolded model and write
    the JSON report (default: beside the artifact; there only when it is at least as strong as the passing
    report already there, else as NAME.verify.weaker.json: artifacts/strength.py). overrides: atol / rtol /
    min_cosine / min_agreement replacing the precision's defaults. name: how the report names the artifact
    (default: its path). run: a multitask.TaskSet for a multi-task artifact (inputs then per task:
    task_input_sets). notes: added to the report's (e.g. where its data came from).
    predictor: an open runtime predictor of the artifact to use (and close) instead of opening `artifact`: a
    prompt pack on its backbone (runtime/packs.py), where `artifact` is the pack file."""
    from vfpt_deploy.runtime import hardware
    from vfpt_deploy.runtime.onnx_runner import open_predictor
    from vfpt_deploy.runtime.selfcheck import golden_of, replay

    artifact = Path(artifact)
    kwargs = {"threads": threads, "allow_fallback": allow_fallback} if not is_engine(artifact) else {}
    multi = isinstance(run, TaskSet)
    if inputs is None:
        inputs = task_input_sets(run, data, num_random) if multi else input_sets(run, data, num_random)
    with predictor if predictor is not None else open_predictor(artifact, providers, **kwargs) as predictor:
        precision, problem = graph_precision(predictor, predictor.metadata.get("precision", "fp32"))
        tol = Tolerances.for_precision(precision).override(**(overrides or {}))
        # A TensorRT engine is compared with the PyTorch reference on the GPU, as it will be served.
        device = "cuda" if is_engine(artifact) and torch.cuda.is_available() else "cpu"
        meta = {**predictor.metadata, "preprocess": predictor.preprocess}
        problems = [problem, *(task_metadata_problems(meta, run) if multi else metadata_problems(meta, run))]
        if multi and not any(problems):
            comparisons = _task_comparisons(predictor, run, inputs, tol, device, problems)
        elif multi:
            comparisons = []  # the tasks do not match the checkpoints: comparing them would say nothing
        else:
            comparisons = [compare(reference_logits(run, s.x, device=device), _infer(predictor, s.x), tol, s.what,
                                   s.labels, gated=tol.gate_random or not s.random) for s in inputs]
        golden = golden_of(predictor, str(name or artifact))
        if golden is not None and comparisons:  # what the artifact carries is checked too: replayed, and its
            replayed, golden_issues = replay(predictor, golden, tol)  # reference recomputed from the checkpoint
            comparisons += replayed
            problems += golden_issues + golden_problems(golden, run, device)
            if golden.precision != precision:
                problems.append(f"the golden set was recorded for {golden.precision}, the graph computes in {precision}: "
                                "re-export the artifact")
        used = getattr(predictor, "providers", None) or ["TensorRT"]
        backend = ", ".join(used)
        notes = [*(notes or ()), *getattr(predictor, "notes", ())]  # e.g. an int8 form that can saturate here
    checkpoint = ", ".join(str(r.path) for r in run.runs) if multi else str(run.path)
    report = VerifyReport(name or str(artifact), checkpoint, f"{backend}; reference on {device}", precision,
                          tol.describe(), comparisons, [p for p in problems if p],
                          artifact_sha256=file_sha256(artifact), quantization=meta.get("quantization"),
                          tasks=list(run.names) if multi else None,
                          hardware=hardware.describe(used, gpu=is_engine(artifact) or None),
                          golden_sha256=golden.sha256 if golden is not None else "", notes=notes,
                          data=_data_records(run, inputs) if comparisons else [], limits=dataclasses.asdict(tol),
                          checkpoint_sha256=[r.sha256 for r in run.runs] if multi else [run.sha256])
    if comparisons and not any(c.gated for c in comparisons):
        report.problems.append(f"{precision} artifacts are gated on real images, and none were given: pass --data "
                               "builtin[:name] or a folder of images")
    beside = default_report_path(artifact)
    out = Path(report_path) if report_path else beside
    report.write(destination(out, report) if out.resolve() == beside.resolve() else out)
    return report


def _data_records(run: Run | TaskSet, inputs) -> list[dict]:
    """The report's `data`: every input set compared (per task for several), by name and size."""
    if isinstance(run, TaskSet):
        return [data_record(s.what, len(s.x), s.random, name) for name, sets in zip(run.names, inputs) for s in sets]
    return [data_record(s.what, len(s.x), s.random) for s in inputs]
