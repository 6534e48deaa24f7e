"""The lean install: `pip install vfpt-deploy` serves an exported ONNX without torch.

Fast part: the CLI in a subprocess whose import system refuses torch (or timm, mlserver, ...) as if it
were not installed: every command that needs a missing extra stops with one line naming it, and the
torch-free commands (predict, bench --onnx, --help) still run.
Real part (slow): a fresh venv with only `pip install <this repo>` (then `[serve]` for the server):
torch cannot be imported there, and predict, bench --onnx, inspect and serve run on an ONNX exported
by the test venv. Needs the package index that .ci/run installs from; pip's cache makes it quicker.
"""
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image

from vfpt_deploy.cli import app
from vfpt_deploy.extras import ORT_DISTRIBUTIONS, check_one_onnxruntime, installed_ort_distributions
from vfpt_deploy.errors import RuntimeSetupError
from vfpt_deploy.runtime import open_predictor
from vfpt_deploy.artifacts.schema import INPUT_NAME, OUTPUT_NAME

from conftest import free_ports

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = typer.main.get_command(app).commands
EXPORT = "pip install '.[export]' in the vfpt-deploy checkout, or 'WHEEL[export]' for its wheel"

# Runs the CLI with some top-level modules made unimportable (what a missing distribution looks like).
BLOCKED_CLI = r"""
import sys
blocked = set(sys.argv.pop(1).split(","))

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Refuse())
sys.argv[0] = "vfpt-deploy"
from vfpt_deploy.cli import run
run()
"""
# Every --help in one process, and the torch-free modules: nothing optional may load.
HELP_ALL = r"""
import sys, typer
import vfpt_deploy.bench, vfpt_deploy.extras, vfpt_deploy.runtime.onnx_runner
from vfpt_deploy.cli import app
command = typer.main.get_command(app)
for args in [["--help"], *([name, "--help"] for name in command.commands)]:
    assert command.main(args, prog_name="vfpt-deploy", standalone_mode=False) == 0, args
optional = {"torch", "timm", "torchvision", "onnxscript", "sklearn", "mlserver", "tensorrt", "tensorrt_rtx"}
loaded = optional & {m.split(".")[0] for m in sys.modules}
assert not loaded, loaded
"""


def cli_without(blocked: str, *args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", BLOCKED_CLI, blocked, *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=cwd, env=env)


def one_error_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "x.png"
    Image.new("RGB", (40, 30), (200, 40, 90)).save(path)
    return path


# -- a missing extra is one line naming it --------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["train", "--epochs", "1"], ["info", "run.pt"], ["demo", "--out", "d"], ["export", "--ckpt", "run.pt"],
    ["verify", "m.onnx", "--ckpt", "run.pt"], ["import", "ref.pth", "--alpha", "0.5"],
    ["bench", "--ckpt", "run.pt", "--backend", "torch"],
], ids=lambda a: a[0])
def test_torch_commands_name_the_export_extra(args, tmp_path, exported_run):
    for name in ("run.pt", "ref.pth"):  # inputs exist: a missing one is a usage error, said first
        (tmp_path / name).write_bytes(b"PK not read before torch")
    shutil.copy(exported_run[1], tmp_path / "m.onnx")  # verify reads the artifact (torch-free) first
    before = sorted(tmp_path.iterdir())
    line = one_error_line(cli_without("torch", *args, cwd=tmp_path))
    assert "needs PyTorch, which is not installed" in line and EXPORT in line, line
    assert sorted(tmp_path.iterdir()) == before, "nothing may be written"


@pytest.mark.parametrize(("args", "words"), [
    (["train", "--alpha", "1.5"], "alpha (Fourier fraction) must be a number in [0, 1]"),
    (["train", "--lr", "-1"], "--lr must be a finite number in (0, 10000]"),
    (["train", "--model-arg", "img_size"], "--model-arg takes KEY=VALUE"),
    (["train", "--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
    (["train", "--crop-pct", "7"], "--crop-pct must be in (0, 1]"),
    (["train", "--out", "run.txt"], "run checkpoint files end in .pt or .pth"),
    (["demo", "--lr", "-1", "--out", "d"], "--lr must be a finite number"),  # was refused after pretraining
    (["export", "--ckpt", "run.pt", "--atol", "-1"], "--atol must be a finite number"),
    (["export", "--ckpt", "run.pt", "--out", "m.txt"], "ONNX files end in .onnx"),
    (["export", "--ckpt", "run.pt", "--quantize", "static"], "apply to --precision int8 only"),
    (["export", "--ckpt", "a.pt", "--ckpt", "b.pt", "--precision", "int8", "--out", "m.onnx"], "int8 multi-task"),
    (["import", "ref.pth", "--alpha", "2"], "alpha (Fourier fraction) must be a number in [0, 1]"),
    (["import", "ref.pth", "--alpha", "0.5", "--crop-pct", "0"], "--crop-pct must be in (0, 1]"),
], ids=lambda a: " ".join(a) if isinstance(a, list) else None)
def test_usage_errors_come_before_torch_is_imported(args, words, tmp_path):
    """A bad option value is reported before torch loads (its import took 7-10 s of a usage error's 10 s
    here): with torch unimportable, the answer is still the usage error, not the missing extra."""
    res = cli_without("torch", *args, cwd=tmp_path)
    line = " ".join(res.stderr.split())
    assert res.returncode in (1, 2) and words in line and "PyTorch" not in line, res.stderr
    assert "Traceback" not in res.stderr and not list(tmp_path.iterdir())


def test_timm_alone_missing_names_the_export_extra(tmp_path):
    line = one_error_line(cli_without("timm", "train", "--epochs", "1", cwd=tmp_path))
    assert line == f"error: vfpt-deploy train needs timm, which is not installed: {EXPORT}"


def test_bench_plot_without_matplotlib_stops_before_measuring(exported_run, tmp_path):
    line = one_error_line(cli_without("matplotlib", "bench", "--onnx", exported_run[1], "--plot", "b.png", cwd=tmp_path))
    assert line == ("error: vfpt-deploy bench --plot needs matplotlib, which is not installed: "
                    "pip install '.[bench]' in the vfpt-deploy checkout, or 'WHEEL[bench]' for its wheel")


@pytest.mark.skipif("serve" not in COMMANDS, reason="serve not built yet")
def test_serve_without_mlserver_names_the_serve_extra(exported_run, tmp_path):
    line = one_error_line(cli_without("mlserver", "serve", exported_run[1], cwd=tmp_path))
    assert "serve needs MLServer, which is not installed" in line and "pip install '.[serve]' in the vfpt-deploy checkout" in line


def test_torch_free_commands_run_without_torch(exported_run, image, tmp_path):
    onnx = exported_run[1]
    res = cli_without("torch,timm,mlserver", "predict", onnx, image, "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert [t["class"] for t in json.loads(res.stdout)["predictions"][0]["top"]][0] in "abcd"
    res = cli_without("torch,timm,mlserver", "bench", "--onnx", onnx, "--batch", "1", "--warmup", "0",
                      "--iters", "2", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert [r["backend"] for r in report["results"]] == ["ort-cpu"]
    assert {s["backend"] for s in report["skipped"]} >= {"torch", "torch-folded"}


def test_help_of_every_command_loads_nothing_optional():
    res = subprocess.run([sys.executable, "-c", HELP_ALL], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("Usage: vfpt-deploy") == len(COMMANDS) + 1


def test_two_onnxruntime_flavours_are_refused(monkeypatch):
    monkeypatch.setattr("vfpt_deploy.extras.installed_ort_distributions", lambda: ["onnxruntime", "onnxruntime-gpu"])
    with pytest.raises(RuntimeSetupError, match=r"^onnxruntime and onnxruntime-gpu are both installed .* "
                       r"pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu$"):
        check_one_onnxruntime()


def test_this_environment_has_one_onnxruntime():
    assert len(installed_ort_distributions()) == 1, installed_ort_distributions()
    assert set(installed_ort_distributions()) <= set(ORT_DISTRIBUTIONS)


# -- a real fresh venv with the base install only ------------------------------------------------------
def _source_copy(dest: Path) -> Path:
    """What the package builds from, copied: pip builds in-tree, and the repo stays untouched."""
    junk = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for folder in ("vfpt_deploy", "exporters", "runtime"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=junk)
    return dest


def _pip(venv: Path, *args):
    res = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                          "--disable-pip-version-check", *args], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"pip install {' '.join(args)} failed:\n{res.stdout[-3000:]}{res.stderr[-3000:]}"


@pytest.fixture(scope="module")
def lean(tmp_path_factory):
    """A fresh venv with `pip install <repo>` (no extras). Took ~20 s on the 2-core machine, pip cache warm."""
    tmp = tmp_path_factory.mktemp("lean")
    venv, src = tmp / "venv", tmp / "src"
    src.mkdir()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    _pip(venv, str(_source_copy(src)))
    return venv


def lean_cli(venv: Path, *args, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([str(venv / "bin" / "vfpt-deploy"), *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env, **kw)


@pytest.mark.slow
def test_lean_venv_has_no_torch(lean):
    for module in ("torch", "timm", "onnxscript", "mlserver"):
        res = subprocess.run([str(lean / "bin" / "python"), "-c", f"import {module}"], capture_output=True, text=True)
        assert res.returncode != 0 and "ModuleNotFoundError" in res.stderr, module
    res = subprocess.run([str(lean / "bin" / "python"), "-c",
                          "from vfpt_deploy.extras import installed_ort_distributions as d; print(d())"],
                         capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "['onnxruntime']"
    res = subprocess.run([str(lean / "bin" / "python"), "-m", "pip", "check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


@pytest.mark.slow
def test_lean_predict_matches_the_test_venv(lean, exported_run, image, tmp_path):
    res = lean_cli(lean, "predict", exported_run[1], image, "--top-k", "4", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)["predictions"][0]["top"]
    with open_predictor(exported_run[1], ["cpu"]) as predictor:
        want = predictor.predict([image], top_k=4)[0].top
    assert [t["class"] for t in got] == [c for c, _ in want]
    assert [t["prob"] for t in got] == pytest.approx([p for _, p in want], abs=1e-5)


@pytest.mark.slow
def test_lean_bench_onnx(lean, exported_run, tmp_path):
    res = lean_cli(lean, "bench", "--onnx", exported_run[1], "--batch", "1,2", "--warmup", "1", "--iters", "3",
                   "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert {(r["backend"], r["batch"]) for r in report["results"]} == {("ort-cpu", 1), ("ort-cpu", 2)}


@pytest.mark.slow
def test_lean_train_names_the_extra(lean, tmp_path):
    line = one_error_line(lean_cli(lean, "train", "--epochs", "1", cwd=tmp_path))
    assert line == f"error: vfpt-deploy train needs PyTorch, which is not installed: {EXPORT}"


@pytest.mark.slow
@pytest.mark.skipif("inspect" not in COMMANDS, reason="inspect not built yet")
def test_lean_inspect_onnx(lean, exported_run, tmp_path):
    res = lean_cli(lean, "inspect", exported_run[1], "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    text = json.dumps(json.loads(res.stdout))
    assert all(f'"{c}"' in text for c in "abcd"), text  # the classes, read without torch


@pytest.mark.slow
@pytest.mark.skipif("serve" not in COMMANDS, reason="serve not built yet")
def test_lean_serve_names_the_extra(lean, exported_run, tmp_path):
    line = one_error_line(lean_cli(lean, "serve", exported_run[1], "--host", "127.0.0.1", cwd=tmp_path))
    assert "serve needs MLServer, which is not installed" in line and "pip install '.[serve]' in the vfpt-deploy checkout" in line


@pytest.fixture(scope="module")
def golden_pair(exported_run, tmp_path_factory):
    """An export with its golden set (made by this venv), and the same file with one weight nudged."""
    import onnx
    from onnx import numpy_helper

    from vfpt_deploy.pipeline import ExportSettings, export_run

    d = tmp_path_factory.mktemp("golden-lean")
    assert export_run(exported_run[0], ExportSettings(num_random=4), d / "good.onnx").passed
    model = onnx.load(str(d / "good.onnx"))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)) if len(t.dims) == 2 else 0)
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += 0.05
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(d / "bad.onnx"))
    return d / "good.onnx", d / "bad.onnx"


@pytest.mark.slow
def test_lean_verify_replays_the_golden_set(lean, golden_pair, tmp_path):
    """The base install (no torch) verifies an artifact exported elsewhere by replaying its golden set, and a
    tampered weight fails in one line."""
    good, bad = golden_pair
    res = lean_cli(lean, "verify", good, "--report", tmp_path / "good.json", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads((tmp_path / "good.json").read_text())["passed"]
    line = one_error_line(lean_cli(lean, "verify", bad, "--report", tmp_path / "bad.json", cwd=tmp_path))
    assert "outside tolerance" in line


# -- serve: the base install plus [serve] ----------------------------------------------------------------
def _get(url: str, data: bytes | None = None, timeout: float = 5.0):
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


@pytest.fixture(scope="module")
def lean_serve(lean):
    """The same venv with the [serve] extra added (after the base-only tests above have used it)."""
    _pip(lean, f"{lean.parent / 'src'}[serve]")
    return lean


@pytest.mark.slow
@pytest.mark.skipif("serve" not in COMMANDS, reason="serve not built yet")
def test_lean_serve_rest_inference(lean_serve, exported_run, tmp_path):
    options = {p.name for p in COMMANDS["serve"].params}
    ports = dict(zip(("port", "grpc_port", "metrics_port"), free_ports(3)))  # distinct: held open together
    args = ["serve", exported_run[1], "--host", "127.0.0.1"]
    args += [a for k, v in ports.items() if k in options for a in (f"--{k.replace('_', '-')}", v)]
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([str(lean_serve / "bin" / "vfpt-deploy"), *map(str, args)], cwd=tmp_path,
                              stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{ports['port']}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if _get(f"{base}/v2/health/ready")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "not ready in 120 s:\n" + (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        x = np.linspace(-1, 1, 3 * 32 * 32, dtype=np.float32).reshape(1, 3, 32, 32)
        body = {"inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
        status, raw = _get(f"{base}/v2/models/{Path(exported_run[1]).stem}/infer", json.dumps(body).encode())
        assert status == 200, raw
        outputs = {o["name"]: o for o in json.loads(raw)["outputs"]}
        with open_predictor(exported_run[1], ["cpu"]) as predictor:
            want = predictor.infer(x)
        assert outputs[OUTPUT_NAME]["shape"] == [1, 4]
        assert outputs[OUTPUT_NAME]["data"] == pytest.approx(want.ravel().tolist(), abs=1e-4)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    import_check = subprocess.run([str(lean_serve / "bin" / "python"), "-c", "import torch"], capture_output=True)
    assert import_check.returncode != 0, "the [serve] extra must not bring torch"
