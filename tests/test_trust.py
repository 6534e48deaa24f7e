"""Bad input, the way a new user or a hostile file brings it: every case exits non-zero with one line,
no traceback, and leaves every input and every previous output byte-identical."""
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vfpt_deploy.artifacts.checkpoint import BackboneInfo, save_run
from vfpt_deploy.cli import app
from vfpt_deploy.runtime.preprocess import Preprocess, load_image

from conftest import TINY, TINY_KWARGS, tiny_model

runner = CliRunner()
PRE = Preprocess(resize=[32, 32], mean=[0.5] * 3, std=[0.5] * 3)
TINY_ARGS = ["--model", TINY, *sum((["--model-arg", f"{k}={v}"] for k, v in TINY_KWARGS.items()), []),
             "--weights", "random"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def snapshot(folder: Path) -> dict:
    """Every file under folder (hidden ones too) -> sha256: what 'nothing lost, nothing left' compares."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink() and p.exists()}


def assert_clean_failure(res, code=None, text=None):
    assert res.exit_code != 0 if code is None else res.exit_code == code, res.output
    assert isinstance(res.exception, SystemExit), res.exception  # never an uncaught exception
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    # A usage error (exit 2) is click's box under CliRunner; the console script prints it as one line
    # (test_console_script_usage_errors_are_one_line).
    assert len(errors) == 1 or res.exit_code == 2 and "Error" in res.output, res.output
    if text:
        assert text in " ".join(res.output.split()), res.output


@pytest.fixture
def work(tmp_path):
    """A folder with a tiny run.pt, its verified ONNX export and report, and two images."""
    model = tiny_model(num_classes=3, scale=4.0, num_prompts=4, alpha=0.5)
    save_run(tmp_path / "r.pt", model, BackboneInfo(TINY, dict(TINY_KWARGS)), ["cat", "dog", "eel"], PRE)
    res = invoke("export", "--ckpt", tmp_path / "r.pt", "--num-random", 4)
    assert res.exit_code == 0, res.output
    (tmp_path / "img").mkdir()
    for i, color in enumerate(((200, 20, 20), (20, 200, 20))):
        Image.new("RGB", (40, 30), color).save(tmp_path / "img" / f"{i}.png")
    return tmp_path


# -- nothing an input or a previous output is ever overwritten ---------------------------------------
@pytest.mark.parametrize("case", [
    "export_out_is_ckpt", "export_out_is_symlink_to_ckpt", "export_trt_rtx_out_onnx", "export_out_is_folder",
    "verify_report_is_ckpt", "verify_report_is_artifact", "verify_report_symlink_to_ckpt",
    "bench_report_is_ckpt", "bench_csv_is_onnx", "import_out_is_input", "train_out_is_folder",
    "train_out_is_weights", "demo_out_is_file", "export_bad_data", "export_fails_verification",
    "export_unknown_option_value", "export_engine_onnx_clash", "export_out_is_dot", "verify_report_is_dot",
    "verify_artifact_is_dot", "bench_report_is_empty", "import_classes_binary",
])
def test_outputs_never_replace_inputs_or_good_artifacts(case, work):
    ckpt, onnx_path = work / "r.pt", work / "r.onnx"
    (work / "link.onnx").symlink_to(ckpt)
    (work / "link.json").symlink_to(ckpt)
    before = snapshot(work)
    args = {
        "export_out_is_ckpt": ["export", "--ckpt", ckpt, "--out", ckpt],
        "export_out_is_symlink_to_ckpt": ["export", "--ckpt", ckpt, "--out", work / "link.onnx"],
        "export_trt_rtx_out_onnx": ["export", "--ckpt", ckpt, "--format", "trt-rtx", "--out", onnx_path],
        "export_out_is_folder": ["export", "--ckpt", ckpt, "--out", work / "img"],
        "verify_report_is_ckpt": ["verify", onnx_path, "--ckpt", ckpt, "--report", ckpt],
        "verify_report_is_artifact": ["verify", onnx_path, "--ckpt", ckpt, "--report", onnx_path],
        "verify_report_symlink_to_ckpt": ["verify", onnx_path, "--ckpt", ckpt, "--report", work / "link.json"],
        "bench_report_is_ckpt": ["bench", "--ckpt", ckpt, "--report", ckpt],
        "bench_csv_is_onnx": ["bench", "--onnx", onnx_path, "--csv", onnx_path],
        "import_out_is_input": ["import", ckpt, "--out", ckpt, "--alpha", 0.5],
        "train_out_is_folder": ["train", *TINY_ARGS, "--out", work / "img", "--epochs", 1],
        "train_out_is_weights": ["train", "--model", TINY, "--weights", ckpt, "--out", ckpt],
        "demo_out_is_file": ["demo", "--out", ckpt],
        "export_bad_data": ["export", "--ckpt", ckpt, "--data", work / "nowhere"],
        "export_fails_verification": ["export", "--ckpt", ckpt, "--atol", 0, "--num-random", 4],
        "export_unknown_option_value": ["export", "--ckpt", ckpt, "--fold", "none"],
        "export_engine_onnx_clash": ["export", "--ckpt", ckpt, "--format", "trt-rtx", "--out", work / "r.engine.json"],
        "export_out_is_dot": ["export", "--ckpt", ckpt, "--out", "."],
        "verify_report_is_dot": ["verify", onnx_path, "--ckpt", ckpt, "--report", "."],
        "verify_artifact_is_dot": ["verify", ".", "--ckpt", ckpt],
        "bench_report_is_empty": ["bench", "--onnx", onnx_path, "--report", ""],
        "import_classes_binary": ["import", ckpt, "--out", work / "n.pt", "--alpha", 0.5, "--classes", onnx_path],
    }[case]
    res = invoke(*args)
    assert_clean_failure(res)
    assert snapshot(work) == before, f"{case} changed files"


def test_failed_reexport_keeps_the_previous_artifact_and_report(work):
    before = snapshot(work)
    res = invoke("export", "--ckpt", work / "r.pt", "--min-agreement", 100, "--atol", 1e-12, "--num-random", 4)
    assert res.exit_code == 1 and "nothing was written" in " ".join(res.output.split())
    assert snapshot(work) == before
    assert not list(work.glob(".vfpt-stage-*"))


def test_artifacts_get_the_umask_mode(work):
    old = os.umask(0o022)
    try:
        res = invoke("export", "--ckpt", work / "r.pt", "--out", work / "m.onnx", "--num-random", 2)
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    for name in ("m.onnx", "m.onnx.verify.json"):
        assert (work / name).stat().st_mode & 0o777 == 0o644


def test_sigterm_leaves_no_temporary_files(work):
    out = work / "sig"
    proc = subprocess.Popen([sys.executable, "-c", "from vfpt_deploy.cli import run; run()", "export", "--ckpt",
                             str(work / "r.pt"), "--out", str(out / "m.onnx"), "--num-random", "64"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob(".vfpt-stage-*/*")):  # wait until it writes
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err
    assert not [p for p in out.rglob("*") if p.name.startswith(".")] if out.exists() else True


# -- numbers ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["train", *TINY_ARGS, "--lr", "nan"], ["train", *TINY_ARGS, "--lr", "inf"], ["train", *TINY_ARGS, "--lr", -1],
    ["train", *TINY_ARGS, "--alpha", "nan"], ["train", *TINY_ARGS, "--dropout", "inf"],
    ["train", *TINY_ARGS, "--weight-decay", "nan"], ["train", *TINY_ARGS, "--crop-pct", "nan"],
    ["train", *TINY_ARGS, "--model-arg", "img_size=-1"], ["train", *TINY_ARGS, "--batch-size", 0],
    ["verify", "{onnx}", "--ckpt", "{ckpt}", "--atol", "nan"], ["verify", "{onnx}", "--ckpt", "{ckpt}", "--atol", -1],
    ["verify", "{onnx}", "--ckpt", "{ckpt}", "--min-cosine", 2], ["verify", "{onnx}", "--ckpt", "{ckpt}", "--rtol", "inf"],
    ["export", "--ckpt", "{ckpt}", "--min-agreement", 101], ["export", "--ckpt", "{ckpt}", "--atol", "nan"],
    ["bench", "--onnx", "{onnx}", "--warmup-time", "inf"], ["bench", "--onnx", "{onnx}", "--duration", "inf"],
    ["bench", "--onnx", "{onnx}", "--duration", "nan"], ["bench", "--onnx", "{onnx}", "--batch", 100000000],
    ["bench", "--onnx", "{onnx}", "--batch", "0"], ["predict", "{onnx}", "{img}", "--threads", 0],
    # A GPU or provider that is not there, on every machine: no machine has 100 GPUs, and DirectML exists
    # on Windows only (plain 'cuda' runs where a GPU is lent, so it would not be refused there).
    ["train", *TINY_ARGS, "--device", "cuda:99"], ["train", *TINY_ARGS, "--device", "tpu"],
    ["predict", "{onnx}", "{img}", "--providers", "dml"], ["verify", "{onnx}", "--ckpt", "{ckpt}", "--providers", "nope"],
])
def test_bad_numbers_and_devices_are_one_line_errors(args, work):
    before = snapshot(work)
    subst = {"{onnx}": work / "r.onnx", "{ckpt}": work / "r.pt", "{img}": work / "img"}
    t0 = time.time()
    res = invoke(*[subst.get(a, a) if isinstance(a, str) else a for a in args],
                 *(["--out", work / "t.pt", "--epochs", 1] if args[0] == "train" else []))
    assert_clean_failure(res)
    assert time.time() - t0 < 60  # never a hang (a generous bound: a hang is minutes)
    assert snapshot(work) == before


def test_train_with_allow_fallback_runs_on_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    res = invoke("train", *TINY_ARGS, "--device", "cuda", "--allow-fallback", "--out", tmp_path / "r.pt",
                 "--epochs", 1, "--prompts", 2, "--batch-size", 256, "--warmup-epochs", 0, "--threads", 1)
    assert res.exit_code == 0, res.output
    assert "on cpu" in res.output


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_same_seed_gives_bit_identical_runs(tmp_path, device):
    """--seed's promise (same command, seed and machine: bit-identical run.pt tensors), on each device: the
    device is pinned, since training picks CUDA by default wherever a GPU is present."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    runs = []
    for name in ("a.pt", "b.pt"):
        res = invoke("train", *TINY_ARGS, "--out", tmp_path / name, "--epochs", 2, "--prompts", 2,
                     "--batch-size", 128, "--warmup-epochs", 0, "--seed", 3, "--threads", 1, "--device", device)
        assert res.exit_code == 0, res.output
        runs.append(torch.load(tmp_path / name, weights_only=True))
    a, b = runs
    for part in ("tuned", "backbone_state"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert a["backbone"]["sha256"] == b["backbone"]["sha256"]


def test_diverging_training_stops_with_a_clear_error(tmp_path):
    res = invoke("train", *TINY_ARGS, "--out", tmp_path / "r.pt", "--epochs", 3, "--prompts", 2, "--lr", 1e4,
                 "--batch-size", 64, "--warmup-epochs", 0, "--threads", 1)
    if res.exit_code == 0:  # did not diverge at this lr: then every saved tensor must be finite
        run = torch.load(tmp_path / "r.pt", weights_only=True)
        assert all(torch.isfinite(t).all() for t in run["tuned"].values())
    else:
        assert_clean_failure(res, 1, "training diverged")


# -- images -------------------------------------------------------------------------------------------
def png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG file that declares width x height pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_one_bad_file_among_good_ones(work):
    png_header_only(work / "img" / "bomb.png", 20000, 20000)
    (work / "img" / "notes.png").write_text("not an image")
    res = invoke("predict", work / "r.onnx", work / "img", "--json")
    assert res.exit_code == 1
    stdout = res.stdout if hasattr(res, "stdout") else res.output
    data = json.loads(stdout[: stdout.rindex("}") + 1])
    by_name = {Path(p["image"]).name: p for p in data["predictions"]}
    assert "megapixel" in by_name["bomb.png"]["error"] and "not a readable image" in by_name["notes.png"]["error"]
    assert by_name["0.png"]["top"] and by_name["1.png"]["top"]  # the good ones still ran


@pytest.mark.parametrize("command", ["verify", "train"])
def test_decompression_bomb_in_data_is_a_clean_error(command, work):
    data = work / "data"
    for split in ("train", "val"):
        for cls in ("cat", "dog"):  # two classes: train refuses a single-class folder before reading images
            (data / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(data / split / cls / "ok.png")
        png_header_only(data / split / "cat" / "bomb.png", 30000, 30000)
    args = (["verify", work / "r.onnx", "--ckpt", work / "r.pt", "--data", data / "val"] if command == "verify"
            else ["train", *TINY_ARGS, "--data", data, "--out", work / "t.pt", "--epochs", 1])
    assert_clean_failure(invoke(*args), None, "megapixel")


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)


def test_predict_json_is_strict(work):
    res = invoke("predict", work / "r.onnx", work / "img", "--json")
    assert res.exit_code == 0, res.output
    json.loads(res.output, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_console_script_usage_errors_are_one_line():
    out = subprocess.run([sys.executable, "-c", "from vfpt_deploy.cli import run; run()", "export", "--opset", "5"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stderr.startswith("error:")


# -- tampered artifact metadata: predict and verify refuse it in one line --------------------------
META_TAMPER = {
    "no_preprocess": ("vfpt.preprocess", None),
    "huge_resize": ("vfpt.preprocess", {"resize": [60000, 60000], "crop": None, "mean": [0.5] * 3, "std": [0.5] * 3}),
    "two_means": ("vfpt.preprocess", {"resize": [32, 32], "mean": [0.5, 0.5], "std": [0.5] * 3}),
    "lanczos": ("vfpt.preprocess", {"resize": [32, 32], "interpolation": "lanczos"}),
    "zero_std": ("vfpt.preprocess", {"resize": [32, 32], "std": [0.0, 1.0, 1.0]}),
    "wrong_size": ("vfpt.preprocess", {"resize": [64, 64]}),
    "classes_not_list": ("vfpt.classes", "cat"),
    "classes_wrong_count": ("vfpt.classes", ["cat", "dog"]),
    "classes_numbers": ("vfpt.classes", [1, 2, 3]),
    "precision_fp64": ("vfpt.precision", "fp64"),
    "bad_sha": ("vfpt.checkpoint_sha256", "zz"),
    "not_json": ("vfpt.preprocess", "{resize"),
    "nested_too_deep": ("vfpt.classes", "[" * 100000 + "]" * 100000),
    "image_size_wrong": ("vfpt.image_size", [64, 64]),
    "format_other": ("vfpt.format", "other"),
    "subnormal_std": ("vfpt.preprocess", {"resize": [32, 32], "std": [1e-320, 1.0, 1.0]}),
}


@pytest.mark.parametrize("case", list(META_TAMPER))
@pytest.mark.parametrize("command", ["predict", "verify"])
def test_tampered_metadata_is_refused(case, command, work):
    import onnx

    key, value = META_TAMPER[case]
    model = onnx.load(work / "r.onnx")
    props = {p.key: p.value for p in model.metadata_props}
    if value is None:
        props.pop(key)
    else:
        props[key] = value if case in ("not_json", "nested_too_deep") else json.dumps(value)
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, work / "t.onnx")
    before = snapshot(work)
    t0 = time.time()
    args = (["predict", work / "t.onnx", work / "img"] if command == "predict"
            else ["verify", work / "t.onnx", "--ckpt", work / "r.pt", "--num-random", 2])
    res = invoke(*args)
    assert_clean_failure(res, 1)
    assert time.time() - t0 < 30
    assert snapshot(work) == before


def test_demo_is_reproducible(tmp_path, monkeypatch):
    """Bit-identical for a seed, and on every machine: the demo trains on the CPU even where torch sees a
    GPU (the default device is never consulted; on a GPU, pretraining there left the backbone on the GPU and
    the CPU-side evaluation after it failed)."""
    import vfpt_deploy.train

    def no_default(*_):
        raise AssertionError("the demo asked for the default (CUDA when present) device")

    monkeypatch.setattr(vfpt_deploy.train, "default_device", no_default)
    tensors = []
    for name in ("a", "b"):
        res = invoke("demo", "--out", tmp_path / name, "--pretrain-epochs", 1, "--epochs", 1, "--seed", 7,
                     "--threads", 1)
        assert res.exit_code == 0, res.output
        tensors.append(torch.load(tmp_path / name / "run.pt", weights_only=True))
    a, b = tensors
    assert a["backbone"]["sha256"] == b["backbone"]["sha256"]
    for part in ("tuned", "backbone_state"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


def test_binary_class_file_and_deep_json_sidecar_are_one_line_errors(tmp_path):
    from vfpt_deploy.errors import ArtifactError, InputError
    from vfpt_deploy.reference import parse_classes
    from vfpt_deploy.runtime.tensorrt_runner import read_sidecar

    (tmp_path / "classes.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(InputError, match="not readable UTF-8 text"):
        parse_classes(str(tmp_path / "classes.txt"), 3)
    (tmp_path / "m.engine").write_bytes(b"x")
    (tmp_path / "m.engine.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ArtifactError, match="nested too deeply"):
        read_sidecar(tmp_path / "m.engine")


@pytest.mark.parametrize("args", [["export", "--ckpt", ""], ["info", ""], ["import", "", "--alpha", 0.5],
                                  ["export", "--ckpt", "{ckpt}", "--out", ""], ["verify", "", "--ckpt", "{ckpt}"]])
def test_empty_paths_are_one_line_errors(args, work):
    before = snapshot(work)
    res = invoke(*[work / "r.pt" if a == "{ckpt}" else a for a in args])
    assert_clean_failure(res)
    assert snapshot(work) == before


def test_failed_verify_keeps_the_passing_report(work):
    report = work / "r.onnx.verify.json"
    before = report.read_bytes()
    res = invoke("verify", work / "r.onnx", "--ckpt", work / "r.pt", "--atol", 1e-30, "--num-random", 2)
    assert_clean_failure(res, 1)
    assert report.read_bytes() == before
    assert json.loads((work / "r.onnx.verify.failed.json").read_text())["passed"] is False


def test_metadata_cannot_loosen_the_gate(work):
    import onnx

    model = onnx.load(work / "r.onnx")
    for p in model.metadata_props:
        if p.key == "vfpt.precision":
            p.value = json.dumps("fp16")
    onnx.save(model, work / "claims_fp16.onnx")
    res = invoke("verify", work / "claims_fp16.onnx", "--ckpt", work / "r.pt", "--num-random", 2)
    assert res.exit_code == 1
    rep = json.loads((work / "claims_fp16.onnx.verify.json").read_text())
    assert rep["precision"] == "fp32" and rep["tolerances"].startswith("max |diff| <= 0.0001")
    assert "the metadata says fp16 but the graph computes in fp32" in rep["problems"][0]


def test_nan_float_image_and_long_names_are_one_line_errors(work):
    import numpy as np

    Image.fromarray(np.full((32, 32), np.nan, np.float32), "F").save(work / "img" / "nan.tif")
    res = invoke("predict", work / "r.onnx", work / "img", "--json")
    assert res.exit_code == 1 and "NaN or Inf pixels" in res.output
    res = invoke("info", "--ckpt", work / ("a" * 300 + ".pt"))
    assert_clean_failure(res, 1)


def test_threads_default_is_fixed_and_waits_are_passive(monkeypatch):
    from vfpt_deploy import threads

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (5.0, 5.0, 5.0))  # the load must not matter
    assert threads.default_threads() == threads.usable_cpus()
    threads.passive_waits()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    threads.passive_waits()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"  # the user's choice stands
    out = subprocess.run([sys.executable, "-c", "import os, sys; from vfpt_deploy.cli import run; sys.argv[1:] = "
                          "['info', '--ckpt', 'nope.pt']\ntry: run()\nexcept SystemExit: print(os.environ.get('OMP_WAIT_POLICY'))"],
                         capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"})
    assert out.stdout.strip() == "PASSIVE", out


def test_a_graph_with_a_loop_is_refused_before_it_runs(work):
    """A crafted ONNX with valid metadata and a 1e12-iteration Loop hung predict (and ignored SIGTERM:
    onnxruntime's C++ held the thread). vfpt-deploy never exports control flow, so any Loop is refused
    before onnxruntime loads the graph (this one is not even a valid Loop: the check comes first)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(work / "r.onnx")
    g = model.graph
    body = helper.make_graph([helper.make_node("Identity", ["cond"], ["cond_out"])], "body",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                              helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                             [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])])
    g.initializer.extend([helper.make_tensor("trips", TensorProto.INT64, [], [10**12]),
                          helper.make_tensor("yes", TensorProto.BOOL, [], [True])])
    g.node.append(helper.make_node("Loop", ["trips", "yes"], [], body=body))
    onnx.save(model, work / "loop.onnx")
    t0 = time.time()
    res = invoke("predict", work / "loop.onnx", work / "img")
    assert_clean_failure(res, 1, "control-flow ops (Loop)")
    assert time.time() - t0 < 30
