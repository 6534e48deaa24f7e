"""Triton model repositories. Triton itself cannot run here, so every config.pbtxt written is parsed with
Triton's own schema (tritonclient's model_config_pb2, protobuf text_format, strict) and checked against the
artifact it serves: names, dtypes, dims without the batch, max_batch_size, labels, the model file's bytes."""
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from vfpt_deploy.cli import app
from vfpt_deploy.errors import ArtifactError, OutputError, UsageError, VerificationError
from vfpt_deploy.exporters import triton as triton_module
from vfpt_deploy.exporters.triton import DEFAULT_MAX_BATCH, model_config_pb2, write_triton_repository
from vfpt_deploy.artifacts.files import file_sha256
from vfpt_deploy.artifacts.schema import encode_metadata
from vfpt_deploy.verify import verify_artifact

pytest.importorskip("tritonclient", reason="tritonclient ships Triton's config schema")
pb = model_config_pb2()  # from its file alone: tritonclient.grpc's service protos clash with MLServer's
from google.protobuf import text_format  # noqa: E402

CLASSES = ["a", "b", "c", "d"]
TRITON_TYPES = {TensorProto.FLOAT: pb.TYPE_FP32, TensorProto.FLOAT16: pb.TYPE_FP16}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def parse_config(folder):
    """config.pbtxt through Triton's schema: an unknown field, a bad enum or a type error fails the parse."""
    return text_format.Parse((folder / "config.pbtxt").read_text(), pb.ModelConfig())


def labels(folder):
    text = (folder / "labels.txt").read_text(encoding="utf-8")
    assert text.endswith("\n")
    return text[:-1].split("\n")


def check_against_onnx(folder, onnx_path, max_batch):
    """The config says what the ONNX graph says: one input, one output, their names and element types, dims
    without the batch dim, max_batch_size, and the labels file names its classes in logit order."""
    cfg = parse_config(folder)
    g = onnx.load(onnx_path, load_external_data=False).graph
    assert cfg.name == folder.name and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == max_batch
    for got, want in ((cfg.input, g.input), (cfg.output, g.output)):
        assert len(got) == len(want) == 1
        dims = [d.dim_value or -1 for d in want[0].type.tensor_type.shape.dim]
        assert got[0].name == want[0].name
        assert got[0].data_type == TRITON_TYPES[want[0].type.tensor_type.elem_type]
        assert list(got[0].dims) == (dims[1:] if max_batch else dims)  # Triton leaves out the batch dim
    assert cfg.output[0].label_filename == "labels.txt"
    meta = {p.key: json.loads(p.value) for p in onnx.load(onnx_path, load_external_data=False).metadata_props}
    assert labels(folder) == meta["vfpt.classes"] and len(labels(folder)) == cfg.output[0].dims[-1]
    assert (folder / "1" / "model.onnx").read_bytes() == onnx_path.read_bytes()
    return cfg


@pytest.fixture(scope="module")
def verified(exported_run, tmp_path_factory):
    """The session's tiny run exported fp32 and fp16, each verified (a report with its sha256 beside it)."""
    from vfpt_deploy.exporters.onnx import export_onnx

    run, onnx_path = exported_run
    d = tmp_path_factory.mktemp("triton")
    shutil.copy(onnx_path, d / "run.onnx")
    export_onnx(run, d / "run.fp16.onnx", precision="fp16")
    for name in ("run.onnx", "run.fp16.onnx"):
        assert verify_artifact(d / name, run, num_random=2).passed
    return d


@pytest.fixture
def work(verified, tmp_path):
    for f in verified.iterdir():
        shutil.copy(f, tmp_path / f.name)
    return tmp_path


# -- ONNX ---------------------------------------------------------------------------------------------
def test_fp32_onnx(work):
    res = write_triton_repository(work / "run.onnx", work / "repo")
    folder = work / "repo" / "run"
    assert res.folder == folder and res.platform == "onnxruntime_onnx" and res.max_batch_size == DEFAULT_MAX_BATCH
    cfg = check_against_onnx(folder, work / "run.onnx", DEFAULT_MAX_BATCH)
    assert list(cfg.input[0].dims) == [3, 32, 32] and list(cfg.output[0].dims) == [4]
    assert cfg.input[0].data_type == pb.TYPE_FP32 and labels(folder) == CLASSES
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(1, pb.ModelInstanceGroup.KIND_GPU)]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 100 and not cfg.dynamic_batching.preferred_batch_size
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == \
        ["1/model.onnx", "config.pbtxt", "labels.txt"]
    assert "passed for this file" in res.notes[0]
    assert parse_config(folder) == text_format.Parse(res.config_text, pb.ModelConfig())


def test_fp16_onnx_with_options(work):
    res = write_triton_repository(work / "run.fp16.onnx", work / "repo", name="vfpt_fp16", max_batch_size=32,
                                  instances=3, kind="cpu", preferred_batch_sizes=(16, 4, 16), max_queue_delay_us=2500)
    cfg = check_against_onnx(res.folder, work / "run.fp16.onnx", 32)
    assert cfg.name == "vfpt_fp16" and res.folder == work / "repo" / "vfpt_fp16"
    assert cfg.input[0].data_type == pb.TYPE_FP32  # the exporter's fp16 graph keeps float32 I/O: the graph says so
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(3, pb.ModelInstanceGroup.KIND_CPU)]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 16]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 2500


def _half_io_onnx(path, batch="N"):
    """A tiny graph with float16 input and output (images -> per-channel mean -> x W), with vfpt metadata."""
    w = numpy_helper.from_array(np.arange(12, dtype=np.float16).reshape(3, 4), "w")
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["images"], ["m"], axes=[2, 3], keepdims=0),
         helper.make_node("MatMul", ["m", "w"], ["logits"])], "half",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT16, [batch, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, [batch, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for k, v in encode_metadata({"classes": CLASSES, "preprocess": {"resize": [32, 32]}, "precision": "fp16"}).items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_half_io_graph_gives_fp16_types(tmp_path):
    path = _half_io_onnx(tmp_path / "half.onnx")
    res = write_triton_repository(path, tmp_path / "repo", require_verified=False)
    cfg = check_against_onnx(res.folder, path, DEFAULT_MAX_BATCH)
    assert cfg.input[0].data_type == cfg.output[0].data_type == pb.TYPE_FP16
    assert "NOT checked" in res.notes[0]


def test_fixed_batch_onnx_is_served_unbatched(tmp_path):
    path = _half_io_onnx(tmp_path / "fixed.onnx", batch=2)
    res = write_triton_repository(path, tmp_path / "repo", require_verified=False)
    cfg = check_against_onnx(res.folder, path, 0)
    assert list(cfg.input[0].dims) == [2, 3, 32, 32] and not cfg.HasField("dynamic_batching")
    with pytest.raises(UsageError, match="fixed batch of 2"):
        write_triton_repository(path, tmp_path / "repo", require_verified=False, max_batch_size=4)


def test_external_data_is_copied_beside_the_model(work):
    model = onnx.load(work / "run.onnx")
    (work / "weights").mkdir()
    onnx.save_model(model, work / "ext.onnx", save_as_external_data=True, location="weights/w.bin", size_threshold=0)
    res = write_triton_repository(work / "ext.onnx", work / "repo", require_verified=False)
    assert (res.folder / "1" / "weights" / "w.bin").read_bytes() == (work / "weights" / "w.bin").read_bytes()
    check_against_onnx(res.folder, work / "ext.onnx", DEFAULT_MAX_BATCH)


# -- TensorRT engines -------------------------------------------------------------------------------------
# Full TensorRT cannot be installed here (NVIDIA's index is unreachable); TensorRT-RTX builds real engines on
# CPU. Triton's tensorrt_plan backend loads full-TensorRT engines only, so a TensorRT-RTX engine is refused,
# and the engine path is tested with TensorRT-RTX builds whose sidecar is relabelled as TensorRT's: the
# writer reads only the sidecar (never the engine bytes), exactly as it does for a TensorRT engine. Their
# verification report is what `verify` writes on the engine's GPU, reduced to the fields the gate reads.
def _as_tensorrt(engine_path):
    side_path = engine_path.with_name(engine_path.name + ".json")
    side = json.loads(side_path.read_text())
    side["tensorrt"] = {"flavor": "trt", "module": "tensorrt", "version": "10.13.3"}
    side["gpu"] = {"name": "NVIDIA L4", "compute_capability": "8.9"}
    side_path.write_text(json.dumps(side))
    report = engine_path.with_name(engine_path.name + ".verify.json")
    report.write_text(json.dumps({"artifact": str(engine_path), "passed": True,
                                  "artifact_sha256": file_sha256(engine_path)}))


@pytest.fixture(scope="module")
def engines(verified, tmp_path_factory):
    from vfpt_deploy.errors import VFPTError
    from vfpt_deploy.exporters.tensorrt import BuildSettings, build_engine
    from vfpt_deploy.runtime.tensorrt_runner import import_tensorrt

    try:
        import_tensorrt("trt-rtx")
    except VFPTError as e:
        pytest.skip(f"TensorRT-RTX builder unavailable, no engine can be built: {e}")
    d = tmp_path_factory.mktemp("engines")
    for f in ("run.onnx", "run.onnx.verify.json"):
        shutil.copy(verified / f, d / f)
    build_engine(d / "run.onnx", d / "rtx.engine", BuildSettings(flavor="trt-rtx", max_batch=4))
    for name, settings in (("run.engine", dict(min_batch=1, opt_batch=4, max_batch=16)), ("fixed.plan", dict(batch=3)),
                           ("from2.engine", dict(min_batch=2, max_batch=8))):
        build_engine(d / "run.onnx", d / name, BuildSettings(flavor="trt-rtx", **settings))
        _as_tensorrt(d / name)
    return d


@pytest.fixture
def eng(engines, tmp_path):
    for f in engines.iterdir():
        shutil.copy(f, tmp_path / f.name)
    return tmp_path


def test_engine(eng):
    res = write_triton_repository(eng / "run.engine", eng / "repo")
    cfg = parse_config(res.folder)
    side = json.loads((eng / "run.engine.json").read_text())
    assert cfg.platform == "tensorrt_plan" and cfg.name == "run"
    assert cfg.max_batch_size == side["profile"]["max"][0] == 16
    assert [(t.name, t.data_type, list(t.dims)) for t in cfg.input] == [("images", pb.TYPE_FP32, side["profile"]["max"][1:])]
    assert [(t.name, t.data_type, list(t.dims)) for t in cfg.output] == [("logits", pb.TYPE_FP32, [len(CLASSES)])]
    assert cfg.output[0].label_filename == "labels.txt" and labels(res.folder) == side["metadata"]["classes"] == CLASSES
    assert list(cfg.dynamic_batching.preferred_batch_size) == [side["profile"]["opt"][0]]  # tuned for opt
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(1, pb.ModelInstanceGroup.KIND_GPU)]
    assert (res.folder / "1" / "model.plan").read_bytes() == (eng / "run.engine").read_bytes()
    assert file_sha256(res.folder / "1" / "model.plan") == side["engine"]["sha256"]
    assert "passed for this file" in res.notes[0] and "TensorRT 10.13.3" in res.notes[1] and "NVIDIA L4" in res.notes[1]
    with pytest.raises(UsageError, match="over the engine's profile max 16"):
        write_triton_repository(eng / "run.engine", eng / "repo", max_batch_size=17)
    with pytest.raises(UsageError, match="runs on a GPU only"):
        write_triton_repository(eng / "run.engine", eng / "repo", kind="cpu")
    assert write_triton_repository(eng / "run.engine", eng / "repo", max_batch_size=8).max_batch_size == 8


def test_fixed_batch_engine_and_a_profile_above_one(eng):
    res = write_triton_repository(eng / "fixed.plan", eng / "repo")
    cfg = parse_config(res.folder)
    assert cfg.name == "fixed" and (res.folder / "1" / "model.plan").is_file()
    assert cfg.max_batch_size == 0 and list(cfg.input[0].dims) == [3, 3, 32, 32] and list(cfg.output[0].dims) == [3, 4]
    assert not cfg.HasField("dynamic_batching")
    with pytest.raises(ArtifactError, match="rebuild it with --min-batch 1"):
        write_triton_repository(eng / "from2.engine", eng / "repo")


def test_tensorrt_rtx_engine_is_refused(eng):
    with pytest.raises(ArtifactError, match="TensorRT-RTX engine.*serve the .onnx it was built from"):
        write_triton_repository(eng / "rtx.engine", eng / "repo", require_verified=False)
    assert not (eng / "repo").exists() or not any((eng / "repo").iterdir())


def test_engine_needs_its_own_report(eng):
    (eng / "run.engine.verify.json").unlink()
    with pytest.raises(VerificationError, match="there is no run.engine.verify.json"):
        write_triton_repository(eng / "run.engine", eng / "repo")
    assert not (eng / "repo" / "run").exists()


def test_changed_engine_is_refused(eng):
    with open(eng / "run.engine", "r+b") as f:
        f.seek(64)
        f.write(b"\xff\xfe")
    with pytest.raises(ArtifactError, match="does not have the sha256 its sidecar records"):
        write_triton_repository(eng / "run.engine", eng / "repo", require_verified=False)


# -- the verification gate ----------------------------------------------------------------------------
def test_unverified_stale_and_failed_are_refused(work):
    shutil.copy(work / "run.onnx", work / "new.onnx")
    with pytest.raises(VerificationError, match="there is no new.onnx.verify.json.*--no-verify-check"):
        write_triton_repository(work / "new.onnx", work / "repo")
    model = onnx.load(work / "run.onnx")
    model.doc_string = "edited after verification"
    onnx.save(model, work / "run.onnx")
    with pytest.raises(VerificationError, match="about another file"):
        write_triton_repository(work / "run.onnx", work / "repo")
    report = work / "run.fp16.onnx.verify.json"
    rep = json.loads(report.read_text())
    report.write_text(json.dumps({**rep, "passed": False}))
    with pytest.raises(VerificationError, match="says it failed"):
        write_triton_repository(work / "run.fp16.onnx", work / "repo")
    rep.pop("artifact_sha256")
    report.write_text(json.dumps(rep))
    with pytest.raises(VerificationError, match="older vfpt-deploy"):
        write_triton_repository(work / "run.fp16.onnx", work / "repo")
    assert not (work / "repo").exists() or not any((work / "repo").iterdir())
    assert write_triton_repository(work / "new.onnx", work / "repo", require_verified=False).folder.is_dir()


# -- replacing, and never writing over the input ---------------------------------------------------------
def test_only_the_version_folder_is_replaced_and_user_files_are_kept(work):
    """triton --out adds or replaces 1/, config.pbtxt and labels.txt only: other versions and a user's files stay
    (and the notes say so, and that Triton would serve a higher version); a changed config is kept aside."""
    repo = work / "repo"
    write_triton_repository(work / "run.onnx", repo, max_batch_size=4)
    (repo / "run" / "1" / "stale.onnx").write_bytes(b"left in 1/ by hand")
    (repo / "run" / "2").mkdir()
    (repo / "run" / "2" / "model.onnx").write_bytes(b"another version")
    (repo / "run" / "NOTES.md").write_text("mine")
    (repo / "other").mkdir()
    (repo / "other" / "config.pbtxt").write_text('name: "other"')
    old_config = (repo / "run" / "config.pbtxt").read_text()
    res = write_triton_repository(work / "run.onnx", repo, max_batch_size=2)
    run = repo / "run"
    assert parse_config(run).max_batch_size == 2 and not (run / "1" / "stale.onnx").exists()
    assert (run / "2" / "model.onnx").read_bytes() == b"another version" and (run / "NOTES.md").read_text() == "mine"
    assert (run / "config.pbtxt.previous").read_text() == old_config
    text = " ".join(res.notes)
    assert "keeps what was there" in text and "2/" in text and "NOTES.md" in text
    assert "version 2 will be served" in text and "kept as config.pbtxt.previous" in text
    assert (repo / "other" / "config.pbtxt").read_text() == 'name: "other"'  # other models are left alone
    assert sorted(p.name for p in repo.iterdir()) == ["other", "run"]  # no staging folder left behind
    again = write_triton_repository(work / "run.onnx", repo, max_batch_size=2)  # the same config: no .previous note
    assert "previous" not in " ".join(again.notes)


def test_a_failed_write_leaves_the_old_folder(work, monkeypatch):
    repo = work / "repo"
    write_triton_repository(work / "run.onnx", repo)
    before = {p: p.read_bytes() for p in (repo / "run").rglob("*") if p.is_file()}

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(triton_module, "_copy", broken)
    with pytest.raises(OutputError, match=r"No space left on device.*nothing was replaced"):  # one line, no traceback
        write_triton_repository(work / "run.onnx", repo, max_batch_size=2)
    assert {p: p.read_bytes() for p in (repo / "run").rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in repo.iterdir()) == ["run"]


def test_the_copy_must_be_the_verified_file(work, monkeypatch):
    """The artifact is replaced between the check and the copy: the repository is not written."""
    real = triton_module._copy

    def swapped(src, dst):
        real(src, dst)
        dst.write_bytes(dst.read_bytes() + b"tampered")

    monkeypatch.setattr(triton_module, "_copy", swapped)
    with pytest.raises(ArtifactError, match="changed while it was copied"):
        write_triton_repository(work / "run.onnx", work / "repo")
    assert not (work / "repo" / "run").exists()


def test_never_writes_over_its_input_or_a_foreign_folder(work):
    repo = work / "repo"
    res = write_triton_repository(work / "run.onnx", repo, require_verified=False)
    inside = res.folder / "1" / "model.onnx"
    before = inside.read_bytes()
    with pytest.raises(OutputError, match="lies inside .* which this command replaces"):
        write_triton_repository(inside, repo, name="run", require_verified=False)
    assert inside.read_bytes() == before
    (repo / "notes").mkdir()
    (repo / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(OutputError, match="not a Triton model folder"):
        write_triton_repository(work / "run.onnx", repo, name="notes")
    assert (repo / "notes" / "todo.txt").read_text() == "mine"
    (work / "afile").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        write_triton_repository(work / "run.onnx", work / "afile")


@pytest.mark.parametrize(("options", "match"), [
    ({"name": "../escape"}, "model name"), ({"name": ".hidden"}, "model name"), ({"name": ""}, "model name"),
    ({"max_batch_size": 0}, "--max-batch"), ({"instances": 0}, "--instances"), ({"kind": "tpu"}, "--kind"),
    ({"max_queue_delay_us": -1}, "--max-queue-delay-us"), ({"preferred_batch_sizes": (0,)}, "--preferred-batch"),
    ({"preferred_batch_sizes": (16,), "max_batch_size": 8}, "over max_batch_size 8"),
])
def test_bad_settings_are_one_line_usage_errors(work, options, match):
    with pytest.raises(UsageError, match=match):
        write_triton_repository(work / "run.onnx", work / "repo", **options)
    assert not (work / "repo").exists() or not any((work / "repo").iterdir())


def test_class_names_must_fit_a_labels_file(tmp_path):
    path = _half_io_onnx(tmp_path / "m.onnx")
    model = onnx.load(path)
    for p in model.metadata_props:
        if p.key == "vfpt.classes":
            p.value = json.dumps(["a", "b\nc", "d", "e"])
    onnx.save(model, path)
    with pytest.raises(ArtifactError, match="line break"):
        write_triton_repository(path, tmp_path / "repo", require_verified=False)


def test_run_pt_is_refused(exported_run, tmp_path):
    with pytest.raises(UsageError, match="export the run first"):
        write_triton_repository(exported_run[0].path, tmp_path / "repo")


# -- the command line, torch-free -------------------------------------------------------------------------
def test_cli(work):
    res = invoke("triton", work / "run.onnx", "--out", work / "repo", "--max-batch", 4, "--instances", 2,
                 "--preferred-batch", 2, "--max-queue-delay-us", 50)
    assert res.exit_code == 0, res.output
    assert "tritonserver --model-repository=/models" in res.output
    cfg = check_against_onnx(work / "repo" / "run", work / "run.onnx", 4)
    assert cfg.instance_group[0].count == 2 and list(cfg.dynamic_batching.preferred_batch_size) == [2]
    res = invoke("triton", work / "run.fp16.onnx", "--out", work / "repo", "--kind", "cpu", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["name"] == "run.fp16" and out["max_batch_size"] == DEFAULT_MAX_BATCH
    assert text_format.Parse(out["config_pbtxt"], pb.ModelConfig()) == parse_config(work / "repo" / "run.fp16")
    shutil.copy(work / "run.onnx", work / "plain.onnx")
    res = invoke("triton", work / "plain.onnx", "--out", work / "repo")
    assert res.exit_code == 1 and res.output.startswith("error:") and "Traceback" not in res.output
    assert invoke("triton", work / "plain.onnx", "--out", work / "repo", "--no-verify-check").exit_code == 0


def test_writing_a_repository_imports_no_torch(work):
    code = ("import sys; from vfpt_deploy.exporters.triton import write_triton_repository as w; "
            f"w({str(work / 'run.onnx')!r}, {str(work / 'repo')!r}); "
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert parse_config(work / "repo" / "run").platform == "onnxruntime_onnx"


def test_missing_tritonclient_names_the_extra(monkeypatch):
    import importlib.util
    import sys

    import vfpt_deploy.exporters.triton as triton

    real = importlib.util.find_spec
    monkeypatch.delitem(sys.modules, "vfpt_deploy.runtime._triton_model_config_pb2")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tritonclient" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install '\.\[triton\]' in the vfpt-deploy checkout"):
        triton.model_config_pb2()
