"""Golden sets: every export carries a few inputs and the unfolded model's logits for them, and `verify
ARTIFACT` (no --ckpt) replays them on this machine without PyTorch. A tampered golden logit or weight fails in
one line; a crafted golden record is refused in one line; the record is small and names where it came from."""
import base64
import hashlib
import io
import json
import zipfile

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image
from typer.testing import CliRunner

from vfpt_deploy.artifacts import golden as golden_mod
from vfpt_deploy.cli import app
from vfpt_deploy.errors import ArtifactError
from vfpt_deploy.pipeline import ExportSettings, export_run
from vfpt_deploy.runtime import open_predictor
from vfpt_deploy.runtime.selfcheck import golden_report_path, self_check, verify_golden
from vfpt_deploy.artifacts.schema import read_graph

from test_lean_install import cli_without, one_error_line


@pytest.fixture(scope="module")
def flat_images(tmp_path_factory):
    """A folder of 12 images without class subfolders (no labels), varied enough to give varied logits."""
    d = tmp_path_factory.mktemp("flat")
    rng = np.random.default_rng(3)
    for i in range(12):
        base = rng.integers(0, 256, 3)
        a = np.clip(base + rng.integers(-60, 60, (36, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(d / f"{i}.png")
    return d


@pytest.fixture(scope="module")
def exported(exported_run, flat_images, tmp_path_factory):
    """The tiny run exported through the pipeline (fp32, verified on random inputs and the images)."""
    run, _ = exported_run
    d = tmp_path_factory.mktemp("golden")
    out = export_run(run, ExportSettings(data=str(flat_images), num_random=8), d / "g.onnx")
    assert out.passed, out.report.to_json()
    return run, d / "g.onnx"


def _meta(path):
    return read_graph(path).metadata


def _rewrite(src, dst, fn):
    """Copy an ONNX file, letting fn change its ModelProto."""
    model = onnx.load(str(src))
    fn(model)
    onnx.save(model, str(dst))
    return dst


def _set_golden(model, record):
    for p in model.metadata_props:
        if p.key == "vfpt.golden":
            p.value = json.dumps(record)


def _with_payload(record, arrays, fix_sha=True):
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    raw = buf.getvalue()
    return {**record, "payload": base64.b64encode(raw).decode(),
            "sha256": hashlib.sha256(raw).hexdigest() if fix_sha else record["sha256"]}


def _arrays(record):
    raw = base64.b64decode(record["payload"])
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_export_writes_a_small_golden_set_that_names_its_reference(exported):
    run, path = exported
    record = _meta(path)["golden"]
    assert record["format"] == "vfpt-deploy.golden" and record["precision"] == "fp32"
    whats = [s["what"] for s in record["sets"]]
    assert len(whats) == 2 and whats[0].startswith("2 of random") and whats[1].startswith("4 of ")
    hw = record["reference"]["hardware"]
    assert hw["cpu"]["model"] and isinstance(hw["cpu"]["isa"], list) and "torch" in hw["libraries"]
    a = _arrays(record)
    assert a["x"].dtype == np.float16 and a["x"].shape == (6, 3, 32, 32) and a["logits"].shape == (6, 4)
    # the reference is the unfolded model on exactly the stored (float16) inputs
    from vfpt_deploy.verify import reference_logits

    np.testing.assert_array_equal(reference_logits(run, a["x"].astype(np.float32)), a["logits"])
    assert record["tolerances"]["atol"] == 1e-4


def test_verify_without_ckpt_replays_the_golden_set(exported, tmp_path):
    _, path = exported
    full_report = path.with_name(path.name + ".verify.json")
    before = full_report.read_bytes()
    res = CliRunner().invoke(app, ["verify", str(path)])
    assert res.exit_code == 0, res.output
    assert "golden set" in res.output and "ran on:" in res.output
    saved = json.loads(golden_report_path(path).read_text())
    assert saved["passed"] and saved["hardware"]["cpu"]["isa"] is not None
    assert saved["golden_sha256"] == _meta(path)["golden"]["sha256"]
    assert [c["inputs"].startswith("golden: ") for c in saved["comparisons"]] == [True, True]
    assert full_report.read_bytes() == before  # the report against the checkpoint is never replaced


def test_torch_free_verify_runs_without_torch(exported, tmp_path):
    """In a process where torch and timm cannot be imported, verify ARTIFACT still replays and passes."""
    _, path = exported
    res = cli_without("torch,timm", "verify", path, "--report", tmp_path / "r.json", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads((tmp_path / "r.json").read_text())["passed"]


def test_a_tampered_golden_logit_fails_in_one_line(exported, tmp_path):
    _, path = exported
    record = _meta(path)["golden"]
    a = _arrays(record)
    a["logits"][3, 1] += 0.01  # one logit of one image
    bad = _rewrite(path, tmp_path / "logit.onnx", lambda m: _set_golden(m, _with_payload(record, a)))
    rep = verify_golden(bad)
    assert not rep.passed
    assert [f for c in rep.comparisons for f in c.failures] == ["max |diff| 0.01 > atol 0.0001"]
    res = CliRunner().invoke(app, ["verify", str(bad)])
    assert res.exit_code == 1 and "outside tolerance" in res.output
    # the same change without its sha256: the record says it was altered
    unsigned = _rewrite(path, tmp_path / "unsigned.onnx", lambda m: _set_golden(m, _with_payload(record, a, False)))
    with pytest.raises(ArtifactError, match="sha256 does not match its data: it was altered"):
        verify_golden(unsigned)


def test_a_tampered_weight_fails_the_replay(exported, tmp_path):
    _, path = exported

    def nudge(model):
        init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)) if len(t.dims) == 2 else 0)
        w = numpy_helper.to_array(init).copy()
        w.flat[0] += 0.05
        init.CopyFrom(numpy_helper.from_array(w, init.name))

    bad = _rewrite(path, tmp_path / "weight.onnx", nudge)
    res = cli_without("torch,timm", "verify", bad, cwd=tmp_path)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "outside tolerance" in res.stderr and "FAIL: max |diff|" in res.stdout


def test_verify_with_ckpt_checks_the_golden_set_against_the_checkpoint(exported, exported_run, tmp_path):
    run, path = exported
    rep_ok = __import__("vfpt_deploy.verify", fromlist=["x"]).verify_artifact(path, run, num_random=2,
                                                                             report_path=tmp_path / "ok.json")
    assert rep_ok.passed and rep_ok.golden_sha256 and any(c.inputs.startswith("golden: ") for c in rep_ok.comparisons)
    record = _meta(path)["golden"]
    a = _arrays(record)
    a["logits"] = a["logits"] + 0.5  # a golden set that is not this checkpoint's (consistent with itself)
    bad = _rewrite(path, tmp_path / "other.onnx", lambda m: _set_golden(m, _with_payload(record, a)))
    from vfpt_deploy.verify import verify_artifact

    rep = verify_artifact(bad, run, num_random=2, report_path=tmp_path / "bad.json")
    assert not rep.passed and any("is not this checkpoint's model" in p for p in rep.problems)


def _crafted(record, a):
    big = io.BytesIO()
    with zipfile.ZipFile(big, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", b"\0" * (300 * 2**20))  # 300 MiB of zeros: a few hundred KiB packed
    return {
        "not base64": {**record, "payload": "!!!"},
        "a pickle": _with_payload(record, {**a, "labels": np.array([object()] * 6, dtype=object)}),
        "wrong dtype": _with_payload(record, {**a, "x": a["x"].astype(np.float64)}),
        "wrong shape": _with_payload(record, {**a, "x": a["x"][:, :, :16]}),
        "non-finite": _with_payload(record, {**a, "logits": np.full_like(a["logits"], np.nan)}),
        "bomb": {**record, "payload": base64.b64encode(big.getvalue()).decode(),
                 "sha256": hashlib.sha256(big.getvalue()).hexdigest()},
        "loose rows": {**record, "sets": [{**record["sets"][0], "stop": 99}]},
        "bad tolerances": {**record, "tolerances": {"atol": -1}},
        "unknown version": {**record, "version": 99},
    }


@pytest.mark.parametrize("case", ["not base64", "a pickle", "wrong dtype", "wrong shape", "non-finite", "bomb",
                                  "loose rows", "bad tolerances", "unknown version"])
def test_crafted_golden_records_are_refused_in_one_line(exported, tmp_path, case):
    _, path = exported
    record = _meta(path)["golden"]
    crafted = _crafted(record, _arrays(record))[case]
    bad = _rewrite(path, tmp_path / "crafted.onnx", lambda m: _set_golden(m, crafted))
    res = cli_without("torch,timm", "verify", bad, cwd=tmp_path)
    line = one_error_line(res)
    assert "golden set" in line and ("re-export" in line or "upgrade" in line), line


def test_an_artifact_without_a_golden_set_is_named(exported_run, tmp_path):
    _, old = exported_run  # exported by export_onnx alone: no golden set
    res = CliRunner().invoke(app, ["verify", str(old)])
    assert res.exit_code == 1 and "carries no golden set" in res.output and "--ckpt" in res.output
    with open_predictor(old) as p:
        assert self_check(p, str(old)) is None


def test_verify_without_ckpt_refuses_options_that_need_it(exported):
    _, path = exported
    res = CliRunner().invoke(app, ["verify", str(path), "--data", "builtin"])
    assert res.exit_code == 2 and "--data needs the checkpoint" in res.output


def test_golden_size_is_bounded(exported):
    """x float16 [6, 3, 32, 32] + logits: the record must stay in the tens of KiB for this model."""
    _, path = exported
    record = _meta(path)["golden"]
    assert len(record["payload"]) < 6 * 3 * 32 * 32 * 2 * 4 / 3 + 4096
    assert golden_mod.summary(_meta(path))["sets"] == [s["what"] for s in record["sets"]]
