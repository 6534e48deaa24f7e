"""Multi-task artifacts (issue 11): one graph, the backbone once, each sample its own task's prompts and head.

Acceptance: in mixed batches (every task present, shuffled, tasks with different M and class counts, deep
and shallow runs) every sample's logits equal its single-task export and its unfolded PyTorch model within
conftest's float32 parity rule (3e-5 + 8e-6 x max|logit|); padding (prompt keys, prompt slots, classes) changes
nothing.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vfpt_deploy.artifacts.checkpoint import load_run
from vfpt_deploy.cli import app
from vfpt_deploy.errors import ArtifactError, UsageError
from vfpt_deploy.exporters.onnx import export_onnx, export_tasks
from vfpt_deploy.folding.multitask import check_task_set, fold_tasks, load_tasks, task_sources
from vfpt_deploy.runtime.onnx_runner import OnnxPredictor
from vfpt_deploy.artifacts.schema import check_metadata

from conftest import (TASK_SPECS, TINY, TINY_KWARGS, assert_logits_close, save_task_runs, tiny_backbone,
                      tiny_model)

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def mixed_batch(tasks, n_per_task: int = 4, seed: int = 0):
    """Every task n times, shuffled: images [N, 3, 32, 32] and task indices [N]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(len(tasks)).repeat_interleave(n_per_task)
    ids = ids[torch.randperm(len(ids), generator=g)]
    return torch.randn(len(ids), 3, 32, 32, generator=g), ids


@pytest.fixture(scope="module")
def tasks(task_runs):
    return load_tasks(list(task_runs.items()))


# -- exactness ----------------------------------------------------------------------------------------
def test_mixed_batch_equals_single_task_exports_and_unfolded_models(tasks, tasks_onnx, tmp_path):
    x, ids = mixed_batch(tasks)
    with OnnxPredictor(tasks_onnx, ["cpu"]) as multi:
        assert multi.tasks == ["cars", "birds", "flat"]
        out = multi.infer(x.numpy(), ids.numpy())
    assert out.shape == (len(x), max(s["num_classes"] for s in TASK_SPECS.values()))
    for t, (name, run) in enumerate(zip(tasks.names, tasks.runs)):
        rows = (ids == t).numpy()
        width = len(run.classes)
        single = export_onnx(run, tmp_path / f"{name}.onnx").path
        with OnnxPredictor(single, ["cpu"]) as one:
            alone = one.infer(x.numpy()[rows])
        with torch.no_grad():
            unfolded = run.model(x[rows]).numpy()
        assert_logits_close(out[rows, :width], alone, f"{name}: multi-task vs single-task ONNX")
        assert_logits_close(out[rows, :width], unfolded, f"{name}: multi-task ONNX vs unfolded PyTorch")
        assert np.isneginf(out[rows, width:]).all(), f"{name}: padding logits must be -inf"


def test_a_sample_does_not_depend_on_the_rest_of_its_batch(tasks_onnx, tasks):
    x, ids = mixed_batch(tasks, 3)
    with OnnxPredictor(tasks_onnx, ["cpu"]) as p:
        together = p.infer(x.numpy(), ids.numpy())
        alone = np.concatenate([p.infer(x.numpy()[i:i + 1], ids.numpy()[i:i + 1]) for i in range(len(x))])
    assert_logits_close(together, alone, "mixed batch vs one sample at a time")


@pytest.mark.parametrize("fold", ["auto", "tokens"])
def test_mean_pooled_tasks_fold_exactly(tmp_path, fold):
    """MAE-style mean pooling over the prompt rows: deep runs keep the last block's prompts as tokens, a
    shallow run keeps all of them; the pool averages only a task's own live prompt slots and the patches."""
    specs = {"a": dict(num_classes=3, num_prompts=6, alpha=0.5), "b": dict(num_classes=5, num_prompts=2, alpha=1.0),
             "c": dict(num_classes=4, num_prompts=4, alpha=0.5, deep=False)}
    paths = save_task_runs(tmp_path, specs, global_pool="avg", fc_norm=True)
    tasks = load_tasks(list(paths.items()))
    assert tasks.first.model.pool == "avg"
    module = fold_tasks(tasks, fold)
    assert module.task_folds == (["kv", "kv", "tokens"] if fold == "auto" else ["tokens"] * 3)
    x, ids = mixed_batch(tasks)
    with torch.no_grad():
        out = module(x, ids)
        for t, run in enumerate(tasks.runs):
            rows = ids == t
            assert_logits_close(out[rows, :run.model.num_classes], run.model(x[rows]), f"task {t}: fold vs unfolded")
    onnx = export_tasks(tasks, tmp_path / "avg.onnx", fold=fold).path
    with OnnxPredictor(onnx, ["cpu"]) as p:
        got = p.infer(x.numpy(), ids.numpy())
    assert_logits_close(got, out, "ONNX vs PyTorch fold")


def test_padding_changes_nothing(tasks):
    """Other tasks' rows in every padded prompt key/value and garbage in every unused prompt slot: the logits
    stay the same (the masks give padding exactly zero weight). Removing a mask makes this fail. (Heads are not padded: each task's
    logits are gathered from the concatenated heads' output, the columns past its classes masked to -inf.)"""
    module = fold_tasks(tasks, "auto")
    assert module.kv_slots == 6 and module.token_slots == 5 and any(module.kv_masked)
    x, ids = mixed_batch(tasks)
    with torch.no_grad():
        before = module(x, ids)
        padded = torch.isneginf(module.kv_bias[0])  # [T, M_kv]: which rows a task reads are padding
        module.kv_rows[padded] = 0  # now another task's prompt key/value row, not a repeat of its own
        module.prompt_tokens[0] = 30.0  # the row every unwritten or padded prompt slot starts from
        after = module(x, ids)
    # Exactly equal, not within a tolerance: the same kernels run on the same live values, and exp(-inf) = 0
    # gives the padding no weight on any CPU (seen bit-identical with AVX-512, AVX2 and scalar kernels). A
    # leaking prompt slot moved these logits by only 6.6e-4, 6x the float32 parity limit: too close to rely on.
    np.testing.assert_array_equal(after.numpy(), before.numpy())


def _softmax_inputs(path) -> list[str]:
    import onnx

    graph = onnx.load(str(path)).graph
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    return [made_by[n.input[0]] for n in graph.node if n.op_type == "Softmax"]


def test_equal_prompt_counts_need_no_mask(tmp_path, tasks_onnx):
    """Deep tasks with the same M: the graph is the kv graph plus gathers, no attention mask at all (with
    different M, as in tasks_onnx, every layer adds one), and its logits are bit-identical to the
    single-task exports'."""
    specs = {"a": dict(num_classes=3, num_prompts=4, alpha=0.5), "b": dict(num_classes=6, num_prompts=4, alpha=0.0)}
    tasks = load_tasks(list(save_task_runs(tmp_path, specs).items()))
    module = fold_tasks(tasks)
    assert module.token_slots == 0 and not any(module.kv_masked)
    multi = export_tasks(tasks, tmp_path / "same.onnx").path
    assert _softmax_inputs(multi) == ["MatMul"] * TINY_KWARGS["depth"]
    assert _softmax_inputs(tasks_onnx) == ["Add"] * TINY_KWARGS["depth"]
    # Nothing padded, so the same float ops in the same order: bit-identical to each single-task export.
    x, ids = mixed_batch(tasks, 3)
    with OnnxPredictor(multi, ["cpu"], threads=1) as p:
        out = p.infer(x.numpy(), ids.numpy())
    for t, run in enumerate(tasks.runs):
        with OnnxPredictor(export_onnx(run, tmp_path / f"{t}.onnx").path, ["cpu"], threads=1) as one:
            rows = (ids == t).numpy()
            np.testing.assert_array_equal(out[rows, :len(run.classes)], one.infer(x.numpy()[rows]))


def test_fp16_multitask_export_verifies(task_runs, tmp_path):
    res = invoke("export", *sum((["--task", f"{n}={p}"] for n, p in task_runs.items()), []),
                 "--precision", "fp16", "--out", tmp_path / "tasks16.onnx")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "tasks16.onnx.verify.json").read_text())
    assert rep["passed"] and rep["precision"] == "fp16" and rep["tasks"] == ["cars", "birds", "flat"]


# -- what may share a graph -------------------------------------------------------------------------
def _run_like(run, **changes):
    from dataclasses import replace

    return replace(run, **changes)


def test_runs_must_share_backbone_and_preprocessing(tasks, tmp_path):
    from vfpt_deploy.artifacts.checkpoint import BackboneInfo, save_run

    other = tiny_model(num_classes=3, seed=5, num_prompts=2, alpha=0.5)  # other backbone weights
    save_run(tmp_path / "other.pt", other, BackboneInfo(TINY, dict(TINY_KWARGS)), list("xyz"), tasks.preprocess)
    with pytest.raises(UsageError, match="tasks 'cars' and 'other' differ in backbone weights"):
        check_task_set(["cars", "other"], [tasks.runs[0], load_run(tmp_path / "other.pt")])
    pre = tasks.preprocess.__class__(resize=[32, 32], mean=[0.4] * 3, std=[0.5] * 3)
    with pytest.raises(UsageError, match="differ in preprocessing"):
        check_task_set(["cars", "b"], [tasks.runs[0], _run_like(tasks.runs[1], preprocess=pre)])


def test_task_names_and_sources(tmp_path):
    assert task_sources([tmp_path / "a.pt"], ["b=x/y.pt"]) == [("a", tmp_path / "a.pt"), ("b", Path("x/y.pt"))]
    for ckpts, named, message in (([], ["b"], "NAME=PATH"), ([], ["=x.pt"], "NAME=PATH"),
                                  ([tmp_path / "a.pt"], ["a=b.pt"], "two tasks are named 'a'"),
                                  ([], ["has space=a.pt"], "must be 1-64 letters"),
                                  ([tmp_path / "-a.pt"], [], "must be 1-64 letters")):
        with pytest.raises(UsageError, match=message):
            task_sources(ckpts, named)


def test_kv_fold_names_the_task_it_cannot_fold(tasks):
    with pytest.raises(UsageError, match="task 'flat': the kv fold is not exact"):
        fold_tasks(tasks, "kv")


def test_tampered_task_metadata_is_refused():
    meta = {"preprocess": {"resize": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}}
    for tasks, message in (("x", "tasks must be a list"), ([], "tasks must be a list"),
                           ([{"name": "a", "classes": ["x"]}, {"name": "a", "classes": ["y"]}], "unique name"),
                           ([{"name": "a b", "classes": ["x"]}], "unique name"),
                           ([{"name": "a", "classes": []}], "classes must be a non-empty list")):
        with pytest.raises(ArtifactError, match=message):
            check_metadata({**meta, "tasks": tasks}, "m.onnx")


def test_runtime_refuses_task_indices_out_of_range(tasks_onnx, exported_run):
    x = np.zeros((2, 3, 32, 32), np.float32)
    with OnnxPredictor(tasks_onnx, ["cpu"]) as p:
        for bad in ([0, 3], [-1, 0], [0]):
            with pytest.raises(UsageError, match=r"one integer task index in \[0, 3\) per image"):
                p.infer(x, np.array(bad))
        with pytest.raises(UsageError, match="one integer task index"):
            p.infer(x)
        with pytest.raises(UsageError, match="holds 3 tasks .cars, birds, flat.; pick one with --task"):
            p.predict([], task=None)
    with OnnxPredictor(exported_run[1], ["cpu"]) as single, pytest.raises(UsageError, match="single task"):
        single.infer(x, np.array([0, 0]))


# -- the CLI ------------------------------------------------------------------------------------------
def _png(folder, n=3):
    from PIL import Image

    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_cli_export_verify_predict(task_runs, tmp_path):
    out = tmp_path / "tasks.onnx"
    res = invoke("export", "--ckpt", task_runs["cars"], "--ckpt", task_runs["birds"], "--task",
                 f"flat={task_runs['flat']}", "--out", out)
    assert res.exit_code == 0, res.output
    assert "cars, birds, flat" in res.output and out.is_file()
    # verify matches the --ckpt files to tasks by the sha256 the artifact recorded, in any order
    res = invoke("verify", out, "--ckpt", task_runs["flat"], "--ckpt", task_runs["cars"],
                 "--task", f"birds={task_runs['birds']}")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "tasks.onnx.verify.json").read_text())
    assert report["passed"] and report["tasks"] == ["cars", "birds", "flat"]
    own = [c["inputs"] for c in report["comparisons"] if not c["inputs"].startswith("golden: ")]
    assert own == [f"task {n}: random N(0,1) x16" for n in report["tasks"]]
    # the golden set the export wrote holds rows of every task, replayed and checked against each task's run
    golden = [c["inputs"] for c in report["comparisons"] if c["inputs"].startswith("golden: ")]
    assert golden == [f"golden: task {n}: 1 of random N(0,1) x16" for n in report["tasks"]] and report["golden_sha256"]
    res = invoke("verify", out)  # the same replay without the checkpoints (torch-free)
    assert res.exit_code == 0 and "golden set (3 inputs" in " ".join(res.output.split()), res.output
    images = _png(tmp_path / "imgs")
    res = invoke("predict", out, images, "--task", "birds")
    assert res.exit_code == 0 and "task birds" in " ".join(res.output.split()) and "birds-" in res.output, res.output
    res = invoke("predict", out, images, "--task", "birds", "--json", "--top-k", 10)
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert got["task"] == "birds" and len(got["predictions"]) == 3
    for p in got["predictions"]:
        assert len(p["top"]) == 7 and all(c["class"].startswith("birds-") for c in p["top"])
        assert abs(sum(c["prob"] for c in p["top"]) - 1) < 1e-6  # padding got no probability


@pytest.mark.parametrize(("args", "message"), [
    (["predict", "{onnx}", "{imgs}"], "holds 3 tasks (cars, birds, flat); pick one with --task"),
    (["predict", "{onnx}", "{imgs}", "--task", "dogs"], "unknown task 'dogs'; this artifact holds cars, birds, flat"),
    (["predict", "{onnx}", "{imgs}", "--task", "CARS"], "unknown task 'CARS' (did you mean 'cars'?)"),
    (["predict", "{cars}", "{imgs}"], "is a checkpoint, not an exported model; export it first"),
    (["export", "--ckpt", "{cars}", "--ckpt", "{onnx}", "--out", "{tmp}/x.onnx"], "is an exported model, not a checkpoint"),
    (["export", "--ckpt", "{cars}", "--ckpt", "{birds}", "--data", "builtin", "--out", "{tmp}/x.onnx"],
     "task 'cars': --data builtin has the classes 0, 1, 2"),
    (["export", "--task", "bad name={cars}", "--out", "{tmp}/x.onnx"], "starting with a letter or digit; pick such a NAME"),
    (["export", "--ckpt", "{cars}", "--ckpt", "{birds}", "--backbone", "{tmp}/nope.pt", "--out", "{tmp}/x.onnx"],
     "nope.pt does not exist; pass a weights file or 'pretrained'"),
    (["predict", "{single}", "{imgs}", "--task", "cars"], "holds a single task; drop --task"),
    (["export", "--ckpt", "{cars}", "--ckpt", "{birds}"], "name the output with --out"),
    (["export", "--ckpt", "{cars}", "--ckpt", "{birds}", "--out", "{cars_onnx}", "--precision", "int8"],
     "int8 multi-task artifacts are not supported yet"),
    (["export", "--ckpt", "{cars}", "--task", "cars={birds}", "--out", "{tmp}/x.onnx"], "two tasks are named 'cars'"),
    (["export", "--ckpt", "{cars}", "--task", "birds", "--out", "{tmp}/x.onnx"], "--task takes NAME=PATH"),
    (["export", "--ckpt", "{cars}", "--ckpt", "{birds}", "--out", "{birds}"], "birds.pt"),
    (["export", "--ckpt", "{cars}", "--ckpt", "{other}", "--out", "{tmp}/x.onnx"], "differ in backbone weights"),
    (["export", "--ckpt", "{cars}", "--ckpt", "{tmp}/missing.pt", "--out", "{tmp}/x.onnx"], "does not exist"),
    (["verify", "{onnx}", "--ckpt", "{cars}"], "no checkpoint given for task 'birds'"),
    (["verify", "{onnx}", "--ckpt", "{cars}", "--ckpt", "{birds}", "--ckpt", "{flat}", "--ckpt", "{other}"],
     "is none of the artifact's tasks"),
    (["verify", "{onnx}", "--task", "dogs={cars}"], "the artifact has no such task"),
    (["verify", "{single}", "--ckpt", "{cars}", "--ckpt", "{birds}"], "is a single-task artifact"),
])
def test_bad_multitask_input_is_one_line(args, message, task_runs, tasks_onnx, exported_run, tmp_path):
    from vfpt_deploy.artifacts.checkpoint import BackboneInfo, save_run

    other = tmp_path / "other.pt"
    save_run(other, tiny_model(num_classes=3, seed=5, num_prompts=2, alpha=0.5), BackboneInfo(TINY, dict(TINY_KWARGS)),
             list("xyz"), load_run(task_runs["cars"]).preprocess)
    fill = {"onnx": tasks_onnx, "single": exported_run[1], "imgs": _png(tmp_path / "imgs"), "tmp": tmp_path,
            "other": other, "cars_onnx": tmp_path / "c.onnx", **task_runs}
    before = {p: p.read_bytes() for p in task_runs.values()}
    res = invoke(*[a.format(**fill) for a in args])
    assert res.exit_code in (1, 2), res.output
    assert isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    assert message in " ".join(res.output.split()), res.output
    assert all(p.read_bytes() == b for p, b in before.items())  # no input was touched
    assert not (tmp_path / "x.onnx").exists()


def test_one_task_with_other_weights_makes_a_single_backbone(tasks):
    """The runs share one backbone module after the check: the artifact holds it once."""
    assert all(r.model.backbone is tasks.first.model.backbone for r in tasks.runs)


def test_swin_runs_are_refused(tasks):
    from vfpt_deploy.models.swin.model import VFPTSwin  # noqa: F401 (the check names the type)

    class FakeSwin(torch.nn.Module):
        pass

    bogus = _run_like(tasks.runs[0], model=FakeSwin())
    with pytest.raises(UsageError, match="multi-task artifacts hold ViT runs only"):
        check_task_set(["a"], [bogus])


def test_backbone_seed_helper_is_the_fixture_backbone():
    """The fixture's runs really share weights (else every test above would compare different models)."""
    a, b = tiny_backbone(0), tiny_backbone(0)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_one_named_task_is_a_multitask_artifact(task_runs, tmp_path):
    """--task alone makes a one-task multi-task artifact (T = 1): the same inputs as with many tasks."""
    out = tmp_path / "one.onnx"
    res = invoke("export", "--task", f"only={task_runs['birds']}", "--out", out)
    assert res.exit_code == 0, res.output
    with OnnxPredictor(out, ["cpu"]) as p:
        assert p.tasks == ["only"] and p.classes_of(0) == [f"birds-{c}" for c in range(7)]
        assert [i.name for i in p.session.get_inputs()] == ["images", "task"]


def test_failed_verification_keeps_the_previous_artifact(task_runs, tmp_path):
    out = tmp_path / "tasks.onnx"
    args = ["export", "--ckpt", task_runs["cars"], "--ckpt", task_runs["flat"], "--out", out]
    assert invoke(*args).exit_code == 0
    before = out.read_bytes(), (tmp_path / "tasks.onnx.verify.json").read_bytes()
    res = invoke(*args, "--atol", 0)  # no float export is bit-exact: the gate fails
    assert res.exit_code == 1 and "outside tolerance" in res.output
    assert (out.read_bytes(), (tmp_path / "tasks.onnx.verify.json").read_bytes()) == before


def test_task_indices_must_be_integers_of_the_batch(tasks_onnx):
    """The Python API's bad task indices are one UsageError each: a float would be truncated and a bool
    read as 0/1 without a word, so neither is taken."""
    x = np.zeros((2, 3, 32, 32), np.float32)
    with OnnxPredictor(tasks_onnx, ["cpu"]) as p:
        for bad in ([0.9, 1.7], [True, False], ["cars", "birds"], [float("nan"), 0], [2**70, 0], [[0], [1]], 1):
            with pytest.raises(UsageError, match="one integer task index"):
                p.infer(x, bad)
        with pytest.raises(UsageError, match="task must be a task name or a list"):
            p.predict([], task=5)
        assert p.infer(x[:0], np.zeros(0, np.int64)).shape == (0, 7)
        assert p.infer(x, np.array([2, 0], np.int32)).shape == (2, 7)  # any integer type is fine


def test_task_names_differing_only_in_case_are_refused():
    with pytest.raises(UsageError, match="named 'A' and 'a', the same ignoring case"):
        task_sources([], ["A=x.pt", "a=y.pt"])
    meta = {"preprocess": {"resize": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3},
            "tasks": [{"name": "A", "classes": ["x"]}, {"name": "a", "classes": ["y"]}]}
    with pytest.raises(ArtifactError, match=r"unique name \(ignoring case\)"):
        check_metadata(meta, "m.onnx")
    for field, value in (("num_prompts", 10**12), ("num_prompts", "6"), ("fold", "magic"),
                         ("checkpoint_sha256", "not-hex")):
        with pytest.raises(ArtifactError, match=f"task 'A' {field}"):
            check_metadata({**meta, "tasks": [{"name": "A", "classes": ["x"], field: value}]}, "m.onnx")


def test_verify_names_the_checkpoint_that_is_not_a_tasks(task_runs, tasks_onnx, tmp_path):
    """A wrong, retrained or doubly given run.pt is named in one line with what it is, before any work."""
    retrained = save_task_runs(tmp_path, {"cars": dict(TASK_SPECS["cars"], alpha=0.25)})["cars"]  # same name
    c, b, f = task_runs["cars"], task_runs["birds"], task_runs["flat"]
    copy = tmp_path / "copy.pt"
    copy.write_bytes(c.read_bytes())
    for args, message in (
            (["--task", f"cars={b}", "--ckpt", b, "--ckpt", f], "is not the run.pt task 'cars' was exported from"),
            (["--ckpt", retrained, "--ckpt", b, "--ckpt", f], "has the name task 'cars' was exported from but other"),
            (["--task", f"cars={copy}", "--ckpt", c, "--ckpt", b, "--ckpt", f], "which --task cars already names")):
        res = invoke("verify", tasks_onnx, *args)
        assert res.exit_code == 2, res.output
        assert message in " ".join(res.output.split()) and "Traceback" not in res.output
    # without checkpoints verify replays the golden set; one without a golden set names every task's run.pt
    res = invoke("verify", tasks_onnx)
    assert res.exit_code == 0 and "golden set (3 inputs" in " ".join(res.output.split()), res.output
    old = _tampered(tasks_onnx, tmp_path / "old.onnx", lambda props: props.pop("vfpt.golden"))
    res = invoke("verify", old)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert ("carries no golden set (exported before vfpt-deploy recorded one); verify it against its checkpoints "
            "with --ckpt cars.pt --ckpt birds.pt --ckpt flat.pt") in " ".join(res.output.split())


def _tampered(src, dst, edit):
    import onnx

    model = onnx.load(str(src))
    props = {p.key: json.loads(p.value) for p in model.metadata_props}
    edit(props)
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=json.dumps(v))
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize(("edit", "problem"), [
    (lambda m: m["vfpt.tasks"][0]["config"].update(alpha=0.9), "task 'cars': the artifact's VFPT config is not"),
    (lambda m: m["vfpt.tasks"][2].update(fold="kv"), "task 'flat': the artifact says kv fold"),
    (lambda m: m["vfpt.backbone"].update(sha256="0" * 64), "the artifact's backbone sha256 is not"),
    (lambda m: m["vfpt.tasks"][0].update(classes=["cars-0", "cars-1", "cars-2"]), "task 'cars': the artifact's class"),
])
def test_verify_catches_metadata_that_lies_about_a_task(edit, problem, task_runs, tasks_onnx, tmp_path):
    from vfpt_deploy.verify import verify_artifact

    bad = _tampered(tasks_onnx, tmp_path / "lie.onnx", edit)
    report = verify_artifact(bad, load_tasks(list(task_runs.items())), num_random=2)
    assert not report.passed and any(p.startswith(problem) for p in report.problems), report.problems
