"""The bench loop and its statistics: every requested backend that can run here measured over the batch
sweep (and, for a multi-task artifact, its task streams), each row timed by runtime.timing.measure and
summarized (mean, std, percentiles, throughput, peak memory); a backend that cannot run is a skip with its
reason."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from vfpt_deploy.artifacts.files import not_a_file, regular_file
from vfpt_deploy.artifacts.schema import artifact_tasks
from vfpt_deploy.bench.backends import Backend, OrtBackend, TensorRTBackend, TorchBackend
from vfpt_deploy.bench.report import BenchReport, Result, Skipped
from vfpt_deploy.bench.settings import BACKENDS, BenchSettings, MiB
from vfpt_deploy.errors import InputError, RuntimeSetupError, Unavailable, UsageError, VerificationError
from vfpt_deploy.extras import needs_extras
from vfpt_deploy.runtime.timing import machine_info, measure, peak_rss_bytes, reset_peak_rss, summarize


# -- task streams (multi-task artifacts) ----------------------------------------------------------------
@dataclass(frozen=True)
class Stream:
    """Which task each image of a multi-task artifact's batches is for: every image `task`, or (None) the
    mixed stream."""

    task: str | None = None

    @property
    def label(self) -> str:
        return "mixed" if self.task is None else f"task:{self.task}"  # ':' is in no task name (schema.TASK_NAME)


def streams(tasks: list[str], task: str | None) -> list[Stream | None]:
    """The streams a backend is measured on: [None] for a single-task artifact; mixed, then `task` alone."""
    if not tasks:
        return [None]
    return [Stream()] + ([Stream(task)] if task is not None else [])


def stream_task_ids(tasks: list[str], stream: Stream, batch: int, seed: int) -> np.ndarray:
    """int64 task indices of one batch. Mixed: each image's task is uniform at random over the T tasks, and
    the batch is balanced (min(b, T) different tasks, counts differing by at most one) rather than drawn
    independently, so that every batch of two or more images really mixes tasks; seeded by (seed, batch)."""
    if stream.task is not None:
        return np.full(batch, tasks.index(stream.task), dtype=np.int64)
    rng = np.random.default_rng([seed, batch])
    ids = np.resize(rng.permutation(len(tasks)), batch)  # a random subset of tasks when batch < T
    rng.shuffle(ids)
    return ids.astype(np.int64)


def check_task_request(checkpoint, artifacts: list, task: str | None) -> None:
    """`--task NAME` picks one task of multi-task artifacts: refused (one line) with a run.pt or a
    single-task artifact, and for a name an artifact does not hold (its tasks listed)."""
    if task is None:
        return
    shown = repr(str(task)[:80])
    if checkpoint is not None:
        raise UsageError(f"--task {shown} picks a task of a multi-task .onnx/.engine, but a run.pt holds a single "
                         "task: drop --task, or benchmark the run.pt in its own run")
    for path in artifacts:
        names = [t["name"] for t in artifact_tasks(Path(path))]
        if not names:
            raise UsageError(f"--task {shown}: {path} holds a single task; drop --task")
        if task not in names:
            raise UsageError(f"--task {shown}: {path} has no such task; it holds {', '.join(names)}")


# -- running -----------------------------------------------------------------------------------------
def measure_backend(backend: Backend, settings: BenchSettings, report: BenchReport,
                    on_row: Callable[[Result], None] | None = None) -> None:
    """The batch sweep of one backend; e2e rows on GPU backends when asked. Every batch's input is checked
    to fit memory before the first is allocated."""
    settings.check_memory(backend.image_size)
    modes = [False] + ([True] if settings.e2e and backend.device != "cpu" else [])
    for batch in settings.batches:
        for stream in streams(backend.tasks, settings.task):  # mixed and single-task rows back to back
            ids = None if stream is None else stream_task_ids(backend.tasks, stream, batch, settings.seed)
            for e2e in modes:
                try:
                    fn = backend.runner(batch, e2e, ids)
                except Unavailable as e:
                    report.skipped.append(Skipped(backend.name, str(e), batch))
                    continue
                row = _measure_row(backend, batch, e2e, fn, settings, stream, ids)
                report.results.append(row)
                if on_row:
                    on_row(row)


def _measure_row(backend: Backend, batch: int, e2e: bool, fn: Callable[[], object], settings: BenchSettings,
                 stream: Stream | None = None, task_ids: np.ndarray | None = None) -> Result:
    backend.cuda_peak_reset()
    scoped = reset_peak_rss()
    seconds = measure(fn, settings.loop, backend.timer(e2e))
    timing = "end-to-end" if e2e else ("host" if backend.device == "cpu" else "device")
    detail = {**backend.detail, "rss_scope": "row" if scoped else "process"}
    if task_ids is not None:  # how many images of each task the measured batch held
        counts = np.bincount(task_ids, minlength=len(backend.tasks))
        detail["task_counts"] = {t: int(c) for t, c in zip(backend.tasks, counts) if c}
    return Result(backend.name, batch, timing, summarize(seconds, batch).to_dict(),
                  round(peak_rss_bytes() / MiB, 1), backend.cuda_peak_mib(), backend.device,
                  list(backend.providers), detail, stream.label if stream else None)


def check_request(checkpoint, onnx: list, engines: list, backends: list[str] | None) -> list[str]:
    """The backends to run (BACKENDS when none named); one-line errors for a request that cannot work."""
    wanted = list(backends) if backends else list(BACKENDS)
    unknown = [b for b in wanted if b not in BACKENDS]
    if unknown:
        raise UsageError(f"unknown backend {unknown[0]!r}; choose from {', '.join(BACKENDS)}")
    if checkpoint is None and not onnx and not engines:
        raise UsageError("nothing to benchmark: pass a run.pt and/or --onnx FILE / --engine FILE")
    for p in [*onnx, *engines]:
        if not regular_file(p):
            raise InputError(f"artifact {p} {not_a_file(p, 'export one with ' + repr('vfpt-deploy export'))}")
    needs_ckpt = [b for b in wanted if b in ("torch", "torch-folded")]
    if backends and needs_ckpt and checkpoint is None:
        raise UsageError(f"backend {needs_ckpt[0]} runs the PyTorch model: pass the run.pt it comes from")
    if backends and "tensorrt" in wanted and not engines:
        raise UsageError("backend tensorrt needs an engine file: pass --engine FILE")
    return wanted


@dataclass
class _Run:
    """One bench run in progress: what it was asked, and where rows, skips and status go."""

    settings: BenchSettings
    report: BenchReport
    wanted: list[str]
    on_row: Callable[[Result], None] | None
    status: Callable[[str], None]

    def backend(self, name: str, make: Callable[[], Backend]) -> None:
        """Make one backend and measure its batch sweep, or record why it was skipped."""
        try:
            backend = make()
        except Unavailable as e:
            self.skip(name, str(e))
            self.status(f"skipping {name}: {e}")
            return
        runs = [st.label for st in streams(backend.tasks, self.settings.task) if st]
        on = f" ({len(backend.tasks)} tasks; streams: {', '.join(runs)})" if runs else ""
        self.status(f"measuring {name} on {backend.device}{on}")
        try:
            measure_backend(backend, self.settings, self.report, self.on_row)
        finally:
            backend.close()

    def skip(self, name: str, reason: str) -> None:
        self.report.skipped.append(Skipped(name, reason))


def run_bench(*, checkpoint: str | os.PathLike | None = None, onnx: list[str | os.PathLike] = (),
              engines: list[str | os.PathLike] = (), backends: list[str] | None = None,
              settings: BenchSettings | None = None, backbone_weights: str | None = None,
              export_dir: str | os.PathLike | None = None,
              on_row: Callable[[Result], None] | None = None,
              on_status: Callable[[str], None] | None = None) -> BenchReport:
    """Benchmark a run.pt and/or exported artifacts on every requested backend that can run here.

    checkpoint: gives torch and torch-folded, and is exported to ONNX (settings.fold, through the export
      pipeline, verified) for the ort-* backends when no ONNX file is given.
    onnx / engines: artifacts for the ort-* backends / the tensorrt backend. A multi-task one is measured on
      the mixed-task stream, and on settings.task's single-task stream when set (module docstring).
    backends: names from BACKENDS; None: all of them (the unusable ones are reported as skipped).
    """
    settings = (settings or BenchSettings()).check()
    wanted = check_request(checkpoint, onnx, engines, backends)
    check_task_request(checkpoint, [*onnx, *engines], settings.task)
    report = BenchReport(machine_info(), {**settings.to_dict(), "backends": wanted,
                                          "checkpoint": str(checkpoint) if checkpoint else None,
                                          "onnx": [str(p) for p in onnx], "engines": [str(p) for p in engines]})
    bench = _Run(settings, report, wanted, on_row, on_status or (lambda s: None))
    try:
        import torch
    except ImportError:  # the lean install (no [export]): the ort-* and tensorrt backends still run
        torch = None
    old_threads = torch.get_num_threads() if torch else None
    if torch and settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        run = _load_run(checkpoint, backbone_weights, bench.status)
        _torch_backends(bench, run)
        with tempfile.TemporaryDirectory(prefix="vfpt-bench-") as tmp:
            _ort_backends(bench, run, [Path(p) for p in onnx], Path(export_dir or tmp))
        _tensorrt_backends(bench, [Path(p) for p in engines])
    finally:
        if torch:
            torch.set_num_threads(old_threads)
    if not report.results:
        reasons = "; ".join(f"{s.backend}: {s.reason}" for s in report.skipped) or "no backend selected"
        raise RuntimeSetupError(f"no backend could run here ({reasons})")
    return report


def _load_run(checkpoint, backbone_weights: str | None, status: Callable[[str], None]):
    if checkpoint is None:
        return None
    with needs_extras("benchmarking a run.pt"):  # PyTorch and timm: the [export] extra
        from vfpt_deploy.artifacts.checkpoint import load_run

    status(f"loading {checkpoint}")
    return load_run(checkpoint, backbone_weights=backbone_weights)


def _torch_backends(bench: _Run, run) -> None:
    for name in [b for b in bench.wanted if b in ("torch", "torch-folded")]:
        if run is None:
            bench.skip(name, "no run.pt given (PyTorch backends run the checkpoint)")
            continue
        if name == "torch":
            module, detail = run.model, {"fold": "none (live FFT)"}
        else:
            from vfpt_deploy.folding import fold_model

            module = fold_model(run.model, bench.settings.fold)
            detail = {"fold": module.fold_mode}
        s = bench.settings
        bench.backend(name, lambda: TorchBackend(name, module, run.model.img_size, s.device, s.seed, detail, s.dtype))


def _ort_backends(bench: _Run, run, onnx_files: list[Path], export_dir: Path) -> None:
    kinds = [b for b in bench.wanted if b.startswith("ort-")]
    if not kinds:
        return
    if not onnx_files and run is not None and bench.settings.fold != "none":
        onnx_files = [_export(bench, run, export_dir)]
    if not onnx_files:
        why = ("the live FFT (--fold none) cannot be exported to ONNX: pass --onnx FILE or another --fold"
               if run is not None else "no ONNX file or run.pt given")
        for kind in kinds:
            bench.skip(kind, why)
    s = bench.settings
    for kind in kinds:
        for path in onnx_files:
            label = kind if len(onnx_files) == 1 else f"{kind}:{path.stem}"
            bench.backend(label, lambda: OrtBackend(label, kind, path, s.threads, s.seed, {}))


def _export(bench: _Run, run, export_dir: Path) -> Path:
    """The run exported to ONNX by the one export pipeline (fold, export, verify against PyTorch)."""
    from vfpt_deploy.pipeline import ExportSettings, export_run

    fold = bench.settings.fold
    out = export_dir / f"{Path(run.path).stem}.{fold}.onnx"
    bench.status(f"exporting {run.path} to ONNX (fold {fold})")
    outcome = export_run(run, ExportSettings(format="onnx", fold=fold), out=out)
    if not outcome.passed:
        raise VerificationError(f"the ONNX exported from {run.path} (fold {fold}) failed verification against "
                                "PyTorch, so it is not benchmarked; run 'vfpt-deploy export' to see the report")
    return outcome.onnx_path


def _tensorrt_backends(bench: _Run, engines: list[Path]) -> None:
    if "tensorrt" not in bench.wanted:
        return
    if not engines:
        bench.skip("tensorrt", "no engine file given (--engine FILE, built by 'vfpt-deploy export --format trt')")
    for path in engines:
        label = "tensorrt" if len(engines) == 1 else f"tensorrt:{path.stem}"
        bench.backend(label, lambda: TensorRTBackend(label, path, bench.settings.seed))
