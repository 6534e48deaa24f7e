"""TensorRT export and runtime.

TensorRT-RTX's builder runs without a GPU, so these tests really parse our ONNX with TensorRT's ONNX
parser and build engines (fp32 and fp16, tokens and kv folds). Running engines needs a GPU: the checks
before that (sidecar, versions, GPU, sha256) are tested here, execution only in the gpu-marked tests.
"""
import ctypes
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from conftest import TINY, TINY_KWARGS, tiny_model
from vfpt_deploy.errors import ArtifactError, OutputError, RuntimeSetupError, UsageError, VFPTError
from vfpt_deploy.exporters import tensorrt as trt_export
from vfpt_deploy.exporters.onnx import export_module
from vfpt_deploy.exporters.tensorrt import BuildSettings, build_engine, check_trt_available
from vfpt_deploy.folding import fold_model
from vfpt_deploy.runtime import tensorrt_runner as runner
from vfpt_deploy.runtime.tensorrt_runner import (CudaDevice, TensorRTPredictor, check_compatible, file_sha256,
                                                 read_sidecar, sidecar_path)

META = {"classes": ["a", "b", "c", "d", "e"], "preprocess": {"resize": [32, 32]}, "checkpoint_sha256": "c" * 64}


def RTX(**kwargs) -> BuildSettings:
    return BuildSettings(flavor="trt-rtx", **kwargs)


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
    settings = RTX(precision=precision, min_batch=1, opt_batch=4, max_batch=16)
    res = build_engine(onnx_path, tmp_path / "m.engine", settings)
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
    settings = RTX(batch=3, opt_level=1, workspace_mb=64, compute_capabilities=["8.6", "8.9"],
                   timing_cache=tmp_path / "tc.bin", hardware_compatible=True)
    res = build_engine(onnx_files["kv", "fp32"], tmp_path / "m.engine", settings)
    side = res.sidecar
    assert side["profile"]["min"] == side["profile"]["opt"] == side["profile"]["max"] == [3, 3, 32, 32]
    assert side["build"]["opt_level"] == 1 and side["build"]["workspace_mb"] == 64
    assert side["build"]["compute_capabilities"] == ["8.6", "8.9"]
    # What TensorRT-RTX does not have is said, not silently dropped.
    assert side["build"]["timing_cache"] is None and not (tmp_path / "tc.bin").exists()
    assert any("timing cache" in n for n in res.notes) and any("hardware_compatible" in n for n in res.notes)
    assert sidecar_path(res.engine_path) == tmp_path / "m.engine.json"


def test_metadata_argument_overrides_onnx(rtx, onnx_files, tmp_path):
    res = build_engine(onnx_files["kv", "fp32"], tmp_path / "m.engine", RTX(), metadata={"classes": list("vwxyz")})
    assert res.sidecar["metadata"]["classes"] == list("vwxyz")
    assert res.sidecar["metadata"]["preprocess"] == META["preprocess"]  # the rest still from the ONNX


def test_precision_must_match_a_strongly_typed_builder(rtx, onnx_files, tmp_path):
    with pytest.raises(VFPTError, match="strongly typed.*export it with --precision fp16"):
        build_engine(onnx_files["kv", "fp32"], tmp_path / "a.engine", RTX(precision="fp16"))
    with pytest.raises(VFPTError, match="is an fp16 graph"):
        build_engine(onnx_files["kv", "fp16"], tmp_path / "b.engine", RTX(precision="fp32"))
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
        build_engine(_dft_onnx(tmp_path / "dft.onnx"), tmp_path / "dft.engine", RTX())
    msg = str(e.value)
    assert "ONNX parser" in msg and "'live_fft' (DFT): unsupported op" in msg and "--fold tokens or kv" in msg
    assert "\n" not in msg
    assert not (tmp_path / "dft.engine").exists()


BAD_SETTINGS = [
    (dict(min_batch=4, max_batch=2), "1 <= min <= opt <= max"),
    (dict(opt_batch=9), "1 <= min <= opt <= max"),  # max_batch defaults to 8
    (dict(batch=0), r"--batch must be an integer in 1\.\.65536, got 0"),
    (dict(batch=65537), r"--batch must be an integer in 1\.\.65536"),
    (dict(min_batch=0), "--min-batch must be"),
    (dict(opt_batch=-1), "--opt-batch must be"),
    (dict(max_batch=100_000), "--max-batch must be"),
    (dict(max_batch=True), "--max-batch must be"),
    (dict(max_batch=4.0), "--max-batch must be"),
    (dict(opt_level=7), "optimization level must be 0..5"),
    (dict(opt_level=-1), "optimization level must be 0..5"),
    (dict(opt_level=True), "optimization level"),
    (dict(precision="int4"), "precision must be"),
    (dict(workspace_mb=0), "workspace"),
    (dict(workspace_mb=(1 << 20) + 1), r"workspace.*1\.\.1048576"),
    (dict(workspace_mb=1.5), "workspace"),
    (dict(flavor="onnx"), "--format must be one of trt, trt-rtx"),
    (dict(flavor="trt-rtx", compute_capabilities=["9.0"]), "unknown compute capability '9.0'"),
    (dict(flavor="trt-rtx", version_compatible=True), "TensorRT-RTX cannot build them"),
    (dict(flavor="trt", compute_capabilities=["8.9"]), "TensorRT-RTX setting"),
    (dict(hardware_compatible="yes"), "--hardware-compatible is a flag"),
]


@pytest.mark.parametrize("kwargs,match", BAD_SETTINGS, ids=[str(k) for k, _ in BAD_SETTINGS])
def test_bad_settings_are_one_line_usage_errors(kwargs, match):
    with pytest.raises(UsageError, match=match) as e:
        BuildSettings(**kwargs).check()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs", [dict(batch=1), dict(batch=65536), dict(min_batch=1, opt_batch=1, max_batch=65536),
                                    dict(opt_level=0), dict(opt_level=5), dict(workspace_mb=1),
                                    dict(workspace_mb=1 << 20), dict(flavor="trt-rtx", compute_capabilities=("8.6",))])
def test_settings_at_the_limits_pass(kwargs):
    settings = BuildSettings(**kwargs)
    assert settings.check() is settings


def test_settings_are_frozen_and_normalized(tmp_path):
    s = BuildSettings(flavor="trt-rtx", timing_cache=str(tmp_path / "tc"), compute_capabilities=["8.6"], max_batch=4)
    assert s.timing_cache == tmp_path / "tc" and s.compute_capabilities == ("8.6",)
    assert s.profile_batches == (1, 4, 4) and BuildSettings(batch=3).profile_batches == (3, 3, 3)
    hash(s)
    with pytest.raises(AttributeError):
        s.max_batch = 8


def test_build_engine_checks_settings_and_paths(rtx, onnx_files, tmp_path):
    onnx_path = onnx_files["kv", "fp32"]
    with pytest.raises(UsageError, match="1 <= min <= opt <= max"):
        build_engine(onnx_path, tmp_path / "m.engine", RTX(min_batch=4, max_batch=2))
    with pytest.raises(VFPTError, match="does not exist"):
        build_engine(tmp_path / "missing.onnx", tmp_path / "m.engine", RTX())
    with pytest.raises(UsageError, match="TensorRT-RTX setting"):
        build_engine(onnx_path, tmp_path / "m.engine", BuildSettings(flavor="trt", compute_capabilities=["8.9"]))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["m.onnx", "m", "m.engine.json", "m.trt"])
def test_engine_path_needs_an_engine_suffix(rtx, onnx_files, tmp_path, name):
    with pytest.raises(OutputError, match=r"engine files end in \.engine or \.plan") as e:
        build_engine(onnx_files["kv", "fp32"], tmp_path / name, RTX())
    assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())  # nothing written


def test_engine_path_may_not_be_the_onnx(rtx, onnx_files, tmp_path):
    onnx_path = tmp_path / "m.plan"
    shutil.copy(onnx_files["kv", "fp32"], onnx_path)
    before = onnx_path.read_bytes()
    with pytest.raises(OutputError, match="same file as the ONNX"):
        build_engine(onnx_path, onnx_path, RTX())
    assert onnx_path.read_bytes() == before


def test_plan_suffix_builds(rtx, onnx_files, tmp_path):
    res = build_engine(onnx_files["kv", "fp32"], tmp_path / "m.plan", RTX(max_batch=2))
    assert res.sidecar_path == tmp_path / "m.plan.json" and read_sidecar(res.engine_path) == res.sidecar
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.plan", "m.plan.json"]  # no staging folder left


def test_fixed_batch_onnx_needs_matching_profile(rtx, tmp_path):
    path = tmp_path / "fixed.onnx"
    with torch.no_grad():
        torch.onnx.export(fold_model(tiny_model(alpha=0.0), "tokens"), torch.randn(2, 3, 32, 32), path, dynamo=False,
                          opset_version=17, input_names=["images"], output_names=["logits"])
    with pytest.raises(VFPTError, match="fixed batch of 2; build with --batch 2"):
        build_engine(path, tmp_path / "m.engine", RTX(), metadata=META)
    assert build_engine(path, tmp_path / "m.engine", RTX(batch=2), metadata=META).sidecar["profile"]["max"][0] == 2


# ---------------------------------------------------------------- missing TensorRT / GPU

def test_missing_tensorrt_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails, as on a machine without TensorRT
    monkeypatch.setattr(trt_export, "builder_gpu", lambda: None)
    with pytest.raises(VFPTError) as e:
        check_trt_available("trt")
    msg = str(e.value)
    assert "'tensorrt'" in msg and "pip install '.[tensorrt]'" in msg and "a CUDA GPU" in msg and "\n" not in msg

    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(VFPTError, match=r"'tensorrt_rtx'.*pip install '\.\[trt-rtx\]' in the vfpt-deploy checkout") as e:
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
        build_engine(onnx_files["kv", "fp32"], tmp_path / "m.engine", BuildSettings(flavor="trt"))


# ---------------------------------------------------------------- loading engines: checks before the GPU

@pytest.fixture(scope="module")
def built_engine(rtx, onnx_files, tmp_path_factory):
    return build_engine(onnx_files["kv", "fp32"], tmp_path_factory.mktemp("engine") / "m.engine",
                        RTX(max_batch=4)).engine_path


@pytest.fixture
def engine(built_engine, tmp_path):
    """A fresh copy of one built engine and its sidecar, free to tamper with."""
    shutil.copy(built_engine, tmp_path / "m.engine")
    shutil.copy(sidecar_path(built_engine), tmp_path / "m.engine.json")
    return tmp_path / "m.engine"


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


TAMPERED = {
    "tensorrt.version a number": (lambda s: s["tensorrt"].update(version=10.3), "tensorrt.version must be a version"),
    "tensorrt.version missing": (lambda s: s["tensorrt"].pop("version"), "tensorrt.version must be a version"),
    "version a string": (lambda s: s.update(version="1"), "sidecar version must be an integer"),
    "profile negative batch": (lambda s: s["profile"].update(min=[-1, 3, 32, 32]), "profile batch must be an integer"),
    "profile huge batch": (lambda s: s["profile"].update(max=[10**12, 3, 32, 32]), r"profile batch .*\[1, 65536\]"),
    "resize 60000": (lambda s: s["metadata"]["preprocess"].update(resize=[60000, 60000]), "preprocess resize"),
    "classes not a list": (lambda s: s["metadata"].update(classes="a,b,c,d,e"), "classes must be a non-empty list"),
    "engine.sha256 not hex": (lambda s: s["engine"].update(sha256="z" * 64), "engine.sha256 must be a sha256"),
    "gpu a string": (lambda s: s.update(gpu="NVIDIA GeForce RTX 4090"), "gpu must be null or"),
    "version_compatible yes": (lambda s: s["build"].update(version_compatible="yes"),
                               "build.version_compatible must be true or false"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_sidecar_is_one_artifact_error(engine, case):
    edit, match = TAMPERED[case]
    _edit_sidecar(engine, edit)
    for load in (read_sidecar, TensorRTPredictor):
        with pytest.raises(VFPTError, match=match) as e:
            load(engine)
        assert type(e.value) is ArtifactError, (load, type(e.value))
        assert "\n" not in str(e.value) and "m.engine.json" in str(e.value)


def test_engine_from_another_tensorrt_version(engine):
    _edit_sidecar(engine, lambda s: s["tensorrt"].update(version="1.0.0.21"))
    with pytest.raises(VFPTError, match=r"built with tensorrt_rtx 1\.0\.0\.21 but this is .*rebuild it here"):
        TensorRTPredictor(engine)


def test_engine_needs_the_tensorrt_that_built_it(engine, monkeypatch):
    _edit_sidecar(engine, lambda s: s["tensorrt"].update(flavor="trt", module="tensorrt", version="10.3.0"))
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(VFPTError, match=r"Python module 'tensorrt'.*pip install '\.\[tensorrt\]' in the vfpt-deploy checkout"):
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


# ---------------------------------------------------------------- the predictor's CUDA plumbing, on fakes

class FakeCudart:
    """cuda-python's runtime API on host memory: pointers are ctypes buffers, copies are memmove."""

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    def __init__(self, fail_malloc_at: int | None = None):
        self.mem, self.streams, self.mallocs, self.fail_malloc_at = {}, set(), 0, fail_malloc_at

    def _alloc(self, n):
        buf = ctypes.create_string_buffer(n)
        self.mem[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def cudaSetDevice(self, index):
        return (0,)

    def cudaStreamCreate(self):
        self.streams.add(7)
        return 0, 7

    def cudaMallocHost(self, n):
        return self._alloc(n)

    def cudaMalloc(self, n):
        self.mallocs += 1
        return (2, None) if self.mallocs == self.fail_malloc_at else self._alloc(n)

    def cudaGetErrorName(self, err):
        return 0, b"cudaErrorMemoryAllocation"

    def cudaGetErrorString(self, err):
        return 0, b"out of memory"

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        assert stream in self.streams
        ctypes.memmove(dst, src, n)
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaFree(self, ptr):
        del self.mem[ptr]
        return (0,)

    cudaFreeHost = cudaFree

    def cudaStreamDestroy(self, stream):
        self.streams.remove(stream)
        return (0,)


class FakeContext:
    """execute_async_v3 writes logits = 2 * the first 5 input values of each image."""

    def __init__(self):
        self.addresses, self.shape, self.runs = {}, None, 0

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def set_input_shape(self, name, shape):
        self.shape = shape
        return True

    def execute_async_v3(self, stream):
        b, n_in = self.shape[0], int(np.prod(self.shape[1:]))
        x = np.ctypeslib.as_array(ctypes.cast(self.addresses["images"], ctypes.POINTER(ctypes.c_float)), (b, n_in))
        out = np.ctypeslib.as_array(ctypes.cast(self.addresses["logits"], ctypes.POINTER(ctypes.c_float)), (b, 5))
        out[:] = 2 * x[:, :5]
        self.runs += 1
        return True


class FakeEngine:
    num_io_tensors, device_memory_size_v2 = 2, 12345

    def get_tensor_name(self, i):
        return ["images", "logits"][i]

    def get_tensor_profile_shape(self, name, profile):
        return (2, 3, 32, 32), (4, 3, 32, 32), (4, 3, 32, 32)  # min batch 2: a single image is padded

    def get_tensor_dtype(self, name):
        return np.float32

    def get_tensor_shape(self, name):
        return (-1, 5)

    def create_execution_context(self):
        return FakeContext()


@pytest.fixture
def fake_gpu(engine, rtx, monkeypatch):
    """The real sidecar checks on a real engine file, then a fake TensorRT runtime and CUDA."""
    class Logger:
        ERROR = 0

        def __init__(self, level):
            pass

    class Runtime:  # no get_engine_validity: as in older TensorRT
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            return FakeEngine()

    cudart = FakeCudart()
    fake_trt = SimpleNamespace(__version__=rtx.__version__, nptype=lambda d: d, Logger=Logger, Runtime=Runtime)
    monkeypatch.setattr(runner, "import_tensorrt", lambda flavor: fake_trt)
    monkeypatch.setattr(runner, "import_cudart", lambda: cudart)
    monkeypatch.setattr(runner, "cuda_device", lambda index=0: CudaDevice(0, "NVIDIA GeForce RTX 4090", "8.9"))
    return engine, cudart


def test_predictor_public_api(fake_gpu):
    engine, cudart = fake_gpu
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32), dtype=np.float32)
    with TensorRTPredictor(engine) as p:
        assert p.stream == 7 and p.activation_bytes == 12345
        assert p.io_bytes == 4 * 3 * 32 * 32 * 4 + 4 * 5 * 4  # input + output buffers for the largest batch
        with pytest.raises(UsageError, match=r"call load\(batch\) first"):
            p.execute()
        np.testing.assert_array_equal(p.infer(x), 2 * x.reshape(5, -1)[:, :5])  # 4 + 1 (padded to 2)
        assert p.load(x[:1]) == 2 and p.context.shape == (2, 3, 32, 32)
        runs = p.context.runs
        p.execute()
        p.execute()
        assert p.context.runs == runs + 2
        assert p.load(x[:3]) == 3
        with pytest.raises(UsageError, match="1..4 images"):
            p.load(x)
        with pytest.raises(UsageError, match=r"engine input is \[N, 3, 32, 32\]"):
            p.infer(x[:, :, :16])
    assert not cudart.mem and not cudart.streams  # every buffer and the stream freed
    p.close()  # idempotent
    with pytest.raises(UsageError, match="closed"):
        p.execute()
    with pytest.raises(UsageError, match="closed"):
        p.infer(x)
    assert p.io_bytes == 0


def test_predictor_frees_what_it_allocated_when_opening_fails(fake_gpu, monkeypatch):
    engine, _ = fake_gpu
    cudart = FakeCudart(fail_malloc_at=2)  # the output buffer's device allocation fails
    monkeypatch.setattr(runner, "import_cudart", lambda: cudart)
    with pytest.raises(RuntimeSetupError, match="CUDA error during cudaMalloc: cudaErrorMemoryAllocation"):
        TensorRTPredictor(engine)
    assert not cudart.mem and not cudart.streams


def test_cuda_check_is_public():
    assert runner.cuda_check(FakeCudart(), (0, 5), "x") == 5
    with pytest.raises(RuntimeSetupError, match="CUDA error during x: cudaErrorMemoryAllocation"):
        runner.cuda_check(FakeCudart(), (2, None), "x")


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


def test_exporter_module_imports_no_torch():
    code = "import sys, vfpt_deploy.exporters.tensorrt; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    # nor does asking for the build GPU (cuda-python's runtime answers; torch only if already loaded)
    code = ("import sys; from vfpt_deploy.exporters.tensorrt import builder_gpu; builder_gpu(); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- ViT-B/16 (slow)

@pytest.mark.slow
def test_rtx_builds_vit_b16(rtx, tmp_path):
    """The real size: ViT-B/16 with 10 deep prompts, kv fold, fp16 graph (fp32 + cast + optimize: ~20 s, ~3 GB
    peak on 2 cores; the engine build itself takes ~2 s). fp32 and the tokens fold are covered on the tiny ViT."""
    from vfpt_deploy.models.backbone import create_backbone
    from vfpt_deploy.models.config import VFPTConfig
    from vfpt_deploy.models.vit.model import VFPTViT

    torch.manual_seed(0)
    model = VFPTViT(create_backbone("vit_base_patch16_224"), 10, VFPTConfig(num_prompts=10, alpha=0.5)).eval()
    meta = {"classes": [str(i) for i in range(10)], "preprocess": {"resize": [224, 224]}}
    onnx_path = export_module(fold_model(model, "kv"), tmp_path / "b16.onnx", image_size=(224, 224),
                              precision="fp16", metadata=meta).path
    res = build_engine(onnx_path, tmp_path / "b16.engine", RTX(precision="fp16", max_batch=8))
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
    from vfpt_deploy.artifacts.checkpoint import BackboneInfo, load_run, save_run
    from vfpt_deploy.exporters.onnx import export_onnx
    from vfpt_deploy.runtime.preprocess import Preprocess
    from vfpt_deploy.verify import verify_artifact

    model = tiny_model(deep=True, alpha=0.5, num_prompts=4, scale=20.0)
    save_run(tmp_path / "run.pt", model, BackboneInfo(TINY, dict(TINY_KWARGS)), META["classes"],
             Preprocess(resize=[32, 32]))
    run = load_run(tmp_path / "run.pt")
    onnx_path = export_onnx(run, tmp_path / "m.onnx", fold="kv", precision=precision).path
    settings = BuildSettings(flavor=flavor, precision=precision, max_batch=8,
                             timing_cache=tmp_path / "tc.bin" if flavor == "trt" else None)
    res = build_engine(onnx_path, tmp_path / "m.engine", settings)
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
