import json
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vfpt_deploy.artifacts.checkpoint import BackboneInfo, save_run
from vfpt_deploy.cli import app
from vfpt_deploy.runtime.preprocess import ImageError, Preprocess, find_images, load_image

from conftest import TINY, TINY_KWARGS, tiny_model

runner = CliRunner()
PRE = Preprocess(resize=[32, 32], mean=[0.5] * 3, std=[0.5] * 3)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("exp")
    model = tiny_model(num_classes=3, scale=4.0, num_prompts=4, alpha=0.5)
    save_run(d / "run.pt", model, BackboneInfo(TINY, dict(TINY_KWARGS)), ["cat", "dog", "eel"], PRE)
    res = invoke("export", "--ckpt", d / "run.pt", "--num-random", 4)
    assert res.exit_code == 0, res.output
    return d


def odd_images(d):
    d.mkdir(exist_ok=True)
    Image.new("L", (20, 30), 128).save(d / "gray.png")
    Image.new("RGBA", (30, 20), (10, 20, 30, 40)).save(d / "rgba.png")
    Image.new("CMYK", (25, 25), (0, 50, 100, 10)).save(d / "cmyk.jpg")
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(d / "deep16.png")
    Image.new("P", (16, 16)).save(d / "palette.gif")
    return d


def test_odd_image_modes_are_handled(tmp_path):
    d = odd_images(tmp_path / "imgs")
    for f in sorted(d.iterdir()):
        im = load_image(f)
        assert im.mode == "RGB"
        x = PRE(im)
        assert x.shape == (3, 32, 32) and x.dtype == np.float32
    sixteen = np.asarray(load_image(d / "deep16.png"))
    assert 150 < sixteen.mean() < 160  # 40000/65535 of full scale, not clipped to 255


def test_shorter_side_resize_then_center_crop():
    pre = Preprocess(resize=36, crop=[32, 32], mean=[0, 0, 0], std=[1, 1, 1])
    a = np.zeros((60, 90, 3), np.uint8)
    a[:, 45:] = 255
    x = pre(Image.fromarray(a))
    assert x.shape == (3, 32, 32) and pre.size == (32, 32)
    assert x[0, :, 0].max() < 0.01 and x[0, :, -1].min() > 0.99


def test_image_errors(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(tmp_path / "notes.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="holds no images"):
        find_images([tmp_path / "empty"])
    with pytest.raises(ImageError, match="does not exist"):
        find_images([tmp_path / "nope.png"])


def test_export_writes_verified_onnx(exported):
    assert (exported / "run.onnx").is_file()
    rep = json.loads((exported / "run.onnx.verify.json").read_text())
    assert rep["passed"] and rep["comparisons"][0]["max_abs"] < 1e-4


def test_predict_table_and_json(exported, tmp_path):
    d = odd_images(tmp_path / "imgs")
    # --providers cpu: the default takes CUDA wherever onnxruntime-gpu runs on a GPU; this is about the output
    res = invoke("predict", exported / "run.onnx", d, "--top-k", 2, "--providers", "cpu")
    assert res.exit_code == 0, res.output
    assert "CPUExecutionProvider" in res.output and "gray.png" in res.output
    res = invoke("predict", exported / "run.onnx", d / "gray.png", d / "rgba.png", "--json", "--providers", "cpu")
    data = json.loads(res.output)
    assert data["providers"] == ["CPUExecutionProvider"]
    assert len(data["predictions"]) == 2 and {t["class"] for t in data["predictions"][0]["top"]} <= {"cat", "dog", "eel"}
    assert abs(sum(t["prob"] for t in data["predictions"][0]["top"]) - 1.0) < 1e-6  # top-3 of 3 classes


def test_verify_command_with_images_and_failure_exit(exported, tmp_path):
    d = odd_images(tmp_path / "imgs")
    # as many random inputs as the export's report, and images besides: at least as strong, so it replaces that
    res = invoke("verify", exported / "run.onnx", "--ckpt", exported / "run.pt", "--data", d, "--num-random", 4)
    assert res.exit_code == 0 and "kept run.onnx.verify.json" not in res.output, res.output
    flat = re.sub(r"[\s│┃]", "", res.output)  # table cells wrap at the runner's 80 columns
    assert "pass" in flat and "FAIL" not in flat
    rep = json.loads((exported / "run.onnx.verify.json").read_text())
    assert rep["passed"] and rep["comparisons"][1]["samples"] == 5 and rep["comparisons"][1]["ref_top1"] is None
    res = invoke("verify", exported / "run.onnx", "--ckpt", exported / "run.pt", "--atol", 0, "--num-random", 3)
    assert res.exit_code == 1 and "outside tolerance" in res.output


@pytest.mark.parametrize("case", ["missing_ckpt", "corrupt_ckpt", "not_image", "empty_dir", "kv_shallow",
                                  "missing_model", "random_location"])
def test_bad_inputs(case, exported, tmp_path):
    if case == "missing_ckpt":
        args, msg = ["export", "--ckpt", tmp_path / "none.pt"], "does not exist"
    elif case == "corrupt_ckpt":
        (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
        args, msg = ["export", "--ckpt", tmp_path / "bad.pt"], "truncated or not a torch checkpoint"
    elif case == "not_image":
        (tmp_path / "x.png").write_text("hello")
        args, msg = ["predict", exported / "run.onnx", tmp_path / "x.png"], "not a readable image"
    elif case == "empty_dir":
        (tmp_path / "e").mkdir()
        args, msg = ["predict", exported / "run.onnx", tmp_path / "e"], "holds no images"
    elif case == "kv_shallow":
        model = tiny_model(num_classes=3, num_prompts=2, deep=False)
        save_run(tmp_path / "s.pt", model, BackboneInfo(TINY, dict(TINY_KWARGS)), ["a", "b", "c"], PRE)
        args, msg = ["export", "--ckpt", tmp_path / "s.pt", "--fold", "kv", "--out", tmp_path / "s.onnx"], "shallow prompts"
    elif case == "missing_model":
        args, msg = ["predict", tmp_path / "none.onnx", tmp_path], "does not exist"
    else:
        args, msg = ["train", "--location", "random"], "'random' is not one of"
    res = invoke(*args)
    assert res.exit_code == (2 if case == "random_location" else 1), res.output
    assert msg in res.output and "Traceback" not in res.output
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".*.tmp"))


def test_export_trt_without_tensorrt_is_one_line(exported):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("full TensorRT is installed here")
    except ImportError:
        pass
    res = invoke("export", "--ckpt", exported / "run.pt", "--format", "trt")
    assert res.exit_code == 1 and "needs TensorRT" in res.output and "'.[tensorrt]'" in res.output
    assert "Traceback" not in res.output


def test_export_trt_rtx_builds_an_engine(exported, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu12 wheel not installed")
    res = invoke("export", "--ckpt", exported / "run.pt", "--format", "trt-rtx", "--out", tmp_path / "m.engine",
                 "--max-batch", 4, "--num-random", 4)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m.engine").stat().st_size > 0 and (tmp_path / "m.onnx").is_file()
    sidecar = json.loads((tmp_path / "m.engine.json").read_text())
    assert sidecar["metadata"]["classes"] == ["cat", "dog", "eel"]
