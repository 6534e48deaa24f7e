"""TensorRT for multi-task artifacts (inputs `images` and int64 `task`).

TensorRT-RTX's parser and builder run without a GPU, so the multi-task graph (Gather on int64 task indices,
GatherElements, Where with -inf, ...) is really parsed and built here, with one profile covering both inputs.
Engines cannot run without a GPU: the runner's binding of the `task` input is tested on the CUDA / TensorRT
fakes of test_tensorrt.py, and end to end only in the gpu-marked test.
"""
import ctypes
import json
import shutil
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from PIL import Image
from typer.testing import CliRunner

from test_tensorrt import RTX, FakeCudart, _edit_sidecar, _gpu_flavor_or_skip, gpu_visible, rtx  # noqa: F401 (rtx: a fixture)
from vfpt_deploy.cli import app
from vfpt_deploy.errors import ArtifactError, UsageError
from vfpt_deploy.exporters.tensorrt import BuildSettings, build_engine
from vfpt_deploy.artifacts.files import file_sha256
from vfpt_deploy.runtime import tensorrt_runner as runner
from vfpt_deploy.runtime.tensorrt_runner import CudaDevice, TensorRTPredictor, read_sidecar, sidecar_path

TASKS = {"cars": 4, "birds": 7, "flat": 2}  # conftest.TASK_SPECS: name -> classes, in task-index order


@pytest.fixture(scope="module")
def tasks_fp16(task_runs, tmp_path_factory):
    """The same three tasks as a typed fp16 graph (not verified: only parsed and built here)."""
    from vfpt_deploy.exporters.onnx import export_tasks
    from vfpt_deploy.folding.multitask import load_tasks

    out = tmp_path_factory.mktemp("fp16") / "tasks.fp16.onnx"
    return export_tasks(load_tasks(list(task_runs.items())), out, precision="fp16").path


def _task_profile(lo, opt, hi):
    return {"input": "task", "dtype": "int64", "min": [lo], "opt": [opt], "max": [hi]}


# ---------------------------------------------------------------- building (TensorRT-RTX, no GPU)

@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_rtx_builds_the_multitask_graph(rtx, tasks_onnx, tasks_fp16, tmp_path, precision):
    onnx_path = tasks_onnx if precision == "fp32" else tasks_fp16
    graph = onnx.load(onnx_path, load_external_data=False).graph
    assert {"Gather", "GatherElements", "Where"} <= {n.op_type for n in graph.node}  # what the parser must take
    assert [(i.name, i.type.tensor_type.elem_type) for i in graph.input] == [("images", onnx.TensorProto.FLOAT),
                                                                             ("task", onnx.TensorProto.INT64)]
    res = build_engine(onnx_path, tmp_path / "tasks.engine", RTX(precision=precision, min_batch=1, opt_batch=4,
                                                                  max_batch=16))
    blob = res.engine_path.read_bytes()
    validity, diagnostics = rtx.Runtime(rtx.Logger(rtx.Logger.ERROR)).get_engine_validity(blob)
    assert not int(diagnostics) & int(rtx.EngineInvalidityDiagnostics.MALFORMED_ENGINE)

    side = read_sidecar(res.engine_path)  # what the runtime reads, from disk
    assert side == res.sidecar and side["version"] == 2  # a task input: older readers refuse it, as they must
    assert side["profile"] == {"input": "images", "min": [1, 3, 32, 32], "opt": [4, 3, 32, 32],
                               "max": [16, 3, 32, 32], "task": _task_profile(1, 4, 16)}
    assert [(t["name"], len(t["classes"])) for t in side["metadata"]["tasks"]] == list(TASKS.items())
    assert "classes" not in side["metadata"] and side["metadata"]["precision"] == precision
    assert side["onnx"] == {"file": onnx_path.name, "sha256": file_sha256(onnx_path)}


def test_fixed_batch_covers_the_task_input_too(rtx, tasks_onnx, tmp_path):
    side = build_engine(tasks_onnx, tmp_path / "t.plan", RTX(batch=3)).sidecar
    assert side["profile"]["max"] == [3, 3, 32, 32] and side["profile"]["task"] == _task_profile(3, 3, 3)


def test_single_task_engines_keep_sidecar_version_1(rtx, exported_run, tmp_path):
    """Nothing new in a single-task sidecar: it stays version 1 (older vfpt-deploy still reads it)."""
    side = build_engine(exported_run[1], tmp_path / "one.engine", RTX(max_batch=2)).sidecar
    assert side["version"] == 1 and "task" not in side["profile"] and side["metadata"]["classes"] == list("abcd")
    assert read_sidecar(tmp_path / "one.engine") == side


def test_graph_without_the_task_input_its_metadata_names(rtx, exported_run, tmp_path):
    """Metadata listing tasks on a one-input graph is refused before building (the runtime would bind `task`)."""
    meta = {"tasks": [{"name": "a", "classes": ["x"]}]}
    with pytest.raises(ArtifactError, match=r"has inputs \['images'\].*its metadata says \['images', 'task'\]"):
        build_engine(exported_run[1], tmp_path / "m.engine", RTX(), metadata=meta)
    assert not list(tmp_path.iterdir())


def test_cli_exports_a_multitask_engine(rtx, task_runs, tmp_path):
    """export --ckpt ... --format trt-rtx: builds through the pipeline, then (no RTX GPU here) verifies every task
    on the ONNX the engine was built from, and puts engine, sidecar, ONNX and report in place."""
    ckpts = [a for name, p in task_runs.items() for a in (("--task", f"{name}={p}") if name == "flat" else ("--ckpt", p))]
    out = tmp_path / "tasks.engine"
    r = CliRunner().invoke(app, ["export", *map(str, ckpts), "--format", "trt-rtx", "--out", str(out),
                                 "--max-batch", "4", "--num-random", "2"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tasks.engine", "tasks.engine.json", "tasks.onnx",
                                                         "tasks.onnx.verify.json"]
    side = read_sidecar(out)
    assert side["profile"]["task"] == _task_profile(1, 4, 4)
    assert side["onnx"]["sha256"] == file_sha256(tmp_path / "tasks.onnx")
    report = json.loads((tmp_path / "tasks.onnx.verify.json").read_text())
    assert report["passed"] and report["tasks"] == list(TASKS)
    assert {c["inputs"].split(":")[0] for c in report["comparisons"]} == {f"task {t}" for t in TASKS} | {"golden"}
    golden = side["metadata"]["golden"]  # the sidecar carries the ONNX's golden set: rows of every task
    assert sorted({s["task"] for s in golden["sets"]}) == [0, 1, 2] and golden["sha256"] == report["golden_sha256"]
    if not gpu_visible():
        assert "verified the ONNX it was built from" in " ".join(r.output.split())


# ---------------------------------------------------------------- the sidecar

@pytest.fixture(scope="module")
def built(rtx, tasks_onnx, tmp_path_factory):
    """A real multi-task engine + sidecar (profile batches 2..4, as FakeTaskEngine says)."""
    return build_engine(tasks_onnx, tmp_path_factory.mktemp("engine") / "tasks.engine",
                        RTX(min_batch=2, max_batch=4)).engine_path


@pytest.fixture
def engine(built, tmp_path):
    shutil.copy(built, tmp_path / "tasks.engine")
    shutil.copy(sidecar_path(built), tmp_path / "tasks.engine.json")
    return tmp_path / "tasks.engine"


def _single_task(side):
    """The metadata of a single-task artifact with 7 classes (as wide as the multi-task logits)."""
    side["metadata"].pop("tasks")
    side["metadata"]["classes"] = [f"c{i}" for i in range(7)]


TAMPERED = {
    "no task profile": (lambda s: s["profile"].pop("task"), "lists tasks but the profile has no task input"),
    "task profile, no tasks": (_single_task, "lists no tasks but the profile has one"),
    "task dtype float": (lambda s: s["profile"]["task"].update(dtype="float32"), "profile.task must be"),
    "task other name": (lambda s: s["profile"]["task"].update(input="ids"), "profile.task must be"),
    "task batches differ": (lambda s: s["profile"]["task"].update(max=[8]), "profile.task must be"),
    "task profile a list": (lambda s: s["profile"].update(task=[1, 4, 4]), "profile.task must be"),
    "newer sidecar": (lambda s: s.update(version=3), "sidecar version 3; this vfpt-deploy reads up to 2"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_task_sidecar_is_one_artifact_error(engine, case):
    edit, match = TAMPERED[case]
    _edit_sidecar(engine, edit)
    for load in (read_sidecar, TensorRTPredictor):
        with pytest.raises(ArtifactError, match=match) as e:
            load(engine)
        assert "\n" not in str(e.value) and "tasks.engine.json" in str(e.value)


def test_version_1_single_task_sidecar_still_loads(engine):
    """A sidecar as vfpt-deploy wrote it before multi-task artifacts (version 1, no profile.task)."""
    def old(s):
        s.update(version=1)
        s["profile"].pop("task")
        _single_task(s)

    _edit_sidecar(engine, old)
    assert read_sidecar(engine)["metadata"]["classes"][0] == "c0"


# ---------------------------------------------------------------- binding the task input, on fakes

class FakeTaskContext:
    """execute_async_v3: logits[i, j] = images[i, j] + 100 * task[i] for j below the task's classes, -inf past them."""

    def __init__(self, task_dtype):
        self.addresses, self.shapes, self.runs, self.task_dtype, self.seen = {}, {}, 0, task_dtype, []

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def _array(self, name, ctype, shape):
        return np.ctypeslib.as_array(ctypes.cast(self.addresses[name], ctypes.POINTER(ctype)), shape)

    def execute_async_v3(self, stream):
        b = self.shapes["images"][0]
        assert self.shapes["task"] == (b,)  # both inputs set to the same batch before every run
        x = self._array("images", ctypes.c_float, (b, 3 * 32 * 32))
        ids = self._array("task", np.ctypeslib.as_ctypes_type(self.task_dtype), (b,)).copy()
        self.seen.append(ids)
        out = self._array("logits", ctypes.c_float, (b, 7))
        width = np.array(list(TASKS.values()))[ids]
        out[:] = np.where(np.arange(7) < width[:, None], x[:, :7] + 100 * ids[:, None], -np.inf)
        self.runs += 1
        return True


class FakeTaskEngine:
    """Tensors images, task, logits as TensorRT-RTX builds them (task int64), profile batches 2..4."""

    num_io_tensors, device_memory_size_v2 = 3, 12345
    names = ["images", "task", "logits"]
    task_dtype = np.int64
    task_profile = ((2,), (4,), (4,))

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_profile_shape(self, name, profile):
        if name == "task":
            return self.task_profile
        return (2, 3, 32, 32), (4, 3, 32, 32), (4, 3, 32, 32)

    def get_tensor_dtype(self, name):
        return self.task_dtype if name == "task" else np.float32

    def get_tensor_shape(self, name):
        return (-1, 7) if name == "logits" else (-1,) if name == "task" else (-1, 3, 32, 32)

    def create_execution_context(self):
        return FakeTaskContext(self.task_dtype)


@pytest.fixture
def fake_gpu(engine, rtx, monkeypatch):
    """The real sidecar checks on a real multi-task engine file, then fake TensorRT and CUDA."""
    fake_engine = FakeTaskEngine()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            return fake_engine

    class Logger:
        ERROR = 0

        def __init__(self, level):
            pass

    cudart = FakeCudart()
    fake_trt = SimpleNamespace(__version__=rtx.__version__, nptype=lambda d: d, Logger=Logger, Runtime=Runtime)
    monkeypatch.setattr(runner, "import_tensorrt", lambda flavor: fake_trt)
    monkeypatch.setattr(runner, "import_cudart", lambda: cudart)
    monkeypatch.setattr(runner, "cuda_device", lambda index=0: CudaDevice(0, "NVIDIA GeForce RTX 4090", "8.9"))
    return engine, cudart, fake_engine


def _expected(x, ids):
    width = np.array(list(TASKS.values()))[ids]
    want = np.where(np.arange(7) < width[:, None], x.reshape(len(x), -1)[:, :7] + 100 * ids[:, None], -np.inf)
    return want.astype(np.float32)  # rounded as the fake engine's float32 output is


def test_infer_binds_the_task_indices(fake_gpu):
    engine, cudart, _ = fake_gpu
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32), dtype=np.float32)
    ids = np.array([2, 1, 1, 0, 2], np.int64)
    with TensorRTPredictor(engine) as p:
        assert p.tasks == list(TASKS) and p.task_dtype == np.int64
        assert p.io_bytes == 4 * 3 * 32 * 32 * 4 + 4 * 7 * 4 + 4 * 8  # images + logits + int64 task, batch 4
        np.testing.assert_array_equal(p.infer(x, ids), _expected(x, ids))  # chunks of 4, then 1 padded to 2
        # the padding row gets task 0, not what the buffer held (pinned memory starts uninitialized)
        assert [s.tolist() for s in p.context.seen] == [[2, 1, 1, 0], [2, 0]]
        assert p.load(x[:3], ids[:3]) == 3 and p.context.shapes == {"images": (3, 3, 32, 32), "task": (3,)}
        with pytest.raises(UsageError, match=r"one integer task index in \[0, 3\) per image"):
            p.infer(x)  # a multi-task engine needs the indices ...
        with pytest.raises(UsageError, match=r"one integer task index in \[0, 3\) per image"):
            p.infer(x, np.array([0, 1, 2, 3, 0]))  # ... in range (a Gather would wrap or fail)
        with pytest.raises(UsageError, match="one integer task index"):
            p.load(x[:2], ids[:3])
    assert not cudart.mem and not cudart.streams


def test_predict_trims_each_image_to_its_task(fake_gpu):
    engine, _, _ = fake_gpu
    img = Image.fromarray(np.full((32, 32, 3), 200, np.uint8))
    with TensorRTPredictor(engine) as p:
        preds = p.predict([img, img, img], top_k=10, task=["flat", "birds", "cars"])
    assert [(pr.task, len(pr.top)) for pr in preds] == [("flat", 2), ("birds", 7), ("cars", 4)]
    assert {c for c, _ in preds[0].top} == {"flat-0", "flat-1"} and preds[1].top[0][0] == "birds-0"


def test_task_input_bound_as_the_engine_types_it(fake_gpu):
    """An engine whose `task` input TensorRT typed int32 (TensorRT before 10 cast int64 down): the indices follow."""
    engine, _, fake_engine = fake_gpu
    fake_engine.task_dtype = np.int32
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32), dtype=np.float32)
    ids = np.array([1, 2, 0])
    with TensorRTPredictor(engine) as p:
        assert p.task_dtype == np.int32
        np.testing.assert_array_equal(p.infer(x, ids), _expected(x, ids))


@pytest.mark.parametrize("change,match", [
    (dict(names=["images", "logits"], num_io_tensors=2), r"engine tensors are \['images', 'logits'\], its sidecar says"),
    (dict(task_dtype=np.float32), "input 'task' is float32"),
    (dict(task_profile=((1,), (4,), (4,))), r"not int \[batch\] over the images' batches"),
])
def test_engine_task_input_must_match(fake_gpu, change, match):
    engine, cudart, fake_engine = fake_gpu
    for k, v in change.items():
        setattr(fake_engine, k, v)
    with pytest.raises(ArtifactError, match=match) as e:
        TensorRTPredictor(engine)
    assert "\n" not in str(e.value)
    assert not cudart.mem and not cudart.streams


# ---------------------------------------------------------------- Triton

@pytest.mark.parametrize("which", ["onnx", "engine"])
def test_triton_refuses_multitask_artifacts(built, tasks_onnx, tmp_path, which):
    pytest.importorskip("tritonclient", reason="tritonclient ships Triton's config schema")
    artifact = tasks_onnx if which == "onnx" else built
    r = CliRunner().invoke(app, ["triton", str(artifact), "--out", str(tmp_path / "repo"), "--no-verify-check"])
    assert r.exit_code == 2, r.output
    msg = " ".join(r.output.split())
    assert "is a multi-task artifact" in msg and "one labels file" in msg and "vfpt-deploy serve" in msg
    assert "Traceback" not in r.output and not (tmp_path / "repo").exists()


# ---------------------------------------------------------------- on a GPU (skipped elsewhere, with the reason)

@pytest.mark.gpu
@pytest.mark.parametrize("flavor", ["trt", "trt-rtx"])
def test_gpu_multitask_engine(flavor, task_runs, tasks_onnx, tmp_path):
    """A mixed-task batch through the engine equals the ONNX's logits; verify checks every task on the engine."""
    _gpu_flavor_or_skip(flavor)
    from vfpt_deploy.folding.multitask import load_tasks
    from vfpt_deploy.runtime.onnx_runner import OnnxPredictor
    from vfpt_deploy.verify import verify_artifact

    res = build_engine(tasks_onnx, tmp_path / "tasks.engine", BuildSettings(flavor=flavor, max_batch=4))
    x = np.random.default_rng(0).standard_normal((9, 3, 32, 32), dtype=np.float32)
    ids = np.array([0, 1, 2, 2, 1, 0, 1, 2, 0])
    with TensorRTPredictor(res.engine_path) as p, OnnxPredictor(tasks_onnx) as ref:
        out, want = p.infer(x, ids), ref.infer(x, ids)
    np.testing.assert_array_equal(np.isneginf(out), np.isneginf(want))
    np.testing.assert_allclose(np.where(np.isneginf(want), 0, out), np.where(np.isneginf(want), 0, want), atol=1e-3)
    report = verify_artifact(res.engine_path, load_tasks(list(task_runs.items())), num_random=4)
    assert report.passed and report.tasks == list(TASKS), report.to_json()
