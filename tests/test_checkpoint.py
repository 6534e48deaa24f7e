import argparse

import pytest
import torch
from safetensors.torch import save_file

from vfpt_deploy.artifacts.checkpoint import BackboneInfo, load_run, read_run_dict, save_run
from vfpt_deploy.errors import VFPTError
from vfpt_deploy.runtime.preprocess import Preprocess

from conftest import TINY, TINY_KWARGS, tiny_model

PRE = Preprocess(resize=[32, 32], mean=[0.5] * 3, std=[0.5] * 3)


def save_tiny(path, include_backbone=True, source="random", **cfg):
    model = tiny_model(num_classes=3, scale=3.0, **cfg)
    save_run(path, model, BackboneInfo(TINY, dict(TINY_KWARGS), source), ["cat", "dog", "eel"], PRE,
             include_backbone=include_backbone)
    return model


@pytest.mark.parametrize("cfg", [dict(num_prompts=4, alpha=0.5), dict(num_prompts=3, alpha=1.0, deep=False, location="append"),
                                 dict(num_prompts=2, alpha=0.5, project=5, dropout=0.1)])
def test_round_trip_is_bit_identical(tmp_path, images, cfg):
    model = save_tiny(tmp_path / "run.pt", **cfg)
    run = load_run(tmp_path / "run.pt")
    with torch.no_grad():
        assert torch.equal(model(images), run.model(images))
    assert run.classes == ["cat", "dog", "eel"] and run.preprocess == PRE
    assert run.config == model.config
    obj = read_run_dict(tmp_path / "run.pt")
    assert obj["format"] == "vfpt-deploy.run" and obj["version"] == 1
    assert obj["backbone"]["included"] and len(obj["backbone"]["sha256"]) == 64


def test_prompts_only_needs_and_checks_backbone(tmp_path, images):
    model = save_tiny(tmp_path / "full.pt")
    weights = tmp_path / "bb.safetensors"
    save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, str(weights))
    save_run(tmp_path / "small.pt", model, BackboneInfo(TINY, dict(TINY_KWARGS), str(weights)), ["a", "b", "c"],
             PRE, include_backbone=False)
    assert (tmp_path / "small.pt").stat().st_size < (tmp_path / "full.pt").stat().st_size / 3
    with pytest.raises(VFPTError, match="without its backbone"):
        load_run(tmp_path / "small.pt")
    run = load_run(tmp_path / "small.pt", backbone_weights=str(weights))
    with torch.no_grad():
        assert torch.equal(model(images), run.model(images))
    other = tiny_model(num_classes=3, seed=7).backbone.state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(VFPTError, match="does not match the recorded"):
        load_run(tmp_path / "small.pt", backbone_weights=str(tmp_path / "other.safetensors"))


def test_random_backbone_cannot_be_saved_prompts_only(tmp_path):
    with pytest.raises(VFPTError, match="cannot be found again"):
        save_tiny(tmp_path / "x.pt", include_backbone=False)
    assert not list(tmp_path.iterdir())  # nothing half-written


def _rewrite(path, edit):
    obj = torch.load(path, weights_only=True)
    edit(obj)
    torch.save(obj, path)


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    good = tmp_path / "run.pt"
    save_tiny(good, num_prompts=4, alpha=0.5)
    raw = good.read_bytes()

    cases = {}
    p = tmp_path / "pickled.pt"
    obj = torch.load(good, weights_only=True)
    obj["meta"]["evil"] = argparse.Namespace(x=1)  # an arbitrary class: only loadable by unpickling code
    torch.save(obj, p)
    cases[p] = "pickled Python objects"
    p = tmp_path / "truncated.pt"
    p.write_bytes(raw[: len(raw) // 2])
    cases[p] = "truncated or not a torch checkpoint"
    p = tmp_path / "version.pt"
    p.write_bytes(raw)
    _rewrite(p, lambda o: o.update(version=99))
    cases[p] = "format version 99"
    p = tmp_path / "missing.pt"
    p.write_bytes(raw)
    _rewrite(p, lambda o: o["tuned"].pop("head.weight"))
    cases[p] = "head.weight is missing"
    p = tmp_path / "nokey.pt"
    p.write_bytes(raw)
    _rewrite(p, lambda o: o.pop("classes"))
    cases[p] = "missing classes"
    p = tmp_path / "shape.pt"
    p.write_bytes(raw)
    _rewrite(p, lambda o: o["tuned"].update(prompt_embeddings=torch.zeros(1, 7, 32)))
    cases[p] = r"prompt_embeddings has shape \(1, 7, 32\)"
    p = tmp_path / "bbshape.pt"
    p.write_bytes(raw)
    _rewrite(p, lambda o: o["backbone_state"].update(pos_embed=torch.zeros(1, 3, 32)))
    cases[p] = "pos_embed has shape"
    p = tmp_path / "other.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, p)
    cases[p] = "not a vfpt-deploy run checkpoint"
    cases[tmp_path / "absent.pt"] = "does not exist"
    for path, msg in cases.items():
        with pytest.raises(VFPTError, match=msg) as exc:
            load_run(path)
        assert "\n" not in str(exc.value), path


def test_save_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "run.pt"
    target.write_bytes(b"old")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        save_tiny(target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]


def test_save_refuses_what_load_would_refuse(tmp_path):
    model = tiny_model(num_classes=3)
    with pytest.raises(VFPTError, match="preprocess gives 64x64 images but the model takes 32x32"):
        save_run(tmp_path / "r.pt", model, BackboneInfo(TINY, dict(TINY_KWARGS)), ["a", "b", "c"], Preprocess(resize=[64, 64]))
    with pytest.raises(VFPTError, match="class names must be strings"):
        save_run(tmp_path / "r.pt", model, BackboneInfo(TINY, dict(TINY_KWARGS)), [1, 2, 3], PRE)
    assert not list(tmp_path.iterdir())
