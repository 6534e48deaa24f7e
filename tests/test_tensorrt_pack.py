"""TensorRT engines of the prompt-pack backbone artifact (issue 22): TensorRT-RTX's builder really parses and
builds the tiny backbone's ONNX on the CPU, with one profile over every dynamic input (batch, tasks, prompts,
slots, classes); the sidecar records the ranges and a set of packs outside them is refused in one line.
Running the engine needs an RTX GPU and a TensorRT PackSession, which do not exist here (docs/tensorrt.md).
"""
import json

import numpy as np
import pytest

from vfpt_deploy.artifacts.checkpoint import load_run
from vfpt_deploy.artifacts.pack import PackTables, assemble, backbone_geometry, check_engine_ranges, table_dims
from vfpt_deploy.artifacts.schema import read_graph
from vfpt_deploy.errors import ArtifactError, UsageError
from vfpt_deploy.exporters.pack import export_backbone
from vfpt_deploy.exporters.tensorrt import BuildSettings
from vfpt_deploy.exporters.tensorrt_pack import build_backbone_engine, pack_ranges
from vfpt_deploy.runtime.tensorrt_runner import file_sha256, read_sidecar
from test_tensorrt import rtx  # noqa: F401, E402  (the shared TensorRT-RTX fixture: skips where it is absent)


@pytest.fixture(scope="module")
def backbones(task_runs, tmp_path_factory):
    """Backbone artifacts of the tiny task runs' backbone: default limits, and small ones (16 prompts, 32 classes)."""
    d = tmp_path_factory.mktemp("backbone")
    run = load_run(next(iter(task_runs.values())))
    return {"default": export_backbone(run, d / "vit.backbone.onnx").path,
            "small": export_backbone(run, d / "small.backbone.onnx", limits={"prompts": 16, "classes": 32}).path}


@pytest.fixture(scope="module")
def built(rtx, backbones, tmp_path_factory):
    return build_backbone_engine(backbones["default"], tmp_path_factory.mktemp("engine") / "vit.backbone.engine",
                                 BuildSettings(flavor="trt-rtx", min_batch=1, opt_batch=4, max_batch=8))


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def test_backbone_engine_builds_with_every_dynamic_input_in_its_profile(rtx, built, backbones):
    blob = built.engine_path.read_bytes()
    assert len(blob) == built.engine_bytes > 10_000
    _, diagnostics = rtx.Runtime(rtx.Logger(rtx.Logger.ERROR)).get_engine_validity(blob)
    assert not int(diagnostics) & int(rtx.EngineInvalidityDiagnostics.MALFORMED_ENGINE)
    side = json.loads(built.sidecar_path.read_text())
    assert side == built.sidecar and side["version"] == 3
    assert side["onnx"]["sha256"] == file_sha256(backbones["default"])
    assert side["engine"]["sha256"] == file_sha256(built.engine_path)
    prof = side["profile"]
    # Defaults: tasks 1..16 (opt 8); prompts and slots 0..the backbone's 512 (opt 100); classes 1..10000 (opt 100).
    assert prof["ranges"] == {"batch": [1, 4, 8], "tasks": [1, 8, 16], "prompts": [0, 100, 512],
                              "slots": [0, 100, 512], "classes": [1, 100, 10000]}
    assert prof["min"] == [1, 3, 32, 32] and prof["max"] == [8, 3, 32, 32]
    assert prof["task"] == {"input": "task", "dtype": "int64", "min": [1], "opt": [4], "max": [8]}
    g = backbone_geometry(read_graph(backbones["default"]).metadata, "b")
    keys = prof["tables"]["prompt_keys"]
    assert keys["dims"] == ["tasks", "kv_layers", "heads", "prompts", "head_dim"]
    assert keys["min"] == [1, g["kv_layers"], g["heads"], 0, g["head_dim"]]
    assert keys["max"] == [16, g["kv_layers"], g["heads"], 512, g["head_dim"]]
    assert prof["tables"]["head_weight"]["opt"] == [8, g["dim"], 100]
    assert prof["tables"]["token_bias"]["max"] == [16, g["depth"], 512]
    assert set(prof["tables"]) == {"prompt_keys", "prompt_values", "kv_bias", "prompt_tokens", "token_write",
                                   "token_bias", "head_weight", "head_bias"}
    assert side["metadata"]["pack_backbone"]["limits"]["prompts"] == 512


def test_ranges_follow_the_backbone_limits_and_the_task_options(rtx, backbones, tmp_path):
    res = build_backbone_engine(backbones["small"], tmp_path / "b.plan", BuildSettings(flavor="trt-rtx", batch=2),
                                max_tasks=4, opt_tasks=2)
    assert res.sidecar["profile"]["ranges"] == {"batch": [2, 2, 2], "tasks": [1, 2, 4], "prompts": [0, 16, 16],
                                                "slots": [0, 16, 16], "classes": [1, 32, 32]}


def test_no_runtime_reads_a_backbone_engine_yet(built):
    with pytest.raises(ArtifactError) as e:
        read_sidecar(built.engine_path)
    assert "prompt-pack backbone engine, which vfpt-deploy cannot run yet" in one_line(e)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_tasks=0), r"--max-tasks must be an integer in 1\.\.256"),
    (dict(max_tasks=257), r"--max-tasks must be an integer in 1\.\.256"),
    (dict(max_tasks=4, opt_tasks=5), r"--opt-tasks must be an integer in 1\.\.4")])
def test_bad_task_ranges_are_one_line(backbones, tmp_path, kwargs, match):
    # Refused before TensorRT is asked for: runs where tensorrt_rtx is absent, too.
    with pytest.raises(UsageError, match=match) as e:
        build_backbone_engine(backbones["small"], tmp_path / "b.engine", BuildSettings(flavor="trt-rtx"), **kwargs)
    one_line(e)
    assert not (tmp_path / "b.engine").exists()


def test_an_ordinary_onnx_is_not_a_backbone(tasks_onnx, tmp_path):
    with pytest.raises(ArtifactError, match="not a backbone artifact") as e:
        build_backbone_engine(tasks_onnx, tmp_path / "b.engine", BuildSettings(flavor="trt-rtx"))
    one_line(e)


def _tables(g: dict, prompts: int, classes: int, tokens: bool = False) -> PackTables:
    w, b = np.zeros((classes, g["dim"]), np.float32), np.zeros(classes, np.float32)
    if tokens:
        return PackTables("tokens", w, b, tokens=np.zeros((g["depth"], prompts, g["dim"]), np.float32),
                          token_write=np.ones(g["depth"], bool), token_live=np.ones(g["depth"], bool))
    kv = np.zeros((g["kv_layers"], g["heads"], prompts, g["head_dim"]), np.float32)
    return PackTables("kv", w, b, kv, kv.copy())


def test_packs_outside_the_engine_profile_are_refused_in_one_line(backbones):
    g = backbone_geometry(read_graph(backbones["small"]).metadata, "b")
    ranges = pack_ranges(g, (1, 4, 8), max_tasks=4)
    ok = assemble([_tables(g, 16, 32), _tables(g, 3, 2, tokens=True)], g)
    assert table_dims(ok) == {"tasks": 2, "prompts": 16, "slots": 3, "classes": 32}
    check_engine_ranges(ranges, {**table_dims(ok), "batch": 8}, "engine")  # at the edges: accepted
    check_engine_ranges(ranges, table_dims(assemble([_tables(g, 3, 2, tokens=True)], g)), "engine")  # 0 kv prompts
    cases = [({"tasks": 5}, r"5 tasks is outside this TensorRT engine's profile \(1\.\.4\); unload a pack"),
             ({"prompts": 17}, r"17 prompts is outside .*\(0\.\.16\).*--max-prompts"),
             ({"slots": 17}, r"17 prompt-token slots is outside .*\(0\.\.16\)"),
             ({"classes": 33}, r"33 classes is outside .*\(1\.\.32\).*--max-classes"),
             ({"batch": 9}, r"9 images in a batch is outside .*\(1\.\.8\).*--max-batch")]
    for change, match in cases:
        with pytest.raises(UsageError, match=match) as e:
            check_engine_ranges(ranges, {**table_dims(ok), **change}, "engine")
        one_line(e)


def _cli(*args):
    from typer.testing import CliRunner

    from vfpt_deploy.cli import app

    return CliRunner().invoke(app, ["export", *map(str, args)])


def test_cli_export_backbone_with_engine(rtx, task_runs, tmp_path):
    ckpt = next(iter(task_runs.values()))
    r = _cli("--ckpt", ckpt, "--format", "backbone", "--out", tmp_path / "b.onnx", "--engine", "trt-rtx",
             "--max-tasks", 4, "--max-prompts", 64, "--max-batch", 2)
    assert r.exit_code == 0, r.output
    side = json.loads((tmp_path / "b.engine.json").read_text())
    assert side["onnx"]["sha256"] == file_sha256(tmp_path / "b.onnx") and (tmp_path / "b.engine").is_file()
    assert side["profile"]["ranges"] == {"batch": [1, 2, 2], "tasks": [1, 4, 4], "prompts": [0, 64, 64],
                                         "slots": [0, 64, 64], "classes": [1, 100, 10000]}
    assert "tasks 1..4 (opt 4)" in r.output


@pytest.mark.parametrize("args, match", [
    (("--format", "backbone", "--max-tasks", 4), "add --engine trt or --engine trt-rtx"),
    (("--format", "onnx", "--engine", "trt-rtx"), "apply to --format backbone only"),
    (("--format", "backbone", "--engine", "trt-rtx", "--max-tasks", 4, "--opt-tasks", 5), "--opt-tasks must be"),
    (("--format", "backbone", "--engine", "trt-rtx", "--max-tasks", 20, "--max-prompts", 8), None)])
def test_cli_engine_options_are_checked_before_the_export(task_runs, tmp_path, args, match):
    ckpt = next(iter(task_runs.values()))
    if match is None:  # a valid request where the engine's output is taken by a folder: refused before any work
        (tmp_path / "b.engine").mkdir()
        match = "b.engine"
    r = _cli("--ckpt", ckpt, "--out", tmp_path / "b.onnx", *args)
    assert r.exit_code != 0 and match in r.output, r.output
    assert not (tmp_path / "b.onnx").exists()
