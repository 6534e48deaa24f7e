"""TensorRT export and runtime.

TensorRT-RTX's builder runs without a GPU, so these tests really parse our ONNX with TensorRT's ONNX
parser and build engines (fp32 and fp16, tokens and kv folds). Running engines needs a GPU: the checks
before that (sidecar, versions, GPU, sha256) are tested here, execution only in the gpu-marked tests.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from conftest import TINY, TINY_KWARGS, tiny_model
from vfpt_deploy.errors import VFPTError
from vfpt_deploy.exporters import tensorrt as trt_export
from vfpt_deploy.exporters.onnx import export_module
from vfpt_deploy.exporters.tensorrt import build_engine, check_trt_available
from vfpt_deploy.fold import fold_model
from vfpt_deploy.runtime import tensorrt_runner as runner
from vfpt_deploy.runtime.tensorrt_runner import (CudaDevice, TensorRTPredictor, check_compatible, file_sha256,
                                                 read_sidecar, sidecar_path)

META = {"classes": ["a", "b", "c", "d", "e"], "preprocess": {"resize": [32, 32]}, "checkpoint_sha256": "c" * 64}


@pytest.fixture(scope="module")
def rtx():
    """The TensorRT-RTX module; the only reason to skip is that its wheel is not importable here."""
    try:
        return runner.import_tensorrt("trt-rtx")
    except VFPTError as e:
        pytest.skip(f"TensorRT-RTX builder unavailable, no engine can be built: {e}")


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    """Our exporter's ONNX for a tiny deep VFPT model (alpha 0.5, so the folds carry real FFT constants)."""
    d = tmp_path_factory.mktemp("onnx")
    model = tiny_model(deep=True, alpha=0.5, num_prompts=4, scale=20.0)
    out = {}
    for fold in ("tokens", "kv"):
        for precision in ("fp32", "fp16"):
            out[fold, precision] = export_module(fold_model(model, fold), d / f"{fold}_{precision}.onnx",
                                                 image_size=(32, 32), precision=precision, metadata=META).path
    return out


def gpu_visible() -> bool:
    try:
        runner.cuda_device()
        return True
    except VFPTError:
        return False


# ---------------------------------------------------------------- building with TensorRT-RTX (no GPU)

@pytest.mark.parametrize("fold", ["tokens", "kv"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_rtx_builds_our_onnx(rtx, onnx_files, tmp_path, fold, precision):
    onnx_path = onnx_files[fold, precision]
    res = build_engine(onnx_path, tmp_path / "m.engine", flavor="trt-rtx", precision=precision,
                       min_batch=1, opt_batch=4, max_batch=16)
    blob = res.engine_path.read_bytes()
    assert len(blob) == res.engine_bytes > 10_000
    # A well-formed TensorRT-RTX engine: TensorRT's pre-load check finds nothing wrong with the file
    # itself (here it is only "invalid" because no GPU is present).
    validity, diagnostics = rtx.Runtime(rtx.Logger(rtx.Logger.ERROR)).get_engine_validity(blob)
    assert not int(diagnostics) & int(rtx.EngineInvalidityDiagnostics.MALFORMED_ENGINE)
    assert not int(diagnostics) & int(rtx.EngineInvalidityDiagnostics.VERSION_MISMATCH)

    side = read_sidecar(res.engine_path)  # what the runtime reads, from disk
    assert side == res.sidecar
    assert side["tensorrt"] == {"flavor": "trt-rtx", "module": "tensorrt_rtx", "version": rtx.__version__}
    assert side["precision"] == precision and side["build"]["precision_mode"] == "strongly-typed"
    assert side["profile"] == {"input": "images", "min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [16, 3, 32, 32]}
    assert side["onnx"] == {"file": onnx_path.name, "sha256": file_sha256(onnx_path)}
    assert side["engine"]["sha256"] == file_sha256(res.engine_path)
    assert side["metadata"]["classes"] == META["classes"]
    assert side["metadata"]["preprocess"] == META["preprocess"]
    assert side["metadata"]["checkpoint_sha256"] == META["checkpoint_sha256"]
    assert side["metadata"]["fold"] == fold and side["metadata"]["precision"] == precision
    assert side["gpu"] is None or set(side["gpu"]) == {"name", "compute_capability"}
    assert side["build"]["tf32"] is False and side["build"]["opt_level"] == 3


def test_fixed_batch_and_settings(rtx, onnx_files, tmp_path):
    res = build_engine(onnx_files["kv", "fp32"], tmp_path / "m.engine", flavor="trt-rtx", batch=3, opt_level=1,
                       workspace_mb=64, compute_capabilities=["8.6", "8.9"], timing_cache=tmp_path / "tc.bin",
                       hardware_compatible=True)
    side = res.sidecar
    assert side["profile"]["min"] == side["profile"]["opt"] == side["profile"]["max"] == [3, 3, 32, 32]
    assert side["build"]["opt_level"] == 1 and side["build"]["workspace_mb"] == 64
    assert side["build"]["compute_capabilities"] == ["8.6", "8.9"]
    # What TensorRT-RTX does not have is said, not silently dropped.
    assert side["build"]["timing_cache"] is None and not (tmp_path / "tc.bin").exists()
    assert any("timing cache" in n for n in res.notes) and any("hardware_compatible" in n for n in res.notes)
    assert sidecar_path(res.engine_path) == tmp_path / "m.engine.json"


def test_metadata_argument_overrides_onnx(rtx, onnx_files, tmp_path):
    res = build_engine(onnx_files["kv", "fp32"], tmp_path / "m.engine", flavor="trt-rtx",
                       metadata={"classes": list("vwxyz")})
    assert res.sidecar["metadata"]["classes"] == list("vwxyz")
    assert res.sidecar["metadata"]["preprocess"] == META["preprocess"]  # the rest still from the ONNX


def test_precision_must_match_a_strongly_typed_builder(rtx, onnx_files, tmp_path):
    with pytest.raises(VFPTError, match="strongly typed.*export it with --precision fp16"):
        build_engine(onnx_files["kv", "fp32"], tmp_path / "a.engine", flavor="trt-rtx", precision="fp16")
    with pytest.raises(VFPTError, match="is an fp16 graph"):
        build_engine(onnx_files["kv", "fp16"], tmp_path / "b.engine", flavor="trt-rtx", precision="fp32")
    assert not list(tmp_path.iterdir())  # nothing half-written


def _dft_onnx(path: Path) -> Path:
    """A graph TensorRT cannot parse: the live FFT (ONNX DFT), which folding exists to remove."""
    nodes = [helper.make_node("Reshape", ["images", "shape"], ["seq"], name="to_seq"),
             helper.make_node("DFT", ["seq"], ["spec"], name="live_fft", axis=1),
             helper.make_node("ReduceSum", ["spec", "axes"], ["logits"], name="pool", keepdims=0)]
    graph = helper.make_graph(
        nodes, "dft", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, 2])],
        [helper.make_tensor("shape", TensorProto.INT64, [3], [0, -1, 1]),
         helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for k, v in {"vfpt.preprocess": json.dumps(META["preprocess"]), "vfpt.classes": json.dumps(META["classes"])}.items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_unsupported_op_is_reported_per_node(rtx, tmp_path):
    with pytest.raises(VFPTError) as e:
        build_engine(_dft_onnx(tmp_path / "dft.onnx"), tmp_path / "dft.engine", flavor="trt-rtx")
    msg = str(e.value)
    assert "ONNX parser" in msg and "'live_fft' (DFT): unsupported op" in msg and "--fold tokens or kv" in msg
    assert "\n" not in msg
    assert not (tmp_path / "dft.engine").exists()


def test_bad_inputs_are_one_line_errors(rtx, onnx_files, tmp_path):
    onnx_path = onnx_files["kv", "fp32"]
    cases = [
        (dict(min_batch=4, max_batch=2), "1 <= min <= opt <= max"),
        (dict(opt_level=7), "optimization level"),
        (dict(precision="int8"), "precision must be"),
        (dict(workspace_mb=0), "workspace"),
        (dict(compute_capabilities=["9.0"]), "unknown compute capability '9.0'"),
        (dict(version_compatible=True), "TensorRT-RTX cannot build them"),
    ]
    for kwargs, match in cases:
        with pytest.raises(VFPTError, match=match):
            build_engine(onnx_path, tmp_path / "m.engine", flavor="trt-rtx", **kwargs)
    with pytest.raises(VFPTError, match="does not exist"):
        build_engine(tmp_path / "missing.onnx", tmp_path / "m.engine", flavor="trt-rtx")
    with pytest.raises(VFPTError, match="TensorRT-RTX setting"):
        build_engine(onnx_path, tmp_path / "m.engine", flavor="trt", compute_capabilities=["8.9"])


def test_fixed_batch_onnx_needs_matching_profile(rtx, tmp_path):
    path = tmp_path / "fixed.onnx"
    with torch.no_grad():
        torch.onnx.export(fold_model(tiny_model(alpha=0.0), "tokens"), torch.randn(2, 3, 32, 32), path, dynamo=False,
                          opset_version=17, input_names=["images"], output_names=["logits"])
    with pytest.raises(VFPTError, match="fixed batch of 2; build with --batch 2"):
        build_engine(path, tmp_path / "m.engine", flavor="trt-rtx", metadata=META)
    assert build_engine(path, tmp_path / "m.engine", flavor="trt-rtx", batch=2, metadata=META).sidecar["profile"]["max"][0] == 2


# ---------------------------------------------------------------- missing TensorRT / GPU

def test_missing_tensorrt_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails, as on a machine without TensorRT
    monkeypatch.setattr(trt_export, "builder_gpu", lambda: None)
    with pytest.raises(VFPTError) as e:
        check_trt_available("trt")
    msg = str(e.value)
    assert "'tensorrt'" in msg and "vfpt-deploy[tensorrt]" in msg and "a CUDA GPU" in msg and "\n" not in msg

    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(VFPTError, match=r"'tensorrt_rtx'.*vfpt-deploy\[trt-rtx\]") as e:
        check_trt_available("trt-rtx")
    assert "GPU" not in str(e.value)  # the RTX builder needs none


def test_missing_gpu_alone(monkeypatch, rtx):
    monkeypatch.setattr(trt_export, "import_tensorrt", lambda flavor: rtx)  # "TensorRT" present ...
    monkeypatch.setattr(trt_export, "builder_gpu", lambda: None)  # ... but no GPU
    with pytest.raises(VFPTError, match="--format trt needs a CUDA GPU, not found here") as e:
        check_trt_available("trt")
    assert "TensorRT (" not in str(e.value)
    assert check_trt_available("trt", need_gpu=False) is rtx


@pytest.mark.skipif(gpu_visible(), reason="a GPU is visible: the no-GPU error cannot happen here")
def test_build_trt_without_tensorrt_or_gpu_fails_in_one_line(onnx_files, tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("full TensorRT is installed here")
    except ImportError:
        pass
    with pytest.raises(VFPTError, match=r"^--format trt needs TensorRT \(Python module 'tensorrt'\) and a CUDA GPU"):
        build_engine(onnx_files["kv", "fp32"], tmp_path / "m.engine", flavor="trt")


# ---------------------------------------------------------------- loading engines: checks before the GPU

@pytest.fixture
def engine(rtx, onnx_files, tmp_path):
    return build_engine(onnx_files["kv", "fp32"], tmp_path / "m.engine", flavor="trt-rtx", max_batch=4).engine_path


def _edit_sidecar(engine_path, fn):
    p = sidecar_path(engine_path)
    side = json.loads(p.read_text())
    fn(side)
    p.write_text(json.dumps(side))


def test_sidecar_problems(engine, tmp_path):
    with pytest.raises(VFPTError, match="does not exist"):
        TensorRTPredictor(tmp_path / "nope.engine")
    sidecar_path(engine).write_text("{not json")
    with pytest.raises(VFPTError, match="not valid JSON"):
        TensorRTPredictor(engine)
    sidecar_path(engine).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(VFPTError, match="not a vfpt-deploy engine sidecar"):
        TensorRTPredictor(engine)
    sidecar_path(engine).unlink()
    with pytest.raises(VFPTError, match="has no sidecar m.engine.json"):
        TensorRTPredictor(engine)


def test_engine_from_another_tensorrt_version(engine):
    _edit_sidecar(engine, lambda s: s["tensorrt"].update(version="1.0.0.21"))
    with pytest.raises(VFPTError, match=r"built with tensorrt_rtx 1\.0\.0\.21 but this is .*rebuild it here"):
        TensorRTPredictor(engine)


def test_engine_needs_the_tensorrt_that_built_it(engine, monkeypatch):
    _edit_sidecar(engine, lambda s: s["tensorrt"].update(flavor="trt", module="tensorrt", version="10.3.0"))
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(VFPTError, match=r"Python module 'tensorrt'.*vfpt-deploy\[tensorrt\]"):
        TensorRTPredictor(engine)


@pytest.mark.skipif(gpu_visible(), reason="a GPU is visible: the no-GPU error cannot happen here")
def test_no_gpu_is_a_clear_error(engine):
    with pytest.raises(VFPTError, match="no CUDA GPU is visible.*onnxruntime"):
        TensorRTPredictor(engine)


def test_engine_for_another_rtx_gpu(engine, monkeypatch):
    monkeypatch.setattr(runner, "cuda_device", lambda index=0: CudaDevice(0, "NVIDIA H100 80GB HBM3", "9.0"))
    with pytest.raises(VFPTError, match=r"TensorRT-RTX for compute capabilities 8\.0, 8\.6, 8\.9, 12\.0 but this GPU is "
                                        r"NVIDIA H100 80GB HBM3 \(compute capability 9\.0\)"):
        TensorRTPredictor(engine)


def test_engine_that_does_not_match_its_sidecar(engine, monkeypatch):
    monkeypatch.setattr(runner, "cuda_device", lambda index=0: CudaDevice(0, "NVIDIA GeForce RTX 4090", "8.9"))
    with open(engine, "ab") as f:
        f.write(b"\0")
    with pytest.raises(VFPTError, match="does not match its sidecar's sha256"):
        TensorRTPredictor(engine)


def _trt_sidecar(version="10.3.0", cc="8.9", name="NVIDIA L4", **build):
    return {"tensorrt": {"flavor": "trt", "module": "tensorrt", "version": version},
            "gpu": {"name": name, "compute_capability": cc},
            "build": {"version_compatible": False, "hardware_compatibility": "none", **build}}


def test_compatibility_rules_for_tensorrt_engines():
    l4, h100 = CudaDevice(0, "NVIDIA L4", "8.9"), CudaDevice(0, "NVIDIA H100 80GB HBM3", "9.0")
    assert check_compatible(_trt_sidecar(), "10.3.0", l4) == []
    with pytest.raises(VFPTError, match=r"built on NVIDIA L4 \(compute capability 8\.9\) but this GPU is NVIDIA H100"):
        check_compatible(_trt_sidecar(), "10.3.0", h100)
    with pytest.raises(VFPTError, match=r"built with tensorrt 10\.3\.0 but this is 10\.8\.0"):
        check_compatible(_trt_sidecar(), "10.8.0", l4)
    # same compute capability, another model: runs, with a warning
    warnings = check_compatible(_trt_sidecar(name="NVIDIA RTX 6000 Ada"), "10.3.0", l4)
    assert len(warnings) == 1 and "may be slower" in warnings[0]
    # hardware-compatible engines run on any Ampere+ GPU, not on Turing
    assert check_compatible(_trt_sidecar(hardware_compatibility="ampere_plus"), "10.3.0", h100) == []
    with pytest.raises(VFPTError, match="Ampere and newer"):
        check_compatible(_trt_sidecar(hardware_compatibility="ampere_plus"), "10.3.0", CudaDevice(0, "T4", "7.5"))
    # version-compatible engines run on the same major version, same or newer
    vc = _trt_sidecar(version_compatible=True)
    assert check_compatible(vc, "10.8.0", l4) == []
    for newer_or_older in ("11.0.0", "10.2.0"):
        with pytest.raises(VFPTError, match="version-compatible"):
            check_compatible(vc, newer_or_older, l4)


def test_runtime_module_imports_no_torch():
    code = ("import sys; import vfpt_deploy.runtime.tensorrt_runner; "
            "bad = [m for m in ('torch', 'timm') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- ViT-B/16 (slow)

@pytest.mark.slow
def test_rtx_builds_vit_b16(rtx, tmp_path):
    """The real size: ViT-B/16 with 10 deep prompts, kv fold, fp16 graph (fp32 + cast + optimize: ~20 s, ~3 GB
    peak on 2 cores; the engine build itself takes ~2 s). fp32 and the tokens fold are covered on the tiny ViT."""
    from vfpt_deploy.backbone import create_backbone
    from vfpt_deploy.config import VFPTConfig
    from vfpt_deploy.model import VFPTViT

    torch.manual_seed(0)
    model = VFPTViT(create_backbone("vit_base_patch16_224"), 10, VFPTConfig(num_prompts=10, alpha=0.5)).eval()
    meta = {"classes": [str(i) for i in range(10)], "preprocess": {"resize": [224, 224]}}
    onnx_path = export_module(fold_model(model, "kv"), tmp_path / "b16.onnx", image_size=(224, 224),
                              precision="fp16", metadata=meta).path
    res = build_engine(onnx_path, tmp_path / "b16.engine", flavor="trt-rtx", precision="fp16", max_batch=8)
    assert res.sidecar["profile"]["max"] == [8, 3, 224, 224]
    assert res.sidecar["build"]["precision_mode"] == "strongly-typed"
    assert res.engine_bytes > 150e6  # the fp16 weights (86M parameters) live in the engine


# ---------------------------------------------------------------- on a GPU (skipped elsewhere, with the reason)

def _gpu_flavor_or_skip(flavor: str):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    try:
        trt = runner.import_tensorrt(flavor)
        runner.import_cudart()
    except VFPTError as e:
        pytest.skip(str(e))
    cc = "%d.%d" % torch.cuda.get_device_capability(0)
    if flavor == "trt-rtx" and cc not in runner.RTX_DEFAULT_TARGETS:
        pytest.skip(f"TensorRT-RTX engines do not run on compute capability {cc} ({torch.cuda.get_device_name(0)})")
    return trt


@pytest.mark.gpu
@pytest.mark.parametrize("flavor", ["trt", "trt-rtx"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gpu_export_and_verify(flavor, precision, tmp_path):
    """Full path on CUDA: run.pt -> folded ONNX -> engine -> TensorRTPredictor vs the PyTorch reference."""
    _gpu_flavor_or_skip(flavor)
    from vfpt_deploy.checkpoint import BackboneInfo, load_run, save_run
    from vfpt_deploy.exporters.onnx import export_onnx
    from vfpt_deploy.runtime.preprocess import Preprocess
    from vfpt_deploy.verify import verify_artifact

    model = tiny_model(deep=True, alpha=0.5, num_prompts=4, scale=20.0)
    save_run(tmp_path / "run.pt", model, BackboneInfo(TINY, dict(TINY_KWARGS)), META["classes"],
             Preprocess(resize=[32, 32]))
    run = load_run(tmp_path / "run.pt")
    onnx_path = export_onnx(run, tmp_path / "m.onnx", fold="kv", precision=precision).path
    res = build_engine(onnx_path, tmp_path / "m.engine", flavor=flavor, precision=precision, max_batch=8,
                       timing_cache=tmp_path / "tc.bin" if flavor == "trt" else None)
    assert res.sidecar["gpu"]["compute_capability"] == "%d.%d" % torch.cuda.get_device_capability(0)
    pred = TensorRTPredictor(res.engine_path)
    x = torch.randn(11, 3, 32, 32)  # more than max_batch, and not a multiple of it
    with torch.no_grad():
        ref = run.model.cuda()(x.cuda()).float().cpu().numpy()
    out = pred.infer(x.numpy())
    assert out.shape == (11, 5) and out.dtype == np.float32
    atol = 1e-3 if precision == "fp32" else 5e-2 * float(np.abs(ref).max())
    np.testing.assert_allclose(out, ref, atol=atol, rtol=0)
    report = verify_artifact(res.engine_path, load_run(tmp_path / "run.pt"), num_random=8)
    assert report.passed, report.to_json()
    pred.close()
