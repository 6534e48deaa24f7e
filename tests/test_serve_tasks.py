"""`vfpt-deploy serve` with a multi-task artifact, for real: a server subprocess serving conftest's tiny
three-task ONNX (cars: 4 classes, birds: 7, flat: 2) beside a single-task one. Each task answers under its
own model name with its own classes; requests for different tasks share inference calls (the
`vfpt_batch_tasks` histogram counts the tasks in each call) and each gets its own rows back; bad requests
get a 4xx and one line; and the process opens the multi-task artifact's session once, for all its tasks --
also when MLServer's own `mlserver start` runs the `--write-settings` folder."""
import asyncio
import json
import os
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlserver")
import grpc  # noqa: E402
from mlserver.grpc import dataplane_pb2 as pb  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from vfpt_deploy.cli import app  # noqa: E402
from vfpt_deploy.runtime.batcher import Batcher  # noqa: E402
from vfpt_deploy.runtime.onnx_runner import OnnxPredictor  # noqa: E402
from conftest import TASK_SPECS, free_ports  # noqa: E402
from test_serve import Server, bytes_input, outputs, photo, running, tensor_input, tensors  # noqa: E402

TASKS = list(TASK_SPECS)  # cars, birds, flat: the artifact's task order
WIDTH = {t: spec["num_classes"] for t, spec in TASK_SPECS.items()}
MAX_BATCH = 8
DELAY_MS = 100  # long enough that concurrent requests meet in one batch on a busy 2-core machine
# The server process: the CLI (or MLServer's own CLI), recording every artifact it opens a session for.
RUN = """
import os, sys
import vfpt_deploy.runtime.onnx_runner as ort_runner
init = ort_runner.OnnxPredictor.__init__
def counting_init(self, path, *args, **kwargs):
    with open(os.environ["VFPT_OPENED_OUT"], "a") as f:
        f.write(os.path.realpath(path) + "\\n")
    init(self, path, *args, **kwargs)
ort_runner.OnnxPredictor.__init__ = counting_init
if sys.argv[1] == "mlserver":
    from mlserver.cli import main
    sys.argv = sys.argv[1:]
    sys.exit(main())
from vfpt_deploy.cli import run
run()
"""


def start(args: list, folder: Path, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    log = folder / "server.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", RUN, *map(str, args)], stdout=f, stderr=subprocess.STDOUT,
                                cwd=folder, env={**os.environ, **(env or {}),
                                                 "VFPT_OPENED_OUT": str(folder / "opened.txt")})
    return proc, log


def opened(folder: Path) -> list[str]:
    path = folder / "opened.txt"
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture(scope="module")
def server(tasks_onnx, exported_run, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_tasks")
    ports = free_ports(3)
    proc, log = start(["serve", tasks_onnx, f"tiny={exported_run[1]}", "--host", "127.0.0.1", "--port", ports[0],
                       "--grpc-port", ports[1], "--metrics-port", ports[2], "--max-batch-size", MAX_BATCH,
                       "--max-batch-delay-ms", DELAY_MS, "--threads", "1", "--providers", "cpu"], d)
    with running(proc, ports, log) as srv:
        srv.folder = d
        yield srv


@pytest.fixture(scope="module")
def predictor(tasks_onnx):
    with OnnxPredictor(tasks_onnx, ["cpu"], threads=1) as p:
        yield p


def post_together(server, reqs: list, prefix: str = "") -> list:
    """Send every (task, x) request at once, one thread each (a barrier releases them together), to the
    model named prefix + task; the (status, body) answers in request order."""
    answers: list = [None] * len(reqs)
    barrier = threading.Barrier(len(reqs))

    def client(i):
        barrier.wait()
        answers[i] = server.post({"inputs": [tensor_input(reqs[i][1])]}, model=prefix + reqs[i][0])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return answers


def want_logits(predictor, x: np.ndarray, task: str) -> np.ndarray:
    """The predictor's logits for x as task `task`, trimmed to the task's classes."""
    return predictor.infer(x, np.full(len(x), TASKS.index(task), np.int64))[:, :WIDTH[task]]


def histogram(srv: Server, metric: str, model: str) -> dict:
    """le -> cumulative count of `metric` for model_name `model`, plus 'count' and 'sum'."""
    out = {}
    for fam in text_string_to_metric_families(srv.get("/metrics", srv.metrics)[1].decode()):
        for s in fam.samples:
            if s.name.startswith(metric) and s.labels.get("model_name") == model:
                out[float(s.labels["le"]) if s.name.endswith("_bucket") else s.name.rsplit("_", 1)[1]] = s.value
    return out


# -- (1) each task is its own model, with its own classes ----------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_each_task_answers_under_its_own_name(server, predictor, task):
    assert server.get(f"/v2/models/{task}/ready")[0] == 200
    assert server.stub.ModelReady(pb.ModelReadyRequest(name=task)).ready
    meta = json.loads(server.get(f"/v2/models/{task}")[1])
    assert {o["name"]: o["shape"] for o in meta["outputs"]}["logits"] == [-1, WIDTH[task]]
    assert meta["parameters"]["num_classes"] == WIDTH[task]
    assert meta["parameters"]["task"] == task and meta["parameters"]["artifact"] == "tasks"
    x = tensors(3, seed=TASKS.index(task))
    status, body = server.post({"inputs": [tensor_input(x)], "parameters": {"top_k": 99}}, model=task)
    assert status == 200 and body["model_name"] == task, body
    out = outputs(body)
    assert out["logits"].shape == (3, WIDTH[task]) and np.isfinite(out["logits"]).all()  # padding trimmed
    np.testing.assert_allclose(out["logits"], want_logits(predictor, x, task), rtol=1e-4, atol=1e-4)
    classes = [f"{task}-{c}" for c in range(WIDTH[task])]  # conftest's class names
    order = np.argsort(-out["logits"], axis=1, kind="stable")
    assert out["top_k_labels"].tolist() == [[classes[j] for j in row] for row in order]  # all of them: top_k 99
    assert out["top_k_indices"].tolist() == order.tolist()


def test_images_match_predict_with_task(server, predictor, tmp_path):
    blob = photo(5)
    (tmp_path / "img.png").write_bytes(blob)
    for task in TASKS:
        status, body = server.post({"inputs": [bytes_input([blob])], "parameters": {"top_k": 2}}, model=task)
        assert status == 200, body
        want = predictor.predict([tmp_path / "img.png"], top_k=2, task=task)[0].top
        out = outputs(body)
        assert out["top_k_labels"].tolist() == [[c for c, _ in want]]
        np.testing.assert_allclose(out["top_k_probabilities"][0], [p for _, p in want], rtol=1e-4)


def test_single_task_artifact_beside_it_is_unchanged(server, exported_run):
    x = tensors(2, seed=3)
    status, body = server.post({"inputs": [tensor_input(x)]}, model="tiny")
    assert status == 200
    with OnnxPredictor(exported_run[1], ["cpu"], threads=1) as p:
        np.testing.assert_allclose(outputs(body)["logits"], p.infer(x), rtol=1e-5, atol=1e-5)
    assert "task" not in json.loads(server.get("/v2/models/tiny")[1])["parameters"]


# -- (2) requests for different tasks share inference calls ----------------------------------------------
def test_concurrent_requests_for_different_tasks_share_batches(server, predictor):
    reqs = [(TASKS[i % 3], tensors(1 + i % 2, seed=50 + i)) for i in range(12)]
    before_tasks = histogram(server, "vfpt_batch_tasks", "tasks")
    before_rows = histogram(server, "vfpt_batch_size", "tasks")
    answers = post_together(server, reqs)
    for (task, x), (status, body) in zip(reqs, answers):
        assert status == 200 and body["model_name"] == task, body
        np.testing.assert_allclose(outputs(body)["logits"], want_logits(predictor, x, task), rtol=1e-4, atol=1e-4)
    after_tasks = histogram(server, "vfpt_batch_tasks", "tasks")
    after_rows = histogram(server, "vfpt_batch_size", "tasks")
    calls = after_tasks["count"] - before_tasks.get("count", 0)
    assert after_rows["sum"] - before_rows.get("sum", 0) == sum(len(x) for _, x in reqs)  # each row inferred once
    assert calls < len(reqs) and after_rows["count"] - before_rows.get("count", 0) == calls
    mixed = calls - (after_tasks[1.0] - before_tasks.get(1.0, 0))  # calls holding rows of 2 or 3 tasks
    assert mixed >= 1, (before_tasks, after_tasks)
    assert after_rows[float(MAX_BATCH)] == after_rows["count"]  # never over --max-batch-size


# -- (3) bad requests: a 4xx with one line, and the server answers the next -------------------------------
@pytest.mark.parametrize("model, body, code, words", [
    ("birds", {"inputs": [tensor_input(tensors(1)[:, :, :31])]}, 400, "got shape [1, 3, 31, 32]"),
    ("flat", {"inputs": [tensor_input(tensors(MAX_BATCH + 1))]}, 400, "over this server's maximum"),
    ("cars", {"inputs": [bytes_input([b"not an image"])]}, 400, "image_bytes[0] is not a readable image"),
    ("tasks", {"inputs": [tensor_input(tensors(1))]}, 404, "tasks"),  # the artifact is no model, its tasks are
    ("cars.x", {"inputs": [tensor_input(tensors(1))]}, 404, "cars.x"),
])
def test_bad_request_to_a_task_model_is_4xx_and_the_server_goes_on(server, predictor, model, body, code, words):
    status, answer = server.post(body, model=model)
    assert status == code and words in answer["error"] and "\n" not in answer["error"], answer
    x = tensors(1, seed=77)
    status, body = server.post({"inputs": [tensor_input(x)]}, model="flat")
    assert status == 200
    np.testing.assert_allclose(outputs(body)["logits"], want_logits(predictor, x, "flat"), rtol=1e-4, atol=1e-4)


def test_bad_grpc_request_to_a_task_model(server):
    shape = pb.ModelInferRequest.InferInputTensor(name="images", datatype="FP32", shape=[1, 3, 32, 33],
                                                  contents=pb.InferTensorContents(fp32_contents=[0.0] * 3168))
    with pytest.raises(grpc.RpcError) as e:
        server.stub.ModelInfer(pb.ModelInferRequest(model_name="birds", inputs=[shape]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "\n" not in e.value.details()
    ok = pb.ModelInferRequest.InferInputTensor(name="images", datatype="FP32", shape=[1, 3, 32, 32],
                                               contents=pb.InferTensorContents(fp32_contents=tensors(1).ravel()))
    r = server.stub.ModelInfer(pb.ModelInferRequest(model_name="birds", inputs=[ok]))
    assert list({o.name: o for o in r.outputs}["logits"].shape) == [1, WIDTH["birds"]]


# -- (4) one session for all the tasks ------------------------------------------------------------------
def test_one_session_for_all_tasks(server, tasks_onnx, exported_run):
    assert sorted(opened(server.folder)) == sorted([os.path.realpath(tasks_onnx), os.path.realpath(exported_run[1])])
    for task in TASKS:
        assert json.loads(server.get(f"/v2/models/{task}")[1])["parameters"]["session_models"] == sorted(TASKS)


def test_unloading_a_task_keeps_the_session_for_the_others(server, predictor, tasks_onnx):
    """Last of the server tests: MLServer's repository API unloads one task model; the others still run
    on the same session, and loading it again attaches to that session instead of opening another."""
    before = opened(server.folder)
    req = lambda path: urllib.request.urlopen(urllib.request.Request(f"{server.url}{path}", b"{}", method="POST"))  # noqa: E731
    assert req("/v2/repository/models/flat/unload").status == 200
    assert server.get("/v2/models/flat/ready")[0] != 200
    x = tensors(2, seed=31)
    status, body = server.post({"inputs": [tensor_input(x)]}, model="cars")
    assert status == 200
    np.testing.assert_allclose(outputs(body)["logits"], want_logits(predictor, x, "cars"), rtol=1e-4, atol=1e-4)
    assert json.loads(server.get("/v2/models/cars")[1])["parameters"]["session_models"] == ["birds", "cars"]
    assert req("/v2/repository/models/flat/load").status == 200
    status, body = server.post({"inputs": [tensor_input(x)]}, model="flat")
    assert status == 200
    np.testing.assert_allclose(outputs(body)["logits"], want_logits(predictor, x, "flat"), rtol=1e-4, atol=1e-4)
    assert opened(server.folder) == before  # no new session


# -- in process: the batcher's task indices, and settings that do not fit the artifact ---------------------
def test_batcher_gives_each_row_its_requests_task():
    seen = []

    def infer(x, ids):
        seen.append(ids.tolist())
        return np.concatenate([x.reshape(len(x), -1)[:, :1], ids[:, None].astype(np.float32)], axis=1)

    async def main():
        b = Batcher(infer, max_rows=6, max_delay_s=0.05)
        xs = [np.full((1 + i % 2, 2), float(i), np.float32) for i in range(6)]
        outs = await asyncio.gather(*(b.submit(x, task=i % 3) for i, x in enumerate(xs)))
        b.close()
        return xs, outs

    xs, outs = asyncio.run(main())
    for i, (x, out) in enumerate(zip(xs, outs)):
        assert (out[:, 0] == x[:, 0]).all() and (out[:, 1] == i % 3).all()
    assert any(len(set(ids)) > 1 for ids in seen) and sum(map(len, seen)) == sum(map(len, xs))


@pytest.mark.parametrize("extra, words", [
    ({}, "holds 3 tasks (cars, birds, flat); serve one model per task"),
    ({"task": "dogs"}, "parameters.extra.task 'dogs' is not a task of"),
])
def test_task_settings_that_do_not_fit_the_artifact_are_one_line(tasks_onnx, extra, words):
    from mlserver.settings import ModelSettings

    from vfpt_deploy.errors import UsageError
    from vfpt_deploy.runtime.serving import VFPTModel

    model = VFPTModel(ModelSettings(name="m", implementation=VFPTModel, parameters={
        "uri": str(tasks_onnx), "extra": {"threads": 1, "providers": ["cpu"], **extra}}))
    with pytest.raises(UsageError) as e:
        asyncio.run(model.load())
    assert words in str(e.value) and "\n" not in str(e.value)
    asyncio.run(model.unload())
    assert model.predictor.session is None  # closed: nothing else used it


# -- the command line ------------------------------------------------------------------------------------
runner = CliRunner()


def test_two_models_of_one_name_are_refused_in_one_line(tasks_onnx, exported_run, tmp_path):
    res = runner.invoke(app, ["serve", str(tasks_onnx), f"cars={exported_run[1]}",
                              "--write-settings", str(tmp_path / "o")])
    assert res.exit_code == 2 and "two served models would be named 'cars'" in res.output, res.output
    assert "NAME=PATH" in res.output and "Traceback" not in res.output and not (tmp_path / "o").exists()


def test_named_artifacts_whose_task_models_collide_are_told_so(task_runs, tmp_path):
    """x + task 'y.z' and x.y + task 'z' are both x.y.z: naming the artifacts is not the fix then."""
    for out, tasks in (("yz.onnx", ["y.z", "w"]), ("z.onnx", ["z", "q"])):
        args = sum((["--task", f"{t}={p}"] for t, p in zip(tasks, task_runs.values())), [])
        assert runner.invoke(app, ["export", *args, "--out", str(tmp_path / out)]).exit_code == 0
    res = runner.invoke(app, ["serve", f"x={tmp_path / 'yz.onnx'}", f"x.y={tmp_path / 'z.onnx'}",
                              "--write-settings", str(tmp_path / "ws")])
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and "would be named 'x.y.z'" in out and "keep NAME.TASK apart" in out, res.output


def test_a_task_named_like_its_artifact_file_is_refused_before_writing(task_runs, tmp_path):
    """Its settings folder would be where the artifact's copy goes (NAME/<file>): refused up front, and the
    settings folder is left as it was (no half-written copy)."""
    out = tmp_path / "z.onnx"
    res = runner.invoke(app, ["export", "--task", f"z.onnx={task_runs['cars']}", "--task", f"b={task_runs['birds']}",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["serve", str(out), "--write-settings", str(tmp_path / "ws")])
    assert res.exit_code == 2 and "has the name of its artifact's file" in " ".join(res.output.split()), res.output
    assert not (tmp_path / "ws").exists() or not any((tmp_path / "ws").iterdir())


def test_write_settings_runs_under_mlserver_start_with_one_session(tasks_onnx, predictor, tmp_path):
    folder = tmp_path / "repo"
    res = runner.invoke(app, ["serve", f"t={tasks_onnx}", "--write-settings", str(folder), "--max-batch-size", "4",
                              "--max-batch-delay-ms", str(DELAY_MS), "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (folder / "t").iterdir()) == ["t.birds", "t.cars", "t.flat", "tasks.onnx"]
    assert (folder / "t" / "tasks.onnx").read_bytes() == Path(tasks_onnx).read_bytes()  # one copy for all tasks
    for task in TASKS:
        ms = json.loads((folder / "t" / f"t.{task}" / "model-settings.json").read_text())
        assert ms["name"] == f"t.{task}" and ms["parameters"]["uri"] == "../tasks.onnx"
        assert ms["parameters"]["extra"]["task"] == task and ms["parameters"]["extra"]["artifact"] == "t"
    http, grpc_port, metrics = free_ports(3)
    env = {"MLSERVER_HTTP_PORT": str(http), "MLSERVER_GRPC_PORT": str(grpc_port),
           "MLSERVER_METRICS_PORT": str(metrics), "MLSERVER_HOST": "127.0.0.1"}
    proc, log = start(["mlserver", "start", folder], tmp_path, env)
    with running(proc, (http, grpc_port, metrics), log) as srv:
        reqs = [(TASKS[i % 3], tensors(1, seed=90 + i)) for i in range(6)]
        answers = post_together(srv, reqs, prefix="t.")
        for (task, x), (status, body) in zip(reqs, answers):
            assert status == 200, body
            np.testing.assert_allclose(outputs(body)["logits"], want_logits(predictor, x, task), rtol=1e-4, atol=1e-4)
        shared = histogram(srv, "vfpt_batch_tasks", "t")
        assert shared["count"] - shared[1.0] >= 1, shared  # a call held rows of more than one task
        assert opened(tmp_path) == [os.path.realpath(folder / "t" / "tasks.onnx")]  # three task models, one session
        assert srv.post({"inputs": [tensor_input(tensors(5))]}, model="t.cars")[0] == 400  # its max_batch_size, 4
