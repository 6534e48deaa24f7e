"""A stock tritonclient (http and grpc, default settings) against `vfpt-deploy serve` (issue 23): inference
with the binary tensor data extension (exact against onnxruntime in-process), JSON too, Triton's
classification extension (class_count), the model config (the same as `vfpt-deploy triton` writes for
serve's batching), statistics, the repository index, metadata marking the two input forms as optional
alternatives, and a one-line log with the request id for every 4xx. `vfpt-deploy triton --kind cpu` writes
CPU instances and suggests no GPU.

The clients run in a subprocess of their own (one run for the module): tritonclient.grpc's protos and
MLServer's share the proto package 'inference', and tritonclient.http brings gevent."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("mlserver")
if importlib.util.find_spec("tritonclient") is None:
    pytest.skip("tritonclient is not installed", allow_module_level=True)

from conftest import free_ports  # noqa: E402
from test_serve import photo, running, tensors  # noqa: E402

from vfpt_deploy.cli import app  # noqa: E402
from vfpt_deploy.runtime.onnx_runner import OnnxPredictor  # noqa: E402
from vfpt_deploy.runtime.triton_config import config_dict, model_config_pb2  # noqa: E402

NAME = "tiny"
MAX_BATCH = 8
DELAY_MS = 50
CLASSES = ["a", "b", "c", "d"]  # conftest's exported_run

# Every call a Triton user makes, with each client's defaults; results as JSON (+ arrays in an .npz).
CLIENTS = r"""
import json, sys, traceback
import numpy as np
import tritonclient.http as th
import tritonclient.grpc as tg
from tritonclient.utils import InferenceServerException

http_url, grpc_url, name, blob_path, x_path, out_path = sys.argv[1:7]
blob, x = open(blob_path, "rb").read(), np.load(x_path)
out, arrays = {}, {}

def step(fn):  # each call on its own: one that fails is recorded (its test fails), the others still run
    try:
        fn()
    except Exception as e:
        out.setdefault("errors", {})[fn.__name__] = f"{type(e).__name__}: {e}"[:500]

def binary_sizes(result):
    return {o["name"]: (o.get("parameters") or {}).get("binary_data_size") for o in result.get_response()["outputs"]}

h = th.InferenceServerClient(http_url)
g = tg.InferenceServerClient(grpc_url)

def http_binary():
    inp = th.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)  # binary_data=True: tritonclient's default
    r = h.infer(name, [inp])  # no outputs named: all of them, as binary data (binary_data_output)
    arrays["http_logits"] = r.as_numpy("logits")
    out["http_labels"] = [[b.decode() for b in row] for row in r.as_numpy("top_k_labels")]
    out["http_binary_sizes"] = binary_sizes(r)

def http_bytes():
    inp = th.InferInput("image_bytes", [1], "BYTES")
    inp.set_data_from_numpy(np.array([blob], dtype=object))
    r = h.infer(name, [inp], outputs=[th.InferRequestedOutput("top_k_labels"), th.InferRequestedOutput("logits")])
    arrays["http_bytes_logits"] = r.as_numpy("logits")
    out["http_bytes_binary_sizes"] = binary_sizes(r)

def http_json():
    inp = th.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    r = h.infer(name, [inp], outputs=[th.InferRequestedOutput("logits", binary_data=False)])
    arrays["http_json_logits"] = r.as_numpy("logits")
    out["http_json_binary_sizes"] = binary_sizes(r)

def http_gzip():  # compressed both ways (not the default): MLServer gzips its JSON, the layer its input
    inp = th.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    r = h.infer(name, [inp], request_compression_algorithm="gzip", response_compression_algorithm="gzip")
    arrays["http_gzip_logits"] = r.as_numpy("logits")

def http_classes():
    inp = th.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    r = h.infer(name, [inp], outputs=[th.InferRequestedOutput("logits", class_count=3)])
    out["http_classes"] = [[b.decode() for b in row] for row in r.as_numpy("logits")]

def http_config():
    out["http_config"] = h.get_model_config(name)

def http_index():
    out["http_index"] = h.get_model_repository_index()

def http_metadata():
    out["http_metadata"] = h.get_model_metadata(name)

def http_bad():
    bad = th.InferInput("images", [1, 3, 31, 32], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 31, 32), np.float32))
    try:
        h.infer(name, [bad], request_id="bad-http-1")
    except InferenceServerException as e:
        out["http_bad"] = [e.status(), e.message()]

def http_stats():
    out["http_stats"] = h.get_inference_statistics(name)
    out["http_stats_all"] = h.get_inference_statistics()

def grpc_infer():
    inp = tg.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    arrays["grpc_logits"] = g.infer(name, [inp]).as_numpy("logits")
    r = g.infer(name, [inp], outputs=[tg.InferRequestedOutput("logits", class_count=3)])
    out["grpc_classes"] = [[b.decode() for b in row] for row in r.as_numpy("logits")]

def grpc_config():
    out["grpc_config"] = g.get_model_config(name, as_json=True)

def grpc_index():
    out["grpc_index"] = g.get_model_repository_index(as_json=True)

def grpc_bad():
    bad = tg.InferInput("images", [1, 3, 31, 32], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 31, 32), np.float32))
    try:
        g.infer(name, [bad], request_id="bad-grpc-1")
    except InferenceServerException as e:
        out["grpc_bad"] = [e.status(), e.message()]

def grpc_stats():
    out["grpc_stats"] = g.get_inference_statistics(name, as_json=True)

for fn in (http_binary, http_bytes, http_json, http_gzip, http_classes, http_config, http_index, http_metadata, http_bad,
           http_stats, grpc_infer, grpc_config, grpc_index, grpc_bad, grpc_stats):
    step(fn)
np.savez(out_path, **arrays)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def served(exported_run, tmp_path_factory):
    """(client results, arrays, server log, the ONNX, x, the photo) after one run of CLIENTS against serve."""
    _, onnx = exported_run
    d = tmp_path_factory.mktemp("tclient")
    ports = free_ports(3)
    log = d / "server.log"
    cmd = [sys.executable, "-c", "from vfpt_deploy.cli import run; run()", "serve", f"{NAME}={onnx}", "--host", "127.0.0.1",
           "--port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2], "--max-batch-size", MAX_BATCH,
           "--max-batch-delay-ms", DELAY_MS, "--threads", "1", "--providers", "cpu"]
    blob, x = photo(5), tensors(3, seed=21)
    (d / "img.png").write_bytes(blob)
    np.save(d / "x.npy", x)
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=os.environ.copy())
    with running(proc, ports, log):
        res = subprocess.run([sys.executable, "-c", CLIENTS, f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}", NAME,
                              d / "img.png", d / "x.npy", d / "out.npz"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:] + log.read_text()[-3000:]
    return json.loads(res.stdout), dict(np.load(d / "out.npz")), log.read_text(), onnx, x, blob


@pytest.fixture(scope="module")
def predictor(exported_run):
    with OnnxPredictor(exported_run[1], ["cpu"], threads=1) as p:
        yield p


def no_errors(out: dict, *steps: str) -> None:
    errors = {s: out.get("errors", {}).get(s) for s in steps if s in out.get("errors", {})}
    assert not errors, errors


def test_http_binary_data_is_exact_and_comes_back_binary(served, predictor):
    out, arrays, _, _, x, blob = served
    no_errors(out, "http_binary", "http_bytes", "http_json", "http_gzip", "grpc_infer")
    want = predictor.infer(x)
    np.testing.assert_array_equal(arrays["http_logits"], want)  # exact: the same float32 bits
    np.testing.assert_array_equal(arrays["http_json_logits"], want)
    np.testing.assert_array_equal(arrays["http_gzip_logits"], want)
    np.testing.assert_array_equal(arrays["grpc_logits"], want)
    assert all(size > 0 for size in out["http_binary_sizes"].values()), out["http_binary_sizes"]
    assert out["http_binary_sizes"]["logits"] == want.size * 4
    assert out["http_json_binary_sizes"] == {"logits": None}  # binary_data=False: JSON, as asked
    assert [r[0] for r in out["http_labels"]] == [CLASSES[i] for i in want.argmax(1)]
    from PIL import Image
    import io

    np.testing.assert_array_equal(arrays["http_bytes_logits"][0], predictor.logits([Image.open(io.BytesIO(blob))])[0])
    assert out["http_bytes_binary_sizes"]["top_k_labels"] > 0


def triton_strings(logits: np.ndarray, k: int) -> list[list[str]]:
    """Triton's classification output: per row the k largest values, "%f:index:label"."""
    return [[f"{float(row[j]):f}:{j}:{CLASSES[j]}" for j in np.argsort(-row, kind="stable")[:k]] for row in logits]


def test_class_count_gives_tritons_classification_strings(served, predictor):
    out, _, _, _, x, _ = served
    no_errors(out, "http_classes", "grpc_infer")
    want = triton_strings(predictor.infer(x), 3)
    assert out["http_classes"] == want
    assert out["grpc_classes"] == want


def test_model_config_is_what_vfpt_deploy_triton_writes(served, tmp_path):
    """serve's config equals config.pbtxt from `vfpt-deploy triton` with serve's batching and CPU instances."""
    from google.protobuf import json_format, text_format

    out, _, _, onnx, _, _ = served
    no_errors(out, "http_config", "grpc_config")
    res = CliRunner().invoke(app, ["triton", str(onnx), "--out", str(tmp_path / "repo"), "--name", NAME, "--kind", "cpu",
                                   "--max-batch", str(MAX_BATCH), "--max-queue-delay-us", str(DELAY_MS * 1000),
                                   "--no-verify-check"])
    assert res.exit_code == 0, res.output
    pb = model_config_pb2()
    written = text_format.Parse((tmp_path / "repo" / NAME / "config.pbtxt").read_text(), pb.ModelConfig())
    assert json_format.ParseDict(out["http_config"], pb.ModelConfig()) == written
    assert json_format.ParseDict(out["grpc_config"]["config"], pb.ModelConfig()) == written
    assert out["http_config"] == config_dict(written)  # numbers as numbers, every scalar field present
    assert out["http_config"]["max_batch_size"] == MAX_BATCH
    # by default the two servers batch alike: serve's --max-batch-size and triton's max_batch_size for an ONNX
    from vfpt_deploy.runtime.serve_settings import ServeOptions
    from vfpt_deploy.runtime.triton_config import DEFAULT_MAX_BATCH

    assert ServeOptions().max_batch_size == DEFAULT_MAX_BATCH == 32
    assert out["http_config"]["instance_group"][0]["kind"] == "KIND_CPU"
    # and --kind cpu needs no GPU in the container
    assert "--gpus" not in " ".join(res.output.split()) and "docker run -p8000" in " ".join(res.output.split())


def test_statistics_count_the_requests_and_the_inference_calls(served):
    out = served[0]
    no_errors(out, "http_stats", "grpc_stats")
    stats = out["http_stats"]["model_stats"]
    assert [s["name"] for s in stats] == [NAME]
    s = stats[0]
    inf = s["inference_stats"]
    # before the stats call: 5 good HTTP requests (3 + 1 + 3 + 3 + 3 rows) and 1 refused
    assert inf["success"]["count"] == 5 and s["inference_count"] == 13, s
    assert inf["fail"]["count"] == 1
    for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert inf[key]["count"] == 5 and inf[key]["ns"] > 0, (key, inf[key])
    assert inf["success"]["ns"] >= inf["compute_infer"]["ns"] + inf["queue"]["ns"]
    assert s["execution_count"] == sum(b["compute_infer"]["count"] for b in s["batch_stats"]) >= 1
    assert sum(b["batch_size"] * b["compute_infer"]["count"] for b in s["batch_stats"]) == 13
    assert s["last_inference"] > 1_700_000_000_000  # ms since the epoch
    assert out["http_stats_all"]["model_stats"][0]["name"] == NAME
    g = out["grpc_stats"]["model_stats"][0]
    assert g["name"] == NAME and int(g["inference_stats"]["success"]["count"]) == 7  # + the two gRPC ones
    assert int(g["inference_count"]) == 19


def test_repository_index_and_metadata_a_generic_client_can_follow(served):
    out = served[0]
    no_errors(out, "http_index", "grpc_index", "http_metadata")
    assert [(m["name"], m["state"]) for m in out["http_index"]] == [(NAME, "READY")]
    assert [(m["name"], m["state"]) for m in out["grpc_index"]["models"]] == [(NAME, "READY")]
    inputs = {i["name"]: i.get("parameters", {}) for i in out["http_metadata"]["inputs"]}
    assert inputs["images"] == {"optional": True, "alternative": "image_bytes"}
    assert inputs["image_bytes"] == {"optional": True, "alternative": "images"}


def test_a_4xx_is_logged_with_the_request_id_and_reason(served):
    out, _, log, _, _, _ = served
    no_errors(out, "http_bad", "grpc_bad")
    assert out["http_bad"][0] == "400" and "got shape [1, 3, 31, 32]" in out["http_bad"][1]
    assert out["grpc_bad"][0] == "StatusCode.INVALID_ARGUMENT"
    lines = log.splitlines()
    http = [ln for ln in lines if "request bad-http-1" in ln]
    grpc = [ln for ln in lines if "request bad-grpc-1" in ln]
    assert len(http) == 1 and "HTTP 400 POST /v2/models/tiny/infer" in http[0] and "got shape [1, 3, 31, 32]" in http[0]
    assert len(grpc) == 1 and "gRPC INVALID_ARGUMENT" in grpc[0] and "got shape [1, 3, 31, 32]" in grpc[0]
    assert "Traceback" not in log


def test_binary_bodies_that_do_not_add_up_are_one_line_400s():
    from vfpt_deploy.runtime.serve_triton import ClientError, join_binary, split_binary

    head = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 2],
                                   "parameters": {"binary_data_size": 8}}]}).encode()
    x = np.array([[1.5, -2.25]], np.float32)
    parsed, binary = split_binary(head + x.tobytes(), str(len(head)))
    np.testing.assert_array_equal(binary["images"], x)
    assert parsed["inputs"][0]["data"] == []
    for body, size, words in [(head + x.tobytes()[:4], str(len(head)), "does not fit"),
                              (head + x.tobytes() + b"!", str(len(head)), "1 bytes after the last binary input"),
                              (head + x.tobytes(), "x", "is not a size"),
                              (head[:-1] + x.tobytes(), str(len(head) - 1), "not valid JSON")]:
        with pytest.raises(ClientError, match=words):
            split_binary(body, size)
    body, size = join_binary(json.dumps({"outputs": [{"name": "s", "datatype": "BYTES", "shape": [2], "data": ["a", "bc"]},
                                                     {"name": "f", "datatype": "FP32", "shape": [1], "data": [0.1]}]}
                                        ).encode(), {"*": True, "f": False})
    assert body[size:] == b"\x01\x00\x00\x00a\x02\x00\x00\x00bc" and json.loads(body[:size])["outputs"][1]["data"] == [0.1]


def test_a_task_models_config_has_the_image_input_and_its_own_classes(tasks_onnx):
    """A multi-task artifact's task model, as serve answers get_model_config: the graph's task input is the
    server's business, and the logits are as wide as that task's classes (birds: 7 of the widest 7, flat: 2)."""
    from vfpt_deploy.runtime.serving import triton_model
    from vfpt_deploy.runtime.triton_config import TritonSettings, model_config

    with OnnxPredictor(tasks_onnx, ["cpu"], threads=1) as p:
        for task, width in ((1, 7), (2, 2)):
            model, gpu = triton_model(p, p.classes_of(task), MAX_BATCH)
            cfg = model_config(model, TritonSettings(max_batch_size=MAX_BATCH, kind="cpu"), "t", tasks_onnx)
            assert not gpu and model.classes == p.classes_of(task)
            assert [(i.name, list(i.dims)) for i in cfg.input] == [("images", [3, 32, 32])]
            assert [(o.name, list(o.dims)) for o in cfg.output] == [("logits", [width])]
            assert cfg.max_batch_size == MAX_BATCH


MLSERVER = "import sys; from mlserver.cli.main import main; sys.argv[0] = 'mlserver'; main()"


def test_the_layer_is_there_under_mlserver_start(exported_run, predictor, tmp_path):
    """A --write-settings folder under MLServer's own CLI (what KServe runs): settings.json's model repository
    class brings the Triton layer in before MLServer builds its servers."""
    import urllib.request

    folder = tmp_path / "repo"
    res = CliRunner().invoke(app, ["serve", f"{NAME}={exported_run[1]}", "--write-settings", str(folder), "--threads", "1"])
    assert res.exit_code == 0, res.output
    http, grpc_port, metrics = free_ports(3)
    env = {**os.environ, "MLSERVER_HTTP_PORT": str(http), "MLSERVER_GRPC_PORT": str(grpc_port),
           "MLSERVER_METRICS_PORT": str(metrics), "MLSERVER_HOST": "127.0.0.1"}
    log = tmp_path / "mlserver.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", MLSERVER, "start", str(folder)], stdout=f,
                                stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    x = tensors(2, seed=4)
    head = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": list(x.shape),
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    url = f"http://127.0.0.1:{http}"
    with running(proc, (http, grpc_port, metrics), log):
        req = urllib.request.Request(f"{url}/v2/models/{NAME}/infer", head + x.tobytes(),
                                     {"Inference-Header-Content-Length": str(len(head))})
        with urllib.request.urlopen(req, timeout=60) as r:
            size, body = int(r.headers["Inference-Header-Content-Length"]), r.read()
        with urllib.request.urlopen(f"{url}/v2/models/{NAME}/config", timeout=30) as r:
            config = json.loads(r.read())
        with urllib.request.urlopen(urllib.request.Request(f"{url}/v2/repository/index", b"", method="POST"),
                                    timeout=30) as r:
            index = json.loads(r.read())
    np.testing.assert_array_equal(np.frombuffer(body[size:], np.float32).reshape(2, 4), predictor.infer(x))
    assert config["name"] == NAME and config["instance_group"][0]["kind"] == "KIND_CPU"
    assert [m["name"] for m in index] == [NAME]


def test_4xx_log_lines_show_control_characters_escaped(caplog):
    """A client's URL or model name reaches the log: an ESC or NUL in it is shown escaped, never raw
    (it would act on the terminal that shows the log), for REST and for gRPC."""
    import asyncio
    import logging

    from mlserver.errors import MLServerError

    from vfpt_deploy.runtime import serve_triton, serving

    evil = "e\x1b[2Jx\x00y"
    sent = []

    async def send(message):
        sent.append(message)

    async def answer():
        wrapped = serve_triton.TritonLayer._logging({"method": "POST", "path": f"/v2/models/{evil}/load"},
                                                    serve_triton.RequestInfo(id="rid-1"), send)
        await wrapped({"type": "http.response.start", "status": 404, "headers": []})
        await wrapped({"type": "http.response.body", "body": json.dumps({"error": f"model {evil}: no pack"}).encode()})

    with caplog.at_level(logging.WARNING, logger="mlserver.vfpt"):
        asyncio.run(answer())
    line = [r.getMessage() for r in caplog.records if "rid-1" in r.getMessage()]
    assert len(line) == 1 and "\x1b" not in line[0] and "\x00" not in line[0], line
    assert "HTTP 404 POST /v2/models/e\\x1b[2Jx\\x00y/load" in line[0] and "model e\\x1b[2Jx\\x00y: no pack" in line[0]

    try:
        raise MLServerError(f"model {evil}: no pack file", 404)
    except MLServerError:
        import sys as _sys

        record = logging.LogRecord("mlserver.grpc", logging.ERROR, __file__, 1, "boom", (), _sys.exc_info())
    serving._OneLineClientErrors().filter(record)
    msg = record.getMessage()
    assert "\x1b" not in msg and "\x00" not in msg and "model e\\x1b[2Jx\\x00y: no pack file" in msg, msg
    assert record.levelno == logging.WARNING and record.exc_info is None  # a client's fault: a warning, one line
