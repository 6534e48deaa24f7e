import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from vfpt_deploy.artifacts.checkpoint import BackboneInfo, load_run, save_run
from vfpt_deploy.errors import VFPTError
from vfpt_deploy.exporters.onnx import TENSORRT_ONNX_OPS, check_ops, export_onnx, op_histogram
from vfpt_deploy.runtime.onnx_runner import OnnxPredictor
from vfpt_deploy.runtime.preprocess import Preprocess
from vfpt_deploy.verify import Tolerances, verify_artifact

from conftest import TINY, TINY_KWARGS, assert_logits_close, tiny_model

PRE = Preprocess(resize=[32, 32], mean=[0.5] * 3, std=[0.5] * 3)


def make_run(path, seed=0, **cfg):
    model = tiny_model(num_classes=4, seed=seed, scale=4.0, **cfg)
    save_run(path, model, BackboneInfo(TINY, dict(TINY_KWARGS)), ["a", "b", "c", "d"], PRE)
    return load_run(path)


@pytest.fixture(scope="module")
def deep_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run") / "run.pt", num_prompts=10, alpha=0.3)


@pytest.mark.parametrize("fold", ["tokens", "kv"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_onnx_parity_and_ops(deep_run, tmp_path, fold, precision, images):
    res = export_onnx(deep_run, tmp_path / "m.onnx", fold=fold, precision=precision)
    assert res.fold_mode == fold and res.path.is_file()
    assert not set(res.ops) - TENSORRT_ONNX_OPS and "DFT" not in res.ops
    model = onnx.load(res.path)
    assert [i.name for i in model.graph.input] == ["images"] and [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 I/O even for fp16
    if precision == "fp16":
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    pred = OnnxPredictor(res.path, ["cpu"])
    assert pred.providers == ["CPUExecutionProvider"]
    with torch.no_grad():
        ref = deep_run.model(images).numpy()
    for batch in (1, 4):  # dynamic batch
        out = pred.infer(images[:batch].numpy())
        if precision == "fp32":
            assert_logits_close(out, ref[:batch], f"ONNX fp32 ({fold}) vs PyTorch, batch {batch}")
        else:
            cos = (out * ref[:batch]).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref[:batch], axis=1)
            assert cos.min() >= 0.999 and (out.argmax(1) == ref[:batch].argmax(1)).all()


def test_fp16_keeps_layernorm_and_softmax_in_fp32(deep_run, tmp_path):
    from onnx import shape_inference

    res = export_onnx(deep_run, tmp_path / "m16.onnx", fold="kv", precision="fp16")
    m = shape_inference.infer_shapes(onnx.load(res.path))
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*m.graph.value_info, *m.graph.output]}
    for node in m.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert types.get(node.output[0]) == onnx.TensorProto.FLOAT, node.name


def test_metadata_round_trip(deep_run, tmp_path):
    res = export_onnx(deep_run, tmp_path / "m.onnx")
    meta = OnnxPredictor(res.path, ["cpu"]).metadata
    assert meta["format"] == "vfpt-deploy.artifact"
    assert meta["classes"] == ["a", "b", "c", "d"]
    assert Preprocess.from_dict(meta["preprocess"]) == PRE
    assert meta["config"] == deep_run.config.to_dict()
    assert meta["checkpoint_sha256"] == deep_run.sha256
    assert meta["fold"] == "kv" and meta["precision"] == "fp32" and meta["opset"] == 17
    assert meta["tool_version"]


def test_live_fft_is_not_exported(deep_run, tmp_path):
    # The exporter folds a parameter FFT to constants, so a 'none' graph would claim a live FFT it lacks.
    with pytest.raises(VFPTError, match="cannot be exported"):
        export_onnx(deep_run, tmp_path / "live.onnx", fold="none")
    assert not (tmp_path / "live.onnx").exists()


def test_op_check_fails_loudly():
    with pytest.raises(VFPTError, match="DFT"):
        check_ops({"MatMul": 3, "DFT": 1})
    with pytest.raises(VFPTError, match="NonZero"):
        check_ops({"MatMul": 3, "NonZero": 1})


def test_verify_report_and_tolerances(deep_run, tmp_path):
    res = export_onnx(deep_run, tmp_path / "m.onnx")
    rep = verify_artifact(res.path, deep_run, num_random=8)
    assert rep.passed and rep.comparisons[0].agreement == 100.0 and rep.comparisons[0].max_abs < 1e-4
    saved = json.loads((tmp_path / "m.onnx.verify.json").read_text())
    assert saved["passed"] and saved["tolerances"].startswith("max |diff| <= 0.0001")
    # An impossible tolerance fails, saying by how much.
    strict = verify_artifact(res.path, deep_run, num_random=8, overrides={"atol": 0.0})
    assert not strict.passed and "atol 0" in strict.comparisons[0].failures[0]
    assert Tolerances().override(atol=0.0).atol == 0.0


def test_artifact_from_another_checkpoint_is_reported(deep_run, tmp_path):
    other = make_run(tmp_path / "other.pt", seed=5, num_prompts=10, alpha=0.3)
    res = export_onnx(other, tmp_path / "other.onnx")
    rep = verify_artifact(res.path, deep_run)
    assert not rep.passed and "was exported from checkpoint sha256" in rep.problems[0]


def test_unwritable_output_leaves_nothing(deep_run, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):  # running as root: permissions do not stop us, use a path under a file
            target = tmp_path / "afile" / "m.onnx"
            (tmp_path / "afile").write_text("x")
        else:
            target = ro / "m.onnx"
        with pytest.raises(VFPTError, match="cannot write"):
            export_onnx(deep_run, target)
    finally:
        os.chmod(ro, 0o700)
    assert not list(ro.iterdir())


def test_runtime_imports_neither_torch_nor_timm(deep_run, tmp_path):
    res = export_onnx(deep_run, tmp_path / "m.onnx")
    from PIL import Image

    Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / "x.png")
    code = (
        "import sys\n"
        "import vfpt_deploy.runtime as rt\n"
        f"p = rt.open_predictor({str(res.path)!r}, ['cpu'])\n"
        f"print(p.predict([{str(tmp_path / 'x.png')!r}], top_k=2)[0].top[0][0])\n"
        "bad = [m for m in ('torch', 'timm') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("a", "b", "c", "d")


@pytest.mark.slow
def test_vit_b16_export_and_parity(tmp_path):
    from vfpt_deploy.models.backbone import create_backbone
    from vfpt_deploy.models.config import VFPTConfig
    from vfpt_deploy.models.vit.model import VFPTViT

    torch.manual_seed(0)
    model = VFPTViT(create_backbone("vit_base_patch16_224"), 10, VFPTConfig(num_prompts=50, alpha=0.5)).eval()
    save_run(tmp_path / "b16.pt", model, BackboneInfo("vit_base_patch16_224", {}), [str(i) for i in range(10)],
             Preprocess())
    run = load_run(tmp_path / "b16.pt")
    res = export_onnx(run, tmp_path / "b16.onnx")
    assert res.fold_mode == "kv" and res.size_bytes < 2**31
    rep = verify_artifact(res.path, run, num_random=2)
    assert rep.passed, rep.comparisons
