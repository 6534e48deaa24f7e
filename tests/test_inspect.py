"""`vfpt-deploy inspect` (and `info`): what a run.pt, an ONNX file and a TensorRT engine hold, read without
running them; torch-free for ONNX and engines; hostile files are one ArtifactError line."""
import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import onnx
import pytest
from onnx import TensorProto
from typer.testing import CliRunner

from conftest import TINY, TINY_KWARGS, tiny_model
from vfpt_deploy.artifacts.checkpoint import BackboneInfo, save_run
from vfpt_deploy.cli import app
from vfpt_deploy.errors import ArtifactError, InputError, UsageError
from vfpt_deploy.artifacts.files import dumps_json, file_sha256
from vfpt_deploy.inspect_artifact import inspect_artifact, summary_rows
from vfpt_deploy.runtime.preprocess import Preprocess
from vfpt_deploy.verify import verify_artifact

PRE = Preprocess(resize=[32, 32], mean=[0.5] * 3, std=[0.5] * 3)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def strict_json(text: str):
    def refuse(c):
        raise ValueError(f"non-strict JSON constant {c}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def work(exported_run, tmp_path):
    """The session's tiny run.pt and its kv ONNX, copied so a test may verify or tamper with them."""
    run, onnx_path = exported_run
    shutil.copy(run.path, tmp_path / "run.pt")
    shutil.copy(onnx_path, tmp_path / "run.onnx")
    return run, tmp_path


# -- run.pt ------------------------------------------------------------------------------------------------
def test_run_pt(work):
    run, d = work
    info = inspect_artifact(d / "run.pt")
    assert info["kind"] == "run" and info["task"] == "classification"
    assert info["classes"] == ["a", "b", "c", "d"] and info["num_classes"] == 4
    assert info["preprocess"] == run.preprocess.to_dict() and info["image_size"] == [32, 32]
    assert info["vfpt"] == {**run.config.to_dict(), "num_fourier": 3}
    assert info["backbone"]["name"] == TINY and info["backbone"]["kwargs"] == TINY_KWARGS
    assert info["backbone"]["included"] is True and info["backbone"]["hash_check"] == "matches the stored weights"
    tuned = sum(p.numel() for p in run.model.tuned_parameters().values())
    assert info["parameters"] == {"tuned": tuned, "frozen": sum(p.numel() for p in run.model.backbone.parameters()),
                                  "total": sum(p.numel() for p in run.model.parameters())}
    assert info["sha256"] == file_sha256(d / "run.pt") and info["provenance"]["tool_version"]
    strict_json(dumps_json(info))
    rows = dict(summary_rows(info))
    assert rows["prompts"].startswith("M=6 deep, alpha=0.5 (m=3 Fourier)") and "tuned" in rows["parameters"]


def test_prompts_only_run_needs_no_backbone_weights(tmp_path):
    """The backbone file a prompts-only run.pt names is gone: inspect still shows everything it knows."""
    from safetensors.torch import save_file

    model = tiny_model(num_classes=3, num_prompts=4, alpha=0.5)
    weights = tmp_path / "bb.safetensors"
    save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, str(weights))
    save_run(tmp_path / "small.pt", model, BackboneInfo(TINY, dict(TINY_KWARGS), str(weights)), ["x", "y", "z"], PRE,
             include_backbone=False)
    moved = weights.rename(tmp_path / "elsewhere.safetensors")
    info = inspect_artifact(tmp_path / "small.pt")
    assert info["backbone"]["included"] is False and info["backbone"]["source"] == str(weights)
    assert "not checked" in info["backbone"]["hash_check"]
    assert info["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert inspect_artifact(tmp_path / "small.pt", backbone_weights=str(moved))["backbone"]["hash_check"].startswith("matches")
    other = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() + 1 for k, v in model.backbone.state_dict().items()}, str(other))
    with pytest.raises(InputError, match="does not match the recorded"):
        inspect_artifact(tmp_path / "small.pt", backbone_weights=str(other))


def test_run_pt_inspection_imports_no_torch_and_builds_no_model(work):
    """inspect run.pt reads the file torch-free (artifacts/run_reader.py): no torch, no timm, no model; the
    answer is the one the torch path gives."""
    _, d = work
    code = ("import sys; from vfpt_deploy.inspect_artifact import inspect_artifact; "
            f"i = inspect_artifact({str(d / 'run.pt')!r}); assert i['classes'] == list('abcd'); "
            "assert i['backbone']['hash_check'] == 'matches the stored weights'; "
            "bad = [m for m in ('torch', 'timm', 'torchvision', 'onnx', 'onnxruntime') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
    cli = ("import atexit, sys; from vfpt_deploy.cli import run; "
           "atexit.register(lambda: print('MODULES', 'torch' in sys.modules, 'timm' in sys.modules)); "
           f"sys.argv = ['vfpt-deploy', 'inspect', {str(d / 'run.pt')!r}]; run()")
    res = subprocess.run([sys.executable, "-c", cli], capture_output=True, text=True)  # the command, whole
    assert res.returncode == 0 and "MODULES False False" in res.stdout, res.stdout + res.stderr


def test_run_pt_fast_path_agrees_with_the_torch_path_and_leaves_odd_files_to_it(work, monkeypatch):
    from vfpt_deploy.artifacts import checkpoint, run_reader
    import torch

    _, d = work
    assert run_reader.read_run_facts(d / "run.pt") is not None
    fast = inspect_artifact(d / "run.pt")
    monkeypatch.setattr(run_reader, "read_run_facts", lambda p: None)
    assert inspect_artifact(d / "run.pt") == fast  # the torch path gives the same answer, field for field
    assert (run_reader.RUN_FORMAT, run_reader.RUN_VERSION) == (checkpoint.FORMAT, checkpoint.VERSION)
    monkeypatch.undo()
    obj = torch.load(d / "run.pt", weights_only=True)
    obj["tuned"]["head.weight"][0, 0] = float("nan")
    torch.save(obj, d / "nan.pt")
    assert run_reader.read_run_facts(d / "nan.pt") is None  # the torch path says what is wrong
    with pytest.raises(InputError, match="non-finite"):
        inspect_artifact(d / "nan.pt")
    obj["tuned"]["head.weight"][0, 0] = 0.0
    obj["backbone_state"]["cls_token"] = obj["backbone_state"]["cls_token"] + 1  # the file altered
    torch.save(obj, d / "altered.pt")
    assert run_reader.read_run_facts(d / "altered.pt") is not None
    assert "DOES NOT match" in inspect_artifact(d / "altered.pt")["backbone"]["hash_check"]
    torch.save({**obj, "meta": {"x": Counter()}}, d / "pickled.pt")  # an object torch would refuse too
    assert run_reader.read_run_arrays(d / "pickled.pt") is None


# -- ONNX ----------------------------------------------------------------------------------------------------
def test_onnx(work):
    run, d = work
    info = inspect_artifact(d / "run.onnx")
    graph = onnx.load(d / "run.onnx")
    assert info["kind"] == "onnx" and info["classes"] == run.classes and info["preprocess"] == run.preprocess.to_dict()
    assert info["inputs"] == [{"name": "images", "dtype": "float32", "shape": ["batch", 3, 32, 32]}]
    assert info["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", 4]}]
    assert info["opsets"] == {"ai.onnx": 17} and info["producer"]["name"] == "vfpt-deploy"
    assert info["ops"] == dict(Counter(n.op_type for n in graph.graph.node)) and info["nodes"] == len(graph.graph.node)
    assert info["initializers"]["count"] == len(graph.graph.initializer)
    assert info["initializers"]["bytes"] == sum(len(t.raw_data) for t in graph.graph.initializer)
    assert info["precision"] == {"metadata": "fp32", "graph": "fp32"} and info["external_data"] == []
    meta = info["vfpt_metadata"]
    assert meta["fold"] == "kv" and meta["checkpoint_sha256"] == run.sha256 and meta["opset"] == 17
    assert meta["config"] == run.config.to_dict() and meta["backbone"]["name"] == TINY
    assert info["sha256"] == file_sha256(d / "run.onnx") and info["bytes"] == (d / "run.onnx").stat().st_size
    strict_json(dumps_json(info))


def test_fp16_onnx_precision_is_the_graphs(exported_run, tmp_path):
    from vfpt_deploy.exporters.onnx import export_onnx

    run, _ = exported_run
    info = inspect_artifact(export_onnx(run, tmp_path / "h.onnx", precision="fp16").path)
    assert info["precision"] == {"metadata": "fp16", "graph": "fp16"}
    assert info["inputs"][0]["dtype"] == "float32" and info["ops"]["Cast"] > 0  # float32 I/O, half inside


def test_verification_state_follows_the_file(work):
    run, d = work
    onnx_path = d / "run.onnx"
    assert inspect_artifact(onnx_path)["verification"]["state"] == "missing"
    verify_artifact(onnx_path, run, num_random=2)
    v = inspect_artifact(onnx_path)["verification"]
    assert v["state"] == "passed" and v["sha256_matches"] is True and v["report"] == "run.onnx.verify.json"
    model = onnx.load(onnx_path)
    model.doc_string = "changed after verification"
    onnx.save(model, onnx_path)
    assert inspect_artifact(onnx_path)["verification"]["state"] == "stale"
    report = d / "run.onnx.verify.json"
    old = json.loads(report.read_text())
    old.pop("artifact_sha256")
    report.write_text(json.dumps(old))
    assert inspect_artifact(onnx_path)["verification"]["state"] == "unhashed"
    report.write_text("[" * 100000)
    assert inspect_artifact(onnx_path)["verification"]["state"] == "unreadable"


def test_external_data_files_are_listed(work):
    _, d = work
    model = onnx.load(d / "run.onnx")
    total = sum(len(t.raw_data) for t in model.graph.initializer)
    onnx.save_model(model, d / "ext.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    info = inspect_artifact(d / "ext.onnx")
    (f,) = info["external_data"]
    assert f["file"] == "w.bin" and f["present"] and f["bytes"] == total and f["size"] == (d / "w.bin").stat().st_size
    assert info["initializers"]["bytes"] < total  # what stays in the .onnx itself
    (d / "w.bin").unlink()
    assert inspect_artifact(d / "ext.onnx")["external_data"][0]["present"] is False
    assert "MISSING" in dict(summary_rows(inspect_artifact(d / "ext.onnx")))["external data"]


def test_onnx_and_engine_inspection_import_no_torch(work):
    _, d = work
    code = ("import sys, json; from vfpt_deploy.inspect_artifact import inspect_artifact; "
            f"i = inspect_artifact({str(d / 'run.onnx')!r}); assert i['classes'] == list('abcd'); "
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- TensorRT engines (built on CPU with TensorRT-RTX) ---------------------------------------------------------
@pytest.fixture(scope="module")
def engine(exported_run, tmp_path_factory):
    from vfpt_deploy.errors import VFPTError
    from vfpt_deploy.exporters.tensorrt import BuildSettings, build_engine
    from vfpt_deploy.runtime.tensorrt_runner import import_tensorrt

    try:
        import_tensorrt("trt-rtx")
    except VFPTError as e:
        pytest.skip(f"TensorRT-RTX builder unavailable, no engine can be built: {e}")
    d = tmp_path_factory.mktemp("engine")
    shutil.copy(exported_run[1], d / "run.onnx")
    return build_engine(d / "run.onnx", d / "run.engine", BuildSettings(flavor="trt-rtx", opt_batch=2, max_batch=4))


def test_engine_sidecar(engine, tmp_path):
    info = inspect_artifact(engine.engine_path)
    assert info["kind"] == "engine" and info["classes"] == ["a", "b", "c", "d"]
    assert info["tensorrt"] == engine.sidecar["tensorrt"] and info["tensorrt"]["flavor"] == "trt-rtx"
    assert info["profile"]["max"] == [4, 3, 32, 32] and info["profile"]["opt"] == [2, 3, 32, 32]
    assert info["sha256_matches_sidecar"] is True and info["precision"] == "fp32"
    assert info["source_onnx"] == {"file": "run.onnx", "sha256": engine.sidecar["onnx"]["sha256"], "present": True,
                                   "sha256_matches": True}
    strict_json(dumps_json(info))
    # a changed engine file is shown, not hidden (the runtime refuses it when it loads)
    shutil.copy(engine.engine_path, tmp_path / "m.engine")
    shutil.copy(engine.sidecar_path, tmp_path / "m.engine.json")
    with open(tmp_path / "m.engine", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    info = inspect_artifact(tmp_path / "m.engine")
    assert info["sha256_matches_sidecar"] is False and info["source_onnx"]["present"] is False
    assert "DOES NOT match" in dict(summary_rows(info))["engine sha256"]
    (tmp_path / "m.engine.json").unlink()
    with pytest.raises(ArtifactError, match="has no sidecar m.engine.json"):
        inspect_artifact(tmp_path / "m.engine")


def test_engine_inspection_imports_no_torch(engine):
    code = ("import sys; from vfpt_deploy.inspect_artifact import inspect_artifact; "
            f"i = inspect_artifact({str(engine.engine_path)!r}); assert i['sha256_matches_sidecar']; "
            "assert 'torch' not in sys.modules and 'tensorrt_rtx' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- hostile files ----------------------------------------------------------------------------------------
def _with_meta(src, dst, **props):
    model = onnx.load(src)
    for k, v in props.items():
        for p in model.metadata_props:
            if p.key == f"vfpt.{k}":
                p.value = v
    onnx.save(model, dst)
    return dst


def _file(path, data: bytes):
    path.write_bytes(data)
    return path


def _truncated(d):
    data = (d / "run.onnx").read_bytes()
    (d / "cut.onnx").write_bytes(data[: len(data) // 2])
    return d / "cut.onnx"


def _external(d, location):
    model = onnx.load(d / "run.onnx")
    t = model.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    onnx.save(model, d / "escape.onnx")
    return d / "escape.onnx"


HOSTILE = [
    ("text", lambda d: _file(d / "t.onnx", b"not a model at all\n"), "not a readable ONNX model"),
    ("empty", lambda d: _file(d / "e.onnx", b""), "holds no graph"),
    ("truncated", _truncated, "not a readable ONNX model"),
    ("classes-not-a-list", lambda d: _with_meta(d / "run.onnx", d / "c.onnx", classes="5"), "classes must be"),
    ("huge-resize", lambda d: _with_meta(d / "run.onnx", d / "r.onnx", preprocess=json.dumps({"resize": [10**9, 32]})),
     "resize"),
    ("other-image-size", lambda d: _with_meta(d / "run.onnx", d / "s.onnx", preprocess=json.dumps({"resize": [64, 64]})),
     "does not belong to this model|image_size"),
    ("escaping-external-data", lambda d: _external(d, "../../etc/passwd"), "outside the model's folder"),
    ("absolute-external-data", lambda d: _external(d, "/etc/passwd"), "outside the model's folder"),
    ("engine-without-sidecar", lambda d: _file(d / "x.engine", b"\0" * 64), "has no sidecar"),
    ("unknown-suffix", lambda d: _file(d / "x.txt", b"hello"), "not a file vfpt-deploy knows"),
]


@pytest.mark.parametrize(("case", "make", "match"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_files_are_one_artifact_error(work, case, make, match):
    _, d = work
    path = make(d)
    with pytest.raises(ArtifactError, match=match):
        inspect_artifact(path)
    res = invoke("inspect", path)
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and res.output.startswith("error:") and len(res.output.splitlines()) <= 3


def test_crafted_metadata_that_is_only_shown(work):
    """Informative fields may hold anything: deep nesting, control characters, a NaN. Printing them is
    bounded, strict JSON, and no escape sequence reaches the terminal."""
    _, d = work
    deep = "[" * 400 + "]" * 400
    path = _with_meta(d / "run.onnx", d / "odd.onnx", config=deep, backbone='{"name": "\\u001b[2Jwiped", "x": NaN}',
                      classes=json.dumps(["\x1b[31mred", "b", "c", "d"]))
    info = inspect_artifact(path)
    text = dumps_json(info)
    strict_json(text)
    assert "<nested too deeply to show>" in text
    rows = summary_rows(info)
    assert not any("\x1b" in k or "\x1b" in v for k, v in rows)
    res = invoke("inspect", path)
    assert res.exit_code == 0 and "\x1b[2J" not in res.output and "\x1b[31m" not in res.output


def test_a_folder_and_a_missing_file(tmp_path):
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(ArtifactError, match="is a folder"):
        inspect_artifact(tmp_path / "dir.onnx")
    with pytest.raises(ArtifactError, match="does not exist"):
        inspect_artifact(tmp_path / "nope.onnx")
    with pytest.raises(InputError, match="does not exist"):
        inspect_artifact(tmp_path / "nope.pt")
    with pytest.raises(UsageError, match="names no file"):
        inspect_artifact("")
    os.mkfifo(tmp_path / "pipe")  # no suffix: said as a FIFO at once, never opened (opening one blocks)
    with pytest.raises(ArtifactError, match="is a named pipe"):
        inspect_artifact(tmp_path / "pipe")


# -- the command line -------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["inspect", "info"])
def test_cli_on_every_kind(work, command):
    _, d = work
    for name, first_row in (("run.pt", "run.pt (VFPT checkpoint)"), ("run.onnx", "ONNX model")):
        res = invoke(command, d / name)
        assert res.exit_code == 0, res.output
        assert first_row in res.output and "classification, 4 classes" in res.output
        res = invoke(command, d / name, "--json")
        assert res.exit_code == 0, res.output
        info = strict_json(res.output)
        assert info["classes"] == ["a", "b", "c", "d"] and info["sha256"] == file_sha256(d / name)


def test_info_on_an_onnx_is_no_longer_a_truncated_checkpoint(work):
    _, d = work
    res = invoke("info", "--ckpt", d / "run.onnx")
    assert res.exit_code == 0, res.output
    assert "truncated" not in res.output and "input images" in res.output and "float32 [batch, 3, 32, 32]" in res.output


def test_cli_engine(engine):
    res = invoke("inspect", engine.engine_path)
    assert res.exit_code == 0, res.output
    assert "TensorRT engine (trt-rtx)" in res.output and "matches the sidecar" in res.output


# -- multi-task artifacts (issue 11) ------------------------------------------------------------------------
def _retasked(src, dst, tasks: list):
    """A copy of a single-task ONNX whose metadata says it holds `tasks` (its graph has no `task` input)."""
    model = onnx.load(src)
    props = [(p.key, p.value) for p in model.metadata_props if p.key != "vfpt.classes"]
    del model.metadata_props[:]
    for k, v in props + [("vfpt.tasks", json.dumps(tasks))]:
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, dst)
    return dst


def test_multi_task_onnx(tasks_onnx, task_runs):
    info = inspect_artifact(tasks_onnx)
    assert info["kind"] == "onnx" and info["task"] == "classification"
    assert "classes" not in info and "num_classes" not in info  # one class list would be wrong for any task
    assert [(t["index"], t["name"], t["num_classes"], t["fold"], t["num_prompts"], t["deep"]) for t in info["tasks"]] == [
        (0, "cars", 4, "kv", 6, True), (1, "birds", 7, "kv", 3, True), (2, "flat", 2, "tokens", 5, False)]
    assert info["tasks"][1]["classes"] == [f"birds-{c}" for c in range(7)]  # all of them in JSON
    for t in info["tasks"]:
        assert t["checkpoint"] == f"{t['name']}.pt" and t["checkpoint_sha256"] == file_sha256(task_runs[t["name"]])
        assert t["config"]["num_prompts"] == t["num_prompts"] and "num_fourier" in t["config"]
    assert info["inputs"] == [{"name": "images", "dtype": "float32", "shape": ["batch", 3, 32, 32]},
                              {"name": "task", "dtype": "int64", "shape": ["batch"]}]
    assert info["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", 7]}]
    assert info["task_input"]["in_graph"] is True and info["task_input"]["dtype"] == "int64"
    assert info["logits"]["width"] == 7 and info["logits"]["widest_task"] == "birds"
    assert "-inf" in info["logits"]["padding"] and "trims" in info["logits"]["padding"]
    assert "tasks" not in info["vfpt_metadata"] and info["vfpt_metadata"]["fold"] == "mixed"
    assert info["verification"]["state"] == "passed"  # the export pipeline verified every task
    strict_json(dumps_json(info))


def test_multi_task_table_rows(tasks_onnx):
    rows = dict(summary_rows(inspect_artifact(tasks_onnx)))
    assert rows["task"].startswith("classification, 3 tasks")
    birds = rows["task 1: birds"]
    assert birds.startswith("7 classes (birds-0, birds-1, birds-2, birds-3, birds-4, ...)") and "birds-5" not in birds
    assert "fold kv" in birds and "M=3 deep" in birds and "from birds.pt" in birds
    assert "M=5 shallow" in rows["task 2: flat"] and "fold tokens" in rows["task 2: flat"]
    assert "0 = cars, 1 = birds, 2 = flat" in rows["task input"] and "MISSING" not in rows["task input"]
    assert rows["logits"].startswith("7 wide") and "(birds)" in rows["logits"] and "-inf" in rows["logits"]
    assert rows["input task"] == "int64 [batch]" and rows["output logits"] == "float32 [batch, 7]"
    assert "prompts" not in rows and "source checkpoint" not in rows and "classes" not in rows  # per task instead


def test_multi_task_metadata_on_a_graph_without_the_task_input(work):
    """A crafted file: tasks in the metadata, no `task` input in the graph. Shown as such, with hostile task
    fields printed harmlessly."""
    _, d = work
    tasks = [{"name": "one", "classes": ["a", "b", "c", "d"], "checkpoint": "\x1b[2Jx.pt", "fold": "kv"},
             {"name": "two", "classes": ["p"], "config": {"deep": "maybe"}}]
    info = inspect_artifact(_retasked(d / "run.onnx", d / "crafted.onnx", tasks))
    assert info["task_input"]["in_graph"] is False and [t["num_classes"] for t in info["tasks"]] == [4, 1]
    assert info["tasks"][1]["deep"] is None and info["tasks"][1]["num_prompts"] is None
    strict_json(dumps_json(info))
    rows = summary_rows(info)
    assert not any("\x1b" in k or "\x1b" in v for k, v in rows)
    rows = dict(rows)
    assert "MISSING from the graph" in rows["task input"] and "sha256 ?" in rows["task 0: one"]
    assert "M=?" in rows["task 1: two"]
    res = invoke("inspect", d / "crafted.onnx")
    assert res.exit_code == 0 and "\x1b[2J" not in res.output


def test_multi_task_fields_of_the_wrong_type_are_one_short_line(work):
    """num_prompts, fold and checkpoint_sha256 are type-checked; a huge crafted value is cut in the message."""
    _, d = work
    for field, value in (("num_prompts", "[" * 300 + "]" * 300), ("checkpoint_sha256", 5), ("fold", "x" * 5000)):
        path = _retasked(d / "run.onnx", d / "bad.onnx", [{"name": "one", "classes": ["a"], field: value}])
        with pytest.raises(ArtifactError, match=f"task 'one' {field}") as e:
            inspect_artifact(path)
        assert len(str(e.value)) < 400


def test_multi_task_names_are_checked(work):
    _, d = work
    path = _retasked(d / "run.onnx", d / "dup.onnx", [{"name": "a", "classes": ["x"]}, {"name": "a", "classes": ["y"]}])
    with pytest.raises(ArtifactError, match="unique name"):
        inspect_artifact(path)


def test_multi_task_cli(tasks_onnx):
    res = invoke("inspect", tasks_onnx)
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.replace("│", " ").split())
    assert "3 tasks on one backbone" in out and "task 1: birds" in out and "7 wide" in out and "input task" in out
    res = invoke("inspect", tasks_onnx, "--json")
    assert res.exit_code == 0, res.output
    info = strict_json(res.output)
    assert [t["name"] for t in info["tasks"]] == ["cars", "birds", "flat"]
    assert [len(t["classes"]) for t in info["tasks"]] == [4, 7, 2] and info["logits"]["width"] == 7


def test_multi_task_inspection_imports_no_torch(tasks_onnx):
    code = ("import sys; from vfpt_deploy.inspect_artifact import inspect_artifact, summary_rows; "
            f"i = inspect_artifact({str(tasks_onnx)!r}); summary_rows(i); assert len(i['tasks']) == 3; "
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def fake_engine(onnx_path, folder, name: str = "tasks.engine"):
    """An engine file and the sidecar a build of `onnx_path` (profile batch 1..4) would write. inspect never
    deserializes an engine, so it sees exactly what a real build gives, without TensorRT."""
    from vfpt_deploy.artifacts.schema import SIDECAR_FORMAT, SIDECAR_VERSION, read_graph

    engine = folder / name
    engine.write_bytes(b"not a real engine")
    shutil.copy(onnx_path, folder / "tasks.onnx")
    profile = {"input": "images", "min": [1, 3, 32, 32], "opt": [2, 3, 32, 32], "max": [4, 3, 32, 32],
               "task": {"input": "task", "dtype": "int64", "min": [1], "opt": [2], "max": [4]}}
    side = {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION,
            "engine": {"file": name, "sha256": file_sha256(engine), "bytes": engine.stat().st_size},
            "tensorrt": {"flavor": "trt-rtx", "module": "tensorrt_rtx", "version": "1.7.1"}, "gpu": None,
            "precision": "fp32", "profile": profile, "build": {"precision_mode": "strongly-typed"},
            "onnx": {"file": "tasks.onnx", "sha256": file_sha256(onnx_path)}, "tool_version": "0.1.0",
            "created": "2026-01-01T00:00:00Z", "metadata": read_graph(onnx_path).metadata}
    (folder / f"{name}.json").write_text(json.dumps(side))
    return engine


def test_multi_task_engine(tasks_onnx, tmp_path):
    engine = fake_engine(tasks_onnx, tmp_path)
    info = inspect_artifact(engine)
    assert info["kind"] == "engine" and "classes" not in info and info["source_onnx"]["sha256_matches"] is True
    assert [(t["name"], t["num_classes"], t["num_prompts"]) for t in info["tasks"]] == [
        ("cars", 4, 6), ("birds", 7, 3), ("flat", 2, 5)]
    assert info["logits"]["width"] == 7 and "in_graph" not in info["task_input"]  # an engine is not deserialized
    strict_json(dumps_json(info))
    rows = dict(summary_rows(info))
    assert "task 2: flat" in rows and "0 = cars" in rows["task input"] and rows["logits"].startswith("7 wide")
    assert "task: min [1], opt [2], max [4]" in rows["profile"]
    code = ("import sys; from vfpt_deploy.inspect_artifact import inspect_artifact, summary_rows; "
            f"summary_rows(inspect_artifact({str(engine)!r})); "
            "assert 'torch' not in sys.modules and 'tensorrt_rtx' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    res = invoke("inspect", engine, "--json")
    assert res.exit_code == 0 and [t["name"] for t in strict_json(res.output)["tasks"]] == ["cars", "birds", "flat"]


# -- metadata that contradicts the graph (issue 24) ------------------------------------------------------------
def _edited(src, dst, edit):
    """A copy of an ONNX file whose metadata_props went through edit(list of [key, value]) -> list."""
    model = onnx.load(src)
    props = edit([[p.key, p.value] for p in model.metadata_props])
    del model.metadata_props[:]
    for k, v in props:
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, dst)
    return dst


def _set(key, value):
    return lambda props: [[k, json.dumps(value) if k == key else v] for k, v in props]


def _tasks(edit):
    return lambda props: [[k, json.dumps(edit(json.loads(v))) if k == "vfpt.tasks" else v] for k, v in props]


CONTRADICTIONS = {  # name: (the file it edits, edit, words of the problem)
    "a million classes on 4 logits": ("run", _set("vfpt.classes", [f"c{i}" for i in range(1_000_000)]),
                                      "the model outputs 4 logits but the metadata names 1000000 classes"),
    "a task more than the graph": ("tasks", _tasks(lambda t: t + [{"name": "extra", "classes": ["x", "y"]}]),
                                   "the metadata lists 4 tasks but the graph's task tables hold 3"),
    "a task fewer than the graph": ("tasks", _tasks(lambda t: t[:2]),
                                    "the metadata lists 2 tasks but the graph's task tables hold 3"),
    "a duplicate key": ("run", lambda props: props + [["vfpt.classes", json.dumps(["w", "x", "y", "z"])]],
                        "metadata key 'vfpt.classes' is given 2 times"),
}


@pytest.mark.parametrize("case", list(CONTRADICTIONS))
def test_metadata_that_contradicts_the_graph_is_a_problem_and_refused_at_load(case, exported_run, tasks_onnx, tmp_path):
    """inspect shows each contradiction as a problem (JSON and table) and still shows the rest; predict (and
    serve and verify, which open the artifact the same way) refuses the file in one line."""
    from vfpt_deploy.runtime.onnx_runner import OnnxPredictor

    which, edit, words = CONTRADICTIONS[case]
    path = _edited(exported_run[1] if which == "run" else tasks_onnx, tmp_path / "crafted.onnx", edit)
    info = inspect_artifact(path)
    assert len(info["problems"]) == 1 and words in info["problems"][0], info["problems"]
    rows = dict(summary_rows(info))
    assert words in rows["PROBLEM 1"] and "refuse" in rows["PROBLEM 1"]
    with pytest.raises(ArtifactError, match=words.replace("(", r"\(")) as e:
        OnnxPredictor(path, ["cpu"])
    assert "\n" not in str(e.value) and len(str(e.value)) < 400
    res = invoke("inspect", path)
    assert res.exit_code == 0 and "PROBLEM 1" in res.output
    (tmp_path / "img").mkdir()
    from PIL import Image
    Image.new("RGB", (32, 32)).save(tmp_path / "img" / "a.png")
    res = invoke("predict", path, tmp_path / "img", "--providers", "cpu")
    assert res.exit_code == 1 and words in " ".join(res.output.split()) and "Traceback" not in res.output, res.output


def test_a_consistent_artifact_has_no_problems(exported_run, tasks_onnx):
    assert inspect_artifact(exported_run[1])["problems"] == [] and inspect_artifact(tasks_onnx)["problems"] == []
