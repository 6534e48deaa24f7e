"""Hostile files, issue by issue: strings from an artifact never reach a terminal raw."""
import json

import onnx
import pytest
from PIL import Image
from typer.testing import CliRunner

from vfpt_deploy.cli import app
from vfpt_deploy.text import printable

NASTY = ["\x1b]0;pwned\x07", "\x1b[2J\x1b[H", "hid\x1b[8mden", "back\rspace", "bidi\u202eevil"]


@pytest.fixture
def crafted(exported_run, tmp_path):
    """The tiny export with class names that carry terminal escape sequences."""
    model = onnx.load(str(exported_run[1]))
    for p in model.metadata_props:
        if p.key == "vfpt.classes":
            p.value = json.dumps(NASTY[:4])
    path = tmp_path / "crafted.onnx"
    onnx.save(model, str(path))
    img = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (10, 200, 90)).save(img)
    return path, img


def test_printable_shows_control_characters_as_escapes():
    assert [printable(s) for s in NASTY] == ["\\x1b]0;pwned\\x07", "\\x1b[2J\\x1b[H", "hid\\x1b[8mden",
                                             "back\\rspace", "bidi\\u202eevil"]
    assert printable("élan ✓ 猫") == "élan ✓ 猫"  # printable text is left alone


@pytest.mark.parametrize("command", [["predict"], ["inspect"]])
def test_class_names_from_an_artifact_reach_the_terminal_escaped(crafted, command):
    path, img = crafted
    args = command + [str(path)] + ([str(img), "--top-k", "4"] if command == ["predict"] else [])
    res = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.output and "\r" not in res.output and "\u202e" not in res.output
    assert "\\x1b]0;pwned\\x07" in res.output or "pwned" in res.output


def test_json_output_keeps_the_exact_names(crafted):
    path, img = crafted
    res = CliRunner().invoke(app, ["predict", str(path), str(img), "--top-k", "4", "--json"])
    assert res.exit_code == 0
    assert "\x1b" not in res.output  # JSON escapes it ...
    assert {t["class"] for t in json.loads(res.output)["predictions"][0]["top"]} == set(NASTY[:4])  # ... exactly


# -- a full disk: one line, nothing replaced, no new empty folder; a killed run's litter is cleaned ------------
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from vfpt_deploy.errors import OutputError  # noqa: E402
from vfpt_deploy.artifacts.files import STALE_AFTER_S, Staging, atomic_write, clean_stale  # noqa: E402

DISK_ERRORS = {
    "torch.save": RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0: "
                               "PytorchStreamWriter failed writing file data/0: file write failed"),
    "torch.save (basic_ios)": RuntimeError("basic_ios::clear: iostream error"),
    "safetensors": type("SafetensorError", (Exception,), {})("Error while serializing: IoError(Os { code: 28, "
                                                             "kind: StorageFull, message: \"No space left on device\" })"),
    "OSError": OSError(28, "No space left on device"),
}


@pytest.mark.parametrize("kind", list(DISK_ERRORS))
def test_a_failed_write_is_one_line_and_leaves_no_new_folder(tmp_path, kind):
    target = tmp_path / "new" / "deeper" / "run.pt"

    def write(tmp):
        open(tmp, "wb").write(b"half")
        raise DISK_ERRORS[kind]

    with pytest.raises(OutputError, match=r"cannot write .*run\.pt \(.*\); free some space or choose another output"):
        atomic_write(target, write)
    assert not (tmp_path / "new").exists()  # the folders it made are gone again
    old = tmp_path / "kept.pt"
    old.write_bytes(b"old")
    with pytest.raises(OutputError):
        atomic_write(old, write)
    assert old.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["kept.pt"]


def test_a_programming_error_is_not_called_a_full_disk(tmp_path):
    with pytest.raises(ZeroDivisionError):
        atomic_write(tmp_path / "x", lambda tmp: 1 / 0)


def test_stale_temporaries_of_killed_runs_are_cleaned_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has exited
    stale = [tmp_path / f".vfpt-stage-{dead}-abc123", tmp_path / f".run.onnx.{dead}.x1y2.tmp"]
    stale[0].mkdir()
    (stale[0] / "run.onnx").write_bytes(b"half")
    stale[1].write_bytes(b"half")
    fresh = tmp_path / f".run.pt.{dead}.fresh.tmp"  # a dead process's, but too new to be sure
    live = tmp_path / f".vfpt-stage-{os.getppid()}-live"  # a running process's
    users = [tmp_path / ".vfpt-stage-notes", tmp_path / ".my.tmp", tmp_path / "run.pt"]  # not ours by name
    fresh.write_bytes(b"")
    live.mkdir()
    for u in users:
        u.write_bytes(b"mine")
    old = time.time() - STALE_AFTER_S - 5
    for p in [*stale, live, *users]:
        os.utime(p, (old, old))
    with Staging(tmp_path) as stage:  # every write into a folder cleans it first
        assert sorted(clean_stale(tmp_path)) == []  # already done on entry
        assert stage.dir.name.startswith(f".vfpt-stage-{os.getpid()}-")
    assert not any(p.exists() for p in stale)
    assert fresh.exists() and live.exists() and all(u.exists() for u in users)


def _full_disk(tmp_path):
    mnt = tmp_path / "full"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root in a sandbox that allows it)")
    return mnt


def test_train_on_a_really_full_disk_is_one_line(tmp_path):
    mnt = _full_disk(tmp_path)
    try:
        res = subprocess.run([sys.executable, "-c", "import sys; sys.argv[0]='vfpt-deploy'; from vfpt_deploy.cli import "
                              "run; run()", "train", "--data", "builtin", "--model", "vit_tiny_patch16_224",
                              "--model-arg", "img_size=32", "--model-arg", "patch_size=8", "--model-arg", "embed_dim=192",
                              "--weights", "random", "--epochs", "1", "--prompts", "2", "--out",
                              str(mnt / "runs" / "run.pt"), "--threads", "1"], capture_output=True, text=True,
                             timeout=600, env={**os.environ, "COLUMNS": "300"})
        assert res.returncode == 1, res.stdout + res.stderr
        assert "Traceback" not in res.stderr, res.stderr
        errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "No space left on device" in errors[0], res.stderr
        assert list(mnt.iterdir()) == []  # no runs/ folder, no temporary file
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
