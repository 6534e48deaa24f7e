"""Where the command line's output goes and how it looks: the one place that decides between a terminal and a
log (CI, `| tee`, a file).

A terminal gets rich's live progress bars and tables fitted to its width. A log gets what a reader of a CI log
can trust:
  - progress as plain lines (LogProgress): one when a task starts or changes phase, then at least every
    HEARTBEAT_S seconds while the command runs (step / total, epoch, elapsed, ETA), from a heartbeat thread
    too, so a long silent phase (an export, a verification) still shows it is alive;
  - tables printed at their natural width, however narrow the log's console thinks it is, so that a number or
    a verdict is never split over two lines; other text is not hard-wrapped either.
`--json` output does not pass through here (the CLI prints it with print()), so it stays exact.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable

from rich.console import Console
from rich.measure import Measurement

HEARTBEAT_S = 25.0  # a log sees a progress line at least this often (the promise is: at least every 30 s)
WIDEST = 4000  # the widest a table is laid out in a log (a table wider than this still wraps there)


class LogConsole(Console):
    """A rich Console that, when it does not write to a terminal, prints tables unwrapped (at the width
    they need) and text without hard line breaks; on a terminal it is rich's own."""

    def print(self, *objects, **kwargs) -> None:  # noqa: A003 (rich's name)
        if self.is_terminal or not objects:
            return super().print(*objects, **kwargs)
        if all(isinstance(o, str) for o in objects):
            kwargs.setdefault("soft_wrap", True)
            return super().print(*objects, **kwargs)
        need = max((natural_width(self, o) for o in objects if not isinstance(o, str)), default=0)
        with self._lock:
            saved = self._width
            if need > self.width:
                self._width = need
            try:
                super().print(*objects, **kwargs)
            finally:
                self._width = saved


def natural_width(console: Console, renderable) -> int:
    """Characters a renderable needs on one line per row (a table: every column at its widest cell)."""
    try:
        return Measurement.get(console, console.options.update_width(WIDEST), renderable).maximum
    except Exception:  # not measurable: leave the console's width alone
        return 0


console = LogConsole()  # results (stdout)
err_console = LogConsole(stderr=True)  # status, progress, notes and errors (stderr)


def print_wide(renderable, console: Console | None = None) -> None:
    """Print a table at the width it needs, on a terminal too (a narrow terminal then wraps whole lines
    rather than eliding or splitting numbers): bench's results."""
    console = console or globals()["console"]
    need = natural_width(console, renderable)
    with console._lock:
        saved = console._width
        console._width = max(console.width, need)
        try:
            Console.print(console, renderable)
        finally:
            console._width = saved


# -- progress ---------------------------------------------------------------------------------------------
def _clock_text(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class _Task:
    def __init__(self, description: str, total, completed, fields: dict, now: float) -> None:
        self.description, self.total, self.completed, self.fields = description, total, completed or 0, fields
        self.start = now


class LogProgress:
    """Progress for a log: the part of rich.progress.Progress the CLI uses (add_task, update, console, a
    context manager), printed as plain lines.

    A line is printed when a task is added or its description changes, when it completes, and otherwise at
    most once per `every` seconds on update; tick() (called each second by a heartbeat thread while the
    context is open) prints the latest task's line when nothing was printed for `every` seconds. A task
    added with epochs=E (a rich field) shows 'epoch e/E'. `clock` is injectable (tests simulate time)."""

    def __init__(self, console: Console, *, every: float | None = None, clock: Callable[[], float] = time.monotonic,
                 heartbeat: bool = True) -> None:
        self.console = console
        self.every = HEARTBEAT_S if every is None else every
        self.clock = clock
        self.heartbeat = heartbeat
        self._tasks: dict[int, _Task] = {}
        self._current: int | None = None
        self._last = clock()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "LogProgress":
        if self.heartbeat:
            self._thread = threading.Thread(target=self._beat, name="vfpt-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _beat(self) -> None:
        while not self._stop.wait(1.0):
            self.tick()

    def add_task(self, description: str, total: float | None = None, completed: float = 0, *, quiet: bool = False,
                 **fields) -> int:
        """A new task, its line printed now (quiet: first by the heartbeat or an update)."""
        with self._lock:
            task_id = len(self._tasks)
            self._tasks[task_id] = _Task(description, total, completed, fields, self.clock())
            self._current = task_id
            if quiet:
                self._last = self.clock()
            else:
                self._print(task_id)
            return task_id

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, **fields) -> None:
        with self._lock:
            t = self._tasks[task_id]
            phase = description is not None and description != t.description
            if description is not None:
                t.description = description
            if total is not None:
                t.total = total
            if completed is not None:
                t.completed = completed
            if advance is not None:
                t.completed += advance
            t.fields.update(fields)
            self._current = task_id
            done = t.total is not None and t.completed >= t.total
            if phase or done or self.clock() - self._last >= self.every:
                self._print(task_id)

    def tick(self) -> None:
        """Print the current task's line when nothing was printed for `every` seconds (the heartbeat)."""
        with self._lock:
            if self._current is not None and self.clock() - self._last >= self.every:
                self._print(self._current)

    def line(self, task_id: int) -> str:
        t = self._tasks[task_id]
        elapsed = self.clock() - t.start
        parts = []
        if t.total:
            done = min(t.completed, t.total)
            parts.append(f"step {done:.0f}/{t.total:.0f} ({100 * done / t.total:.0f}%)")
            epochs = t.fields.get("epochs")
            if epochs:
                parts.append(f"epoch {max(1, min(epochs, -(-int(done) * int(epochs) // int(t.total))))}/{epochs}")
        parts.append(f"elapsed {_clock_text(elapsed)}")
        if t.total and 0 < t.completed < t.total:
            parts.append(f"ETA {_clock_text(elapsed / t.completed * (t.total - t.completed))}")
        return f"{t.description}: {', '.join(parts)}"

    def _print(self, task_id: int) -> None:
        self._last = self.clock()
        self.console.print(self.line(task_id), markup=False, highlight=False, soft_wrap=True)


def progress(console: Console | None = None):
    """The progress display for `console` (default: stderr): rich's live bars on a terminal, LogProgress
    lines in a log."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    console = console or err_console
    if not console.is_terminal:
        return LogProgress(console)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)


@contextmanager
def activity(message: str, console: Console | None = None):
    """One long step without a step count (fold + export + verify, a verification, a bench run): a spinner on
    a terminal; in a log, '<message>: elapsed ...' lines at least every HEARTBEAT_S once it runs that long. Yields
    say(text): a status line (printed on a terminal; in a log, the new phase whose line the heartbeat repeats)."""
    from rich.markup import escape

    from vfpt_deploy.text import printable

    console = console or err_console
    if console.is_terminal:
        with console.status(escape(message)) as status:
            def say(text: str) -> None:
                console.print(f"[cyan]{escape(printable(text))}[/]", highlight=False)
                status.update(escape(printable(text)))

            yield say
        return
    with LogProgress(console) as bar:
        task = bar.add_task(printable(message), quiet=True)  # a quick command (or a usage error) stays quiet
        yield lambda text: bar.update(task, description=printable(text))
