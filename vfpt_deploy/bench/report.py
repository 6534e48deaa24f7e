"""A bench run's results: rows and skips, written as strict JSON, CSV or a PNG plot, and shown as a table
with the machine they came from."""
from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vfpt_deploy.artifacts.files import atomic_write, dumps_json
from vfpt_deploy.bench.settings import FORMAT, VERSION
from vfpt_deploy.errors import VFPTError


@dataclass
class Result:
    backend: str
    batch: int
    timing: str  # "host" (perf_counter, CPU), "device" (CUDA events, data on device), "end-to-end"
    stats: dict
    peak_rss_mib: float  # peak resident memory of the process while this row ran (everything loaded)
    cuda_peak_mib: float | None  # torch allocator's peak on the GPU (None: CPU, or memory torch cannot see)
    device: str
    providers: list[str] = field(default_factory=list)  # onnxruntime: what the session really uses
    detail: dict = field(default_factory=dict)  # fold mode, artifact, a multi-task batch's task counts, ...
    stream: str | None = None  # multi-task artifacts: "mixed" or "task:NAME" (Stream.label); None: single-task

    def flat(self) -> dict:
        return {"backend": self.backend, "batch": self.batch, "timing": self.timing, "stream": self.stream or "",
                **self.stats,
                "peak_rss_mib": self.peak_rss_mib, "cuda_peak_mib": self.cuda_peak_mib, "device": self.device,
                "providers": ";".join(self.providers),
                "detail": dumps_json(self.detail, sort_keys=True) if self.detail else ""}


@dataclass
class Skipped:
    backend: str
    reason: str
    batch: int | None = None  # the first batch size it was skipped at (None: the whole backend)
    batches: list[int] = field(default_factory=list)  # every batch size skipped for this reason

    def line(self) -> str:
        """'ort-cuda-graph at batches 1, 8: reason' -- one line per backend and reason."""
        where = (f" at batch{'es' if len(self.batches) > 1 else ''} {', '.join(map(str, self.batches))}"
                 if self.batches else "")
        return f"{self.backend}{where}: {self.reason}"


@dataclass
class BenchReport:
    machine: dict
    settings: dict
    results: list[Result] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "machine": self.machine, "settings": self.settings,
                "results": [asdict(r) for r in self.results], "skipped": [asdict(s) for s in self.skipped]}

    def write_json(self, path: str | os.PathLike) -> Path:
        text = dumps_json(self.to_dict(), indent=2)  # strict: a non-finite number is written as null
        atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))
        return Path(path)

    def write_csv(self, path: str | os.PathLike) -> Path:
        """One row per result; every row carries the machine and the settings that produced it."""
        m = self.machine
        machine_cols = {"cpu_model": m.get("cpu_model"), "physical_cores": m.get("physical_cores"),
                        "logical_cpus": m.get("logical_cpus"), "usable_cpus": m.get("usable_cpus"),
                        "threads": self.settings.get("threads"), "gpus": ";".join(m.get("gpus") or []),
                        "versions": dumps_json(m.get("versions", {}), sort_keys=True), "time_utc": m.get("time_utc"),
                        "isa": " ".join(m.get("isa") or []),
                        "load_before": ";".join(map(str, m.get("load_before") or [])),
                        "load_after": ";".join(map(str, m.get("load_after") or []))}
        rows = [{**r.flat(), **machine_cols} for r in self.results]

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                if not rows:
                    f.write("")
                    return
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)

        atomic_write(path, write)
        return Path(path)

    def plot(self, path: str | os.PathLike) -> Path:
        """PNG: p50 latency (bars to p95) and throughput vs batch size, one line per backend and timing."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not self.results:
            raise VFPTError("nothing was measured, so there is nothing to plot")
        series: dict[str, list[Result]] = {}
        for r in self.results:
            label = r.backend if r.timing in ("host", "device") else f"{r.backend} ({r.timing})"
            label += f" [{r.stream}]" if r.stream else ""
            series.setdefault(label, []).append(r)
        fig, (ax_lat, ax_thr) = plt.subplots(1, 2, figsize=(12, 4.8))
        for label, rows in series.items():
            rows = sorted(rows, key=lambda r: r.batch)
            b = [r.batch for r in rows]
            p50 = np.array([r.stats["p50_ms"] for r in rows])
            p95 = np.array([r.stats["p95_ms"] for r in rows])
            ax_lat.errorbar(b, p50, yerr=[np.zeros_like(p50), p95 - p50], marker="o", capsize=3, label=label)
            ax_thr.plot(b, [r.stats["throughput"] for r in rows], marker="o", label=label)
        batches = sorted({r.batch for r in self.results})
        for ax, ylabel in ((ax_lat, "latency per call, ms (p50, bar to p95)"), (ax_thr, "throughput, images/s")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.set_xlabel("batch size")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_lat.legend(fontsize=8)
        fig.suptitle(machine_line(self.machine, self.settings.get("threads")), fontsize=9)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
        plt.close(fig)
        return Path(path)


def skip_lines(skipped: list[Skipped]) -> list[str]:
    """Each skip said once: backends skipped for the same reason (at the same batch sizes) share one line,
    'ort-cuda, ort-cuda-graph: this onnxruntime build has no CUDAExecutionProvider ...'."""
    groups: dict[tuple, list[str]] = {}
    for s in skipped:
        groups.setdefault((s.reason, tuple(s.batches)), []).append(s.backend)
    return [Skipped(", ".join(names), reason, None, list(batches)).line() for (reason, batches), names in groups.items()]


def machine_line(machine: dict, threads: int | None = None) -> str:
    gpu = ", ".join(machine.get("gpus") or []) or "no GPU"
    v = machine.get("versions", {})
    ort = v.get("onnxruntime-gpu") or v.get("onnxruntime")
    isa = f", ISA {' '.join(machine['isa']) or 'unknown'}" if "isa" in machine else ""
    return (f"{machine.get('cpu_model')}{isa}, {machine.get('physical_cores')} cores / {machine.get('usable_cpus')} "
            f"usable CPUs, threads {threads or 'default'}; {gpu}; torch {v.get('torch', '-')}, onnxruntime {ort or '-'}"
            f"{load_text(machine)}")


def load_text(machine: dict) -> str:
    """'; load 1.2 -> 3.4 (1-min average, before -> after)', or '' when not recorded."""
    before, after = machine.get("load_before"), machine.get("load_after")
    if not before and not after:
        return ""
    show = lambda v: f"{v[0]:.2f}" if v else "?"  # noqa: E731
    return f"; load {show(before)} -> {show(after)} (1-min average, before -> after)"


def _ms(v: float) -> str:
    return f"{v:.0f}" if v >= 1000 else f"{v:.1f}" if v >= 100 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def results_table(report: BenchReport):
    """A rich Table of every result row (the machine as its caption; print it with width=table_width so
    narrow terminals wrap rather than elide numbers); columns that say nothing here
    (timing when everything ran on the CPU, CUDA peak without a GPU) are left out."""
    from rich import box
    from rich.table import Table

    rows = report.results
    show_timing = any(r.timing != "host" for r in rows)
    show_cuda = any(r.cuda_peak_mib is not None for r in rows)
    show_stream = any(r.stream for r in rows)  # a multi-task artifact: which task stream each row replayed
    t = Table(title="latency per call, ms", caption=machine_line(report.machine, report.settings.get("threads")),
              box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left", caption_justify="left")
    cols = ["backend", "batch"] + (["timing"] if show_timing else []) + (["stream"] if show_stream else []) + \
        ["n", "mean", "std", "p50", "p90", "p95", "p99", "img/s", "RSS MiB"] + (["CUDA MiB"] if show_cuda else [])
    for col in cols:
        t.add_column(col, justify="left" if col in ("backend", "timing", "stream") else "right", no_wrap=True)
    for r in rows:
        s = r.stats
        cells = [r.backend, str(r.batch)] + ([r.timing] if show_timing else []) + \
            ([r.stream or "-"] if show_stream else []) + [str(s["n"])]
        cells += [_ms(s[k]) for k in ("mean_ms", "std_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms")]
        cells += [f"{s['throughput']:.0f}" if s["throughput"] >= 100 else f"{s['throughput']:.1f}", f"{r.peak_rss_mib:.0f}"]
        if show_cuda:
            cells.append("-" if r.cuda_peak_mib is None else f"{r.cuda_peak_mib:.0f}")
        t.add_row(*cells)
    return t


def table_width(report: BenchReport) -> int:
    """Characters the results table needs: every column at its widest cell, plus the gaps."""
    t = results_table(report)
    from rich.console import Console

    return Console(width=1000).measure(t).maximum
