"""Serving under hostile requests: bodies are bounded as sent and after gzip decoding, the pixels a request's
images claim are bounded before any is decoded, large claims cost little memory, and a model that gives NaN
is a server fault (5xx), not the client's (4xx). The server's memory is measured from /proc."""
import gzip
import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import zlib

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image

pytest.importorskip("mlserver")

from conftest import free_ports  # noqa: E402
from test_serve import running  # noqa: E402

CLI = "import sys; sys.argv[0] = 'vfpt-deploy'; from vfpt_deploy.cli import run; run()"


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, body, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def server(exported_run, tmp_path_factory):
    """`serve` on the tiny export (m) and a copy whose weights are NaN (nan), max batch 32."""
    _, good = exported_run
    d = tmp_path_factory.mktemp("limits")
    model = onnx.load(str(good))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)) if len(t.dims) == 2 else 0)
    w = numpy_helper.to_array(init).copy()
    w[...] = np.nan
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(d / "nan.onnx"))
    ports = free_ports(3)
    log = d / "server.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", CLI, "serve", f"m={good}", f"nan={d / 'nan.onnx'}", "--host",
                                 "127.0.0.1", "--port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port",
                                 str(ports[2]), "--threads", "1", "--providers", "cpu", "--max-batch-size", "32"],
                                stdout=f, stderr=subprocess.STDOUT)
    with running(proc, ports, log) as srv:
        yield srv


def _jpeg_claiming(side: int) -> bytes:
    """A JPEG whose header says side x side (a flat picture: a few KB on disk)."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (90, 120, 200)).save(buf, "JPEG", quality=20)
    return buf.getvalue()


def _claiming(side: int) -> bytes:
    """A 64x64 JPEG (a few hundred bytes) whose header is edited to claim side x side: what a hostile client sends."""
    blob = bytearray(_jpeg_claiming(64))
    sof = blob.index(b"\xff\xc0")
    blob[sof + 5:sof + 9] = side.to_bytes(2, "big") * 2
    return bytes(blob)


def _images_body(blobs: list[bytes]) -> bytes:
    import base64

    return json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [len(blobs)],
                                   "data": [base64.b64encode(b).decode() for b in blobs]}]}).encode()


def test_a_gzip_bomb_is_refused_before_it_inflates(server):
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = b"\0" * 2**24
    bomb = b"".join(z.compress(chunk) for _ in range(128)) + z.flush()  # 2 GiB of zeros in ~2 MiB
    assert len(bomb) < 3 * 2**20
    before = rss_mib(server.proc.pid)
    status, body = post(f"{server.url}/v2/models/m/infer", bomb, {"Content-Encoding": "gzip"})
    assert status == 413 and "inflates past this server's limit" in body["error"], body
    assert rss_mib(server.proc.pid) < before + 300  # nowhere near the 2 GiB it claims
    ok = post(f"{server.url}/v2/models/m/infer", gzip.compress(_images_body([_jpeg_claiming(64)])),
              {"Content-Encoding": "gzip"})
    assert ok[0] == 200, ok  # a normal gzip body still works


def test_a_body_over_the_limit_is_refused_by_its_length(server):
    """A client announcing 400 MB is answered 413 at once, before the server reads (or waits for) the body."""
    import socket

    with socket.create_connection(("127.0.0.1", server.http), timeout=60) as s:
        s.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 419430400\r\n\r\n{\"inputs\": [")
        reply = b""
        while b"}" not in reply.partition(b"\r\n\r\n")[2]:  # the JSON error body may come in a second packet
            more = s.recv(65536)
            if not more:
                break
            reply += more
        reply = reply.decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413") and "over this server's limit" in reply, reply[:300]


def test_pixel_claims_are_bounded_and_large_ones_cost_little(server):
    status, body = post(f"{server.url}/v2/models/m/infer", _images_body([_claiming(6000)] * 32))  # ~30 KB
    assert status == 413 and "claim 1152 megapixels together" in body["error"], body
    big = _jpeg_claiming(6000)  # a real 36 MP JPEG (550 KB): 103 MiB decoded at full size
    before = rss_mib(server.proc.pid)
    status, body = post(f"{server.url}/v2/models/m/infer", _images_body([big] * 4))  # 144 MP: within the limit
    assert status == 200, body
    assert rss_mib(server.proc.pid) < before + 200  # decoded at a reduced scale, one at a time


def test_a_model_that_gives_nan_is_a_server_fault(server):
    status, body = post(f"{server.url}/v2/models/nan/infer", _images_body([_jpeg_claiming(64)]))
    assert status == 500 and "non-finite logits" in body["error"] and "valid request" in body["error"], body
    assert post(f"{server.url}/v2/models/m/infer", _images_body([_jpeg_claiming(64)]))[0] == 200
