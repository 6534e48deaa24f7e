"""Crafted run.pt files: every field a checkpoint holds is checked before anything is built, so a
tampered file is one InputError line within a couple of seconds -- never a traceback, a MemoryError or
a minute-long build -- and `vfpt-deploy info` exits 1 without a traceback."""

import os
import re
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from vfpt_deploy.models import backbone as backbone_module
from vfpt_deploy.models.backbone import backbone_skeleton, build_backbone, check_backbone_kwargs, create_backbone
from vfpt_deploy.artifacts.checkpoint import BackboneInfo, load_run, save_run
from vfpt_deploy.cli import app
from vfpt_deploy.models.config import VFPTConfig
from vfpt_deploy.errors import InputError, UsageError, VFPTError
from vfpt_deploy.runtime.preprocess import Preprocess

from conftest import TINY, TINY_KWARGS, tiny_model

PRE = Preprocess(resize=[32, 32], mean=[0.5] * 3, std=[0.5] * 3)
SECONDS = 2.0  # a crafted file is refused within this (the real limit is "well under a second")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A real tiny run.pt with its backbone, and a prompts-only one with its weights file."""
    d = tmp_path_factory.mktemp("runs")
    model = tiny_model(num_classes=3, scale=3.0, num_prompts=4, alpha=0.5)
    save_run(d / "full.pt", model, BackboneInfo(TINY, dict(TINY_KWARGS)), ["cat", "dog", "eel"], PRE)
    weights = d / "bb.safetensors"
    save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, str(weights))
    save_run(d / "small.pt", model, BackboneInfo(TINY, dict(TINY_KWARGS), str(weights)), ["cat", "dog", "eel"], PRE,
             include_backbone=False)
    return {"full": d / "full.pt", "small": d / "small.pt", "weights": str(weights)}


def _set(*keys, value):
    def edit(o):
        for k in keys[:-1]:
            o = o[k]
        o[keys[-1]] = value
    return edit


def _pop(*keys):
    def edit(o):
        for k in keys[:-1]:
            o = o[k]
        o.pop(keys[-1])
    return edit


def _kwargs(**kw):
    return _set("backbone", "kwargs", value={**TINY_KWARGS, **kw})


def _poison(section, name, value=float("nan")):
    def edit(o):
        o[section][name].view(-1)[0] = value
    return edit


def _drop_block(o):
    for k in [k for k in o["backbone_state"] if k.startswith("blocks.2.")]:
        o["backbone_state"].pop(k)


def _renumber_block(o):
    for k in [k for k in o["backbone_state"] if k.startswith("blocks.2.")]:
        o["backbone_state"]["blocks.7." + k.removeprefix("blocks.2.")] = o["backbone_state"].pop(k)


# (case id, edit of the full run's dict, a regex the one-line message must match)
FULL_CASES = [
    ("num_prompts-float", _set("config", "num_prompts", value=4.0), "num_prompts must be an integer"),
    ("num_prompts-bool", _set("config", "num_prompts", value=True), "num_prompts must be an integer"),
    ("num_prompts-huge", _set("config", "num_prompts", value=10**9), r"num_prompts must be an integer in \[0, 10000\]"),
    ("alpha-string", _set("config", "alpha", value="0.5"), "alpha .* must be a number"),
    ("alpha-nan", _set("config", "alpha", value=float("nan")), "alpha .* must be a number"),
    ("deep-string", _set("config", "deep", value="yes"), "deep must be true or false"),
    ("location-int", _set("config", "location", value=3), "location must be one of"),
    ("project-float", _set("config", "project", value=2.5), "project must be an integer"),
    ("dropout-inf", _set("config", "dropout", value=float("inf")), r"dropout must be a number in \[0, 1\)"),
    ("dropout-string", _set("config", "dropout", value="0"), r"dropout must be a number in \[0, 1\), got '0'"),
    ("config-list", _set("config", value=[1, 2]), "config: a VFPT config must be a mapping"),
    ("config-unknown-key", _set("config", "evil", value=1), "unknown VFPT config keys"),
    ("tuned-non-tensor", _set("tuned", "head.bias", value="zeros"), "is a str, not a tensor"),
    ("tuned-list", _set("tuned", value=[1]), "tuned must be a mapping"),
    ("tuned-int-tensor", _set("tuned", "head.bias", value=torch.zeros(3, dtype=torch.int64)), "int64, not floating point"),
    ("tuned-nan", _poison("tuned", "prompt_embeddings"), r"tensor prompt_embeddings holds non-finite values"),
    ("tuned-inf", _poison("tuned", "head.weight", float("inf")), r"tensor head.weight holds non-finite values"),
    ("backbone-state-nan", _poison("backbone_state", "blocks.1.attn.qkv.weight"), r"blocks.1.attn.qkv.weight holds non-finite"),
    ("backbone-state-half-int", _set("backbone_state", "norm.weight", value=torch.ones(32, dtype=torch.int32)), "not floating point"),
    ("tuned-sparse", _set("tuned", "head.bias", value=torch.zeros(3).to_sparse()), "tensor head.bias is a sparse_coo tensor"),
    ("tuned-meta", _set("tuned", "head.bias", value=torch.empty(3, device="meta")), "tensor head.bias is a meta tensor"),
    ("backbone-state-not-dict", _set("backbone_state", value=7), "backbone_state must be a mapping"),
    ("meta-list", _set("meta", value=["a"]), "meta must be a mapping"),
    ("meta-train-list", _set("meta", "train", value=[1]), "meta train must be a dict"),
    ("backbone-list", _set("backbone", value=["vit"]), "backbone must be a mapping"),
    ("kwargs-string", _set("backbone", "kwargs", value="depth=3"), "backbone options must be a mapping"),
    ("kwargs-list", _set("backbone", "kwargs", value=[["depth", 3]]), "backbone options must be a mapping"),
    ("kwargs-object", _kwargs(act_layer={"a": {"b": {"c": {"d": 1}}}}), "backbone option act_layer="),
    ("kwargs-reserved", _kwargs(pretrained_cfg_overlay={"file": "/etc/passwd"}), "pretrained_cfg_overlay is set by vfpt-deploy"),
    ("name-int", _set("backbone", "name", value=5), "backbone name must be a timm model name, got 5"),
    ("name-unknown", _set("backbone", "name", value="no_such_vit"), "cannot create timm model 'no_such_vit'"),
    ("name-not-vit", lambda o: o["backbone"].update(name="resnet18", kwargs={}), "not a timm VisionTransformer"),
    ("sha-int", _set("backbone", "sha256", value=3), "sha256 must be 64 hex digits"),
    ("included-no-state", _pop("backbone_state"), "backbone_state is missing"),
    ("classes-str", _set("classes", value="cat,dog,eel"), "classes must be a list"),
    ("classes-ints", _set("classes", value=[1, 2, 3]), "class names must be non-empty strings"),
    ("classes-count", _set("classes", value=["a", "b"]), r"2 class names for a 3-class head"),
    ("classes-empty", _set("classes", value=[]), "classes must be a list of 1 to"),
    ("preprocess-mean-2", _set("preprocess", "mean", value=[0.5, 0.5]), "mean must be 3 finite numbers"),
    ("preprocess-lanczos", _set("preprocess", "interpolation", value="lanczos"), "interpolation must be one of"),
    ("preprocess-list", _set("preprocess", value=[32, 32]), "preprocess must be an object"),
    ("preprocess-size", _set("preprocess", "resize", value=[64, 64]), "preprocess gives 64x64 images but the backbone takes 32x32"),
    ("depth-million", _kwargs(depth=1_000_000), r"depth=1000000: depth must be an integer in \[1, 256\]"),
    ("depth-disagrees", _kwargs(depth=200), "depth=200 but backbone_state holds 3 blocks"),
    ("embed_dim-million", _kwargs(embed_dim=10**6), r"embed_dim must be an integer in \[1, 16384\]"),
    ("embed_dim-disagrees", _kwargs(embed_dim=4096, num_heads=64), "embed_dim=4096 but backbone_state cls_token is 32 wide"),
    ("img_size-negative", _kwargs(img_size=-1), "img_size must be an integer or"),
    ("img_size-million", _kwargs(img_size=10**6), "img_size must be an integer or"),
    ("img_size-disagrees", _kwargs(img_size=1024), r"pos_embed has shape \(1, 17, 32\): 17 tokens, but .* imply 16385"),
    ("patch_size-zero", _kwargs(patch_size=0), "patch_size must be an integer or"),
    ("patch_size-over-img", _kwargs(patch_size=64), "patch_size must be an integer or"),
    ("mlp_ratio-nan", _kwargs(mlp_ratio=float("nan")), "backbone option mlp_ratio"),
    ("mlp_ratio-huge", _kwargs(mlp_ratio=1000.0), r"mlp_ratio must be a number in \(0, 64\]"),
    ("num_heads-not-dividing", _kwargs(num_heads=5), "num_heads=5 does not divide embed_dim=32"),
    ("reg_tokens-huge", _kwargs(reg_tokens=10**6), "register tokens"),
    ("in_chans", _kwargs(in_chans=10**6), "in_chans must be 3"),
    ("mlp-disagrees", _kwargs(mlp_ratio=2.0), r"backbone_state: tensor blocks.0.mlp.fc1.weight has shape \(128, 32\) but the model expects \(64, 32\)"),
    ("block-dropped", _drop_block, "depth=3 but backbone_state holds 2 blocks"),
    ("tensor-missing", _pop("backbone_state", "blocks.1.norm1.weight"), "backbone_state: 1 tensors missing, first blocks.1.norm1.weight"),
    ("tensor-unexpected", _set("backbone_state", "blocks.1.evil", value=torch.zeros(2)), "backbone_state: 1 unexpected tensors, first blocks.1.evil"),
    ("block-renumbered", _renumber_block, r"blocks are not numbered 0..N-1"),
    ("cls_token-missing", _pop("backbone_state", "cls_token"), r"cls_token has shape nothing"),
    ("deep-prompts-shape", _set("tuned", "deep_prompt_embeddings", value=torch.zeros(9, 4, 32)),
     r"deep_prompt_embeddings has shape \(9, 4, 32\), the config implies \(2, 4, 32\)"),
    ("prompt-width", _set("tuned", "prompt_embeddings", value=torch.zeros(1, 4, 48)), r"prompt_embeddings has shape \(1, 4, 48\)"),
    ("extra-tensor", _set("tuned", "evil", value=torch.zeros(1)), "unexpected tensors"),
    ("version-bool", _set("version", value=True), "format version True"),
]

SMALL_CASES = [
    ("prompts-only-depth", _kwargs(depth=256), r"depth=256 but deep_prompt_embeddings has 2 layers"),
    ("prompts-only-width", _kwargs(embed_dim=64), r"embed_dim=64 but head.weight has shape \(3, 32\)"),
    ("prompts-only-huge-shallow", lambda o: (o["config"].update(deep=False), o["tuned"].pop("deep_prompt_embeddings"),
                                             o["backbone"]["kwargs"].update(depth=256, embed_dim=16384, num_heads=128)),
     "billion parameters"),
    ("prompts-only-shallow-depth", lambda o: (o["config"].update(deep=False), o["tuned"].pop("deep_prompt_embeddings"),
                                              o["backbone"]["kwargs"].update(depth=256)),
     "bb.safetensors holds 3 transformer blocks but the model has 256"),
    ("prompts-only-default-depth", lambda o: o["backbone"]["kwargs"].pop("depth"),
     r"deep_prompt_embeddings has shape \(2, 4, 32\), the config implies \(11, 4, 32\)"),
]


def _craft(runs, which, edit, tmp_path):
    obj = torch.load(runs[which], weights_only=True)
    edit(obj)
    path = tmp_path / f"crafted-{which}.pt"
    torch.save(obj, path)
    return path


def _assert_refused(path, match, **kw):
    t0 = time.perf_counter()
    with pytest.raises(VFPTError, match=match) as exc:
        load_run(path, **kw)
    elapsed = time.perf_counter() - t0
    assert isinstance(exc.value, InputError), type(exc.value)
    assert "\n" not in str(exc.value)
    assert elapsed < SECONDS, f"refused after {elapsed:.1f}s"


def test_the_untouched_runs_load(runs, tmp_path):
    assert load_run(runs["full"]).classes == ["cat", "dog", "eel"]
    assert load_run(runs["small"], backbone_weights=runs["weights"]).model.depth == 3


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
@pytest.mark.parametrize(("edit", "match"), [c[1:] for c in FULL_CASES], ids=[c[0] for c in FULL_CASES])
def test_crafted_full_run_is_one_line(runs, tmp_path, edit, match):
    _assert_refused(_craft(runs, "full", edit, tmp_path), match)


@pytest.mark.parametrize(("edit", "match"), [c[1:] for c in SMALL_CASES], ids=[c[0] for c in SMALL_CASES])
def test_crafted_prompts_only_run_is_one_line(runs, tmp_path, edit, match):
    _assert_refused(_craft(runs, "small", edit, tmp_path), match, backbone_weights=runs["weights"])


@pytest.mark.parametrize("case", ["depth-million", "tuned-non-tensor", "meta-list", "alpha-nan", "classes-count",
                                  "backbone-state-nan", "preprocess-lanczos"])
@pytest.mark.parametrize("form", ["positional", "--ckpt"])
def test_info_on_crafted_file_exits_1_without_traceback(runs, tmp_path, case, form):
    edit, match = next(c[1:] for c in FULL_CASES if c[0] == case)
    path = str(_craft(runs, "full", edit, tmp_path))
    res = CliRunner().invoke(app, ["info", path] if form == "positional" else ["info", "--ckpt", path])
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output and "error:" in res.output


# -- the torch-free read inspect and info use (artifacts/run_reader.py) ----------------------------------
# Refused by the family's torch-free size checks (models/vit/sizes.py, models/options.py), so the fast
# read must refuse them itself instead of showing the file as fine.
SIZE_CASES = ["depth-million", "depth-disagrees", "embed_dim-million", "embed_dim-disagrees", "img_size-disagrees",
              "img_size-million", "patch_size-over-img",
              "img_size-negative", "patch_size-zero", "mlp_ratio-huge", "num_heads-not-dividing", "in_chans",
              "block-dropped", "block-renumbered", "cls_token-missing", "kwargs-reserved"]
def _torch_path_error(path) -> str:
    """What inspect's torch path (artifacts/checkpoint.py: parse_run, check_run) says of a file."""
    from vfpt_deploy.artifacts.checkpoint import check_run, parse_run, read_run_dict

    with pytest.raises(VFPTError) as exc:
        check_run(parse_run(read_run_dict(path), path), path)
    return str(exc.value)


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
@pytest.mark.parametrize(("edit", "match"), [c[1:] for c in FULL_CASES], ids=[c[0] for c in FULL_CASES])
def test_fast_read_refuses_with_the_torch_paths_line_or_leaves_the_file_to_it(runs, tmp_path, edit, match, request):
    from vfpt_deploy.artifacts.run_reader import read_run_facts

    path = _craft(runs, "full", edit, tmp_path)
    case = request.node.callspec.id
    try:
        facts = read_run_facts(path)
    except VFPTError as e:
        assert isinstance(e, InputError) and str(e) == _torch_path_error(path), case
        return
    assert case not in SIZE_CASES, f"{case}: the fast read shows a file whose sizes a load refuses"
    assert facts is None, f"{case}: the fast read shows a file a load refuses"


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
@pytest.mark.parametrize(("edit", "match"), [c[1:] for c in FULL_CASES], ids=[c[0] for c in FULL_CASES])
def test_inspect_refuses_every_crafted_run(runs, tmp_path, edit, match):
    """`inspect run.pt` (torch-free where it can, the torch path where it cannot) exits 1 with one line."""
    res = CliRunner().invoke(app, ["inspect", str(_craft(runs, "full", edit, tmp_path))])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and "error:" in res.output and re.search(match, res.output), res.output


def test_inspect_shows_the_untouched_run_torch_free(runs):
    from vfpt_deploy.artifacts.run_reader import read_run_facts

    facts = read_run_facts(runs["full"])
    assert facts is not None and facts["frozen"] == sum(t.numel() for t in backbone_skeleton(TINY, TINY_KWARGS).state_dict().values())


@pytest.mark.parametrize("name", sorted(__import__("vfpt_deploy.models.vit.sizes", fromlist=["x"]).KNOWN_VITS))
def test_known_vit_templates_match_timm(name):
    """The torch-free ViT template (vit/sizes.py expected) is what timm builds, for every known name, with
    and without options."""
    from vfpt_deploy.models.vit.sizes import expected

    config = VFPTConfig(num_prompts=3, deep=True, project=8)
    for kwargs in ({}, {"img_size": 64, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 4, "mlp_ratio": 3.0}):
        skeleton = backbone_skeleton(name, kwargs)
        state, tuned, size = expected(name, kwargs, config, 5)
        assert state == {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}, (name, kwargs)
        assert size == tuple(skeleton.patch_embed.img_size), (name, kwargs)
        assert tuned["deep_prompt_embeddings"] == (len(skeleton.blocks) - 1, 3, 8)


@pytest.mark.parametrize("case", ["depth-million", "depth-disagrees", "embed_dim-disagrees", "embed_dim-million"])
def test_inspect_refuses_crafted_sizes_in_one_line_without_torch(runs, tmp_path, case):
    edit, match = next(c[1:] for c in FULL_CASES if c[0] == case)
    path = _craft(runs, "full", edit, tmp_path)
    cli = ("import atexit, sys; from vfpt_deploy.cli import run; "
           "atexit.register(lambda: print('MODULES', 'torch' in sys.modules, 'timm' in sys.modules)); "
           f"sys.argv = ['vfpt-deploy', 'inspect', {str(path)!r}]; run()")
    res = subprocess.run([sys.executable, "-c", cli], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "MODULES False False" in res.stdout, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr, res.stderr
    assert re.search(match, lines[0]) and lines[0] == f"error: {_torch_path_error(path)}", lines[0]


# -- backbone keyword arguments from the command line --------------------------------------------------
@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(img_size=-1), "img_size=-1"), (dict(depth=1_000_000), "depth=1000000"), (dict(patch_size=0), "patch_size=0"),
    (dict(img_size=8192, patch_size=1), "67108864 patches"), (dict(num_heads=1025), r"num_heads must be an integer in \[1, 1024\]"),
    (dict(embed_dim=48, num_heads=5), "does not divide"), (dict(mlp_ratio=0), "mlp_ratio"),
    (dict(depth=256, embed_dim=16384, num_heads=128), "make a ViT of over 825 billion parameters"), (dict(num_classes=10), "num_classes is set"),
    ({"not a name": 1}, "is not a keyword argument name"), (dict(x=b"bytes"), "option x="),
])
def test_backbone_kwargs_are_bounded(kwargs, match):
    t0 = time.perf_counter()
    with pytest.raises(UsageError, match=match) as exc:
        create_backbone(TINY, **kwargs)
    assert "\n" not in str(exc.value) and time.perf_counter() - t0 < SECONDS


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(embed_dim=16384, num_heads=128), r"has 38.7 billion parameters, over the 2.5 billion limit"),  # depth from the name
    (dict(img_size=8192), "has 262144 patches, over the 65536 limit"),  # patch size from the name
])
def test_skeleton_bounds_what_the_name_implies(kwargs, match):
    """Sizes the options leave to the model name are bounded on the meta-device skeleton, before any
    real tensor exists (backbone_skeleton is what create_backbone and load_run call first)."""
    with pytest.raises(UsageError, match=match):
        backbone_skeleton(TINY, kwargs)
    with pytest.raises(UsageError, match="backbone name must be a timm model name such as"):
        backbone_skeleton(None, {})


def test_check_backbone_kwargs_accepts_json_like_options():
    assert check_backbone_kwargs({**TINY_KWARGS, "img_size": [32, 48], "global_pool": "avg", "qkv_bias": False,
                                  "init_values": None, "mlp_ratio": 2}) is not None
    for bad in ("img_size=32", ["img_size", 32], None):
        with pytest.raises(UsageError, match="must be a mapping"):
            check_backbone_kwargs(bad)


def test_train_model_arg_is_checked(tmp_path):
    res = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "r.pt"), "--model", TINY, "--weights", "random",
                                   "--model-arg", "img_size=-1"])
    assert res.exit_code in (1, 2) and "img_size=-1" in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "r.pt").exists()


@pytest.mark.parametrize(("cfg", "match"), [
    (dict(num_prompts=4.0), "num_prompts"), (dict(num_prompts=True), "num_prompts"), (dict(num_prompts=10_001), "num_prompts"),
    (dict(alpha="0.5"), "alpha"), (dict(alpha=float("nan")), "alpha"), (dict(alpha=True), "alpha"),
    (dict(location=None), "location"), (dict(project=65_537), "project"), (dict(project=1.0), "project"),
    (dict(dropout=float("nan")), "dropout"), (dict(dropout="0.1"), "dropout"), (dict(deep=1), "deep"),
])
def test_config_types_and_ranges(cfg, match):
    with pytest.raises(UsageError, match=match):
        VFPTConfig(**cfg)


def test_config_accepts_ints_for_floats():
    assert VFPTConfig(alpha=1, dropout=0).num_fourier == 10


# -- pretrained weights offline ------------------------------------------------------------------------
def test_pretrained_offline_fails_after_one_quick_probe(monkeypatch, tmp_path):
    """Not cached and the hub unreachable: one line naming --weights FILE, after one connection attempt
    (the probe is replaced here, so the test takes no network time)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("HF_ENDPOINT", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(backbone_module, "_hub_offline", lambda: False)
    probed = []
    monkeypatch.setattr(backbone_module, "_reachable", lambda host, timeout=3.0: probed.append(host) or False)
    with pytest.raises(InputError, match=r"not in the local cache and huggingface.co cannot be reached .*--weights FILE"):
        build_backbone(TINY, TINY_KWARGS, "pretrained")
    assert probed == [("huggingface.co", 443)]


def test_pretrained_with_hf_hub_offline_does_not_probe(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(backbone_module, "_reachable", lambda *a, **k: pytest.fail("probed the network"))
    with pytest.raises(InputError, match="HF_HUB_OFFLINE is set; pass local weights with --weights FILE"):
        build_backbone(TINY, TINY_KWARGS, "pretrained")


def test_pretrained_from_the_local_cache_needs_no_network(monkeypatch, tmp_path):
    """Weights in the Hugging Face cache load with no network access at all (no probe, no HEAD request)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(backbone_module, "_hub_offline", lambda: False)
    monkeypatch.setattr(backbone_module, "_reachable", lambda *a, **k: pytest.fail("probed the network"))
    cfg = backbone_module._pretrained_cfg(TINY)
    repo = tmp_path / "hub" / ("models--" + cfg["hf_hub_id"].replace("/", "--"))
    (repo / "snapshots" / "rev0").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("rev0")
    torch.manual_seed(3)
    src = create_backbone(TINY, img_size=32, patch_size=8)  # vit_tiny's own width and depth
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(repo / "snapshots" / "rev0" / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    model = build_backbone(TINY, {"img_size": 32, "patch_size": 8}, "pretrained")
    assert torch.equal(model.blocks[5].mlp.fc1.weight, src.blocks[5].mlp.fc1.weight)


def test_pretrained_offline_for_real_ends_with_the_fix():
    """A real run with HF_HUB_OFFLINE unset and an empty cache: the probe fails (nothing listens on the
    endpoint) and the command ends in one line naming --weights FILE, in seconds rather than a minute."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=os.devnull + "-nothing-cached")
    code = ("from vfpt_deploy.models.backbone import build_backbone\n"
            "from vfpt_deploy.errors import VFPTError\n"
            "import time\nt0 = time.perf_counter()\n"
            "try:\n    build_backbone('vit_tiny_patch16_224', {}, 'pretrained')\n"
            "except VFPTError as e:\n    print('ERR', e)\n"
            "print('SECONDS', time.perf_counter() - t0)\n")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    *_, line, seconds = res.stdout.strip().splitlines() or ["", ""]
    assert float(seconds.split()[1]) < 20  # timm's own retries took about 50 s here
    assert line.startswith("ERR pretrained weights for 'vit_tiny_patch16_224' are not in the local cache"), res.stdout + res.stderr
    assert "127.0.0.1 cannot be reached" in line and "--weights FILE" in line


# -- reference checkpoints (vfpt-deploy import) ----------------------------------------------------------
def test_crafted_reference_checkpoints_are_one_line():
    from test_import import make_reference
    from vfpt_deploy.reference import import_state_dict

    deep = make_reference(M=2)
    deep["enc.transformer.encoder.layer.999999.ffn.fc1.weight"] = torch.zeros(1)
    nan = make_reference(M=2)
    nan["enc.transformer.encoder.layer.1.attn.query.weight"][0, 0] = float("nan")
    ints = make_reference(M=2)
    ints["head.last_layer.bias"] = torch.zeros(5, dtype=torch.int64)
    for sd, match in [(deep, r"ref.pth: the tensors describe a backbone that cannot be built: .*depth=1000000"),
                      (nan, r"ref.pth: tensor enc.transformer.encoder.layer.1.attn.query.weight holds non-finite"),
                      (ints, r"ref.pth: tensor head.last_layer.bias is int64, not floating point")]:
        t0 = time.perf_counter()
        with pytest.raises(InputError, match=match) as exc:
            import_state_dict(sd, alpha=0.5, heads=2, source="ref.pth")
        assert "\n" not in str(exc.value) and time.perf_counter() - t0 < SECONDS
