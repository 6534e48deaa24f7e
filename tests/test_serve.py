"""`vfpt-deploy serve` on MLServer, for real: one server in a subprocess on free ports (the tiny exported
ONNX), spoken to over REST and gRPC with encoded images and FP32 tensors; every bad request gets a 4xx with
one line and the server answers the next one; concurrent requests are batched and each gets its own rows;
health, readiness, Prometheus metrics; the serving process never imports torch; the settings folder that
`--write-settings` writes runs under MLServer's own `mlserver start` (what KServe runs)."""
import asyncio
import base64
import contextlib
import importlib.util
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("mlserver")
import grpc  # noqa: E402  (mlserver's dependency)
from mlserver.grpc import dataplane_pb2 as pb  # noqa: E402
from mlserver.grpc import dataplane_pb2_grpc as pb_grpc  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from vfpt_deploy.cli import app  # noqa: E402
from vfpt_deploy.runtime.batcher import Batcher  # noqa: E402
from vfpt_deploy.runtime.onnx_runner import OnnxPredictor  # noqa: E402
from vfpt_deploy.runtime.preprocess import load_image  # noqa: E402
from conftest import free_ports  # noqa: E402

MAX_BATCH = 8
DELAY_MS = 50  # long enough that concurrent requests meet in one batch even on a busy 2-core machine
NAME = "tiny"
CLASSES = ["a", "b", "c", "d"]  # conftest's exported_run
# The server process: the CLI, plus a record of every module it imported and every artifact it opened.
RUN = """
import atexit, json, os, sys
import vfpt_deploy.runtime.onnx_runner as ort_runner
opened, init = [], ort_runner.OnnxPredictor.__init__
def counting_init(self, path, *args, **kwargs):
    opened.append(str(path))
    init(self, path, *args, **kwargs)
ort_runner.OnnxPredictor.__init__ = counting_init
def record():
    with open(os.environ["VFPT_MODULES_OUT"], "w") as f:
        json.dump({"modules": sorted(sys.modules), "opened": opened}, f)
atexit.register(record)
from vfpt_deploy.cli import run
run()
"""


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (serve's clean stop), then kill if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"the server was not ready after {timeout} s:\n{log.read_text()[-3000:]}")


class Server:
    def __init__(self, proc, ports, log, modules):
        self.proc, self.log, self.modules = proc, log, modules
        self.http, self.grpc_port, self.metrics = ports
        self.url = f"http://127.0.0.1:{self.http}"
        self.stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}"))

    def post(self, body: dict, model: str = NAME) -> tuple[int, dict]:
        req = urllib.request.Request(f"{self.url}/v2/models/{model}/infer", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def get(self, path: str, port: int | None = None) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port or self.http}{path}", timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def batch_histogram(self) -> dict[float, float]:
        """le -> cumulative count of vfpt_batch_size for the model, plus 'count' and 'sum'."""
        out = {}
        for fam in text_string_to_metric_families(self.get("/metrics", self.metrics)[1].decode()):
            for s in fam.samples:
                if s.name.startswith("vfpt_batch_size") and s.labels.get("model_name") == NAME:
                    key = float(s.labels["le"]) if s.name.endswith("_bucket") else s.name.rsplit("_", 1)[1]
                    out[key] = s.value
        return out


@pytest.fixture(scope="module")
def server(exported_run, tmp_path_factory):
    _, onnx = exported_run
    d = tmp_path_factory.mktemp("serve")
    ports = free_ports(3)
    log, modules = d / "server.log", d / "modules.txt"
    cmd = [sys.executable, "-c", RUN, "serve", f"{NAME}={onnx}", f"second={onnx}", "--host", "127.0.0.1",
           "--port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2], "--max-batch-size", MAX_BATCH,
           "--max-batch-delay-ms", DELAY_MS, "--threads", "1", "--providers", "cpu"]
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "VFPT_MODULES_OUT": str(modules)})
    with running(proc, ports, log, modules) as srv:
        yield srv


@contextlib.contextmanager
def running(proc, ports, log, modules=None):
    """A started server process as a Server once it is ready; stopped on leaving."""
    srv = Server(proc, ports, log, modules)
    try:
        wait_ready(srv.url, proc, log)
        yield srv
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def predictor(exported_run):
    with OnnxPredictor(exported_run[1], ["cpu"], threads=1) as p:
        yield p


# -- requests ------------------------------------------------------------------------------------------
def png(size=(40, 50), color=(200, 10, 30), fmt="PNG", **save) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt, **save)
    return buf.getvalue()


def photo(seed: int, size=(45, 37)) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def bytes_input(blobs: list[bytes]) -> dict:
    return {"name": "image_bytes", "datatype": "BYTES", "shape": [len(blobs)],
            "data": [base64.b64encode(b).decode() for b in blobs]}


def tensor_input(x: np.ndarray, datatype="FP32") -> dict:
    return {"name": "images", "datatype": datatype, "shape": list(x.shape), "data": x.reshape(-1).tolist()}


def tensors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32), dtype=np.float32)


def outputs(body: dict) -> dict:
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) if o["datatype"] != "BYTES"
            else np.asarray(o["data"], dtype=object).reshape(o["shape"]) for o in body["outputs"]}


def bomb_png(w: int = 20000, h: int = 20000) -> bytes:
    """A valid PNG header declaring w x h pixels, with almost no data: decoding it would take gigabytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def exif_rotated_jpeg() -> bytes:
    a = np.zeros((30, 60, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 40:] = (0, 0, 255)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


# -- health, metadata, metrics -------------------------------------------------------------------------
def test_health_readiness_and_metadata(server):
    assert server.get("/v2/health/live")[0] == 200
    assert server.get("/v2/health/ready")[0] == 200
    assert server.get(f"/v2/models/{NAME}/ready")[0] == 200
    assert server.get("/v2/models/nope/ready")[0] == 404
    assert server.stub.ServerLive(pb.ServerLiveRequest()).live
    assert server.stub.ModelReady(pb.ModelReadyRequest(name=NAME)).ready
    status, body = server.get(f"/v2/models/{NAME}")
    meta = json.loads(body)
    assert status == 200 and meta["platform"] == "onnxruntime_onnx"
    assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
        "images": ("FP32", [-1, 3, 32, 32]), "image_bytes": ("BYTES", [-1])}
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {
        "logits": "FP32", "top_k_labels": "BYTES", "top_k_probabilities": "FP32", "top_k_indices": "INT64"}
    assert meta["parameters"]["max_batch_size"] == MAX_BATCH
    grpc_meta = server.stub.ModelMetadata(pb.ModelMetadataRequest(name=NAME))
    assert [(t.name, list(t.shape)) for t in grpc_meta.inputs] == [("images", [-1, 3, 32, 32]), ("image_bytes", [-1])]


def test_two_models_from_one_command(server, predictor):
    assert server.get("/v2/models/second/ready")[0] == 200
    x = tensors(2, seed=9)
    for model in (NAME, "second"):
        status, body = server.post({"inputs": [tensor_input(x)]}, model=model)
        assert status == 200 and body["model_name"] == model
        np.testing.assert_allclose(outputs(body)["logits"], predictor.infer(x), rtol=1e-5, atol=1e-5)


def test_prometheus_metrics(server):
    assert server.post({"inputs": [bytes_input([png()])]})[0] == 200
    status, text = server.get("/metrics", server.metrics)
    names = {f.name for f in text_string_to_metric_families(text.decode())}
    assert status == 200 and {"model_infer_request_success", "vfpt_batch_size"} <= names
    assert server.batch_histogram()["count"] >= 1


# -- answers -------------------------------------------------------------------------------------------
def test_rest_images_match_in_process_predict(server, predictor, tmp_path):
    blobs = [photo(1), png((64, 64), (0, 128, 255), "JPEG"), exif_rotated_jpeg()]
    status, body = server.post({"inputs": [bytes_input(blobs)], "parameters": {"top_k": 3}})
    assert status == 200, body
    out = outputs(body)
    files = []
    for i, b in enumerate(blobs):
        files.append(tmp_path / f"{i}.img")
        files[-1].write_bytes(b)
    want = predictor.logits([load_image(f) for f in files])
    np.testing.assert_allclose(out["logits"], want, rtol=1e-5, atol=1e-5)
    preds = predictor.predict(files, top_k=3)
    assert out["top_k_labels"].tolist() == [[c for c, _ in p.top] for p in preds]
    np.testing.assert_allclose(out["top_k_probabilities"], [[s for _, s in p.top] for p in preds], rtol=1e-5)
    assert out["top_k_indices"].tolist() == [[CLASSES.index(c) for c, _ in p.top] for p in preds]
    # the EXIF orientation was applied: the same pixels read upright give other logits
    raw = predictor.infer(predictor.preprocess.batch([Image.open(io.BytesIO(blobs[2])).convert("RGB")]))
    assert not np.allclose(raw[0], out["logits"][2], atol=1e-3)


def test_rest_tensors_top_k_and_output_selection(server, predictor):
    x = tensors(3)
    status, body = server.post({"inputs": [tensor_input(x)], "parameters": {"top_k": 2},
                                "outputs": [{"name": "top_k_labels"}, {"name": "logits"}]})
    assert status == 200, body
    assert [o["name"] for o in body["outputs"]] == ["top_k_labels", "logits"]
    out = outputs(body)
    np.testing.assert_allclose(out["logits"], predictor.infer(x), rtol=1e-5, atol=1e-5)
    assert out["top_k_labels"].shape == (3, 2)
    status, body = server.post({"inputs": [tensor_input(x[:1])], "parameters": {"top_k": 99}})
    assert status == 200 and outputs(body)["top_k_labels"].shape == (1, 4)  # at most the number of classes


def grpc_request(inp: pb.ModelInferRequest.InferInputTensor, raw: list[bytes] | None = None, **params):
    req = pb.ModelInferRequest(model_name=NAME, inputs=[inp], raw_input_contents=raw or [])
    for k, v in params.items():
        req.parameters[k].int64_param = v
    return req


def test_grpc_images_and_tensors(server, predictor):
    blobs = [photo(2), photo(3, (20, 90))]
    inp = pb.ModelInferRequest.InferInputTensor(name="image_bytes", datatype="BYTES", shape=[2],
                                                contents=pb.InferTensorContents(bytes_contents=blobs))
    r = server.stub.ModelInfer(grpc_request(inp, top_k=2))
    got = {o.name: o for o in r.outputs}
    want = predictor.logits([load_image(io.BytesIO(b)) for b in blobs])
    np.testing.assert_allclose(np.reshape(got["logits"].contents.fp32_contents, (2, 4)), want, rtol=1e-5, atol=1e-5)
    assert list(got["top_k_labels"].shape) == [2, 2]
    assert [b.decode() for b in got["top_k_labels"].contents.bytes_contents[:2]] == \
        [c for c, _ in predictor.predict([Image.open(io.BytesIO(blobs[0]))], top_k=2)[0].top]
    x = tensors(2, seed=5)
    inp = pb.ModelInferRequest.InferInputTensor(name="images", datatype="FP32", shape=list(x.shape),
                                                contents=pb.InferTensorContents(fp32_contents=x.ravel()))
    r = server.stub.ModelInfer(grpc_request(inp))
    np.testing.assert_allclose(np.reshape(r.outputs[0].contents.fp32_contents, (2, 4)), predictor.infer(x),
                               rtol=1e-5, atol=1e-5)
    # raw_input_contents (what tritonclient sends): the answer comes back raw too
    inp = pb.ModelInferRequest.InferInputTensor(name="images", datatype="FP32", shape=list(x.shape))
    r = server.stub.ModelInfer(grpc_request(inp, raw=[x.tobytes()]))
    logits = np.frombuffer(r.raw_output_contents[0], np.float32).reshape(2, 4)
    np.testing.assert_allclose(logits, predictor.infer(x), rtol=1e-5, atol=1e-5)


TRITON_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as tg
client = tg.InferenceServerClient(sys.argv[1])
assert client.is_server_ready() and client.is_model_ready(sys.argv[2])
inp = tg.InferInput("image_bytes", [1], "BYTES")
inp.set_data_from_numpy(np.array([open(sys.argv[3], "rb").read()], dtype=object))
r = client.infer(sys.argv[2], [inp], parameters={"top_k": 2})
out = {"labels": [b.decode() for b in r.as_numpy("top_k_labels")[0]], "probs": r.as_numpy("top_k_probabilities")[0].tolist()}
x = np.load(sys.argv[4])
inp = tg.InferInput("images", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
r = client.infer(sys.argv[2], [inp], outputs=[tg.InferRequestedOutput("logits")])
out.update(logits=r.as_numpy("logits").tolist(), only_logits=r.as_numpy("top_k_labels") is None)
print(json.dumps(out))
"""


def test_tritonclient_grpc(server, predictor, tmp_path):
    """Triton's own client (raw_input_contents, BYTES with length prefixes, parameters, outputs). In a
    process of its own: its protos and MLServer's both define package 'inference'."""
    if importlib.util.find_spec("tritonclient") is None:  # not imported here (see above)
        pytest.skip("tritonclient is not installed")
    blob, x = photo(11), tensors(2, seed=3)
    (tmp_path / "img.png").write_bytes(blob)
    np.save(tmp_path / "x.npy", x)
    res = subprocess.run([sys.executable, "-c", TRITON_CLIENT, f"127.0.0.1:{server.grpc_port}", NAME,
                          tmp_path / "img.png", tmp_path / "x.npy"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    want = predictor.predict([Image.open(io.BytesIO(blob))], top_k=2)[0].top
    assert out["labels"] == [c for c, _ in want]
    np.testing.assert_allclose(out["probs"], [p for _, p in want], rtol=1e-5)
    np.testing.assert_allclose(out["logits"], predictor.infer(x), rtol=1e-5, atol=1e-5)
    assert out["only_logits"]


# -- bad requests: a 4xx with one line, and the server answers the next request -------------------------
ONE = tensors(1)
BAD_REST = {
    "wrong shape": ({"inputs": [tensor_input(tensors(1)[:, :, :31])]}, 400, "got shape [1, 3, 31, 32]"),
    "wrong dtype": ({"inputs": [tensor_input(ONE.astype(np.float64), "FP64")]}, 400, "got datatype FP64"),
    "integer dtype": ({"inputs": [{**tensor_input(ONE), "datatype": "INT32", "data": [0] * ONE.size}]}, 400,
                      "got datatype INT32"),
    "too few values": ({"inputs": [{**tensor_input(ONE), "data": [0.0] * 10}]}, 400, "has 10 values"),
    "text in a tensor": ({"inputs": [{**tensor_input(ONE), "data": ["x"] * ONE.size}]}, 400, "not all numbers"),
    "not an image": ({"inputs": [bytes_input([b"hello, not an image"])]}, 400, "image_bytes[0] is not a readable image"),
    "truncated image": ({"inputs": [bytes_input([png()[:60]])]}, 400, "image_bytes[0] is not a readable image"),
    "decompression bomb": ({"inputs": [bytes_input([png(), bomb_png()])]}, 400, "image_bytes[1]"),
    "not base64": ({"inputs": [{**bytes_input([png()]), "data": ["%%% not base64 %%%"]}]}, 400, "not valid base64"),
    "oversized batch of tensors": ({"inputs": [tensor_input(tensors(MAX_BATCH + 1))]}, 400,
                                   f"batch size {MAX_BATCH + 1}, over this server's maximum of {MAX_BATCH}"),
    "oversized batch of images": ({"inputs": [bytes_input([png()] * (MAX_BATCH + 1))]}, 400,
                                  f"over this server's maximum of {MAX_BATCH}"),
    "infinite value": ({"inputs": [{**tensor_input(ONE), "data": [1e39] * ONE.size}]}, 400,
                       "input 'images' holds NaN or Inf values"),
    "missing inputs": ({"inputs": []}, 400, "the request has no inputs"),
    "two inputs at once": ({"inputs": [tensor_input(ONE), bytes_input([png()])]}, 400, "has 2 inputs"),
    "unknown input": ({"inputs": [{**tensor_input(ONE), "name": "pixels"}]}, 400, "unknown input 'pixels'"),
    "bytes named images": ({"inputs": [{**bytes_input([png()]), "name": "images"}]}, 400, "got datatype BYTES"),
    "bad top_k": ({"inputs": [tensor_input(ONE)], "parameters": {"top_k": 0}}, 400, "top_k must be an integer"),
    "unknown output": ({"inputs": [tensor_input(ONE)], "outputs": [{"name": "probs"}]}, 400, "unknown output 'probs'"),
}


@pytest.mark.parametrize("case", list(BAD_REST))
def test_bad_rest_request_gets_4xx_and_the_server_goes_on(server, case):
    body, code, words = BAD_REST[case]
    status, answer = server.post(body)
    assert status == code, answer
    assert words in answer["error"] and "\n" not in answer["error"], answer
    assert server.post({"inputs": [tensor_input(ONE)]})[0] == 200


def test_unknown_model_is_404(server):
    status, answer = server.post({"inputs": [tensor_input(ONE)]}, model="nope")
    assert status == 404 and "nope" in answer["error"]
    with pytest.raises(grpc.RpcError) as e:
        server.stub.ModelInfer(pb.ModelInferRequest(model_name="nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert server.post({"inputs": [tensor_input(ONE)]})[0] == 200


@pytest.mark.parametrize("case", ["nan", "shape", "not an image", "two inputs", "no inputs"])
def test_bad_grpc_request_is_invalid_argument(server, case):
    x = ONE.copy()
    x[0, 0, 0, 0] = np.nan
    nan = pb.ModelInferRequest.InferInputTensor(name="images", datatype="FP32", shape=[1, 3, 32, 32],
                                                contents=pb.InferTensorContents(fp32_contents=x.ravel()))
    text = pb.ModelInferRequest.InferInputTensor(name="image_bytes", datatype="BYTES", shape=[1],
                                                 contents=pb.InferTensorContents(bytes_contents=[b"GIF89a..."]))
    shape = pb.ModelInferRequest.InferInputTensor(name="images", datatype="FP32", shape=[1, 3, 32, 33],
                                                  contents=pb.InferTensorContents(fp32_contents=[0.0] * 3168))
    req = {"nan": grpc_request(nan), "shape": grpc_request(shape), "not an image": grpc_request(text),
           "two inputs": pb.ModelInferRequest(model_name=NAME, inputs=[nan, text]),
           "no inputs": pb.ModelInferRequest(model_name=NAME)}[case]
    with pytest.raises(grpc.RpcError) as e:
        server.stub.ModelInfer(req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    words = {"nan": "holds NaN or Inf", "shape": "got shape [1, 3, 32, 33]", "not an image": "is not a readable image",
             "two inputs": "has 2 inputs", "no inputs": "has no inputs"}[case]
    assert words in e.value.details() and "\n" not in e.value.details()
    ok = pb.ModelInferRequest.InferInputTensor(name="images", datatype="FP32", shape=[1, 3, 32, 32],
                                               contents=pb.InferTensorContents(fp32_contents=ONE.ravel()))
    assert len(server.stub.ModelInfer(grpc_request(ok)).outputs) == 4


def raw_tensor(name="images", datatype="FP32", shape=(1, 3, 32, 32)):
    return pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=list(shape))


RAW = ONE.tobytes()
MALFORMED_GRPC = {  # raw_input_contents that MLServer's own proto conversion cannot read
    "raw size": (grpc_request(raw_tensor(), raw=[RAW[:100]]), "has 100 raw bytes but FP32 [1, 3, 32, 32] needs 12288"),
    "shape vs data": (grpc_request(raw_tensor(shape=[1, 3, 32, 33]), raw=[RAW]), "FP32 [1, 3, 32, 33] needs 12672"),
    "huge shape": (grpc_request(raw_tensor(shape=[100000, 3, 224, 224]), raw=[RAW]), "needs 60211200000"),
    "negative dim": (grpc_request(raw_tensor(shape=[-1, 3, 32, 32]), raw=[RAW]), "negative dimension"),
    "unknown datatype": (grpc_request(raw_tensor(datatype="FLOAT"), raw=[RAW]), "datatype 'FLOAT'"),
    "bytes prefix": (grpc_request(raw_tensor("image_bytes", "BYTES", [1]), raw=[struct.pack("<I", 999) + b"x"]),
                     "length prefix"),
    "raw count": (pb.ModelInferRequest(model_name=NAME, inputs=[raw_tensor(), raw_tensor("image_bytes", "BYTES", [1])],
                                       raw_input_contents=[RAW]), "1 raw_input_contents for 2 inputs"),
}


@pytest.mark.parametrize("case", list(MALFORMED_GRPC))
def test_malformed_grpc_tensors_are_invalid_argument_and_one_log_line(server, case):
    """Tensors whose raw bytes do not match their datatype and shape fail in MLServer's conversion, before the
    model sees them: INVALID_ARGUMENT with one line, and one line in the server's log, no traceback."""
    req, words = MALFORMED_GRPC[case]
    before = server.log.read_text(errors="replace")
    with pytest.raises(grpc.RpcError) as e:
        server.stub.ModelInfer(req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert words in e.value.details() and "\n" not in e.value.details(), e.value.details()
    ok = pb.ModelInferRequest.InferInputTensor(name="images", datatype="FP32", shape=[1, 3, 32, 32])
    assert len(server.stub.ModelInfer(grpc_request(ok, raw=[RAW])).outputs) == 4
    logged = server.log.read_text(errors="replace")[len(before):]
    assert "Traceback" not in logged and words in logged, logged[-3000:]


# -- adaptive batching ---------------------------------------------------------------------------------
def concurrent_requests() -> list[dict]:
    """Image and tensor requests of 1-3 rows with different top_k, and two bad ones in between."""
    reqs = []
    for i in range(16):
        rows = 1 + i % 3
        inp = bytes_input([photo(100 + 3 * i + j) for j in range(rows)]) if i % 2 else tensor_input(tensors(rows, i))
        reqs.append({"inputs": [inp], "parameters": {"top_k": 1 + i % 4}})
    reqs.insert(5, {"inputs": [bytes_input([b"not an image"])]})
    reqs.insert(11, {"inputs": [tensor_input(tensors(1)[:, :2])]})
    return reqs


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(server):
    reqs = concurrent_requests()
    alone = [server.post(r) for r in reqs]  # one at a time: batches of one request each
    before = server.batch_histogram()
    together: list = [None] * len(reqs)
    barrier = threading.Barrier(len(reqs))

    def client(i):
        barrier.wait()
        together[i] = server.post(reqs[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for (s1, b1), (s2, b2) in zip(alone, together):
        assert s1 == s2, (b1, b2)
        if s1 != 200:
            assert s1 == 400 and b1["error"] == b2["error"]  # a bad request fails alone, not its batch
            continue
        o1, o2 = outputs(b1), outputs(b2)
        np.testing.assert_allclose(o2["logits"], o1["logits"], rtol=1e-5, atol=1e-5)
        assert o2["top_k_labels"].tolist() == o1["top_k_labels"].tolist()
        assert o2["top_k_indices"].tolist() == o1["top_k_indices"].tolist()
    after = server.batch_histogram()
    calls = after["count"] - before["count"]
    rows = after["sum"] - before["sum"]
    good_rows = sum(len(r["inputs"][0]["data"]) // (1 if r["inputs"][0]["datatype"] == "BYTES" else 3072)
                    for r, (s, _) in zip(reqs, alone) if s == 200)
    assert rows == good_rows  # every good row was inferred exactly once
    assert calls < 16 and after[1.0] - before[1.0] < calls, (before, after)  # batches of more than one row
    assert after[float(MAX_BATCH)] == after["count"]  # and never more than --max-batch-size


def run_batcher(coro):
    return asyncio.run(coro)


def test_batcher_keeps_rows_with_their_request_and_respects_the_limit():
    seen = []

    def infer(x):
        seen.append(len(x))
        return x.reshape(len(x), -1)[:, :1] * 10

    async def main():
        b = Batcher(infer, max_rows=5, max_delay_s=0.05, on_batch=lambda n: None)
        xs = [np.full((1 + i % 3, 2), float(i), np.float32) for i in range(9)]
        outs = await asyncio.gather(*(b.submit(x) for x in xs))
        b.close()
        return xs, outs

    xs, outs = run_batcher(main())
    for x, out in zip(xs, outs):
        assert out.shape == (len(x), 1) and (out == x[:, :1] * 10).all()
    assert sum(seen) == sum(len(x) for x in xs) and max(seen) <= 5 and len(seen) < 9


def test_batcher_failure_reaches_every_request_of_that_batch_only():
    calls = []

    def infer(x):
        calls.append(len(x))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return x

    async def main():
        b = Batcher(infer, max_rows=4, max_delay_s=0.05)
        first = await asyncio.gather(*(b.submit(np.ones((1, 1), np.float32)) for _ in range(2)),
                                     return_exceptions=True)
        second = await b.submit(np.ones((1, 1), np.float32))
        b.close()
        return first, second

    first, second = run_batcher(main())
    assert all(isinstance(r, RuntimeError) for r in first) and second.shape == (1, 1)


def test_batcher_without_batching_runs_one_request_per_call():
    seen = []

    async def main():
        b = Batcher(lambda x: (seen.append(len(x)), x)[1], max_rows=4, max_delay_s=0.0, max_requests=1)
        await asyncio.gather(*(b.submit(np.ones((2, 1), np.float32)) for _ in range(4)))
        b.close()

    run_batcher(main())
    assert seen == [2, 2, 2, 2]


# -- the process ---------------------------------------------------------------------------------------
def test_sigterm_stops_cleanly_torch_never_imported_each_artifact_opened_once(server, exported_run):
    """Last of the server tests: stop it the way a container runtime does."""
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0, server.log.read_text()[-2000:]
    log = server.log.read_text()
    assert "server stopped" in log, log[-3000:]
    record = json.loads(server.modules.read_text())
    modules = set(record["modules"])
    assert "mlserver" in modules and "onnxruntime" in modules
    assert not {m for m in modules if m.split(".")[0] in ("torch", "timm", "torchvision")}
    # opened up front, once per model (MLServer re-imports the runtime module for every model it loads)
    assert record["opened"] == [str(exported_run[1])] * 2


# -- the command line: one line and a non-zero exit before anything listens --------------------------
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["serve", *map(str, args)])


def test_port_in_use_is_one_line(exported_run):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        http, metrics = free_ports(2)
        res = invoke(exported_run[1], "--host", "127.0.0.1", "--port", http, "--grpc-port", port,
                     "--metrics-port", metrics)
    assert res.exit_code != 0 and f"127.0.0.1:{port}" in res.output and "--grpc-port" in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("args, words, code", [
    (["missing.onnx"], "does not exist", 1),
    (["--max-batch-delay-ms", "-1"], "--max-batch-delay-ms must be in [0, 60000]", 2),
    (["--max-batch-delay-ms", "nan"], "--max-batch-delay-ms must be in [0, 60000]", 2),
    (["--port", "9000", "--grpc-port", "9000"], "ports must differ", 2),
    (["bad name!=x.onnx"], "model name 'bad name!'", 2),
])
def test_bad_options_are_one_line(exported_run, args, words, code):
    onnx = exported_run[1]
    res = invoke(*([onnx] if not str(args[0]).endswith(".onnx") else []), *args)
    assert res.exit_code == code and words in res.output and "Traceback" not in res.output, res.output


def test_unreadable_artifact_is_one_line(tmp_path):
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"\x00not a model" * 10)
    res = invoke(bad, "--host", "127.0.0.1", *sum(([f, p] for f, p in zip(
        ["--port", "--grpc-port", "--metrics-port"], free_ports(3))), []))
    assert res.exit_code == 1 and "onnxruntime cannot load" in res.output and "Traceback" not in res.output


def test_two_models_with_one_name_are_refused(exported_run):
    res = invoke(f"m={exported_run[1]}", f"m={exported_run[1]}")
    assert res.exit_code == 2 and "two models are named 'm'" in res.output


# -- the settings folder, run by MLServer's own CLI (what KServe runs) ---------------------------------
def test_write_settings_folder_runs_under_mlserver_start(exported_run, predictor, tmp_path):
    folder = tmp_path / "repo"
    res = invoke(f"{NAME}={exported_run[1]}", "--write-settings", folder, "--max-batch-size", 4, "--threads", 1)
    assert res.exit_code == 0, res.output
    server_json = json.loads((folder / "settings.json").read_text())
    assert server_json["parallel_workers"] == 0 and "http_port" not in server_json  # ports: KServe's env
    model_json = json.loads((folder / NAME / "model-settings.json").read_text())
    assert model_json["implementation"] == "vfpt_deploy.runtime.serving.VFPTModel"
    assert model_json["max_batch_size"] == 4 and model_json["parameters"]["uri"] == "./run.onnx"
    assert (folder / NAME / "run.onnx").read_bytes() == Path(exported_run[1]).read_bytes()
    again = invoke(f"other={exported_run[1]}", "--write-settings", folder)  # a stale model would be served too
    assert again.exit_code == 1 and "not an empty folder" in again.output
    mlserver = Path(sys.executable).with_name("mlserver")
    if not mlserver.exists():
        pytest.skip("the mlserver console script is not beside this python")
    http, grpc_port, metrics = free_ports(3)
    env = {**os.environ, "MLSERVER_HTTP_PORT": str(http), "MLSERVER_GRPC_PORT": str(grpc_port),
           "MLSERVER_METRICS_PORT": str(metrics), "MLSERVER_HOST": "127.0.0.1"}
    log = tmp_path / "mlserver.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(mlserver), "start", str(folder)], stdout=f, stderr=subprocess.STDOUT,
                                env=env, cwd=tmp_path)
    try:
        wait_ready(f"http://127.0.0.1:{http}", proc, log)
        srv = Server(proc, (http, grpc_port, metrics), log, None)
        status, body = srv.post({"inputs": [bytes_input([photo(7)])]})
        assert status == 200, body
        want = predictor.logits([load_image(io.BytesIO(photo(7)))])
        np.testing.assert_allclose(outputs(body)["logits"], want, rtol=1e-5, atol=1e-5)
        assert srv.post({"inputs": [tensor_input(tensors(5))]})[0] == 400  # its own max_batch_size, 4
    finally:
        stop(proc)
