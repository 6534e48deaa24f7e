"""`vfpt-deploy serve B.onnx --packs DIR` for real (issue 22, part 3): a server subprocess serving conftest's tiny
packs on one backbone session. Each pack answers under its own name exactly as an in-process PackSession does;
concurrent requests for different packs share inference calls; a pack dropped into DIR is loaded with the V2
repository extension while clients run (no failed request, the first answer after the load is right); an
unloaded pack answers 404 in one line while the others keep serving, and its requests in flight are answered;
a bad pack is refused in one line with a 400 and changes nothing; `mlserver start` runs a --write-settings
folder; and a new user's workflow (train, pack, serve, load, query with tritonclient) runs end to end."""
import contextlib
import json
import shutil
import threading
import time
import urllib.request

import numpy as np
import pytest

pytest.importorskip("mlserver")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from vfpt_deploy.artifacts.pack import read_pack, write_pack  # noqa: E402
from vfpt_deploy.cli import app  # noqa: E402
from vfpt_deploy.runtime.packs import PackSession  # noqa: E402
from conftest import assert_logits_close, free_ports  # noqa: E402
from test_packs import make_packs  # noqa: E402
from test_serve import running, tensor_input, tensors  # noqa: E402
from test_serve_tasks import start  # noqa: E402

DELAY_MS = 150  # long enough that concurrent requests meet in one batch, and that an unload finds them in flight
WIDTH = {"cars": 4, "birds": 7, "flat": 2}


@pytest.fixture(scope="module")
def packed(task_runs, tmp_path_factory):
    """(backbone artifact, {name: pack file}) for conftest's three tasks, exported apart from DIR."""
    d = tmp_path_factory.mktemp("serve_packs_src")
    return make_packs(task_runs, d)


@pytest.fixture(scope="module")
def expected(packed):
    """name -> logits of tensors(3, seed) as an in-process PackSession holding all three packs gives them."""
    backbone, packs = packed
    with PackSession(backbone, ["cpu"], threads=1) as s:
        for p in packs.values():
            s.add(p)
        yield lambda name, x: s.infer(x, name)[:, :WIDTH[name]]


class Client:
    def __init__(self, url: str):
        self.url = url

    def call(self, path: str, body: dict | None = None, method: str = "POST") -> tuple[int, dict]:
        data = None if method == "GET" else json.dumps(body or {}).encode()
        req = urllib.request.Request(self.url + path, data, {"Content-Type": "application/json"}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def infer(self, model: str, x: np.ndarray) -> tuple[int, dict]:
        return self.call(f"/v2/models/{model}/infer", {"inputs": [tensor_input(x)], "outputs": [{"name": "logits"}]})

    def logits(self, model: str, x: np.ndarray) -> np.ndarray:
        status, body = self.infer(model, x)
        assert status == 200, body
        out = {o["name"]: o for o in body["outputs"]}["logits"]
        return np.asarray(out["data"], np.float32).reshape(out["shape"])

    def index(self) -> dict:
        status, body = self.call("/v2/repository/index")
        assert status == 200, body
        return {m["name"]: m["state"] for m in body}

    def reasons(self) -> dict:
        status, body = self.call("/v2/repository/index")
        assert status == 200, body
        return {m["name"]: m.get("reason", "") for m in body}

    def repo(self, name: str, action: str) -> tuple[int, dict]:
        return self.call(f"/v2/repository/models/{name}/{action}")


@pytest.fixture(scope="module")
def server(packed, tmp_path_factory):
    """A server on DIR = {cars, birds}; flat stays outside DIR until a test drops it in."""
    backbone, packs = packed
    d = tmp_path_factory.mktemp("serve_packs")
    folder = d / "packs"
    folder.mkdir()
    for name in ("cars", "birds"):
        shutil.copyfile(packs[name], folder / packs[name].name)
    ports = free_ports(3)
    proc, log = start(["serve", backbone, "--packs", folder, "--host", "127.0.0.1", "--port", ports[0], "--grpc-port",
                       ports[1], "--metrics-port", ports[2], "--max-batch-size", 8, "--max-batch-delay-ms", DELAY_MS,
                       "--threads", "1", "--providers", "cpu"], d)
    with running(proc, ports, log) as srv:
        srv.client, srv.folder, srv.packs = Client(srv.url), folder, packs
        yield srv


def one_line(body: dict) -> str:
    msg = body["error"]
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def tasks_per_call(srv) -> list[float]:
    """(calls, rows) of the shared batcher's vfpt_batch_tasks histogram: (count, sum of tasks per call)."""
    for fam in text_string_to_metric_families(srv.get("/metrics", srv.metrics)[1].decode()):
        if fam.name == "vfpt_batch_tasks":
            got = {s.name: s.value for s in fam.samples}
            return [got.get("vfpt_batch_tasks_count", 0.0), got.get("vfpt_batch_tasks_sum", 0.0)]
    return [0.0, 0.0]


def run_clients(client: Client, expected, models: list[str], stop: threading.Event, out: dict) -> list[threading.Thread]:
    """One thread per model, each sending requests until `stop`, checking every answer; out[model] = [ok, bad]."""
    def loop(model: str, seed: int) -> None:
        x = tensors(2, seed)
        want = expected(model, x)
        out[model] = [0, []]
        while not stop.is_set():
            status, body = client.infer(model, x)
            if status != 200:
                out[model][1].append((status, body))
                continue
            o = {o["name"]: o for o in body["outputs"]}["logits"]
            got = np.asarray(o["data"], np.float32).reshape(o["shape"])
            try:
                assert_logits_close(got, want, model)
                out[model][0] += 1
            except AssertionError as e:
                out[model][1].append((200, str(e)[:200]))

    threads = [threading.Thread(target=loop, args=(m, 20 + i), daemon=True) for i, m in enumerate(models)]
    for t in threads:
        t.start()
    return threads


# -- serving ------------------------------------------------------------------------------------------
def test_each_pack_is_its_own_model(server, expected):
    c = server.client
    assert c.index() == {"birds": "READY", "cars": "READY"}
    for i, name in enumerate(("cars", "birds")):
        x = tensors(3, seed=i)
        got = c.logits(name, x)
        assert got.shape == (3, WIDTH[name])
        assert_logits_close(got, expected(name, x), f"{name} served vs PackSession")
    # the answer is the pack's own: cars' rows are not birds' first four columns
    x = tensors(3, seed=0)
    assert not np.allclose(c.logits("cars", x), expected("birds", x)[:, :4], atol=1e-3)
    status, meta = c.call("/v2/models/birds", method="GET")
    assert status == 200 and meta["parameters"]["session_models"] == ["birds", "cars"]
    assert meta["parameters"]["self_check"] == "passed"


def test_mixed_concurrent_requests_share_calls(server, expected):
    c = server.client
    before = tasks_per_call(server)
    xs = {(m, i): tensors(1 + i % 2, seed=100 + i) for i in range(6) for m in ("cars", "birds")}
    got: dict = {}

    def one(key):
        got[key] = c.logits(key[0], xs[key])

    threads = [threading.Thread(target=one, args=(k,)) for k in xs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (m, i), x in xs.items():
        assert_logits_close(got[(m, i)], expected(m, x), f"{m} #{i} in a mixed batch")
    after = tasks_per_call(server)
    calls, tasks = after[0] - before[0], after[1] - before[1]
    assert 0 < calls < len(xs) and tasks > calls, (calls, tasks)  # some call held rows of both packs


# -- the repository extension -------------------------------------------------------------------------
def test_load_a_pack_dropped_in_while_clients_run(server, expected):
    c = server.client
    assert "flat" not in c.index() and c.infer("flat", tensors(1))[0] == 404
    stop, out = threading.Event(), {}
    threads = run_clients(c, expected, ["cars", "birds"], stop, out)
    try:
        time.sleep(0.5)
        shutil.copyfile(server.packs["flat"], server.folder / "flat.pack.safetensors")
        assert c.index()["flat"] == "UNAVAILABLE" and c.reasons()["flat"] == "not loaded"  # listed
        x = tensors(2, seed=7)
        t0 = time.perf_counter()
        status, body = c.repo("flat", "load")
        assert status == 200, body
        got = c.logits("flat", x)
        first = time.perf_counter() - t0
        assert_logits_close(got, expected("flat", x), "flat, the first answer after its load")
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    for model, (ok, bad) in out.items():
        assert ok > 0 and not bad, (model, bad[:3])
    assert c.index() == {"birds": "READY", "cars": "READY", "flat": "READY"}
    assert first < 30, first


def test_unload_answers_in_flight_then_404(server, expected):
    c = server.client
    x = tensors(1, seed=3)
    results = []
    threads = [threading.Thread(target=lambda: results.append(c.infer("birds", x))) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(DELAY_MS / 1000 / 3)  # they wait in the batcher for DELAY_MS
    status, body = c.repo("birds", "unload")
    for t in threads:
        t.join()
    assert status == 200, body
    for status, body in results:  # in flight: answered (one arriving after the unload began: 404, one line)
        if status == 200:
            o = {o["name"]: o for o in body["outputs"]}["logits"]
            assert_logits_close(np.asarray(o["data"], np.float32).reshape(o["shape"]), expected("birds", x), "birds")
        else:
            assert status == 404 and "birds was unloaded" in one_line(body)
    assert any(s == 200 for s, _ in results)
    status, body = c.infer("birds", x)
    assert status == 404 and "model birds was unloaded" in one_line(body) and "/load" in body["error"]
    assert_logits_close(c.logits("cars", x), expected("cars", x), "cars after birds' unload")
    assert c.index()["birds"] == "UNAVAILABLE" and c.reasons()["birds"] == "unloaded"
    status, body = c.repo("birds", "load")  # and back
    assert status == 200, body
    assert_logits_close(c.logits("birds", x), expected("birds", x), "birds loaded again")


def test_load_again_replaces_a_changed_pack(server, expected, tmp_path):
    """A new file under a loaded name: the load call swaps it in (here birds' file becomes flat's tables, 2
    classes), and the original again after."""
    c, x = server.client, tensors(2, seed=11)
    with birds_replaced_by_flat(server, expected, x):
        status, body = c.repo("birds", "load")
        assert status == 200, body
        assert_logits_close(c.logits("birds", x), expected("flat", x), "birds replaced by flat's pack")
        status, meta = c.call("/v2/models/birds", method="GET")
        assert meta["parameters"]["num_classes"] == 2
        assert_logits_close(c.logits("cars", x), expected("cars", x), "cars beside the replacement")


@contextlib.contextmanager
def birds_replaced_by_flat(server, expected, x):
    """birds' file in DIR holds flat's pack inside the block; after it, the original is loaded back and checked."""
    c, target = server.client, server.folder / "birds.pack.safetensors"
    try:
        shutil.copyfile(server.packs["flat"], target)
        yield
    finally:
        shutil.copyfile(server.packs["birds"], target)
        status, body = c.repo("birds", "load")
    assert status == 200, body
    assert_logits_close(c.logits("birds", x), expected("birds", x), "birds back")


def test_reload_answers_in_flight_requests_with_the_old_pack(server, expected):
    """Requests waiting in the batcher when a reload swaps birds' file for flat's: each is answered by the
    pack its model had (birds, 7 classes), never by the new one cut to the old width."""
    c, x = server.client, tensors(1, seed=5)
    results = []
    threads = [threading.Thread(target=lambda: results.append(c.infer("birds", x))) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(DELAY_MS / 1000 / 3)  # they wait in the batcher for DELAY_MS
    with birds_replaced_by_flat(server, expected, x):
        status, body = c.repo("birds", "load")
        for t in threads:
            t.join()
        assert status == 200, body
        answered = [b for st, b in results if st == 200]
        assert answered and len(answered) == len(results), results
        for body in answered:
            o = {o["name"]: o for o in body["outputs"]}["logits"]
            got = np.asarray(o["data"], np.float32).reshape(o["shape"])
            if got.shape[1] == WIDTH["birds"]:  # sent to the old model: the old pack's answer
                assert_logits_close(got, expected("birds", x), "birds in flight during its reload")
            else:  # reached the new model after the swap: the new pack's answer, whole
                assert_logits_close(got, expected("flat", x), "birds after its reload")
        assert any(b["outputs"][0]["shape"][1] == WIDTH["birds"] for b in answered)
        assert_logits_close(c.logits("birds", x), expected("flat", x), "birds after its reload")


def test_bad_packs_are_refused_and_the_others_keep_serving(server, expected, tmp_path):
    c = server.client
    pack = read_pack(server.packs["cars"])
    meta = {k: v for k, v in pack.metadata.items() if k not in ("format", "version", "fold")}
    cut = server.packs["birds"].read_bytes()
    (server.folder / "corrupt.pack.safetensors").write_bytes(cut[: len(cut) // 2])
    ident = meta["backbone_identity"]  # made on another file, and another backbone's weights
    write_pack(server.folder / "other.pack.safetensors", pack.tables, {**meta, "backbone_artifact_sha256": "0" * 64,
               "backbone_identity": {**ident, "backbone": {**ident["backbone"], "sha256": "1" * 64}}})
    tables = pack.tables
    wide = type(tables)(**{**vars(tables), "head_weight": np.zeros((10_001, tables.head_weight.shape[1]), np.float32),
                           "head_bias": np.zeros(10_001, np.float32)})
    write_pack(server.folder / "wide.pack.safetensors", wide, {**meta, "classes": [str(i) for i in range(10_001)]})
    # cars replaced by a pack whose golden set no longer matches (its head moved): the old cars stays
    moved = type(tables)(**{**vars(tables), "head_bias": tables.head_bias + 1.0})
    replaced = tmp_path / "cars.pack.safetensors"
    write_pack(replaced, moved, meta)
    original = server.folder / "cars.pack.safetensors"
    shutil.copyfile(original, tmp_path / "cars.orig")
    shutil.copyfile(replaced, original)
    x = tensors(2, seed=5)
    try:
        for name, why in (("corrupt", "not a usable prompt pack"), ("other", "another backbone"),
                          ("wide", "10001"), ("cars", "does not reproduce its golden set")):
            status, body = c.repo(name, "load")
            assert status == 400 and f"model {name}:" in one_line(body) and why in body["error"], (name, body)
        index = c.index()
        assert {n: index[n] for n in ("birds", "cars", "corrupt", "other", "wide")} == {
            "birds": "READY", "cars": "READY", "corrupt": "UNAVAILABLE", "other": "UNAVAILABLE", "wide": "UNAVAILABLE"}
        reasons = c.reasons()
        assert reasons["corrupt"].startswith("load refused:") and "not a usable prompt pack" in reasons["corrupt"]
        assert "another backbone" in reasons["other"] and reasons["cars"] == ""  # cars: still READY
        for name in [n for n in ("cars", "birds", "flat") if index.get(n) == "READY"]:
            assert_logits_close(c.logits(name, x), expected(name, x), f"{name} after the refused loads")
        status, body = c.repo("nothere", "load")
        assert status == 404 and "no pack file nothere.pack.safetensors" in one_line(body)
    finally:
        shutil.copyfile(tmp_path / "cars.orig", original)
        for name in ("corrupt", "other", "wide"):
            (server.folder / f"{name}.pack.safetensors").unlink()


# -- refused before anything listens -------------------------------------------------------------------
def test_serve_packs_refusals_are_one_line(packed, exported_run, tmp_path):
    backbone, packs = packed
    (tmp_path / "ok").mkdir()
    (tmp_path / "bad").mkdir()
    shutil.copyfile(packs["cars"], tmp_path / "bad" / "cars.pack.safetensors")
    (tmp_path / "bad" / "broken.pack.safetensors").write_bytes(b"not a pack")
    cases = [([backbone, exported_run[1], "--packs", tmp_path / "ok"], "exactly one backbone artifact"),
             ([backbone, "--packs", tmp_path / "none"], "is not a folder"),
             ([exported_run[1], "--packs", tmp_path / "ok"], "not a backbone artifact"),
             ([backbone, "--packs", tmp_path / "bad"], "broken.pack.safetensors is not a usable prompt pack")]
    for i, (args, why) in enumerate(cases):
        # --write-settings checks as serving does (a broken check then writes a folder, not serves forever)
        r = CliRunner().invoke(app, ["serve", *map(str, args), "--write-settings", str(tmp_path / f"out{i}")])
        assert r.exit_code != 0 and why in r.output and "Traceback" not in r.output, r.output
        assert len([line for line in r.output.splitlines() if line.startswith("error")]) == 1, r.output


# -- mlserver start on a --write-settings folder ------------------------------------------------------
def test_mlserver_start_on_a_written_folder(packed, tmp_path, expected):
    backbone, packs = packed
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(packs["cars"], src / "cars.pack.safetensors")
    out, ports = tmp_path / "folder", free_ports(3)
    r = CliRunner().invoke(app, [str(a) for a in ("serve", backbone, "--packs", src, "--write-settings", out,
                                                  "--host", "127.0.0.1", "--port", ports[0], "--grpc-port", ports[1],
                                                  "--metrics-port", ports[2], "--threads", 1)])
    assert r.exit_code == 0, r.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "packs/cars.pack.safetensors", "settings.json", "vit.backbone.onnx"]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["model_repository_implementation_args"]["packs"] == "packs"  # relative: the folder moves
    proc, log = start(["mlserver", "start", out], tmp_path)
    with running(proc, ports, log) as srv:
        c, x = Client(srv.url), tensors(2, seed=9)
        assert_logits_close(c.logits("cars", x), expected("cars", x), "cars under mlserver start")
        shutil.copyfile(packs["flat"], out / "packs" / "flat.pack.safetensors")
        status, body = c.repo("flat", "load")
        assert status == 200, body
        assert_logits_close(c.logits("flat", x), expected("flat", x), "flat loaded under mlserver start")
        assert c.index() == {"cars": "READY", "flat": "READY"}


# -- a new user's workflow, end to end (docs/serving.md, "Prompt packs") ------------------------------
def test_new_user_workflow_train_pack_serve_load_query(tmp_path):
    """train two tasks on one backbone, export the backbone artifact and a pack of each, serve one pack,
    drop the other into the folder and load it while the server runs, query both with tritonclient."""
    httpclient = pytest.importorskip("tritonclient.http")
    from test_cli import TINY_ARGS

    from vfpt_deploy.runtime.onnx_runner import OnnxPredictor

    def cli(*args):
        r = CliRunner().invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        return r.output

    for name, prompts in (("digits", 4), ("digits2", 2)):  # same --seed: the same random backbone
        cli("train", "--out", tmp_path / f"{name}.pt", *TINY_ARGS, "--epochs", 1, "--prompts", prompts, "--lr",
            0.05 * prompts, "--batch-size", 128, "--warmup-epochs", 0)
    cli("export", "--ckpt", tmp_path / "digits.pt", "--format", "backbone", "--out", tmp_path / "vit.backbone.onnx")
    (tmp_path / "packs").mkdir()
    for name in ("digits", "digits2"):
        cli("export", "--ckpt", tmp_path / f"{name}.pt", "--format", "pack", "--backbone-artifact",
            tmp_path / "vit.backbone.onnx", "--out", tmp_path / f"{name}.pack.safetensors")
        cli("export", "--ckpt", tmp_path / f"{name}.pt", "--out", tmp_path / f"{name}.onnx")  # to compare with
    shutil.copyfile(tmp_path / "digits.pack.safetensors", tmp_path / "packs" / "digits.pack.safetensors")
    ports = free_ports(3)
    proc, log = start(["serve", tmp_path / "vit.backbone.onnx", "--packs", tmp_path / "packs", "--host", "127.0.0.1",
                       "--port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2], "--threads", 1],
                      tmp_path)
    with running(proc, ports, log) as srv:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{srv.http}")
        x = tensors(4, seed=1)

        def query(model: str) -> np.ndarray:
            inp = httpclient.InferInput("images", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            return client.infer(model, [inp], outputs=[httpclient.InferRequestedOutput("logits")]).as_numpy("logits")

        assert [m["name"] for m in client.get_model_repository_index()] == ["digits"]
        shutil.copyfile(tmp_path / "digits2.pack.safetensors", tmp_path / "packs" / "digits2.pack.safetensors")
        client.load_model("digits2")
        assert client.is_model_ready("digits2")
        for name in ("digits", "digits2"):
            with OnnxPredictor(tmp_path / f"{name}.onnx", ["cpu"]) as single:
                assert_logits_close(query(name), single.infer(x), f"{name}: served pack vs its single-task export")
        client.unload_model("digits2")
        assert not client.is_model_ready("digits2") and client.is_model_ready("digits")


def test_serve_packs_says_how_the_backbone_and_each_pack_were_verified(packed, tmp_path):
    """As serve does for artifacts: the backbone's and each pack's report (data, tolerances), and for a pack
    copied into DIR without its report, NOT verified with the pack's own verify command."""
    from vfpt_deploy.runtime.serve_packs import open_backbone
    from vfpt_deploy.runtime.serve_settings import ServeOptions

    backbone, packs = packed
    d = tmp_path / "packs"
    d.mkdir()
    for name in ("cars", "birds"):
        shutil.copyfile(packs[name], d / f"{name}.pack.safetensors")
    report = packs["cars"].parent / (packs["cars"].name + ".verify.json")
    shutil.copyfile(report, d / report.name)  # cars comes with its report, birds without
    lines: list[str] = []
    bb, _ = open_backbone([str(backbone)], d, ServeOptions(threads=1, self_check=False), lines.append)
    bb.session.close()
    said = "\n".join(lines)
    assert f"backbone {backbone.name}: verified (" in said, said
    assert [ln for ln in lines if ln.startswith("pack cars: verified (cars.pack.safetensors.verify.json)")], said
    assert (f"pack birds: NOT verified: no birds.pack.safetensors.verify.json beside it (run 'vfpt-deploy verify "
            f"{backbone.name} --pack birds.pack.safetensors --ckpt RUN.pt')") in lines, said


def test_a_pack_file_name_with_escape_sequences_is_shown_escaped(tmp_path, caplog):
    """A file in DIR named with an ESC sequence is skipped with a warning that shows the name escaped."""
    import logging

    from vfpt_deploy.runtime.serve_packs import pack_files

    (tmp_path / "e\x1b[31mred.pack.safetensors").write_bytes(b"x")
    (tmp_path / "ok.pack.safetensors").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="mlserver"):
        assert list(pack_files(tmp_path)) == ["ok"]
    said = [r.getMessage() for r in caplog.records if "red.pack" in r.getMessage()]
    assert len(said) == 1 and "\x1b" not in said[0] and "e\\x1b[31mred.pack.safetensors" in said[0], said


def test_packs_on_another_file_of_the_same_backbone_are_replayed_or_refused(packed, tmp_path):
    """A backbone artifact re-exported with other limits (another file sha256, the same backbone identity) serves
    the packs made on the first one; serve replays each one's golden set there even with --no-self-check, says
    where the pack was made, and refuses (one line) a pack whose numbers do not reproduce."""
    from vfpt_deploy.artifacts.pack import BACKBONE_KEY
    from vfpt_deploy.artifacts.schema import read_graph
    from vfpt_deploy.errors import ArtifactError
    from vfpt_deploy.exporters.onnx import add_metadata
    from vfpt_deploy.runtime.serve_packs import open_backbone
    from vfpt_deploy.runtime.serve_settings import ServeOptions

    backbone, packs = packed
    big = tmp_path / "big.backbone.onnx"
    shutil.copyfile(backbone, big)
    g = read_graph(big).metadata[BACKBONE_KEY]
    add_metadata(big, {BACKBONE_KEY: {**g, "limits": {**g["limits"], "classes": 20_000}}})  # as --max-classes does
    d = tmp_path / "packs"
    d.mkdir()
    shutil.copyfile(packs["birds"], d / "birds.pack.safetensors")
    lines: list[str] = []
    bb, _ = open_backbone([str(big)], d, ServeOptions(threads=1, self_check=False), lines.append)
    try:
        assert bb.session.pack("birds@1").replayed_on == bb.session.sha256
        assert [ln for ln in lines if ln.startswith("pack birds: made on backbone artifact sha256")], lines
        pack = read_pack(packs["cars"])
        moved = type(pack.tables)(**{**vars(pack.tables), "head_bias": pack.tables.head_bias + 1.0})
        write_pack(d / "cars.pack.safetensors", moved,
                   {k: v for k, v in pack.metadata.items() if k not in ("format", "version", "fold")})
        with pytest.raises(ArtifactError) as e:
            bb.load("cars", d / "cars.pack.safetensors", False)
        assert "does not reproduce its golden set" in str(e.value) and "\n" not in str(e.value)
        assert bb.session.names == ["birds@1"]
    finally:
        bb.session.close()
