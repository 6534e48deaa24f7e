"""Report semantics (issue 23): `verify` replaces the report beside an artifact only with one at least as
strong (same or more data, same or tighter tolerances, same checkpoint), else writes NAME.verify.weaker.json
and says so; verify uses the data the export used (each task its own); `triton`, `inspect` and `serve` say
which data and tolerances an artifact was verified with and flag loosened ones; older reports stay readable,
in their weakest plausible form."""
import dataclasses
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY, TINY_KWARGS, tiny_model
from vfpt_deploy.artifacts.compare import Tolerances
from vfpt_deploy.artifacts.strength import (keep_existing, looser_limits, serving_line, strength_of, summary,
                                            weaker_in)
from vfpt_deploy.cli import app
from vfpt_deploy.verify import verify_artifact

FP32 = dataclasses.asdict(Tolerances.for_precision("fp32"))
IMAGES = {"set": "builtin digits-shifted val", "samples": 397, "random": False}


def rand(n=16, task=None):
    return {"set": (f"task {task}: " if task else "") + "random N(0,1)", "samples": n, "random": True}


def report(data, limits=FP32, ckpt=("abc",), **more) -> dict:
    return {"precision": "fp32", "passed": True, "artifact_sha256": "f" * 64, "data": data, "limits": limits,
            "checkpoint_sha256": list(ckpt), "tolerances": Tolerances(**limits).describe() if limits else "?", **more}


def why(new: dict, old: dict) -> list[str]:
    return weaker_in(strength_of(new), strength_of(old))


# -- what "at least as strong" means, case by case --------------------------------------------------------------
def test_weaker_data_is_not_as_strong():
    export = report([rand(), IMAGES])
    assert why(report([rand()]), export) == ["it lacks builtin digits-shifted val (397 inputs)"]
    assert why(report([rand(8), IMAGES]), export) == ["it has 8 of the 16 inputs of random N(0,1)"]
    other = {**IMAGES, "set": "folder imgs", "samples": 500}  # more images, but other ones
    assert why(report([rand(), other]), export) == ["it lacks builtin digits-shifted val (397 inputs)"]


def test_looser_tolerances_are_not_as_strong():
    loose = {**FP32, "min_agreement": 96.0}
    assert why(report([rand(), IMAGES], loose), report([rand(), IMAGES])) == [
        "looser top-1 agreement >= 96% (vs >= 100%)"]
    assert why(report([rand(), IMAGES], {**FP32, "atol": None}), report([rand(), IMAGES]))[0].startswith(
        "looser max |diff| not gated (vs <= 0.0001)")


def test_stronger_and_equal_replace():
    old = report([rand(), IMAGES])
    tighter = {**FP32, "atol": 1e-5, "min_cosine": 0.9999}
    assert why(report([rand(32), IMAGES, {**IMAGES, "set": "folder imgs"}], tighter), old) == []
    assert why(report([rand(), IMAGES]), old) == []  # equal
    assert why(old, report([rand(32), IMAGES], tighter))  # and not the other way round


def test_another_checkpoint_is_not_as_strong():
    assert why(report([rand(), IMAGES], ckpt=("other",)), report([rand(), IMAGES])) == [
        "it was verified against another checkpoint"]


def test_multitask_data_is_per_task():
    own = report([rand(16, "a"), {**IMAGES, "set": "task a: builtin digits val"}, rand(16, "b"),
                  {**IMAGES, "set": "task b: builtin digits-shifted val"}])
    one = report([rand(16, "a"), {**IMAGES, "set": "task a: builtin digits-shifted val"}, rand(16, "b"),
                  {**IMAGES, "set": "task b: builtin digits-shifted val"}])
    assert why(one, own) == ["it lacks task a: builtin digits val (397 inputs)"]


def test_an_old_report_is_read_in_its_weakest_plausible_form():
    """Written before data/limits/checkpoint_sha256: data from its comparisons (the golden replay left out),
    tolerances loosened unless their text is the default gate, checkpoint unknown; and it says so."""
    comparisons = [{"inputs": "random N(0,1) x16", "samples": 16}, {"inputs": "builtin digits-shifted val: 397 images",
                   "samples": 397}, {"inputs": "golden: 2 of random N(0,1) x16", "samples": 2}]
    old = {"precision": "fp32", "passed": True, "artifact_sha256": "f" * 64, "comparisons": comparisons,
           "tolerances": "max |diff| <= 0.001, all logits finite"}
    s = strength_of(old)
    assert s.data == {"random N(0,1)": 16, "builtin digits-shifted val": 397} and s.limits is None
    assert s.checkpoints is None and len(s.assumed) == 2 and "taken as loosened" in s.assumed[0]
    assert why(report([rand(), IMAGES], {**FP32, "min_agreement": 50.0}), old) == []  # any recorded limits do
    assert why(report([rand()]), old) == ["it lacks builtin digits-shifted val (397 inputs)"]
    line = summary(old)["line"]
    assert summary(old)["loosened"] is None and "LOOSENED or unknown" in line and "397 images of builtin" in line
    default = {**old, "tolerances": Tolerances.for_precision("fp32").describe()}  # its text is the default gate
    assert strength_of(default).limits == Tolerances.for_precision("fp32") and summary(default)["loosened"] == []
    assert why(report([rand(), IMAGES], {**FP32, "min_agreement": 96.0}), default)


def test_loosened_from_the_default():
    fp32 = Tolerances.for_precision("fp32")
    assert looser_limits(fp32, fp32) == [] and looser_limits(fp32.override(atol=1e-6), fp32) == []
    s = summary(report([rand(), IMAGES], {**FP32, "min_agreement": 96.0}))
    assert s["loosened"] == ["top-1 agreement >= 96% (vs >= 100%)"]
    assert s["line"] == ("on 397 images of builtin digits-shifted val + 16 random N(0,1) inputs; tolerances LOOSENED "
                         "from the fp32 default: top-1 agreement >= 96% (vs >= 100%)")
    assert summary(report([rand()]))["line"] == ("on 16 random N(0,1) inputs only (no real images); the fp32 default "
                                                 "tolerances")


def test_only_a_passing_report_about_the_same_file_is_kept(tmp_path):
    path = tmp_path / "m.onnx.verify.json"
    strong, weak = report([rand(), IMAGES]), report([rand()])
    for old, kept in ((strong, True), ({**strong, "passed": False}, False),
                      ({**strong, "artifact_sha256": "0"}, False)):
        path.write_text(json.dumps(old))
        assert (keep_existing(path, weak) is not None) == kept
    path.write_text("{not json")
    assert keep_existing(path, weak) is None


# -- verify writes beside the artifact only what is at least as strong -------------------------------------------
def _images(folder, n=3):
    from PIL import Image

    folder.mkdir()
    for i in range(n):
        Image.fromarray(((torch.rand(40, 48, 3) * 255).byte().numpy())).save(folder / f"{i}.png")
    return str(folder)


def test_verify_keeps_the_stronger_report(exported_run, tmp_path):
    run, onnx_path = exported_run
    art = tmp_path / "m.onnx"
    shutil.copy(onnx_path, art)
    beside, weaker = tmp_path / "m.onnx.verify.json", tmp_path / "m.onnx.verify.weaker.json"
    imgs = _images(tmp_path / "imgs")
    assert verify_artifact(art, run, data=imgs, num_random=4).passed
    first = beside.read_bytes()
    assert json.loads(first)["data"] == [{"set": "random N(0,1)", "samples": 4, "random": True},
                                         {"set": f"{imgs}", "samples": 3, "random": False}]
    assert json.loads(first)["checkpoint_sha256"] == [run.sha256] and json.loads(first)["limits"] == FP32

    rep = verify_artifact(art, run, num_random=4)  # random only: weaker
    assert beside.read_bytes() == first and json.loads(weaker.read_text())["passed"]
    assert rep.notes[-1] == (f"kept m.onnx.verify.json (verified 3 images of {imgs} + 4 random N(0,1) inputs): "
                             f"this report is not as strong (it lacks {imgs} (3 inputs)); "
                             "this one is m.onnx.verify.weaker.json")
    weaker.unlink()
    rep = verify_artifact(art, run, data=imgs, num_random=4, overrides={"min_agreement": 96.0})  # looser
    assert beside.read_bytes() == first and weaker.is_file() and "looser top-1 agreement >= 96%" in rep.notes[-1]
    # an explicit --report elsewhere is written as asked
    verify_artifact(art, run, num_random=2, report_path=tmp_path / "mine.json")
    assert (tmp_path / "mine.json").is_file() and beside.read_bytes() == first

    weaker.unlink()
    beside.write_text(json.dumps({**json.loads(first), "marker": 1}))  # to see it replaced by equal bytes
    rep = verify_artifact(art, run, data=imgs, num_random=4)  # equal: replaces
    assert not any("kept" in n for n in rep.notes) and beside.read_bytes() == first and not weaker.exists()
    rep = verify_artifact(art, run, data=imgs, num_random=8, overrides={"min_cosine": 0.999})  # stronger
    assert not any("kept" in n for n in rep.notes)
    saved = json.loads(beside.read_text())
    assert saved["data"][0]["samples"] == 8 and saved["limits"]["min_cosine"] == 0.999


# -- verify uses the export's data: the run's own, each task's own ---------------------------------------------------
def _runs_on_builtin(folder, datas: dict) -> dict:
    """10-class tiny runs on one backbone that record the built-in data they were trained on."""
    from vfpt_deploy.artifacts.checkpoint import BackboneInfo, save_run
    from vfpt_deploy.runtime.preprocess import Preprocess

    pre = Preprocess(resize=[32, 32], mean=[0.5] * 3, std=[0.5] * 3)
    paths = {}
    for i, (name, data) in enumerate(datas.items()):
        model = tiny_model(num_classes=10, scale=4.0, num_prompts=3, alpha=0.5)
        torch.manual_seed(20 + i)
        with torch.no_grad():
            for p in model.tuned_parameters().values():
                p.add_(torch.randn_like(p) * 0.5)
        paths[name] = folder / f"{name}.pt"
        save_run(paths[name], model, BackboneInfo(TINY, dict(TINY_KWARGS)), [str(c) for c in range(10)], pre,
                 meta={"train": {"data": data}})
    return paths


def _sets(path) -> list[str]:
    return [d["set"] for d in json.loads(path.read_text())["data"]]


def test_verify_without_data_uses_the_runs_own_data(tmp_path):
    run = _runs_on_builtin(tmp_path, {"run": "builtin"})["run"]
    invoke = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    assert invoke("export", "--ckpt", run, "--num-random", 4).exit_code == 0
    onnx, beside = tmp_path / "run.onnx", tmp_path / "run.onnx.verify.json"
    assert _sets(beside) == ["random N(0,1)", "builtin digits-shifted val"]
    res = invoke("verify", onnx, "--ckpt", run, "--num-random", 4)
    assert res.exit_code == 0 and "verified on the run's own data (builtin) too" in " ".join(res.output.split())
    assert _sets(beside) == ["random N(0,1)", "builtin digits-shifted val"]
    assert not (tmp_path / "run.onnx.verify.weaker.json").exists()


def test_multitask_verify_uses_each_tasks_own_data(tmp_path):
    runs = _runs_on_builtin(tmp_path, {"a": "builtin:digits", "b": "builtin"})
    invoke = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    out = tmp_path / "ab.onnx"
    ckpts = ["--ckpt", runs["a"], "--ckpt", runs["b"], "--num-random", 4]
    assert invoke("export", *ckpts, "--out", out).exit_code == 0
    beside, weaker = tmp_path / "ab.onnx.verify.json", tmp_path / "ab.onnx.verify.weaker.json"
    own = ["task a: random N(0,1)", "task a: builtin digits val", "task b: random N(0,1)",
           "task b: builtin digits-shifted val"]
    assert _sets(beside) == own
    for data in ([], ["--data", "builtin"]):  # no --data, and a bare builtin: each task's own set, as the export
        res = invoke("verify", out, *ckpts, *data)
        assert res.exit_code == 0 and "verified each task on its own data (a: builtin:digits, b: builtin)" in " ".join(
            res.output.split()), res.output
        assert _sets(beside) == own and not weaker.exists()
    res = invoke("verify", out, *ckpts, "--data", "builtin:digits-shifted")  # one set for all: said, kept apart
    assert res.exit_code == 0 and "lacks task a: builtin digits val" in " ".join(res.output.split()), res.output
    assert _sets(beside) == own and _sets(weaker)[1] == "task a: builtin digits-shifted val"


# -- triton, inspect and serve say what the report vouches with -------------------------------------------------------
@pytest.fixture
def verified(exported_run, tmp_path):
    run, onnx_path = exported_run
    shutil.copy(onnx_path, tmp_path / "m.onnx")
    return run, tmp_path / "m.onnx"


def _loosen(art):
    rep = art.with_name(art.name + ".verify.json")
    data = json.loads(rep.read_text())
    data["limits"]["min_agreement"] = 96.0
    rep.write_text(json.dumps(data))


def test_triton_flags_loosened_tolerances(verified, tmp_path):
    pytest.importorskip("tritonclient")
    from vfpt_deploy.exporters.triton import write_triton_repository

    run, art = verified
    verify_artifact(art, run, num_random=4)
    note = write_triton_repository(art, tmp_path / "repo").notes[0]
    assert note == ("verified: m.onnx.verify.json passed for this file (same sha256) on 4 random N(0,1) inputs only "
                    "(no real images); the fp32 default tolerances")
    _loosen(art)
    note = write_triton_repository(art, tmp_path / "repo").notes[0]
    assert note.startswith("verified with LOOSENED tolerances: m.onnx.verify.json passed") and not note.startswith(
        "verified:")
    assert note.endswith("tolerances LOOSENED from the fp32 default: top-1 agreement >= 96% (vs >= 100%)")
    res = CliRunner().invoke(app, ["triton", str(art), "--out", str(tmp_path / "repo2")])
    assert res.exit_code == 0 and "LOOSENED" in res.output and "\nnote: verified:" not in res.output, res.output


def test_inspect_says_what_the_report_covers(verified):
    from vfpt_deploy.inspect_artifact import inspect_artifact, summary_rows

    run, art = verified
    verify_artifact(art, run, num_random=4)
    v = inspect_artifact(art)["verification"]
    assert v["state"] == "passed" and v["loosened"] == [] and v["random_only"]
    _loosen(art)
    info = inspect_artifact(art)
    assert info["verification"]["loosened"] == ["top-1 agreement >= 96% (vs >= 100%)"]
    row = dict(summary_rows(info))["verification"]
    assert "LOOSENED from the fp32 default: top-1 agreement >= 96%" in row and "4 random N(0,1) inputs" in row


def test_serve_says_what_the_report_covers(verified, tmp_path):
    run, art = verified
    assert serving_line(art) == ("NOT verified: no m.onnx.verify.json beside it (run 'vfpt-deploy verify ARTIFACT "
                                 "--ckpt RUN.pt')")
    verify_artifact(art, run, num_random=4)
    assert serving_line(art).startswith("verified (m.onnx.verify.json) on 4 random N(0,1) inputs only")
    _loosen(art)
    assert serving_line(art).startswith("verified with LOOSENED tolerances (m.onnx.verify.json)")
    pytest.importorskip("mlserver")
    from vfpt_deploy.runtime.serve_settings import ServeOptions, open_models

    lines = []
    for p in open_models([("m", art, None)], ServeOptions(self_check=False).check(), lines.append).values():
        p.close()
    assert any(line.startswith("m: verified with LOOSENED tolerances") for line in lines), lines
