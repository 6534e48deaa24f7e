"""The load-time self-check: `serve` replays each artifact's golden set when it loads the model and refuses
one that does not reproduce here (one line, nothing served), reports a passing one in its log, its model
metadata and a Prometheus gauge; the MLServer runtime (what `mlserver start` and KServe load) refuses it too;
`predict --self-check` refuses an artifact that does not reproduce or carries no golden set."""
import asyncio
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("mlserver")
from mlserver.settings import ModelParameters, ModelSettings  # noqa: E402
from prometheus_client import REGISTRY  # noqa: E402

from vfpt_deploy.cli import app  # noqa: E402
from vfpt_deploy.errors import ArtifactError  # noqa: E402
from vfpt_deploy.pipeline import ExportSettings, export_run  # noqa: E402
from vfpt_deploy.runtime import serving  # noqa: E402

from conftest import free_ports  # noqa: E402
from test_serve import running  # noqa: E402


@pytest.fixture(scope="module")
def artifacts(exported_run, tmp_path_factory):
    """A verified export with its golden set, and the same file with one weight nudged (it still loads)."""
    run, _ = exported_run
    d = tmp_path_factory.mktemp("selfcheck")
    good = d / "good.onnx"
    assert export_run(run, ExportSettings(num_random=4), good).passed
    model = onnx.load(str(good))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)) if len(t.dims) == 2 else 0)
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += 0.05
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    bad = d / "bad.onnx"
    onnx.save(model, str(bad))
    return good, bad


CLI = "import sys; sys.argv[0] = 'vfpt-deploy'; from vfpt_deploy.cli import run; run()"


def _serve(args, log):
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-c", CLI, "serve", *map(str, args)], stdout=f,
                                stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "300"})


def test_serve_refuses_an_artifact_that_does_not_reproduce(artifacts, tmp_path):
    _, bad = artifacts
    ports = free_ports(3)
    proc = _serve([f"m={bad}", "--host", "127.0.0.1", "--port", ports[0], "--grpc-port", ports[1],
                   "--metrics-port", ports[2], "--providers", "cpu", "--threads", "1"], tmp_path / "log")
    assert proc.wait(timeout=300) == 1
    text = (tmp_path / "log").read_text()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert "Traceback" not in text and len(errors) == 1, text
    assert "does not reproduce its golden set on this machine (golden: " in errors[0] and "max |diff|" in errors[0]
    assert "not served" in errors[0]


def test_serve_reports_a_passing_self_check(artifacts, tmp_path):
    good, _ = artifacts
    ports = free_ports(3)
    log = tmp_path / "log"
    proc = _serve([f"m={good}", "--host", "127.0.0.1", "--port", ports[0], "--grpc-port", ports[1],
                   "--metrics-port", ports[2], "--providers", "cpu", "--threads", "1"], log)
    with running(proc, ports, log) as srv:
        status, body = srv.get("/v2/models/m")
        params = json.loads(body)["parameters"]
        assert status == 200 and params["self_check"] == "passed" and params["self_check_inputs"] == 1
        assert 0 < params["self_check_seconds"] < 60
        metrics = srv.get("/metrics", srv.metrics)[1].decode()
        assert 'vfpt_self_check_passed{model_name="m",model_version=""} 1.0' in metrics
    assert "m: self-check passed: 1 of 2 golden inputs" in log.read_text()


def test_serve_without_self_check_says_off(artifacts, tmp_path):
    _, bad = artifacts
    ports = free_ports(3)
    log = tmp_path / "log"
    proc = _serve([f"m={bad}", "--host", "127.0.0.1", "--port", ports[0], "--grpc-port", ports[1],
                   "--metrics-port", ports[2], "--providers", "cpu", "--threads", "1", "--no-self-check"], log)
    with running(proc, ports, log) as srv:
        assert json.loads(srv.get("/v2/models/m")[1])["parameters"]["self_check"] == "off"


def _gauge(model: str) -> float | None:
    return REGISTRY.get_sample_value(serving.SELF_CHECK_METRIC, {"model_name": model, "model_version": ""})


def test_the_mlserver_runtime_refuses_it_too(artifacts):
    """What `mlserver start` / KServe load: VFPTModel.load replays the golden set itself."""
    good, bad = artifacts

    def load(name, path):
        settings = ModelSettings(name=name, implementation=serving.VFPTModel,
                                 parameters=ModelParameters(uri=str(path), extra={"threads": 1, "providers": ["cpu"]}))
        model = serving.VFPTModel(settings)
        return model, asyncio.run(model.load())

    with pytest.raises(ArtifactError, match="does not reproduce its golden set"):
        load("refused", bad)
    assert _gauge("refused") == 0.0
    model, ok = load("fine", good)
    assert ok and model.self_check.passed and _gauge("fine") == 1.0
    meta = asyncio.run(model.metadata())
    assert meta.parameters.self_check == "passed"
    asyncio.run(model.unload())


def test_predict_self_check(artifacts, exported_run, tmp_path):
    good, bad = artifacts
    img = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (200, 40, 90)).save(img)
    ok = CliRunner().invoke(app, ["predict", str(good), str(img), "--self-check"])
    assert ok.exit_code == 0 and "self-check passed" in ok.output
    refused = CliRunner().invoke(app, ["predict", str(bad), str(img), "--self-check"])
    assert refused.exit_code == 1 and "does not reproduce its golden set" in refused.output
    old = CliRunner().invoke(app, ["predict", str(exported_run[1]), str(img), "--self-check"])
    assert old.exit_code == 1 and "carries no golden set" in old.output
    assert CliRunner().invoke(app, ["predict", str(bad), str(img)]).exit_code == 0  # off unless asked
