import pytest
from typer.testing import CliRunner

from vfpt_deploy.artifacts.checkpoint import load_run
from vfpt_deploy.cli import app

from conftest import TINY, TINY_KWARGS, color_image_folder

runner = CliRunner()
TINY_ARGS = ["--model", TINY, *sum((["--model-arg", f"{k}={v}"] for k, v in TINY_KWARGS.items()), []),
             "--weights", "random"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run.pt"
    res = invoke("train", "--out", out, *TINY_ARGS, "--epochs", 1, "--prompts", 4, "--alpha", 0.5, "--lr", 0.05,
                 "--batch-size", 128, "--warmup-epochs", 0)
    assert res.exit_code == 0, res.output
    return out, res.output


def test_train_one_epoch_on_builtin_data(trained):
    out, output = trained
    assert "epoch   1" in output and "val top-1" in output and "wrote" in output
    run = load_run(out)
    assert run.classes == [str(i) for i in range(10)]
    assert run.config.num_prompts == 4 and run.config.num_fourier == 2
    assert run.meta["train"]["data"] == "builtin" and run.meta["train"]["best_epoch"] == 1
    assert run.backbone.source == "random"


def test_info(trained):
    out, _ = trained
    res = invoke("info", out)
    assert res.exit_code == 0, res.output
    for text in ("M=4 deep, alpha=0.5", "m=2 Fourier", "tuned", "%", "vit_tiny_patch16_224", "classes"):
        assert text in res.output


@pytest.mark.parametrize(("args", "message"), [
    (["train", "--alpha", "1.5", *TINY_ARGS], "alpha"),
    (["train", "--location", "random", *TINY_ARGS], "'random' is not one of"),
    (["train", "--model-arg", "img_size", *TINY_ARGS], "KEY=VALUE"),
    (["train", "--data", "/nonexistent", *TINY_ARGS], "train/ and val/"),
    (["train", "--model", "resnet50", "--weights", "random"], "not a timm VisionTransformer"),
    (["train", "--model", "no_such_model", "--weights", "random"], "cannot create timm model"),
    (["train", "--weights", "/nonexistent.pth", "--model", TINY], "does not exist"),
    (["info", "/nonexistent/run.pt"], "does not exist"),
])
def test_bad_arguments_are_one_line_errors(args, message, tmp_path):
    res = invoke(*args, *(["--out", tmp_path / "r.pt"] if args[0] == "train" else []))
    assert res.exit_code in (1, 2), res.output  # 2: a bad option value, 1: a bad input
    assert isinstance(res.exception, SystemExit)
    assert message in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "r.pt").exists()


def test_pretrained_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = invoke("train", "--model", "vit_tiny_patch16_224", "--weights", "pretrained", "--out", tmp_path / "r.pt")
    assert res.exit_code == 1 and "pass local weights with --weights FILE" in " ".join(res.output.split())


def test_train_on_an_image_folder(tmp_path):
    color_image_folder(tmp_path / "data")
    out = tmp_path / "run.pt"
    res = invoke("train", "--data", tmp_path / "data", "--out", out, *TINY_ARGS, "--epochs", 2, "--prompts", 2,
                 "--batch-size", 4, "--warmup-epochs", 1)
    assert res.exit_code == 0, res.output
    run = load_run(out)
    assert run.classes == ["blue", "red"]
    assert run.preprocess.resize == [32, 32]


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: [f.unlink() for f in (d / "train" / "blue").iterdir()], "train: class folder blue holds no images"),
    (lambda d: (d / "train" / "green").mkdir(), "train: class folder green holds no images"),
    (lambda d: [f.unlink() for f in (d / "val" / "blue").iterdir()], "val has no images of class blue, which train/ has"),
    (lambda d: [f.unlink() for f in (d / "val" / "blue").iterdir()] and (d / "val" / "blue").rmdir(),
     "val has no images of class blue"),
    (lambda d: [[f.unlink() for f in (d / s / "blue").iterdir()] and (d / s / "blue").rmdir() for s in ("train", "val")],
     "has one class (red); a classifier needs two"),
])
def test_training_refuses_classes_without_images_before_any_work(edit, message, tmp_path):
    """An empty class folder (or a val/ without some classes) once trained to 'best val top-1 100.00%'. Refused
    in one line, before the backbone is even read (its weights file here does not exist)."""
    color_image_folder(tmp_path / "data")
    edit(tmp_path / "data")
    res = invoke("train", "--data", tmp_path / "data", "--out", tmp_path / "r.pt", "--model", TINY,
                 "--weights", tmp_path / "missing.pth", "--epochs", 1)
    out = " ".join(res.output.split())
    assert res.exit_code == 1 and message in out and "Traceback" not in res.output, res.output
    assert len(res.output.strip().splitlines()) <= 3 and not (tmp_path / "r.pt").exists()  # one line, wrapped
