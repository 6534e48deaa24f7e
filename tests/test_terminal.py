"""Logs for machines (vfpt_deploy/terminal.py): without a terminal, long commands print plain progress lines
at least every 30 s (step, epoch, ETA), and result tables are never split mid-number or mid-verdict."""
import io
import re

from rich.console import Console
from typer.testing import CliRunner

import vfpt_deploy.terminal as terminal
from conftest import TINY, TINY_KWARGS
from vfpt_deploy.artifacts.compare import Comparison, VerifyReport
from vfpt_deploy.cli import app
from vfpt_deploy.terminal import LogConsole, LogProgress


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def log_console(width: int = 80) -> LogConsole:
    return LogConsole(file=io.StringIO(), width=width)  # a file: not a terminal, like a CI log or a pipe


def stamped(console: LogConsole, clock: FakeClock, lines: list) -> None:
    """Record (simulated time, line) for every line the console prints."""
    write = console.file.write
    console.file.write = lambda text: [lines.append((clock(), ln)) for ln in text.splitlines() if ln] and write(text)


def test_log_progress_prints_a_line_at_least_every_30_s_with_epoch_and_eta():
    clock, console, lines = FakeClock(), log_console(), []
    stamped(console, clock, lines)
    steps, epochs = 400, 10
    with LogProgress(console, clock=clock, heartbeat=False) as bar:
        task = bar.add_task("training", total=None, epochs=epochs)
        for s in range(1, steps + 1):
            clock.now += 1.3  # 8.7 minutes of simulated training
            bar.update(task, completed=s, total=steps)
    times = [t for t, _ in lines]
    assert len(lines) >= 520 / 30, lines
    assert max(b - a for a, b in zip(times, times[1:])) <= 30
    mid = next(text for _, text in lines if "step 200/400" in text or "(5" in text)
    assert re.search(r"training: step \d+/400 \(\d+%\), epoch \d+/10, elapsed 0:\d\d:\d\d, ETA 0:\d\d:\d\d", mid), mid
    assert lines[-1][1].startswith("training: step 400/400 (100%), epoch 10/10")


def test_the_heartbeat_prints_during_a_long_silent_step():
    clock, console = FakeClock(), log_console()
    bar = LogProgress(console, clock=clock, heartbeat=False)
    bar.add_task("verifying against PyTorch")
    clock.now += 10
    bar.tick()
    assert console.file.getvalue().count("\n") == 1  # the start line only: nothing new to say yet
    clock.now += 20
    bar.tick()
    assert console.file.getvalue().splitlines()[-1] == "verifying against PyTorch: elapsed 0:00:30"


def test_a_train_run_without_a_terminal_prints_progress_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(terminal, "HEARTBEAT_S", 0.0)  # simulated time: every step is 'long enough'
    args = ["train", "--out", tmp_path / "run.pt", "--model", TINY,
            *sum((["--model-arg", f"{k}={v}"] for k, v in TINY_KWARGS.items()), []), "--weights", "random",
            "--epochs", 2, "--prompts", 2, "--batch-size", 512, "--warmup-epochs", 0]
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    steps = re.findall(r"^training: step (\d+)/(\d+) \(\d+%\), epoch (\d)/2, elapsed", res.output, re.M)
    assert steps and steps[-1][0] == steps[-1][1] and steps[-1][2] == "2", res.output
    assert "ETA" in res.output


def verify_report() -> VerifyReport:
    bad = Comparison("builtin digits-shifted val: 397 images", 397, 2.86e-05, 1e-6, 4.1e-07, 0.99999912, 97.48,
                     99.5, 91.23, 89.17, failures=["top-1 agreement 97.48% < 100%", "top-1 fell 2.06 points"])
    good = Comparison("random N(0,1) x16", 16, 1.91e-05, 1e-6, 3.9e-07, 1.0, 100.0)
    return VerifyReport("runs/demo/run.onnx", "runs/demo/run.pt", "CPUExecutionProvider", "fp32",
                        "max |diff| <= 0.0001, top-1 agreement >= 100%", [good, bad])


def test_a_table_in_an_80_column_log_splits_no_number_and_no_verdict(capsys, monkeypatch):
    from vfpt_deploy import cli

    console = log_console(80)
    monkeypatch.setattr(cli, "console", console)
    cli.print_verify(verify_report())
    out = console.file.getvalue()
    for whole in ("2.86e-05", "1.91e-05", "4.1e-07", "0.9999991", "97.48%", "91.23% / 89.17% (-2.06)",
                  "FAIL: top-1 agreement 97.48% < 100%; top-1 fell 2.06 points", "builtin digits-shifted val: 397 images"):
        assert whole in out, f"{whole!r} split or elided in:\n{out}"
    rows = [ln for ln in out.splitlines() if "digits-shifted" in ln]
    assert len(rows) == 1 and "FAIL" in rows[0], out  # one row, one line


def test_a_terminal_keeps_rich_layout():
    from rich.progress import Progress

    console = Console(file=io.StringIO(), width=80, force_terminal=True)

    assert isinstance(terminal.progress(console), Progress)
    assert isinstance(terminal.progress(log_console()), LogProgress)
