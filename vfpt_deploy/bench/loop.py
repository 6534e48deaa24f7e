"""The bench loop and its statistics: every requested backend that can run here measured over the batch
sweep (and, for a multi-task artifact, its task streams), each row timed by runtime.timing.measure and
summarized (mean, std, percentiles, throughput, peak memory); a backend that cannot run is a skip with its
reason."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
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
from vfpt_deploy.runtime.timing import LoopSpec, machine_info, measure, peak_rss_bytes, reset_peak_rss, summarize


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
ROUNDS = 5  # round-robin rounds per batch size: every backend's timed calls are spread over them


def split_loop(spec: LoopSpec, rounds: int = ROUNDS) -> list[LoopSpec]:
    """The timed part of `spec` as round-robin chunks without warm-up: a count split as evenly as it goes
    (at most `iters` chunks), a duration in equal parts (each with its share of min_iters)."""
    if spec.iters is not None:
        r = max(1, min(rounds, spec.iters))
        return [LoopSpec(warmup=0, iters=spec.iters // r + (i < spec.iters % r)) for i in range(r)]
    return [LoopSpec(warmup=0, iters=None, duration_s=spec.duration_s / rounds,
                     min_iters=-(-spec.min_iters // rounds)) for _ in range(rounds)]


@dataclass
class _Cell:
    """One row being measured: a backend at a batch size (stream, timing), its calls gathered over rounds."""

    key: tuple
    backend: Backend
    batch: int
    e2e: bool
    stream: Stream | None
    ids: np.ndarray | None
    fn: Callable[[], object]
    times: list = field(default_factory=list)
    rss: int = 0
    cuda: float | None = None
    scoped: bool = True

    def warm_up(self, spec: LoopSpec) -> None:
        if spec.warmup is not None:
            for _ in range(spec.warmup):
                self.fn()
        else:  # by time: measure's warm-up, its one timed call dropped
            measure(self.fn, LoopSpec(warmup=None, warmup_s=spec.warmup_s, iters=1))

    def run(self, spec: LoopSpec) -> None:
        self.backend.cuda_peak_reset()
        self.scoped = reset_peak_rss() and self.scoped
        self.times.extend(measure(self.fn, spec, self.backend.timer(self.e2e)))
        self.rss = max(self.rss, peak_rss_bytes())
        peak = self.backend.cuda_peak_mib()
        if peak is not None:
            self.cuda = max(self.cuda or 0.0, peak)

    def result(self, rounds: int) -> Result:
        b = self.backend
        timing = "end-to-end" if self.e2e else ("host" if b.device == "cpu" else "device")
        detail = {**b.detail, "rss_scope": "row" if self.scoped else "process", "rounds": rounds}
        if self.ids is not None:  # how many images of each task the measured batch held
            counts = np.bincount(self.ids, minlength=len(b.tasks))
            detail["task_counts"] = {t: int(c) for t, c in zip(b.tasks, counts) if c}
        return Result(b.name, self.batch, timing, summarize(np.asarray(self.times), self.batch).to_dict(),
                      round(self.rss / MiB, 1), self.cuda, b.device, list(b.providers), detail,
                      self.stream.label if self.stream else None)


def add_skip(report: BenchReport, backend: str, reason: str, batch: int | None = None) -> None:
    """Record a skip once: the same backend skipped for the same reason at several batch sizes is one
    entry listing them."""
    for s in report.skipped:
        if s.backend == backend and s.reason == reason:
            if batch is not None and batch not in s.batches:
                s.batches.append(batch)
            return
    report.skipped.append(Skipped(backend, reason, batch, [batch] if batch is not None else []))


def measure_backends(backends: list[Backend], settings: BenchSettings, report: BenchReport,
                     on_row: Callable[[Result], None] | None = None,
                     status: Callable[[str], None] | None = None) -> None:
    """Every backend's batch sweep, interleaved: at each batch size every row (backend, stream, timing) is
    warmed up, then timed round-robin in split_loop's chunks, each round starting one row later, so a change
    in the machine's load lands on all of them alike rather than on whichever ran last. Every batch's input
    is checked to fit memory before the first is allocated. Rows come back backend by backend."""
    for backend in backends:
        settings.check_memory(backend.image_size)
    chunks = split_loop(settings.loop)
    rows: dict[tuple, Result] = {}
    for bi, batch in enumerate(settings.batches):
        cells: list[_Cell] = []
        for k, backend in enumerate(backends):
            modes = [False] + ([True] if settings.e2e and backend.device != "cpu" else [])
            for si, stream in enumerate(streams(backend.tasks, settings.task)):  # mixed, then one task
                ids = None if stream is None else stream_task_ids(backend.tasks, stream, batch, settings.seed)
                for e2e in modes:
                    try:
                        fn = backend.runner(batch, e2e, ids)
                    except Unavailable as e:
                        add_skip(report, backend.name, str(e), batch)
                        continue
                    cells.append(_Cell((k, bi, si, e2e), backend, batch, e2e, stream, ids, fn))
        if not cells:
            continue
        if status:
            status(f"batch {batch}: {len(cells)} row{'s' if len(cells) > 1 else ''} "
                   f"({', '.join(dict.fromkeys(c.backend.name for c in cells))}), {len(chunks)} rounds round-robin")
        for c in cells:
            c.warm_up(settings.loop)
        for r, spec in enumerate(chunks):
            for c in cells[r % len(cells):] + cells[:r % len(cells)]:
                c.run(spec)
        for c in cells:
            rows[c.key] = c.result(len(chunks))
            if on_row:
                on_row(rows[c.key])
    report.results.extend(rows[k] for k in sorted(rows))


def measure_backend(backend: Backend, settings: BenchSettings, report: BenchReport,
                    on_row: Callable[[Result], None] | None = None) -> None:
    """One backend's batch sweep (measure_backends with one backend)."""
    measure_backends([backend], settings, report, on_row)


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
    """One bench run in progress: what it was asked, the backends made so far, and where rows and status go."""

    settings: BenchSettings
    report: BenchReport
    wanted: list[str]
    on_row: Callable[[Result], None] | None
    status: Callable[[str], None]
    backends: list[Backend] = field(default_factory=list)

    def backend(self, name: str, make: Callable[[], Backend]) -> None:
        """Make one backend (measured later, interleaved with the others), or record why it was skipped."""
        try:
            backend = make()
        except Unavailable as e:
            self.skip(name, str(e))
            return
        runs = [st.label for st in streams(backend.tasks, self.settings.task) if st]
        on = f" ({len(backend.tasks)} tasks; streams: {', '.join(runs)})" if runs else ""
        self.status(f"loaded {name} on {backend.device}{on}")
        self.backends.append(backend)

    def skip(self, name: str, reason: str) -> None:
        add_skip(self.report, name, reason)

    def measure(self) -> None:
        measure_backends(self.backends, self.settings, self.report, self.on_row, self.status)

    def close(self) -> None:
        for b in self.backends:
            b.close()


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
    report.machine.update(bench_machine())
    try:
        run = _load_run(checkpoint, backbone_weights, bench.status)
        _torch_backends(bench, run)
        with tempfile.TemporaryDirectory(prefix="vfpt-bench-") as tmp:
            _ort_backends(bench, run, [Path(p) for p in onnx], Path(export_dir or tmp))
            _tensorrt_backends(bench, [Path(p) for p in engines])
            bench.measure()
    finally:
        bench.close()
        report.machine["load_after"] = load_average()
        if torch:
            torch.set_num_threads(old_threads)
    if not report.results:
        reasons = "; ".join(f"{s.backend}: {s.reason}" for s in report.skipped) or "no backend selected"
        raise RuntimeSetupError(f"no backend could run here ({reasons})")
    return report


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def bench_machine() -> dict:
    """What bench adds to timing.machine_info: the CPU's arch and numeric ISA flags (runtime.hardware) and
    the load average before measuring (load_after is added when done): a number measured on a loaded shared
    machine says so."""
    from vfpt_deploy.runtime.hardware import cpu

    c = cpu()
    return {"arch": c["arch"], "isa": list(c["isa"]), "load_before": load_average()}


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
