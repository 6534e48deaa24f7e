"""The predictor interface every runtime backend shares: metadata -> preprocessing -> logits -> top-k.

A backend (onnxruntime, TensorRT) implements `infer` on a preprocessed float32 NCHW batch; everything
else -- preprocessing from the artifact's own (checked) metadata, batching, softmax, top-k with class
names, per-file errors -- lives here once. The metadata schema is vfpt_deploy.artifacts.schema.
Predictors hold sessions or GPU buffers: close() them, or use them as context managers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vfpt_deploy.errors import ImageError, UsageError
from vfpt_deploy.artifacts.schema import (ARTIFACT_FORMAT, INPUT_NAME, OUTPUT_NAME, decode_metadata, encode_metadata,  # noqa: F401
                                task_names)

from .preprocess import Preprocess


@dataclass
class Prediction:
    source: str
    top: list[tuple[str, float]]  # (class name, probability), best first; empty when error is set
    error: str | None = None  # why this input could not be classified (the others still are)
    task: str | None = None  # multi-task artifacts: the task it was classified for


class Predictor:
    """Base class. Subclasses set self.metadata (decoded) and implement infer().

    A multi-task artifact (metadata `tasks`) takes a task index per sample besides the images, and its
    logits are as wide as its widest task; `task_ids` turns names into indices (one line naming the
    tasks for a wrong one) and `task_logits` trims a row to its task's classes."""

    metadata: dict  # decoded, as stored
    preprocess: Preprocess  # checked (schema.check_metadata) when the predictor opens
    graph_precision: str | None = None  # what the ONNX graph itself computes in, where it was read
    notes: tuple[str, ...] = ()  # one line each: what the user should know about running it here (an int8 form
    # that can saturate on this CPU: hardware.int8_isa_note); predict, serve and verify show them
    max_batch: int = 32

    @property
    def classes(self) -> list[str]:
        """The class names of a single-task artifact ([] for a multi-task one: see classes_of)."""
        return list(self.metadata.get("classes") or [])

    @property
    def tasks(self) -> list[str]:
        """Task names in index order; [] for a single-task artifact."""
        return task_names(self.metadata)

    def classes_of(self, task: int | None) -> list[str]:
        """The class names a sample of task index `task` is classified into (None: single-task)."""
        return self.classes if task is None else list(self.metadata["tasks"][task]["classes"])

    def task_ids(self, task: str | list[str] | None, count: int) -> np.ndarray | None:
        """int64 task indices for `count` samples from one name or one per sample; None for a single-task
        artifact (which refuses a task)."""
        names = self.tasks
        if not names:
            if task is not None:
                raise UsageError("this artifact holds a single task; drop --task")
            return None
        if task is None:
            raise UsageError(f"this artifact holds {len(names)} tasks ({', '.join(names)}); pick one with --task NAME")
        if not isinstance(task, (str, list, tuple)):
            raise UsageError(f"task must be a task name or a list of them, got {type(task).__name__}")
        wanted = [task] * count if isinstance(task, str) else list(task)
        if len(wanted) != count:
            raise UsageError(f"{len(wanted)} task names for {count} inputs; give one task, or one per input")
        index = {n: i for i, n in enumerate(names)}
        bad = next((t for t in wanted if t not in index), None)
        if bad is not None:
            near = next((n for n in names if n.lower() == str(bad).lower()), None)  # names differ ignoring case
            hint = f" (did you mean {near!r}?)" if near else ""
            raise UsageError(f"unknown task {str(bad)[:80]!r}{hint}; this artifact holds {', '.join(names)}")
        return np.array([index[t] for t in wanted], dtype=np.int64)

    def close(self) -> None:
        """Release the session / device memory. Safe to call twice."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def infer(self, batch: np.ndarray, task_ids: np.ndarray | None = None) -> np.ndarray:
        """float32 [B, 3, H, W] (+ int64 [B] task indices for a multi-task artifact) -> float32 logits [B, C]."""
        raise NotImplementedError

    def check_task_ids(self, batch: np.ndarray, task_ids: np.ndarray | None) -> np.ndarray | None:
        """The backends' guard: a multi-task artifact needs one in-range index per sample (a graph's Gather
        would wrap a negative one or fail on a large one), a single-task one none."""
        if not self.tasks:
            if task_ids is not None:
                raise UsageError("this artifact holds a single task; it takes no task indices")
            return None
        want = f"a multi-task artifact needs one integer task index in [0, {len(self.tasks)}) per image"
        try:
            ids = np.asarray(task_ids)
        except (TypeError, ValueError, OverflowError):
            raise UsageError(want) from None
        # integers only: a float would be truncated and a bool read as 0/1 without a word
        if task_ids is None or ids.dtype.kind not in "iu" or ids.ndim != 1 or len(ids) != len(batch):
            raise UsageError(f"{want}; got {'none' if task_ids is None else f'{ids.dtype} {list(ids.shape)}'}")
        if len(ids) and not (0 <= ids.min() and ids.max() < len(self.tasks)):
            raise UsageError(f"{want}; got {int(ids.min())}..{int(ids.max())}")
        return np.ascontiguousarray(ids, dtype=np.int64)

    def logits(self, images: list[Image.Image], task_ids: np.ndarray | None = None) -> np.ndarray:
        pre, n = self.preprocess, self.max_batch
        outs = [self.infer(pre.batch(images[i:i + n]), None if task_ids is None else task_ids[i:i + n])
                for i in range(0, len(images), n)]
        width = len(self.classes) or max([len(t["classes"]) for t in self.metadata.get("tasks") or []] or [0])
        return np.concatenate(outs) if outs else np.zeros((0, width), np.float32)

    def task_logits(self, row: np.ndarray, task: int | None) -> np.ndarray:
        """A logits row trimmed to its task's classes (the graph pads the rest with -inf)."""
        return row if task is None else row[:len(self.classes_of(task))]

    def predict(self, sources: list[str | Path | Image.Image], top_k: int = 5,
                task: str | list[str] | None = None) -> list[Prediction]:
        """Top-k per input, in input order. task: the task name for every input, or one per input
        (multi-task artifacts only). An unreadable image, or an input whose logits are not finite, gets a
        Prediction with `error` set; the others are still classified. Files are decoded one at a time and
        only max_batch preprocessed arrays are held at once, so memory does not grow with the number of files
        (or with the sizes they claim: runtime/preprocess.py)."""
        ids = self.task_ids(task, len(sources))
        out: list[Prediction] = []
        for start in range(0, len(sources), max(1, self.max_batch)):
            chunk = range(start, min(start + max(1, self.max_batch), len(sources)))
            out += self._predict_chunk(sources, chunk, ids, top_k)
        return out

    def _predict_chunk(self, sources, chunk: range, ids: np.ndarray | None, top_k: int) -> list[Prediction]:
        names = {i: str(sources[i]) if not isinstance(sources[i], Image.Image) else "<image>" for i in chunk}
        tname = (lambda i: None) if ids is None else (lambda i: self.tasks[ids[i]])
        arrays, ok, out = [], [], {}
        for i in chunk:
            s = sources[i]
            try:
                arrays.append(self.preprocess(s) if isinstance(s, Image.Image) else self.preprocess.load(s))
                ok.append(i)
            except ImageError as e:
                out[i] = Prediction(names[i], [], str(e), tname(i))
        if ok:
            x = np.stack(arrays)
            del arrays
            logits = self.infer(x, None if ids is None else ids[ok]).astype(np.float64)
        for i, full in zip(ok, logits if ok else []):
            t = None if ids is None else int(ids[i])
            row = self.task_logits(full, t)
            classes = self.classes_of(t) or [str(c) for c in range(len(row))]
            if not np.isfinite(row).all():
                out[i] = Prediction(names[i], [], f"{names[i]}: the model's logits are not finite (NaN or Inf) for "
                                    "this input", tname(i))
                continue
            z = np.exp(row - row.max())
            p = z / z.sum()
            idx = np.argsort(-p, kind="stable")[:min(top_k, len(p))]
            out[i] = Prediction(names[i], [(classes[j], float(p[j])) for j in idx], None, tname(i))
        return [out[i] for i in chunk]
