"""INT8 export: dynamic and static quantization of a tiny run, verified with the int8 tolerances; a badly
quantized artifact fails the gate; calibration is deterministic; the TensorRT Q/DQ profile parses and
builds with TensorRT-RTX (CPU); metadata records the quantization."""
import dataclasses
import importlib.util
import json
from collections import Counter

import numpy as np
import onnx
import pytest
from PIL import Image

from vfpt_deploy.calibration import calibration_set
from vfpt_deploy.errors import RuntimeSetupError, UsageError
from vfpt_deploy.pipeline import ExportSettings, export_run
from vfpt_deploy.artifacts.schema import read_graph
from vfpt_deploy.verify import Tolerances, compare, verify_artifact


def _images(folder, n, seed, constant=False):
    """Smooth, image-like pictures (gradients, blobs and mild noise), or constant grey ones."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    for i in range(n):
        if constant:
            a = np.full((32, 32, 3), 128.0)
        else:
            c = rng.uniform(0, 1, (4, 3))
            blob = np.exp(-((xx - c[3, 0]) ** 2 + (yy - c[3, 1]) ** 2) * 20)[..., None]
            a = 255 * np.clip(c[0] * xx[..., None] + c[1] * yy[..., None] * 0.5 + c[2] * blob
                              + rng.normal(0, 0.03, (32, 32, 3)), 0, 1)
        Image.fromarray(a.astype(np.uint8)).save(folder / f"img{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("int8data")
    return {"val": _images(d / "val", 50, seed=1), "calib": _images(d / "calib", 40, seed=2),
            "constant": _images(d / "constant", 8, seed=3, constant=True)}


def _export(run, tmp_path, folders, name, **kw):
    settings = ExportSettings(precision="int8", data=str(folders["val"]), **kw)
    return export_run(run, settings, tmp_path / name)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_export_passes_the_int8_gate(exported_run, tmp_path, folders, mode):
    run, _ = exported_run
    kw = {"quantize": mode} if mode == "dynamic" else {"quantize": mode, "calib": str(folders["calib"])}
    out = _export(run, tmp_path, folders, f"{mode}.onnx", **kw)
    assert out.passed, out.report.to_json()
    assert out.written and (tmp_path / f"{mode}.onnx").is_file()
    facts = read_graph(tmp_path / f"{mode}.onnx")
    assert facts.precision == "int8" and out.report.precision == "int8"
    assert out.report.tolerances == Tolerances.for_precision("int8").describe()
    q = facts.metadata["quantization"]
    assert facts.metadata["precision"] == "int8" and q["mode"] == mode
    assert "LayerNormalization" in q["kept_float"]["op_types"] and "Softmax" in q["kept_float"]["op_types"]
    assert q["kept_float"]["nodes"]["head"] and q["kept_float"]["nodes"]["attention"]
    if mode == "static":
        assert {"DequantizeLinear", "QuantizeLinear"} <= facts.ops
        assert q["calibration"]["count"] == 40 and len(q["calibration"]["sample_sha256"]) == 64
    else:
        assert "MatMulInteger" in facts.ops and q["calibration"] is None
    real = [c for c in out.report.comparisons if c.gated]
    assert real and real[0].samples == 50 and real[0].min_cosine >= 0.99
    assert out.report.quantization["mode"] == mode
    assert out.onnx.precision == "int8" and out.onnx.size_bytes == (tmp_path / f"{mode}.onnx").stat().st_size


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_what_stays_float_is_float(exported_run, tmp_path, folders, mode):
    """The recorded float nodes really are float: the head stays a Gemm (the dynamic quantizer renames a Gemm
    it rewrites, which once slipped past the exclusion list and quantized the head); the patch embedding Conv
    stays float; every block's qkv, proj, fc1, fc2 is int8; static Q/DQ quantizes the linear layers' inputs,
    not their outputs."""
    run, _ = exported_run  # TINY: 3 blocks
    kw = {"quantize": mode} if mode == "dynamic" else {"quantize": mode, "calib": str(folders["calib"])}
    assert _export(run, tmp_path, folders, "q.onnx", **kw).passed
    model = onnx.load(str(tmp_path / "q.onnx"))
    q = read_graph(tmp_path / "q.onnx").metadata["quantization"]
    ops = Counter(n.op_type for n in model.graph.node)
    head = q["kept_float"]["nodes"]["head"][0]  # the dynamic quantizer rewrites it to '<head>_MatMul' + Add
    assert [n.op_type for n in model.graph.node if n.name in (head, f"{head}_MatMul")] in (["Gemm"], ["MatMul"])
    assert ops["Conv"] == 1 and q["kept_float"]["nodes"]["patch"] == [n.name for n in model.graph.node
                                                                      if n.op_type == "Conv"]
    assert q["quantized"]["nodes"] == 12  # 3 blocks x (qkv, proj, fc1, fc2)
    if mode == "dynamic":
        assert ops["MatMulInteger"] == 12 and "ConvInteger" not in ops
    else:
        producers = {o: n for n in model.graph.node for o in n.output}
        quantized = [producers.get(n.input[0]) for n in model.graph.node if n.op_type == "QuantizeLinear"]
        assert len(quantized) == 12 and not [p for p in quantized if p is not None and p.op_type in ("MatMul", "Conv")]


@pytest.fixture
def pixels_quantized(monkeypatch):
    """The recipe with the patch embedding quantized too: the pixels get the calibrated range, so a bad
    calibration set does real harm (with it float, constant calibration images still passed on TINY: the
    LayerNorm outputs that the other layers see have similar ranges for any image)."""
    original = ExportSettings.quant_spec
    monkeypatch.setattr(ExportSettings, "quant_spec",
                        lambda self: original(self) and dataclasses.replace(original(self), keep_patch=False))


def test_constant_calibration_fails_the_gate_and_writes_nothing(exported_run, tmp_path, folders, pixels_quantized):
    """Calibrated on constant images, the activation ranges collapse: real images saturate."""
    run, _ = exported_run
    out = _export(run, tmp_path, folders, "bad.onnx", quantize="static", calib=str(folders["constant"]))
    assert not out.passed and out.written == []
    assert not (tmp_path / "bad.onnx").exists()
    failed = [c for c in out.report.comparisons if c.failures]
    assert failed and failed[0].gated and any("cosine" in f for f in failed[0].failures)


def test_a_broken_scale_fails_the_gate(exported_run, tmp_path, folders):
    run, _ = exported_run
    assert _export(run, tmp_path, folders, "good.onnx", quantize="static", calib=str(folders["calib"])).passed
    model = onnx.load(str(tmp_path / "good.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
              and onnx.numpy_helper.to_array(inits[n.input[0]]).dtype == np.int8)  # a weight's scale
    scale = inits[dq.input[1]]
    scale.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(scale) * 50, scale.name))
    onnx.save(model, str(tmp_path / "broken.onnx"))
    report = verify_artifact(tmp_path / "broken.onnx", run, data=str(folders["val"]))
    assert not report.passed


def test_random_inputs_are_reported_not_gated_for_int8():
    ref = np.random.default_rng(0).normal(size=(8, 5))
    bad = -ref
    tol = Tolerances.for_precision("int8")
    assert compare(ref, bad, tol, "noise", gated=False).failures == []
    assert compare(ref, bad, tol, "images").failures
    nan = bad.copy()
    nan[0, 0] = np.nan
    assert compare(ref, nan, tol, "noise", gated=False).failures  # non-finite still fails


def test_top1_drop_gate():
    labels = np.arange(10) % 5
    ref = np.eye(5)[labels] * 5.0
    out = ref.copy()
    out[0] = np.eye(5)[(labels[0] + 1) % 5] * 5.0  # one image wrong: 10 points, 90% agreement
    c = compare(ref, out, Tolerances(min_agreement=0, max_top1_drop=5.0), "x", labels)
    assert c.ref_top1 == 100.0 and c.artifact_top1 == 90.0
    assert any("points below" in f for f in c.failures)
    assert not compare(ref, out, Tolerances(min_agreement=0, max_top1_drop=10.0), "x", labels).failures


def test_int8_gate_needs_real_images(exported_run, tmp_path):
    run, _ = exported_run
    out = export_run(run, ExportSettings(precision="int8", quantize="dynamic"), tmp_path / "d.onnx")
    assert not out.passed and any("real images" in p for p in out.report.problems)


def test_fp32_graph_claiming_int8_is_gated_as_fp32(exported_run, tmp_path):
    run, onnx_path = exported_run
    model = onnx.load(str(onnx_path))
    for p in model.metadata_props:
        if p.key == "vfpt.precision":
            p.value = json.dumps("int8")
    onnx.save(model, str(tmp_path / "claims.onnx"))
    report = verify_artifact(tmp_path / "claims.onnx", run)
    assert report.precision == "fp32" and any("metadata says int8" in p for p in report.problems)


def test_calibration_sample_is_deterministic(exported_run, folders, tmp_path):
    run, _ = exported_run
    a, b = calibration_set(run, str(folders["calib"]), 10), calibration_set(run, str(folders["calib"]), 10)
    assert a.info == b.info and np.array_equal(a.x, b.x) and a.x.shape == (10, 3, 32, 32)
    assert a.info["count"] == 10 and a.info["of"] == 40 and a.info["split"] == "all"
    assert calibration_set(run, str(folders["calib"]), 10, seed=1).info["sample_sha256"] != a.info["sample_sha256"]
    # the run's own preprocessing: mean/std 0.5 maps pixels into [-1, 1]
    assert -1.0 <= a.x.min() < -0.5 and a.x.max() <= 1.0
    builtin = calibration_set(run, "builtin:digits", 5)
    assert builtin.info["split"] == "train" and builtin.info["count"] == 5
    (tmp_path / "ds" / "train").mkdir(parents=True)
    _images(tmp_path / "ds" / "train" / "a", 3, seed=4)
    assert calibration_set(run, str(tmp_path / "ds"), 100).info == {**calibration_set(
        run, str(tmp_path / "ds"), 100).info, "split": "train", "count": 3}


@pytest.mark.parametrize("kw, match", [
    ({"precision": "fp32", "quantize": "static"}, "int8 only"),
    ({"precision": "int8", "format": "trt-rtx", "quantize": "dynamic"}, "TensorRT cannot run dynamic"),
    ({"precision": "int8", "quantize": "dynamic", "calib": "builtin"}, "needs no calibration"),
    ({"precision": "int8", "quantize": "static", "calib_samples": 0}, "calib-samples"),
])
def test_bad_int8_settings_are_refused(kw, match):
    with pytest.raises(UsageError, match=match):
        ExportSettings(**kw).check()


def test_static_without_calibration_images_is_refused_before_work(exported_run, tmp_path):
    run, _ = exported_run  # a run with no recorded built-in training data
    with pytest.raises(UsageError, match="needs calibration images"):
        export_run(run, ExportSettings(precision="int8", quantize="static"), tmp_path / "s.onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(importlib.util.find_spec("modelopt") is not None, reason="ModelOpt is installed here")
def test_modelopt_missing_names_the_extra(exported_run, tmp_path):
    run, _ = exported_run
    with pytest.raises(RuntimeSetupError, match=r"pip install '\.\[modelopt\]' in the vfpt-deploy checkout"):
        export_run(run, ExportSettings(precision="int8", quantize="modelopt", calib="builtin"), tmp_path / "m.onnx")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="needs tensorrt-rtx-cu12")
def test_static_qdq_for_tensorrt_parses_and_builds_with_trt_rtx(exported_run, tmp_path, folders):
    """The TensorRT profile (symmetric int8, float biases, Q/DQ around MatMul/Gemm/Conv) parses and builds
    on the CPU; the engine cannot run here, so the ONNX it was built from is verified."""
    run, _ = exported_run
    settings = ExportSettings(format="trt-rtx", precision="int8", calib=str(folders["calib"]),
                              data=str(folders["val"]))
    out = export_run(run, settings, tmp_path / "m.engine")
    assert out.engine is not None and out.engine.engine_bytes > 0
    assert out.passed, out.report.to_json()
    model = onnx.load(str(tmp_path / "m.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    assert not any(v.dtype == np.int32 for v in inits.values())  # no int32 biases
    side = json.loads((tmp_path / "m.engine.json").read_text())
    assert side["precision"] == "int8" and side["metadata"]["quantization"]["target"] == "tensorrt"
    # the engine's sidecar carries the golden set of the ONNX it was built from, with the int8 gate
    golden = side["metadata"]["golden"]
    assert golden["precision"] == "int8" and golden["tolerances"]["min_cosine"] == 0.99
    assert golden["sha256"] == read_graph(tmp_path / "m.onnx").metadata["golden"]["sha256"]


def test_cli_export_int8_static(exported_run, tmp_path, folders, pixels_quantized):
    from typer.testing import CliRunner

    from vfpt_deploy.cli import app

    run, _ = exported_run
    args = ["export", "--ckpt", str(run.path), "--out", str(tmp_path / "q.onnx"), "--precision", "int8",
            "--quantize", "static", "--calib", str(folders["calib"]), "--calib-samples", "12",
            "--data", str(folders["val"]), "--threads", "1"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "int8" in res.output and "real images only" in res.output
    q = read_graph(tmp_path / "q.onnx").metadata["quantization"]
    assert q["calibration"]["count"] == 12 and q["calibration"]["source"] == str(folders["calib"])
    bad = CliRunner().invoke(app, args[:-6] + ["--calib", str(folders["constant"]), "--data", str(folders["val"])])
    assert bad.exit_code == 1 and "outside tolerance" in bad.output
    assert read_graph(tmp_path / "q.onnx").metadata["quantization"]["calibration"]["count"] == 12  # kept
    refused = CliRunner().invoke(app, args[:7] + ["--quantize", "dynamic", "--calib", "builtin"])
    assert refused.exit_code == 2 and "needs no calibration" in refused.output


@pytest.mark.skipif(importlib.util.find_spec("modelopt") is None or importlib.util.find_spec("tensorrt_rtx") is None,
                    reason="needs the modelopt extra and tensorrt-rtx-cu12")
def test_modelopt_qdq_builds_with_trt_rtx(exported_run, tmp_path, folders):
    run, _ = exported_run
    settings = ExportSettings(format="trt-rtx", precision="int8", quantize="modelopt", calib=str(folders["calib"]),
                              data=str(folders["val"]))
    out = export_run(run, settings, tmp_path / "mo.engine")
    assert out.passed and out.engine.engine_bytes > 0
    assert read_graph(tmp_path / "mo.onnx").metadata["quantization"]["tool"].startswith("nvidia-modelopt")


# -- the same int8 model on every x86-64 CPU (issue 19) ---------------------------------------------------
# onnxruntime multiplies uint8 activations by int8 weights with AVX2's vpmaddubsw, which adds two products
# into an int16: 2 x 255 x |w| must stay <= 32767, i.e. |w| <= 64. VNNI does not saturate, so a test of
# the logits alone passes on a VNNI CPU whatever the weights: these tests check the written numbers.
INT16_MAX = 32767


def _integer_weights(model):
    """name -> int array of every initializer an integer matmul reads (directly or through Q/DQ)."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    reads = {"MatMulInteger": 1, "DynamicQuantizeMatMul": 1, "MatMulIntegerToFloat": 1, "QLinearMatMul": 3,
             "ConvInteger": 1, "QLinearConv": 3, "DequantizeLinear": 0}
    return {n.input[reads[n.op_type]]: inits[n.input[reads[n.op_type]]] for n in model.graph.node
            if n.op_type in reads and n.input[reads[n.op_type]] in inits
            and inits[n.input[reads[n.op_type]]].dtype in (np.int8, np.uint8)}


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_written_int8_cannot_saturate_on_any_x86_cpu(exported_run, tmp_path, folders, mode):
    """CPU-independent: every weight of the 12 quantized linear layers is int8 in [-64, 64] and the activations
    are uint8, so no pair of products can leave int16 on AVX2; the metadata says so."""
    run, _ = exported_run
    kw = {"quantize": mode} if mode == "dynamic" else {"quantize": mode, "calib": str(folders["calib"])}
    assert _export(run, tmp_path, folders, "q.onnx", **kw).passed
    model = onnx.load(str(tmp_path / "q.onnx"))
    weights = _integer_weights(model)
    assert len(weights) == 12 and all(w.dtype == np.int8 for w in weights.values())
    widest = max(int(np.abs(w.astype(np.int32)).max()) for w in weights.values())
    assert 2 * 255 * widest <= INT16_MAX, f"|w| up to {widest}: AVX2's int16 pair sums can saturate"
    assert widest >= 60  # the 7-bit range is used, not a collapsed scale
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    if mode == "dynamic":  # activations: DynamicQuantizeLinear makes uint8
        assert "DynamicQuantizeLinear" in {n.op_type for n in model.graph.node}
    else:
        zps = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
        assert len(zps) == 12 and all(z.dtype == np.uint8 for z in zps)
    cpu = read_graph(tmp_path / "q.onnx").metadata["quantization"]["cpu"]
    assert cpu["form"] == "int7" and cpu["needs_one_of"] == [] and "every x86-64 CPU" in cpu["saturation_free_on"]


def test_an_int7_record_over_full_range_weights_is_refused(exported_run, tmp_path, monkeypatch):
    """If onnxruntime's quantizer stopped honouring reduce_range, the exporter refuses the file rather than
    promise a saturation-free form it did not write."""
    import onnxruntime.quantization as oq

    from vfpt_deploy.errors import VFPTError
    from vfpt_deploy.exporters.quantize import QuantizeSpec, quantize_onnx, saturation_problems

    real = oq.quantize_dynamic
    monkeypatch.setattr(oq, "quantize_dynamic", lambda *a, **k: real(*a, **{**k, "reduce_range": False}))
    _, onnx_path = exported_run
    with pytest.raises(VFPTError, match=r"not the int7 form.*outside the int7 form's int8 \[-64, 64\]"):
        quantize_onnx(onnx_path, tmp_path / "full.onnx", QuantizeSpec(mode="dynamic"))
    monkeypatch.setattr(oq, "quantize_dynamic", real)
    full = quantize_onnx(onnx_path, tmp_path / "s8.onnx", QuantizeSpec(mode="dynamic", weights="int8"))
    assert full.info["cpu"]["needs_one_of"] == ["avx512_vnni", "avx_vnni", "amx_int8"]
    assert saturation_problems(onnx.load(str(full.path)), "int7") and not saturation_problems(
        onnx.load(str(full.path)), "int8")


AVX2_ONLY = {"model": "AMD EPYC 7B13", "arch": "x86_64", "isa": ["avx2", "fma"], "cores": 2}
VNNI_CPU = {"model": "Intel Xeon", "arch": "x86_64", "isa": ["avx2", "fma", "avx512f", "avx512_vnni"], "cores": 2}


@pytest.mark.parametrize("cpu, quantization, providers, expect", [
    (AVX2_ONLY, {"mode": "dynamic"}, None, "has none of them"),  # written before the form was recorded
    (AVX2_ONLY, {"mode": "static", "cpu": {"form": "int8"}}, ["CPUExecutionProvider"], "re-export"),
    (AVX2_ONLY, {"mode": "static", "target": "tensorrt", "cpu": {"form": "int8"}}, None, "TensorRT engine"),
    (AVX2_ONLY, {"mode": "dynamic", "cpu": {"form": "nonsense", "needs_one_of": []}}, None, "has none"),
    ({**AVX2_ONLY, "isa": []}, {"mode": "dynamic"}, None, "could not be read"),
    (AVX2_ONLY, {"mode": "dynamic", "cpu": {"form": "int7", "needs_one_of": ["avx512_vnni"]}}, None, None),
    (AVX2_ONLY, {"mode": "static", "cpu": {"form": "uint8"}}, None, None),
    (AVX2_ONLY, {"mode": "dynamic"}, ["CUDAExecutionProvider", "CPUExecutionProvider"], None),
    (VNNI_CPU, {"mode": "dynamic"}, None, None),
    ({**AVX2_ONLY, "isa": ["avx2", "avx_vnni"]}, {"mode": "dynamic"}, None, None),
    ({**AVX2_ONLY, "arch": "aarch64", "isa": ["asimd"]}, {"mode": "dynamic"}, None, None),
    (AVX2_ONLY, None, None, None),
    (AVX2_ONLY, "crafted", None, None),
])
def test_int8_isa_note(monkeypatch, cpu, quantization, providers, expect):
    from vfpt_deploy.runtime import hardware

    monkeypatch.setattr(hardware, "cpu", lambda: cpu)
    note = hardware.int8_isa_note(quantization, providers)
    if expect is None:
        assert note is None
    else:
        assert expect in note and "\n" not in note and "avx512_vnni, avx_vnni, amx_int8" in note


def test_predict_and_verify_say_when_the_int8_form_can_saturate_here(exported_run, tmp_path, folders, monkeypatch):
    """An int8 artifact that records no form (written before it was recorded: full-range int8 weights) on an
    AVX2-only CPU: predict and verify say so in one line; the current form says nothing."""
    from typer.testing import CliRunner

    from vfpt_deploy.cli import app
    from vfpt_deploy.runtime import hardware

    run, _ = exported_run
    assert _export(run, tmp_path, folders, "new.onnx", quantize="dynamic").passed
    model = onnx.load(str(tmp_path / "new.onnx"))
    for p in model.metadata_props:
        if p.key == "vfpt.quantization":
            p.value = json.dumps({k: v for k, v in json.loads(p.value).items() if k != "cpu"})
    onnx.save(model, str(tmp_path / "old.onnx"))
    image = str(next(folders["val"].iterdir()))
    monkeypatch.setattr(hardware, "cpu", lambda: AVX2_ONLY)
    res = CliRunner().invoke(app, ["predict", str(tmp_path / "old.onnx"), image, "--json"])
    assert res.exit_code == 0, res.output
    notes = [line for line in res.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "none of them" in notes[0] and "avx512_vnni" in notes[0]
    assert "note:" not in CliRunner().invoke(app, ["predict", str(tmp_path / "new.onnx"), image]).output
    shown = CliRunner().invoke(app, ["inspect", str(tmp_path / "old.onnx")], terminal_width=400).output
    assert "int8 on this CPU" in shown and "full-range int8 weights" in shown
    shown = CliRunner().invoke(app, ["inspect", str(tmp_path / "new.onnx")], terminal_width=400).output
    assert "int8 on this CPU" not in shown and "saturation-free on every x86-64 CPU" in shown
    report = verify_artifact(tmp_path / "old.onnx", run, data=str(folders["val"]))
    assert len(report.notes) == 1 and "saturate" in report.notes[0]
    from vfpt_deploy.runtime.selfcheck import verify_golden

    replayed = verify_golden(tmp_path / "old.onnx")  # verify without --ckpt: the golden set, torch-free
    assert replayed.passed and [n for n in replayed.notes if "saturate" in n]
    monkeypatch.setattr(hardware, "cpu", lambda: VNNI_CPU)
    assert not verify_artifact(tmp_path / "old.onnx", run, data=str(folders["val"])).notes
    assert _served_notes(tmp_path / "old.onnx") == []  # a VNNI CPU: nothing to say
    monkeypatch.setattr(hardware, "cpu", lambda: AVX2_ONLY)
    assert [n for n in _served_notes(tmp_path / "old.onnx") if "none of them" in n] and not _served_notes(
        tmp_path / "new.onnx")


def _served_notes(path) -> list[str]:
    """What the server logs while it loads `path` as a model (MLServer's logger)."""
    import asyncio
    import logging

    pytest.importorskip("mlserver")
    from mlserver.settings import ModelSettings

    from vfpt_deploy.runtime.serving import VFPTModel

    lines = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: lines.append(record.getMessage())
    log = logging.getLogger("mlserver")
    log.addHandler(handler)
    try:
        model = VFPTModel(ModelSettings(name="m", implementation=VFPTModel, parameters={
            "uri": str(path), "extra": {"threads": 1, "providers": ["cpu"]}}))
        assert asyncio.run(model.load())
        asyncio.run(model.unload())
    finally:
        log.removeHandler(handler)
    return [line for line in lines if "int8" in line]
