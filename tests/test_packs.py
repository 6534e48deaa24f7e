"""Prompt packs (issue 22): one backbone artifact whose per-task tables are graph inputs, a small verified pack
file per task, and a torch-free session that serves any set of packs in mixed batches and adds or removes
them without a new session.

Acceptance: every sample of a mixed batch over packs (different M, classes and folds) equals its single-task
export within conftest's float32 parity rule; padding changes nothing (bit-identical); a pack for another
backbone, a bad pack and a pack beyond the backbone's limits are refused in one line.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vfpt_deploy.artifacts.checkpoint import load_run
from vfpt_deploy.artifacts.pack import read_pack, write_pack
from vfpt_deploy.cli import app
from vfpt_deploy.errors import ArtifactError, UsageError
from vfpt_deploy.exporters.onnx import export_onnx
from vfpt_deploy.pack_pipeline import export_pack_run, plan_pack_export
from vfpt_deploy.pipeline import ExportSettings
from vfpt_deploy.runtime.onnx_runner import OnnxPredictor
from vfpt_deploy.runtime.packs import PackSession, Tables

from conftest import assert_logits_close, parity_limit, save_task_runs

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def export(run, fmt: str, out=None, **kw):
    settings = ExportSettings(format=fmt, **kw.pop("settings", {})).check()
    outcome = export_pack_run(run, settings, plan_pack_export(run.path, settings, out, **kw))
    assert outcome.passed, outcome.report.to_json()
    return outcome.plan.out


def make_packs(paths: dict, folder: Path) -> tuple[Path, dict]:
    """A backbone artifact (from the first run) and every run's pack on it."""
    runs = {n: load_run(p) for n, p in paths.items()}
    backbone = export(next(iter(runs.values())), "backbone", folder / "vit.backbone.onnx")
    packs = {n: export(r, "pack", backbone_artifact=backbone) for n, r in runs.items()}
    return backbone, packs


@pytest.fixture(scope="module")
def packed(task_runs):
    """(backbone artifact, {name: pack}, {name: run}) for conftest's three tasks: kv M=6 C=4, kv M=3 C=7, shallow
    tokens M=5 C=2."""
    backbone, packs = make_packs(task_runs, next(iter(task_runs.values())).parent)
    return backbone, packs, {n: load_run(p) for n, p in task_runs.items()}


def mixed_batch(n_tasks: int, n_per_task: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(n_tasks).repeat_interleave(n_per_task)
    ids = ids[torch.randperm(len(ids), generator=g)]
    return torch.randn(len(ids), 3, 32, 32, generator=g).numpy(), ids.numpy()


def check_mixed(session: PackSession, runs: dict, tmp_path: Path, ids_shift: int = 0) -> None:
    """Every sample of a shuffled mixed batch against its task's single-task ONNX and unfolded model."""
    names = session.names
    x, ids = mixed_batch(len(names))
    tasks = [names[(i + ids_shift) % len(names)] for i in ids]
    out = session.infer(x, tasks)
    assert out.shape == (len(x), max(len(runs[n].classes) for n in names))
    for t, name in enumerate(names):
        run, rows = runs[name], ids == t
        width = len(run.classes)
        single = tmp_path / f"{name}.onnx"
        if not single.exists():
            export_onnx(run, single)
        with OnnxPredictor(single, ["cpu"]) as one:
            alone = one.infer(x[rows])
        with torch.no_grad():
            unfolded = run.model(torch.from_numpy(x[rows])).numpy()
        assert_logits_close(out[rows, :width], alone, f"{name}: pack vs single-task ONNX")
        assert_logits_close(out[rows, :width], unfolded, f"{name}: pack vs unfolded PyTorch")
        assert np.isneginf(out[rows, width:]).all(), f"{name}: padding logits must be -inf"


# -- exactness ----------------------------------------------------------------------------------------
def test_mixed_batch_over_packs_equals_single_task_exports(packed, tmp_path):
    backbone, packs, runs = packed
    with PackSession(backbone, ["cpu"]) as s:
        for p in packs.values():
            s.add(p)
        assert s.names == ["cars", "birds", "flat"]
        check_mixed(s, runs, tmp_path)
        # the check sees a wrong task index: every sample run with the next task's tables fails it
        with pytest.raises(AssertionError):
            check_mixed(s, runs, tmp_path, ids_shift=1)


def test_mean_pooled_packs(tmp_path):
    """MAE-style mean pooling: kv packs keep the last block's prompts as tokens, a shallow one all of them."""
    specs = {"a": dict(num_classes=3, num_prompts=6, alpha=0.5), "b": dict(num_classes=5, num_prompts=2, alpha=1.0),
             "c": dict(num_classes=4, num_prompts=4, alpha=0.5, deep=False)}
    paths = save_task_runs(tmp_path, specs, global_pool="avg", fc_norm=True)
    backbone, packs = make_packs(paths, tmp_path)
    runs = {n: load_run(p) for n, p in paths.items()}
    assert [read_pack(p).tables.fold for p in packs.values()] == ["kv", "kv", "tokens"]
    with PackSession(backbone, ["cpu"]) as s:
        for p in packs.values():
            s.add(p)
        check_mixed(s, runs, tmp_path)


def test_padding_changes_nothing(packed):
    """Garbage in every padded prompt key/value row, prompt slot and head column: the logits stay bit-identical
    (the masks give padding exactly zero weight, and a padded class is -inf whatever its weights). With the kv
    mask removed the same garbage moves the logits far beyond the parity limit."""
    backbone, packs, _ = packed
    with PackSession(backbone, ["cpu"], threads=1) as s:
        for p in packs.values():
            s.add(p)
        tables = s._tables
        x, ids = mixed_batch(3)
        before = s.run(x, ids, tables)
        a = {k: v.copy() for k, v in tables.arrays.items()}
        pad_kv = np.isneginf(a["kv_bias"])  # [T, L, M]
        assert pad_kv.any() and np.isneginf(a["token_bias"]).any() and np.isneginf(a["head_bias"]).any()
        a["prompt_keys"][np.broadcast_to(pad_kv[:, :, None, :, None], a["prompt_keys"].shape)] = 7.0
        a["prompt_values"][np.broadcast_to(pad_kv[:, :, None, :, None], a["prompt_values"].shape)] = -5.0
        pad_tok = np.isneginf(a["token_bias"]) & ~a["token_write"][:, :, None]
        a["prompt_tokens"][pad_tok] = 30.0  # a padded slot (or one no layer writes) starts from garbage
        a["head_weight"][np.broadcast_to(np.isneginf(a["head_bias"])[:, None, :], a["head_weight"].shape)] = 3.0
        after = s.run(x, ids, Tables(tables.names, tables.packs, a))
        np.testing.assert_array_equal(after, before)
        a["kv_bias"][:] = 0.0  # the mask broken: padded keys now get weight
        broken = s.run(x, ids, Tables(tables.names, tables.packs, a))
        fin = np.isfinite(before)
        assert np.abs(broken[fin] - before[fin]).max() > 100 * parity_limit(before)


# -- the session: add / remove ------------------------------------------------------------------------
def test_add_and_remove_packs_on_one_session(packed, tmp_path):
    backbone, packs, runs = packed
    with PackSession(backbone, ["cpu"]) as s:
        session = s.session
        s.add(packs["cars"])
        x, _ = mixed_batch(1, 3)
        alone = s.infer(x, "cars")
        held = s._tables  # what a request in flight holds
        s.add(packs["birds"])
        s.add(packs["flat"])
        assert s.names == ["cars", "birds", "flat"] and s.session is session
        check_mixed(s, runs, tmp_path)
        assert_logits_close(s.infer(x, "cars")[:, :4], alone, "cars, before and after adding packs")
        s.remove("birds")
        assert s.names == ["cars", "flat"] and s.session is session
        assert s.infer(x, "cars").shape == (3, 4)  # the widest loaded pack now has 4 classes
        np.testing.assert_array_equal(s.infer(x, ["cars"] * 3, held), alone)  # old tables still run
        with pytest.raises(UsageError, match="no prompt pack named 'birds' is loaded"):
            s.infer(x, ["cars", "birds", "cars"])
        with pytest.raises(UsageError, match="already loaded"):
            s.add(packs["cars"])
        s.add(packs["cars"], replace=True)
        assert s.names == ["flat", "cars"]
        with pytest.raises(UsageError, match="already loaded"):  # all or none
            s.add_many([packs["birds"], packs["flat"]])
        assert s.names == ["flat", "cars"]
        s.add_many([packs["birds"], packs["flat"]], replace=True)
        assert s.names == ["cars", "birds", "flat"] and s.session is session
        check_mixed(s, runs, tmp_path)


def test_requests_in_flight_while_packs_come_and_go(packed):
    """Two threads infer cars and flat while a third adds and removes birds and re-adds cars and flat (their
    task indices move): no request fails or gets another task's answer (each takes the tables of one moment)."""
    import threading

    backbone, packs, _ = packed
    with PackSession(backbone, ["cpu"], threads=1) as s:
        s.add(packs["cars"]), s.add(packs["flat"])
        x, _ = mixed_batch(1, 2)
        want = {n: s.infer(x, n)[:, :len(s.pack(n).classes)] for n in ("cars", "flat")}
        errors, stop = [], threading.Event()

        def ask(name):
            try:
                while not stop.is_set():
                    got = s.infer(x, name)
                    assert_logits_close(got[:, :want[name].shape[1]], want[name], f"{name} in flight")
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=ask, args=(n,)) for n in ("cars", "flat")]
        for t in threads:
            t.start()
        for i in range(20):  # indices move: birds comes and goes, cars and flat swap places
            s.add(packs["birds"])
            s.add(packs["cars" if i % 2 else "flat"], replace=True)
            s.remove("birds")
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors[0]


# -- refusals -----------------------------------------------------------------------------------------
def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_pack_for_another_backbone_is_refused(packed, tmp_path):
    backbone, packs, runs = packed
    other = save_task_runs(tmp_path, {"x": dict(num_classes=3, num_prompts=2, alpha=0.5)}, embed_dim=48)["x"]
    other_run = load_run(other)
    with pytest.raises(UsageError) as e:  # export: the backbone artifact holds another backbone than the run's
        export(other_run, "pack", backbone_artifact=backbone)
    assert "holds another backbone" in one_line(e)
    other_bb = export(other_run, "backbone", tmp_path / "other.backbone.onnx")
    with PackSession(other_bb, ["cpu"]) as s, pytest.raises(ArtifactError) as e:  # load: made for another artifact
        s.add(packs["cars"])
    assert "made for another backbone artifact" in one_line(e) and "backbone weights sha256" in str(e.value)
    r = invoke("export", "--ckpt", other, "--format", "pack", "--backbone-artifact", backbone)
    assert r.exit_code != 0 and "holds another backbone" in r.output and "Traceback" not in r.output


def test_pack_fits_the_backbone_reexported_with_larger_limits(packed, tmp_path):
    """A pack is tied to the backbone's computation (its identity), not the file: re-exporting the backbone with
    --max-classes (a new file sha256) keeps every pack, whose golden set is replayed there before it is served.
    An old pack (no identity) still needs its very file; a pack whose numbers do not reproduce is refused."""
    from vfpt_deploy.artifacts.files import file_sha256

    backbone, packs, runs = packed
    big = export(runs["cars"], "backbone", tmp_path / "big.backbone.onnx", limits={"classes": 20000})
    assert file_sha256(big) != file_sha256(backbone)
    x, _ = mixed_batch(1, 5)
    with PackSession(backbone, ["cpu"]) as a, PackSession(big, ["cpu"]) as b:
        assert b.geometry["limits"]["classes"] == 20000 and b.geometry["identity"] == a.geometry["identity"]
        for name in ("birds", "flat"):
            a.add(packs[name])
            loaded = b.add(packs[name])
            assert loaded.replayed_on == b.sha256  # its golden set ran on the new file before it was served
            np.testing.assert_array_equal(b.infer(x, name), a.infer(x, name))
    from PIL import Image

    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(tmp_path / "img0.png")
    r = invoke("predict", big, tmp_path / "img0.png", "--pack", packs["birds"], "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["task"] == "birds"
    pack = read_pack(packs["birds"])  # an old-style pack: no identity, so only its own file
    old = tmp_path / "old.pack.safetensors"
    keep = {k: v for k, v in pack.metadata.items() if k not in ("format", "version", "fold", "backbone_identity")}
    write_pack(old, pack.tables, keep)
    with PackSession(backbone, ["cpu"]) as a:
        a.add(old)
    r = invoke("inspect", old, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["runs_on"].startswith("only the backbone artifact with sha256")
    with PackSession(big, ["cpu"]) as b, pytest.raises(ArtifactError) as e:
        b.add(old)
    assert "made for another backbone artifact" in one_line(e) and "--backbone-artifact THIS.onnx" in str(e.value)
    r = invoke("predict", big, tmp_path / "img0.png", "--pack", old)
    assert r.exit_code == 1 and "made for another backbone artifact" in r.output and "Traceback" not in r.output
    wrong = tmp_path / "wrong.pack.safetensors"  # same identity, numbers that do not match its golden set
    pack = read_pack(packs["birds"])
    pack.tables.head_bias = pack.tables.head_bias + 1.0
    write_pack(wrong, pack.tables, {k: v for k, v in pack.metadata.items() if k not in ("format", "version", "fold")})
    with PackSession(big, ["cpu"]) as b, pytest.raises(ArtifactError) as e:
        b.add(wrong)
    assert "does not reproduce its golden set" in one_line(e)


def test_bad_pack_files_are_refused(packed, tmp_path):
    backbone, packs, _ = packed
    data = packs["birds"].read_bytes()
    cut = tmp_path / "cut.pack.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError) as e:
        read_pack(cut)
    assert "not a usable prompt pack" in one_line(e)
    pack = read_pack(packs["birds"])
    bad = tmp_path / "nan.pack.safetensors"
    w = pack.tables.head_weight.copy()
    w[0, 0] = np.nan
    pack.tables.head_weight = w
    write_pack(bad, pack.tables, {k: v for k, v in pack.metadata.items() if k not in ("format", "version", "fold")})
    with pytest.raises(ArtifactError) as e:
        read_pack(bad)
    assert "non-finite" in one_line(e)
    with pytest.raises(ArtifactError) as e:
        read_pack(tmp_path / "missing.pack.safetensors")
    assert "does not exist" in one_line(e)
    os.mkfifo(tmp_path / "fifo.pack.safetensors")  # said as a FIFO (not "does not exist"), and never opened
    with pytest.raises(ArtifactError) as e:
        read_pack(tmp_path / "fifo.pack.safetensors")
    assert "is a named pipe (FIFO), not a regular file" in one_line(e)
    r = invoke("predict", backbone, packs["birds"])  # a backbone artifact alone classifies nothing
    assert r.exit_code != 0 and "backbone artifact for prompt packs" in r.output
    r = invoke("triton", backbone, "--out", tmp_path / "repo", "--kind", "cpu")  # not "no vfpt-deploy metadata"
    assert r.exit_code == 1 and "backbone artifact for prompt packs" in r.output and "--packs DIR" in r.output, r.output
    assert not (tmp_path / "repo").exists()


def test_pack_beyond_the_backbone_limits_is_refused(packed, tmp_path):
    _, packs, runs = packed
    small = export(runs["cars"], "backbone", tmp_path / "small.backbone.onnx", limits={"classes": 5})
    with pytest.raises(UsageError) as e:  # birds has 7 classes
        export(runs["birds"], "pack", tmp_path / "birds.pack.safetensors", backbone_artifact=small)
    assert "at most 5" in one_line(e) and "--max-classes" in str(e.value)


# -- files --------------------------------------------------------------------------------------------
def test_pack_size(packed, tmp_path):
    """A pack holds its tables, head and golden set and nothing of the backbone: its size is theirs plus a small
    header, a fraction of a single-task export."""
    backbone, packs, runs = packed
    pack = read_pack(packs["cars"])
    golden = len(json.dumps(pack.metadata["golden"]))
    size = packs["cars"].stat().st_size
    assert pack.tables.nbytes + golden < size < pack.tables.nbytes + golden + 4096
    assert pack.tables.nbytes == (2 * 3 * 2 * 6 * 16 + 4 * 32 + 4) * 4  # kv keys+values [3, 2, 6, 16], head
    single = export_onnx(runs["cars"], tmp_path / "cars.onnx").path.stat().st_size
    assert size < 0.1 * single


def test_graph_facts_read_without_the_weights(packed, tmp_path):
    """read_graph (PackSession and OnnxPredictor call it before their session) skips the initializers' data: the
    same facts as the whole file parsed, none of the weight bytes held; a truncated file still gets the whole
    parse's verdict."""
    import onnx

    from vfpt_deploy.artifacts.schema import _load_without_weights, graph_facts, load_onnx, read_graph

    backbone = packed[0]
    whole = load_onnx(backbone)
    light = _load_without_weights(backbone)
    assert read_graph(backbone) == graph_facts(whole)
    assert [(t.name, t.data_type, list(t.dims)) for t in light.graph.initializer] == \
        [(t.name, t.data_type, list(t.dims)) for t in whole.graph.initializer]
    assert sum(len(t.raw_data) for t in whole.graph.initializer) > 10_000
    assert not any(t.raw_data or t.float_data for t in light.graph.initializer)
    assert onnx.helper.printable_graph(light.graph) == onnx.helper.printable_graph(whole.graph)
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(backbone.read_bytes()[:-1000])
    assert _load_without_weights(cut) is None
    with pytest.raises(ArtifactError, match="not a readable ONNX model"):
        read_graph(cut)
    assert read_graph(cut, strict=False) is None


def test_failed_verification_keeps_the_previous_pack(packed, tmp_path):
    backbone, packs, runs = packed
    out = tmp_path / "cars.pack.safetensors"
    export(runs["cars"], "pack", out, backbone_artifact=backbone)
    before = out.read_bytes()
    settings = ExportSettings(format="pack", tolerances={"atol": 1e-12}).check()
    outcome = export_pack_run(runs["cars"], settings, plan_pack_export(runs["cars"].path, settings, out,
                                                                       backbone_artifact=backbone))
    assert not outcome.passed and outcome.written == [] and out.read_bytes() == before


def test_cli_export_predict_verify(task_runs, tmp_path):
    cars, flat = task_runs["cars"], task_runs["flat"]
    bb = tmp_path / "b.onnx"
    r = invoke("export", "--ckpt", cars, "--format", "backbone", "--out", bb)
    assert r.exit_code == 0, r.output
    out = tmp_path / "f.pack.safetensors"
    r = invoke("export", "--task", f"flat2={flat}", "--format", "pack", "--backbone-artifact", bb, "--out", out)
    assert r.exit_code == 0, r.output
    assert read_pack(out).name == "flat2"
    from PIL import Image

    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(tmp_path / "img.png")
    r = invoke("predict", bb, tmp_path / "img.png", "--pack", out, "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["task"] == "flat2" and got["predictions"][0]["top"][0]["class"].startswith("flat-")
    r = invoke("verify", bb, "--pack", out)  # the golden set, torch-free
    assert r.exit_code == 0, r.output
    assert (tmp_path / "f.pack.safetensors.golden.verify.json").is_file()
    r = invoke("verify", bb, "--pack", out, "--ckpt", flat)
    assert r.exit_code == 0, r.output
    r = invoke("verify", bb, "--pack", out, "--ckpt", cars)  # another run's checkpoint
    assert r.exit_code == 1 and "Traceback" not in r.output
    r = invoke("export", "--ckpt", cars, "--format", "pack")
    assert r.exit_code == 2 and "--backbone-artifact" in r.output


def test_packs_run_without_torch(packed, tmp_path):
    """predict and verify --pack (the golden replay) are torch-free; a pack export's usage error comes before
    torch loads."""
    from test_lean_install import cli_without

    backbone, packs, _ = packed
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 40, 90)).save(tmp_path / "x.png")
    res = cli_without("torch,timm,mlserver", "predict", backbone, tmp_path / "x.png", "--pack", packs["birds"],
                      "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["predictions"][0]["top"][0]["class"].startswith("birds-")
    res = cli_without("torch,timm,mlserver", "verify", backbone, "--pack", packs["birds"], "--report",
                      tmp_path / "r.json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = cli_without("torch", "export", "--ckpt", "run.pt", "--format", "pack", cwd=tmp_path)
    assert res.returncode == 2 and "--backbone-artifact" in res.stderr and "PyTorch" not in res.stderr


def test_inspect_pack_and_backbone(packed):
    backbone, packs, _ = packed
    r = invoke("inspect", packs["birds"], "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert (info["kind"], info["name"], info["fold"], len(info["classes"])) == ("pack", "birds", "kv", 7)
    assert info["tables"]["kv.keys"] == [3, 2, 3, 16] and info["verification"]["state"] == "passed"
    assert info["runs_on"].startswith("any backbone artifact with its backbone identity")
    assert info["backbone_identity"]["backbone"]["sha256"] == info["backbone"]["sha256"]
    r = invoke("inspect", backbone, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["pack_backbone"]["limits"]["prompts"] == 512 and info["problems"] == []
    assert [i["name"] for i in info["inputs"]][:3] == ["images", "task", "prompt_keys"]


def test_cli_verify_pack_uses_the_runs_own_data_like_verify_of_an_artifact(tmp_path):
    """verify B --pack P --ckpt RUN without --data compares on the run's own built-in data as the pack's
    export did (else its report is weaker than the export's and goes to .verify.weaker.json)."""
    from test_cli import TINY_ARGS

    run, bb, out = tmp_path / "d.pt", tmp_path / "b.onnx", tmp_path / "d.pack.safetensors"
    r = invoke("train", "--out", run, *TINY_ARGS, "--epochs", 1, "--prompts", 2, "--batch-size", 128,
               "--warmup-epochs", 0)  # trained on builtin: the run records it
    assert r.exit_code == 0, r.output
    assert invoke("export", "--ckpt", run, "--format", "backbone", "--out", bb).exit_code == 0
    r = invoke("export", "--ckpt", run, "--format", "pack", "--backbone-artifact", bb, "--out", out)
    assert r.exit_code == 0, r.output
    r = invoke("verify", bb, "--pack", out, "--ckpt", run)
    assert r.exit_code == 0 and "verified on the run's own data (builtin) too" in r.output, r.output
    assert not (tmp_path / "d.pack.safetensors.verify.weaker.json").exists(), r.output
    report = json.loads((tmp_path / "d.pack.safetensors.verify.json").read_text())
    assert any(c["inputs"].startswith("builtin") for c in report["comparisons"]), report["comparisons"]
