"""The verification gate: every criterion fails on its own when it is violated (so disabling any one of
them makes its test fail), non-finite logits never pass, tolerances are range-checked, and reports are
strict JSON."""
import json
import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from vfpt_deploy.errors import UsageError
from vfpt_deploy.verify import Tolerances, compare, verify_artifact

REF = np.array([[5.0, 4.0, 3.0, 2.99985, 1.0, 0.0],
                [0.0, 6.0, 1.0, 2.0, 3.0, -1.0],
                [9.0, 1.0, 2.0, 3.0, 4.0, 5.0],
                [1.0, 2.0, 3.0, 4.0, 5.0, 6.5]])
LOOSE = dict(atol=None, rtol=None, min_cosine=None, min_agreement=0.0, topk_order=False)


def only(**gate) -> Tolerances:
    """Tolerances with every gate off but the given ones."""
    return Tolerances(**{**LOOSE, **gate})


def test_identical_logits_pass_every_gate():
    c = compare(REF, REF.copy(), Tolerances(atol=1e-4, rtol=1e-6, min_cosine=0.9999, topk_order=True), "same")
    assert not c.failures and c.max_abs == 0 and c.agreement == 100.0 and c.topk_order == 100.0


def test_atol_gate():
    c = compare(REF, REF + 2e-4, only(atol=1e-4), "shifted")
    assert c.failures == ["max |diff| 0.0002 > atol 0.0001"]


def test_rtol_gate():
    out = REF * (1 + 2e-3)
    assert compare(REF, out, only(rtol=1e-3), "scaled").failures[0].startswith("max rel diff 0.002 > rtol")
    assert not compare(REF, out, only(rtol=3e-3), "scaled").failures


def test_cosine_gate():
    out = REF.copy()
    out[1, [0, 2, 3, 4, 5]] += 2.0  # same top-1, a different direction
    c = compare(REF, out, only(min_cosine=0.999), "bent")
    assert len(c.failures) == 1 and c.failures[0].startswith("min cosine") and c.agreement == 100.0


def test_agreement_gate():
    out = REF.copy()
    out[2, 1] = 10.0  # sample 2's top-1 changes
    c = compare(REF, out, only(min_agreement=100.0), "flipped")
    assert c.failures == ["top-1 agreement 75.00% < 100%"]
    assert not compare(REF, out, only(min_agreement=75.0), "flipped").failures


def test_topk_order_gate_catches_reordering_within_atol():
    # Ranks 3 and 4 of sample 0 are 1.5e-4 apart; moving each by 0.9e-4 (inside atol) swaps them.
    out = REF.copy()
    out[0, 2] -= 0.9e-4
    out[0, 3] += 0.9e-4
    assert not compare(REF, out, only(atol=1e-4), "swapped").failures  # atol alone lets it through
    c = compare(REF, out, only(atol=1e-4, topk_order=True), "swapped")
    assert c.failures == ["top-5 order differs on 1 of 4 samples"] and c.topk_order == 75.0
    # A swap of a true tie (values closer than atol) is not a failure.
    tie = REF.copy()
    tie[0, 3] = 3.0 - 0.5e-4
    swapped = tie.copy()
    swapped[0, 2], swapped[0, 3] = tie[0, 3], tie[0, 2]
    assert not compare(tie, swapped, only(atol=1e-4, topk_order=True), "tie").failures


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["artifact", "reference"])
def test_nonfinite_logits_never_pass(bad, where):
    broken = REF.copy()
    broken[1, 3] = bad
    ref, out = (REF, broken) if where == "artifact" else (broken, REF)
    c = compare(ref, out, Tolerances(atol=1e6, min_agreement=0.0), "nan")  # every other gate wide open
    assert len(c.failures) == 1 and "not finite" in c.failures[0] and "sample 1, class 3" in c.failures[0]
    assert (where == "artifact") == ("artifact's" in c.failures[0])


def test_all_nan_is_not_a_pass():
    c = compare(np.full((2, 3), np.nan), np.full((2, 3), np.nan), Tolerances(), "nan")
    assert c.failures


@pytest.mark.parametrize(("field", "value"), [("atol", math.nan), ("atol", -1.0), ("atol", math.inf),
                                              ("rtol", math.nan), ("min_cosine", 1.5), ("min_cosine", math.nan),
                                              ("min_agreement", 101.0), ("min_agreement", -0.1)])
def test_bad_tolerances_are_refused(field, value):
    with pytest.raises(UsageError, match=field.replace("_", "-")):
        Tolerances(**{field: value})
    with pytest.raises(UsageError):
        Tolerances.for_precision("fp32").override(**{field: value})


def _tamper(src, dst, fn):
    model = onnx.load(src)
    fn(model)
    onnx.save(model, dst)
    return dst


def test_nan_artifact_fails_and_report_is_strict_json(exported_run, tmp_path):
    run, onnx_path = exported_run

    def poison(model):
        init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)) if len(t.dims) == 2 else 0)
        a = numpy_helper.to_array(init).copy()
        a[...] = np.nan
        init.CopyFrom(numpy_helper.from_array(a, init.name))

    bad = _tamper(onnx_path, tmp_path / "nan.onnx", poison)
    rep = verify_artifact(bad, run, num_random=4)
    assert not rep.passed and "not finite" in rep.comparisons[0].failures[0]
    text = (tmp_path / "nan.onnx.verify.json").read_text()
    saved = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert saved["passed"] is False


def test_metadata_that_does_not_describe_the_checkpoint_fails(exported_run, tmp_path):
    run, onnx_path = exported_run

    def rename_classes(model):
        for p in model.metadata_props:
            if p.key == "vfpt.classes":
                p.value = json.dumps(list(reversed(json.loads(p.value))))

    rep = verify_artifact(_tamper(onnx_path, tmp_path / "renamed.onnx", rename_classes), run, num_random=2)
    assert not rep.passed and "class names differ" in rep.problems[0]
    assert not rep.comparisons[0].failures  # the numbers match: only the metadata is wrong


def test_a_wrong_checkpoint_is_named_as_the_failing_check(exported_run, tmp_path):
    """verify against a checkpoint the artifact was not exported from (same weights, another file): the error
    line names that check, not the tolerances, and speaks of an earlier report only when one was kept."""
    import shutil

    from typer.testing import CliRunner

    from vfpt_deploy.artifacts.checkpoint import save_run
    from vfpt_deploy.cli import app

    run, onnx_path = exported_run
    shutil.copy(onnx_path, tmp_path / "m.onnx")
    save_run(tmp_path / "other.pt", run.model, run.backbone, run.classes, run.preprocess, meta={"note": "another file"})
    args = ["verify", str(tmp_path / "m.onnx"), "--ckpt", str(tmp_path / "other.pt"), "--num-random", "2"]
    for earlier in (False, True):
        res = CliRunner().invoke(app, args)
        line = " ".join(res.output.split("error:")[-1].split())
        assert res.exit_code == 1 and "exported from checkpoint sha256" in line, res.output
        assert "verify it against the checkpoint it came from" in line and "tolerance" not in line, line
        assert ("the earlier report was kept" in line) == earlier, line  # the first run wrote the first report
