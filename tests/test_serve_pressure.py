"""Serving under pressure (issue 23, part 7), against a real `vfpt-deploy serve` on loopback: a 200 MB body sent
without a length is cut off at the limit with memory flat; a shape claim of [100000, 3, 224, 224] with
little data is a 4xx (REST and gRPC); a client that stalls in its headers or its body does not hold the
server (others are answered, the stalled connection gets 408 and is closed); bad and good requests at once
leave every good answer exact; SIGTERM with requests in flight answers them and exits 0.

Timeouts are shortened for the test through the server's environment (VFPT_SERVE_BODY_TIMEOUT_S,
VFPT_SERVE_HEADER_TIMEOUT_S; defaults 60 s and 10 s). Every loop is bounded."""
import gzip
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest

pytest.importorskip("mlserver")
import grpc  # noqa: E402
from mlserver.grpc import dataplane_pb2 as pb  # noqa: E402

from conftest import free_ports  # noqa: E402
from test_serve import RUN, bytes_input, grpc_request, outputs, photo, running, tensor_input, tensors  # noqa: E402

NAME = "tiny"  # test_serve's grpc_request names this model
STALL_S = 3  # the server's body and header timeouts in these tests


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def post(url: str, body: bytes, headers: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(url, body, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read() or b"{}"
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"error": raw.decode(errors="replace")}


def start(onnx, d, *extra):
    ports = free_ports(3)
    log = d / "server.log"
    cmd = [sys.executable, "-c", RUN, "serve", f"{NAME}={onnx}", "--host", "127.0.0.1", "--port", ports[0],
           "--grpc-port", ports[1], "--metrics-port", ports[2], "--threads", "1", "--providers", "cpu", *extra]
    env = {**os.environ, "VFPT_MODULES_OUT": str(d / "modules.json"), "VFPT_SERVE_BODY_TIMEOUT_S": str(STALL_S),
           "VFPT_SERVE_HEADER_TIMEOUT_S": str(STALL_S)}
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env)
    return running(proc, ports, log, d / "modules.json")


@pytest.fixture(scope="module")
def server(exported_run, tmp_path_factory):
    with start(exported_run[1], tmp_path_factory.mktemp("pressure")) as srv:
        yield srv


def infer_url(srv) -> str:
    return f"{srv.url}/v2/models/{NAME}/infer"


def good(srv, rows: int = 1, seed: int = 0) -> tuple[int, dict]:
    return post(infer_url(srv), json.dumps({"inputs": [tensor_input(tensors(rows, seed))]}).encode())


def read_reply(s: socket.socket, wait: float) -> bytes:
    """What the server sends on `s` until it closes it, or until `wait` seconds have passed."""
    s.settimeout(wait)
    reply, deadline = b"", time.monotonic() + wait
    try:
        while time.monotonic() < deadline:
            more = s.recv(65536)
            if not more:
                break
            reply += more
    except (socket.timeout, ConnectionResetError):
        pass
    return reply


# -- a 200 MB body ------------------------------------------------------------------------------------------
def test_a_200mb_body_without_a_length_is_cut_off_and_memory_stays_flat(server):
    """Chunked transfer encoding: no Content-Length to refuse up front, so the server must count as it reads."""
    before = rss_mib(server.proc.pid)
    chunk = b"[" + b"0.0," * (2**18 - 1) + b"0]"  # ~1 MiB of JSON-ish numbers
    framed = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    sent, reply = 0, b""
    with socket.create_connection(("127.0.0.1", server.http), timeout=60) as s:
        s.sendall(b"POST /v2/models/" + NAME.encode() + b"/infer HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            while sent < 200 * 2**20:
                if select.select([s], [], [], 0)[0]:  # the server answered: it stopped reading
                    break
                s.sendall(framed)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = read_reply(s, 30)
    assert reply.startswith(b"HTTP/1.1 413"), (sent, reply[:300])
    assert b"over this server's limit" in reply
    assert sent < 150 * 2**20, sent  # refused near the limit (16 MiB here), not after reading all 200 MB
    assert rss_mib(server.proc.pid) < before + 100
    assert good(server)[0] == 200


# -- shape claims ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, words", [([100000, 3, 224, 224], "got shape [100000, 3, 224, 224]"),
                                          ([100000, 3, 32, 32], "batch size 100000, over this server's maximum"),
                                          ([2**40, 3, 32, 32], "over this server's maximum")])
def test_a_huge_shape_claim_with_little_data_is_4xx(server, shape, words):
    before = rss_mib(server.proc.pid)
    body = {"inputs": [{"name": "images", "datatype": "FP32", "shape": shape, "data": [0.0] * 12}]}
    status, answer = post(infer_url(server), json.dumps(body).encode())
    assert status == 400 and words in answer["error"], answer
    stub = server.stub
    inp = pb.ModelInferRequest.InferInputTensor(name="images", datatype="FP32", shape=shape,
                                                contents=pb.InferTensorContents(fp32_contents=[0.0] * 12))
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(grpc_request(inp), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert rss_mib(server.proc.pid) < before + 50
    assert good(server)[0] == 200


# -- stalled clients -------------------------------------------------------------------------------------------
def test_a_stalled_client_does_not_hold_the_server(server):
    head = (b"POST /v2/models/" + NAME.encode() + b"/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n")
    stalls = {"body": head + b'{"inputs": [{"name": "images", ', "headers": head[:40], "nothing": b""}
    socks = {}
    t0 = time.monotonic()
    for kind, sent in stalls.items():
        socks[kind] = socket.create_connection(("127.0.0.1", server.http), timeout=30)
        socks[kind].sendall(sent)
    try:
        for i in range(5):  # answered while the stalled connections are open
            assert good(server, 1 + i % 3, seed=i)[0] == 200
        if time.monotonic() - t0 < STALL_S - 0.5:  # (on a very busy machine the stalls may have timed out by now)
            assert not select.select(list(socks.values()), [], [], 0)[0]  # ... and not yet cut off
        replies = {kind: read_reply(s, STALL_S + 20) for kind, s in socks.items()}
    finally:
        for s in socks.values():
            s.close()
    waited = time.monotonic() - t0
    for kind, reply in replies.items():
        assert reply.startswith(b"HTTP/1.1 408"), (kind, reply[:300])
        assert b"did not arrive within 3 s" in reply, (kind, reply)
    assert waited < STALL_S + 20  # every stalled connection was closed (read_reply saw its end)
    assert good(server)[0] == 200


# -- bad and good at once ----------------------------------------------------------------------------------------
def _bad_requests() -> list[tuple[bytes, dict, int]]:
    """(body, headers, status) of requests that must fail, each in its own way."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = b"".join(z.compress(b"\0" * 2**24) for _ in range(16)) + z.flush()  # 256 MiB of zeros, ~256 KB
    one = tensors(1)
    claim = {"inputs": [{"name": "images", "datatype": "FP32", "shape": [100000, 3, 32, 32], "data": [0.0] * 12}]}
    nan = {"inputs": [{**tensor_input(one), "data": [float("nan")] * one.size}]}  # NaN: not JSON at all
    inf = {"inputs": [{**tensor_input(one), "data": [1e39] * one.size}]}  # infinite as float32
    return [
        (bomb, {"Content-Encoding": "gzip"}, 413),
        (gzip.compress(b'{"inputs": [')[:-8], {"Content-Encoding": "gzip"}, 400),  # truncated gzip
        (b'{"inputs": [', {}, 422),  # not JSON: MLServer's own validation answer
        (json.dumps(claim).encode(), {}, 400),
        (json.dumps(nan).encode(), {}, 422),
        (json.dumps(inf).encode(), {}, 400),
        (json.dumps({"inputs": [bytes_input([b"not an image"])]}).encode(), {}, 400),
        (json.dumps({"inputs": [tensor_input(one[:, :2])]}).encode(), {}, 400),
    ]


def test_bad_and_good_requests_at_once_every_good_one_is_exact(server):
    goods = [json.dumps({"inputs": [tensor_input(tensors(1 + i % 3, 50 + i)) if i % 2 else
                                    bytes_input([photo(200 + i + j) for j in range(1 + i % 2)])]}).encode()
             for i in range(24)]
    alone = [post(infer_url(server), b) for b in goods]  # one at a time
    assert all(s == 200 for s, _ in alone), [a for s, a in alone if s != 200][:2]
    bads = _bad_requests() * 2
    jobs = [("good", i) for i in range(len(goods))] + [("bad", i) for i in range(len(bads))]
    jobs = [jobs[(7 * k) % len(jobs)] for k in range(len(jobs))]  # interleaved (7 is prime to the count)
    assert sorted(jobs) == sorted(set(jobs))
    results: dict = {}
    lock = threading.Lock()
    before = rss_mib(server.proc.pid)

    def worker(mine):
        for kind, i in mine:
            body, headers = (goods[i], {}) if kind == "good" else bads[i][:2]
            answer = post(infer_url(server), body, headers)
            with lock:
                results[kind, i] = answer

    threads = [threading.Thread(target=worker, args=(jobs[w::16],)) for w in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(results) == len(jobs)
    for i, (s, body) in enumerate(alone):
        status, answer = results["good", i]
        assert status == 200, answer
        a, b = outputs(body), outputs(answer)
        assert a.keys() == b.keys()
        for k in a:  # the same bits as the request sent alone, whatever it was batched with
            assert np.array_equal(a[k], b[k]), (k, a[k], b[k])
    for i, (_, _, want) in enumerate(bads):
        status, answer = results["bad", i]
        assert status == want and "\n" not in answer.get("error", answer.get("detail", "")), (i, status, answer)
    assert rss_mib(server.proc.pid) < before + 300


# -- SIGTERM with requests in flight ----------------------------------------------------------------------------
def test_sigterm_answers_requests_in_flight_and_exits_0(exported_run, tmp_path):
    """The batcher holds requests for 3 s (--max-batch-delay-ms 3000), so they are in flight when SIGTERM comes:
    each is answered (or cleanly refused, never dropped mid-answer), new connections are refused, exit 0."""
    from vfpt_deploy.runtime.onnx_runner import OnnxPredictor

    with start(exported_run[1], tmp_path, "--max-batch-delay-ms", "3000") as srv:
        results: dict = {}

        def rest(i):
            results["rest", i] = post(infer_url(srv), json.dumps({"inputs": [tensor_input(tensors(1, i))]}).encode())

        def grpc_call(i):
            inp = pb.ModelInferRequest.InferInputTensor(name="images", datatype="FP32", shape=[1, 3, 32, 32],
                                                        contents=pb.InferTensorContents(
                                                            fp32_contents=tensors(1, 10 + i).ravel()))
            try:
                results["grpc", i] = srv.stub.ModelInfer(grpc_request(inp), timeout=60)
            except grpc.RpcError as e:
                results["grpc", i] = e

        threads = [threading.Thread(target=rest, args=(i,)) for i in range(6)]
        threads += [threading.Thread(target=grpc_call, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # all sent; the batcher waits until 3 s
        srv.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert srv.proc.wait(timeout=60) == 0, srv.log.read_text()[-3000:]
        try:
            late = post(infer_url(srv), b"{}", timeout=5)
        except OSError as e:  # connection refused: the server is gone
            late = e
        assert isinstance(late, OSError), late
    log = srv.log.read_text()
    assert "server stopped" in log and "Traceback" not in log, log[-3000:]
    with OnnxPredictor(exported_run[1], ["cpu"], threads=1) as p:
        for i in range(6):
            status, answer = results["rest", i]
            assert status == 200, answer  # in flight at SIGTERM: answered
            np.testing.assert_allclose(outputs(answer)["logits"], p.infer(tensors(1, i)), rtol=1e-5, atol=1e-5)
        for i in range(2):
            r = results["grpc", i]
            if isinstance(r, grpc.RpcError):  # a clean refusal, if any: UNAVAILABLE / CANCELLED, never INTERNAL
                assert r.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), r
            else:
                logits = np.frombuffer(r.raw_output_contents[0], np.float32) if r.raw_output_contents else \
                    np.asarray(r.outputs[0].contents.fp32_contents, np.float32)
                np.testing.assert_allclose(logits.reshape(1, -1), p.infer(tensors(1, 10 + i)), rtol=1e-5, atol=1e-5)
