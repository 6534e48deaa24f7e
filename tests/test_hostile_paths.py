"""Hostile paths (issue 24): a FIFO, socket or device given where a file belongs is named for what it is, in
one line, without blocking on it; a file whose name leaves no room for its report name can still be
inspected and predicted, and a command that must write beside it says why it cannot; usage errors about
arguments come before PyTorch is imported."""
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image
from typer.testing import CliRunner

from vfpt_deploy.cli import app


@pytest.fixture
def fifo(tmp_path):
    """A FIFO named f.onnx, and a helper that unblocks any reader within half a second (opens the FIFO for
    writing and closes it: the reader sees end of file). Without the fix a command blocked reading it then
    fails on the empty read instead of hanging the test run."""
    path = tmp_path / "f.onnx"
    os.mkfifo(path)
    stop = threading.Event()

    def unblock():
        while not stop.wait(0.5):
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO while nobody reads
            except OSError:
                pass

    t = threading.Thread(target=unblock, daemon=True)
    t.start()
    yield path
    stop.set()
    t.join()


def _special(kind: str, tmp_path, fifo_path):
    if kind == "fifo":
        return fifo_path, "is a named pipe (FIFO), not a regular file"
    if kind == "socket":
        path = tmp_path / "s.onnx"
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
        return path, "is a socket, not a regular file"
    return "/dev/null", "is a character device, not a regular file"


def _one_error_line(res, what: str) -> str:
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 1, res.output
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert what in lines[0] and "save the content to a file" in lines[0], lines[0]
    assert "does not exist" not in lines[0]
    return lines[0]


@pytest.mark.parametrize("kind", ["fifo", "socket", "device"])
@pytest.mark.parametrize("command", ["inspect", "predict", "verify", "triton", "image"])
def test_a_special_file_is_named_for_what_it_is(exported_run, tmp_path, fifo, kind, command):
    if (kind, command) == ("device", "triton"):
        pytest.skip("/dev/null has no .onnx suffix: triton refuses it by name first")
    path, what = _special(kind, tmp_path, fifo)
    img = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (10, 200, 90)).save(img)
    args = {"inspect": ["inspect", str(path)], "predict": ["predict", str(path), str(img)],
            "verify": ["verify", str(path)], "triton": ["triton", str(path), "--out", str(tmp_path / "repo")],
            "image": ["predict", str(exported_run[1]), str(path)]}[command]
    t0 = time.monotonic()
    res = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    _one_error_line(res, what)
    assert time.monotonic() - t0 < 30  # answered, not blocked on the FIFO until the helper unblocked it
    assert not (tmp_path / "repo").exists()


# -- a file name near NAME_MAX (255 bytes): ARTIFACT.verify.json cannot exist beside it ------------------------
@pytest.fixture
def long_named(exported_run, tmp_path):
    path = tmp_path / ("m" * 250 + ".onnx")  # 255 bytes, the limit; its report name would be 267
    shutil.copyfile(exported_run[1], path)
    img = tmp_path / ("i" * 250 + ".png")
    Image.new("RGB", (40, 30), (10, 200, 90)).save(img)
    return path, img


def test_a_file_named_near_the_limit_can_be_inspected_and_used(long_named):
    path, img = long_named
    res = CliRunner().invoke(app, ["inspect", str(path), "--json"])
    assert res.exit_code == 0, res.output
    assert '"state": "missing"' in res.output  # its report cannot exist, so there is none
    res = CliRunner().invoke(app, ["predict", str(path), str(img), "--json"])
    assert res.exit_code == 0, res.output


def test_a_report_name_over_the_limit_is_one_line_naming_the_fix(exported_run, long_named, tmp_path):
    path, _ = long_named
    res = CliRunner().invoke(app, ["verify", str(path)], env={"COLUMNS": "2000"})
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "over the 255 this file system allows" in lines[0] and "--report" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, long_named[1].name])  # nothing written
    ckpt = exported_run[1].with_name("run.pt")
    res = CliRunner().invoke(app, ["verify", str(path), "--ckpt", str(ckpt), "--report", str(tmp_path / "r.json")])
    assert res.exit_code == 0 and (tmp_path / "r.json").is_file(), res.output  # the fix the line names works


def test_a_long_file_name_named_on_the_serve_command_line(long_named, monkeypatch):
    pytest.importorskip("mlserver")
    from vfpt_deploy.runtime.serve_settings import parse_models

    path, _ = long_named
    monkeypatch.chdir(path.parent)
    (item,) = parse_models([f"m={path.name}"])  # 'm=<250 bytes>' is itself a name too long to look up
    assert item.name == "m" and item.path.name == path.name and item.named


# -- usage errors before PyTorch ------------------------------------------------------------------------------
CHECK_TORCH = """
import atexit, sys
atexit.register(lambda: sys.stderr.write("torch imported: %s\\n" % ("torch" in sys.modules)))
sys.argv = ["vfpt-deploy", *sys.argv[1:]]
from vfpt_deploy.cli import run
run()
"""


@pytest.mark.parametrize("args, message", [
    (["export", "--task", "BADNAME"], "--task takes NAME=PATH"),
    (["export", "--task", "a=x.pt", "--task", "A=y.pt"], "two tasks are named"),
    (["export", "--ckpt", "missing.pt"], "checkpoint missing.pt does not exist"),
    (["export", "--ckpt", "missing.pt", "--task", "b=other.pt", "--out", "t.onnx"], "does not exist"),
    (["verify", "ART.onnx", "--ckpt", "missing.pt"], "checkpoint missing.pt does not exist"),
    (["import", "missing.pth", "--alpha", "0.5"], "checkpoint missing.pth does not exist"),
])
def test_usage_errors_come_before_torch_is_imported(exported_run, tmp_path, args, message):
    shutil.copyfile(exported_run[1], tmp_path / "ART.onnx")
    res = subprocess.run([sys.executable, "-c", CHECK_TORCH, *args], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode in (1, 2), res.stderr
    assert message in res.stderr, res.stderr
    assert "torch imported: False" in res.stderr, res.stderr
