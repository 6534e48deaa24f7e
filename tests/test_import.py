"""`vfpt-deploy import`: reference VFPT checkpoints -> run.pt, checked against an independent reference forward.

Tolerance (stated up front): imported logits match the reference forward by conftest's float32 parity rule,
max abs diff <= 3e-5 + 8e-6 x max|logit| (a different operation order; a flat 1e-5 sat on the float32 floor).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from vfpt_deploy.artifacts.checkpoint import load_run
from vfpt_deploy.cli import app
from vfpt_deploy.errors import VFPTError
from vfpt_deploy.models.vit.reference import infer_backbone
from vfpt_deploy.reference import import_state_dict, parse_classes

from conftest import assert_logits_close

D, L, PATCH, IMG, HIDDEN, HEADS, C = 32, 3, 8, 32, 48, 2, 5
runner = CliRunner()


# -- reference-layout state dicts ------------------------------------------------------------------
def _linear(g, out_f, in_f):
    return torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f), 0.1 * torch.randn(out_f, generator=g)


def _norm(g, n):
    return 1 + 0.1 * torch.randn(n, generator=g), 0.1 * torch.randn(n, generator=g)


def make_reference(arch="vit", M=5, deep=True, project=0, classes=C, depth=L, seed=0, prompt_scale=1.0,
                   dim=D, hidden=HIDDEN, patch=PATCH, img=IMG):
    """A random state dict in the reference's layout: enc.transformer.* (vit) or enc.blocks.* (mae/moco)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    n = (img // patch) ** 2
    pd = project or dim
    if arch == "vit":
        E = "enc.transformer."
        sd[E + "embeddings.patch_embeddings.weight"] = torch.randn(dim, 3, patch, patch, generator=g) / math.sqrt(3 * patch * patch)
        sd[E + "embeddings.patch_embeddings.bias"] = 0.1 * torch.randn(dim, generator=g)
        sd[E + "embeddings.position_embeddings"] = 0.1 * torch.randn(1, 1 + n, dim, generator=g)
        sd[E + "embeddings.cls_token"] = 0.1 * torch.randn(1, 1, dim, generator=g)
        for i in range(depth):
            lay = f"{E}encoder.layer.{i}."
            for name in ("attention_norm", "ffn_norm"):
                sd[lay + name + ".weight"], sd[lay + name + ".bias"] = _norm(g, dim)
            for name in ("query", "key", "value", "out"):
                sd[lay + f"attn.{name}.weight"], sd[lay + f"attn.{name}.bias"] = _linear(g, dim, dim)
            sd[lay + "ffn.fc1.weight"], sd[lay + "ffn.fc1.bias"] = _linear(g, hidden, dim)
            sd[lay + "ffn.fc2.weight"], sd[lay + "ffn.fc2.bias"] = _linear(g, dim, hidden)
        sd[E + "encoder.encoder_norm.weight"], sd[E + "encoder.encoder_norm.bias"] = _norm(g, dim)
    else:
        E = "enc."
        sd[E + "cls_token"] = 0.1 * torch.randn(1, 1, dim, generator=g)
        sd[E + "pos_embed"] = 0.1 * torch.randn(1, 1 + n, dim, generator=g)
        sd[E + "patch_embed.proj.weight"] = torch.randn(dim, 3, patch, patch, generator=g) / math.sqrt(3 * patch * patch)
        sd[E + "patch_embed.proj.bias"] = 0.1 * torch.randn(dim, generator=g)
        for i in range(depth):
            blk = f"{E}blocks.{i}."
            for name in ("norm1", "norm2"):
                sd[blk + name + ".weight"], sd[blk + name + ".bias"] = _norm(g, dim)
            sd[blk + "attn.qkv.weight"], sd[blk + "attn.qkv.bias"] = _linear(g, 3 * dim, dim)
            sd[blk + "attn.proj.weight"], sd[blk + "attn.proj.bias"] = _linear(g, dim, dim)
            sd[blk + "mlp.fc1.weight"], sd[blk + "mlp.fc1.bias"] = _linear(g, hidden, dim)
            sd[blk + "mlp.fc2.weight"], sd[blk + "mlp.fc2.bias"] = _linear(g, dim, hidden)
        final = "fc_norm" if arch == "mae" else "norm"
        sd[f"{E}{final}.weight"], sd[f"{E}{final}.bias"] = _norm(g, dim)
    sd[E + "prompt_embeddings"] = prompt_scale * torch.randn(1, M, pd, generator=g)
    if deep:
        sd[E + "deep_prompt_embeddings"] = prompt_scale * torch.randn(depth - 1, M, pd, generator=g)
    if project:
        sd[E + "prompt_proj.weight"], sd[E + "prompt_proj.bias"] = _linear(g, dim, project)
    sd["head.last_layer.weight"], sd["head.last_layer.bias"] = _linear(g, classes, dim)
    return sd


# -- the reference forward, written from the spec in plain torch ops (not timm, not VFPTViT) --------------
def _layer_params(sd, arch, i):
    if arch == "vit":
        p = f"enc.transformer.encoder.layer.{i}."
        return {"ln1": (sd[p + "attention_norm.weight"], sd[p + "attention_norm.bias"]),
                "q": (sd[p + "attn.query.weight"], sd[p + "attn.query.bias"]),
                "k": (sd[p + "attn.key.weight"], sd[p + "attn.key.bias"]),
                "v": (sd[p + "attn.value.weight"], sd[p + "attn.value.bias"]),
                "out": (sd[p + "attn.out.weight"], sd[p + "attn.out.bias"]),
                "ln2": (sd[p + "ffn_norm.weight"], sd[p + "ffn_norm.bias"]),
                "fc1": (sd[p + "ffn.fc1.weight"], sd[p + "ffn.fc1.bias"]),
                "fc2": (sd[p + "ffn.fc2.weight"], sd[p + "ffn.fc2.bias"])}
    p = f"enc.blocks.{i}."
    qw, kw, vw = sd[p + "attn.qkv.weight"].chunk(3)
    qb, kb, vb = sd[p + "attn.qkv.bias"].chunk(3)
    return {"ln1": (sd[p + "norm1.weight"], sd[p + "norm1.bias"]), "q": (qw, qb), "k": (kw, kb), "v": (vw, vb),
            "out": (sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"]),
            "ln2": (sd[p + "norm2.weight"], sd[p + "norm2.bias"]),
            "fc1": (sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]),
            "fc2": (sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])}


def _ln(x, wb):
    return F.layer_norm(x, (x.shape[-1],), wb[0], wb[1], eps=1e-6)


def _lin(x, wb):
    return x @ wb[0].T + wb[1]


def _encoder_layer(h, w, heads):
    B, T, Dm = h.shape
    hd = Dm // heads
    y = _ln(h, w["ln1"])
    q, k, v = (_lin(y, w[n]).view(B, T, heads, hd).transpose(1, 2) for n in ("q", "k", "v"))
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
    h = h + _lin((att @ v).transpose(1, 2).reshape(B, T, Dm), w["out"])
    return h + _lin(F.gelu(_lin(_ln(h, w["ln2"]), w["fc1"])), w["fc2"])


def reference_forward(sd, x, *, arch="vit", alpha, location="prepend", heads=HEADS):
    vit = arch == "vit"
    E = "enc.transformer." if vit else "enc."
    emb = (lambda k: sd[E + "embeddings." + k]) if vit else None
    patch_w = emb("patch_embeddings.weight") if vit else sd[E + "patch_embed.proj.weight"]
    patch_b = emb("patch_embeddings.bias") if vit else sd[E + "patch_embed.proj.bias"]
    cls = emb("cls_token") if vit else sd[E + "cls_token"]
    pos = emb("position_embeddings") if vit else sd[E + "pos_embed"]
    B = x.shape[0]
    h = F.conv2d(x, patch_w, patch_b, stride=patch_w.shape[-1]).flatten(2).transpose(1, 2)
    h = torch.cat([cls.expand(B, -1, -1), h], 1) + pos
    P0 = sd[E + "prompt_embeddings"]
    deep = E + "deep_prompt_embeddings" in sd
    M = P0.shape[1]
    m = math.floor(M * alpha + 1e-9)

    def prompts(layer):
        p = P0 if layer == 0 else sd[E + "deep_prompt_embeddings"][layer - 1: layer]
        if E + "prompt_proj.weight" in sd:
            p = _lin(p, (sd[E + "prompt_proj.weight"], sd[E + "prompt_proj.bias"]))
        p = p.expand(B, -1, -1)
        if m == 0:
            return p
        f = torch.fft.fft(torch.fft.fft(p[:, :m], dim=-1), dim=-2).real
        return torch.cat([f, p[:, m:]] if location == "prepend" else [p[:, m:], f], 1)

    h = torch.cat([h[:, :1], prompts(0), h[:, 1:]], 1)
    depth = 1 + max(int(k.split(".")[4 if vit else 2]) for k in sd
                    if k.startswith(E + ("encoder.layer." if vit else "blocks.")))
    for i in range(depth):
        if i > 0 and deep:
            h = torch.cat([h[:, :1], prompts(i), h[:, 1 + M:]], 1)
        h = _encoder_layer(h, _layer_params(sd, arch, i), heads)
    if arch == "mae":
        pooled = _ln(h[:, 1:].mean(1), (sd["enc.fc_norm.weight"], sd["enc.fc_norm.bias"]))
    elif vit:
        pooled = _ln(h, (sd[E + "encoder.encoder_norm.weight"], sd[E + "encoder.encoder_norm.bias"]))[:, 0]
    else:
        pooled = _ln(h, (sd["enc.norm.weight"], sd["enc.norm.bias"]))[:, 0]
    return _lin(pooled, (sd["head.last_layer.weight"], sd["head.last_layer.bias"]))


@pytest.fixture(scope="module")
def x():
    return torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(7))


# -- logits equal the reference -----------------------------------------------------------------------
CASES = [(M, alpha, deep, loc) for M in range(1, 11) for alpha in (0.0, 0.3, 0.5, 1.0)
         for deep in (True, False) for loc in ("prepend", "append")]


@pytest.mark.parametrize(("M", "alpha", "deep", "location"), CASES,
                         ids=[f"M{M}-a{a}-{'deep' if d else 'shallow'}-{loc}" for M, a, d, loc in CASES])
@torch.no_grad()
def test_imported_vit_matches_reference_forward(M, alpha, deep, location, x):
    sd = make_reference(M=M, deep=deep, seed=M, prompt_scale=2.0)
    imported = import_state_dict(sd, alpha=alpha, location=location, heads=HEADS)
    cfg = imported.model.config
    assert (cfg.num_prompts, cfg.deep, cfg.num_fourier) == (M, deep, math.floor(M * alpha + 1e-9))
    assert imported.unused == []
    assert_logits_close(imported.model(x), reference_forward(sd, x, alpha=alpha, location=location), "imported vs reference")


@pytest.mark.parametrize("arch", ["mae", "moco"])
@pytest.mark.parametrize(("M", "alpha", "deep"), [(1, 1.0, True), (6, 0.5, True), (10, 0.3, False), (4, 0.0, True)])
@torch.no_grad()
def test_imported_mae_and_moco_match_reference_forward(arch, M, alpha, deep, x):
    sd = make_reference(arch, M=M, deep=deep, seed=M, prompt_scale=2.0)
    imported = import_state_dict(sd, arch=arch, alpha=alpha, heads=HEADS)
    assert imported.model.pool == ("avg" if arch == "mae" else "token")
    assert imported.backbone.kwargs.get("global_pool") == ("avg" if arch == "mae" else None)
    assert imported.unused == []
    assert_logits_close(imported.model(x), reference_forward(sd, x, arch=arch, alpha=alpha), "imported vs reference")


@torch.no_grad()
def test_prompt_projection_is_imported(x):
    sd = make_reference(M=4, project=6)
    imported = import_state_dict(sd, alpha=0.5, location="append", heads=HEADS)
    assert imported.model.config.project == 6
    assert_logits_close(imported.model(x), reference_forward(sd, x, alpha=0.5, location="append"), "imported vs reference")


def test_architecture_is_read_off_shapes():
    info = infer_backbone(make_reference(), "vit", heads=HEADS)
    assert info.name == "vit_base_patch16_224"
    assert info.kwargs == {"img_size": IMG, "patch_size": PATCH, "embed_dim": D, "depth": L, "num_heads": HEADS,
                           "mlp_ratio": HIDDEN / D}
    # A standard ViT-B/16 keeps its timm name; the head count defaults to the standard one.
    sd = {"enc.transformer.embeddings.patch_embeddings.weight": torch.zeros(768, 3, 16, 16),
          "enc.transformer.embeddings.position_embeddings": torch.zeros(1, 1 + 24 * 24, 768),
          "enc.transformer.encoder.layer.0.ffn.fc1.weight": torch.zeros(3072, 768),
          **{f"enc.transformer.encoder.layer.{i}.attention_norm.weight": torch.zeros(768) for i in range(12)}}
    info = infer_backbone(sd, "vit")
    assert (info.name, info.kwargs) == ("vit_base_patch16_224", {"img_size": 384})
    mae = {k.replace("enc.transformer.embeddings.patch_embeddings", "enc.patch_embed.proj")
           .replace("enc.transformer.embeddings.position_embeddings", "enc.pos_embed")
           .replace("enc.transformer.encoder.layer.", "enc.blocks.").replace("ffn.fc1", "mlp.fc1"): v for k, v in sd.items()}
    info = infer_backbone(mae, "mae")
    assert (info.name, info.kwargs) == ("vit_base_patch16_224.mae", {"img_size": 384, "global_pool": "avg"})
    with pytest.raises(VFPTError, match="pass --heads"):
        infer_backbone(make_reference(), "vit")
    with pytest.raises(VFPTError, match="does not divide"):
        infer_backbone(make_reference(), "vit", heads=5)


def test_classes_option(tmp_path):
    assert parse_classes(None, 3) == ["0", "1", "2"]
    assert parse_classes("cat, dog,bird", 3) == ["cat", "dog", "bird"]
    f = tmp_path / "names.txt"
    f.write_text("cat\ndog\n\nbird\n")
    assert parse_classes(str(f), 3) == ["cat", "dog", "bird"]
    with pytest.raises(VFPTError, match="2 class names for the checkpoint's 3-class head"):
        parse_classes("a,b", 3)
    with pytest.raises(VFPTError, match="duplicate"):
        parse_classes("a,b,a", 3)


# -- the command ------------------------------------------------------------------------------------
def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _save(sd, path, wrap=True, prefix="module."):
    sd = {prefix + k: v for k, v in sd.items()}
    torch.save({"model": sd} if wrap else sd, path)
    return path


@torch.no_grad()
@pytest.mark.parametrize("wrap", [True, False], ids=["model-dict", "bare"])
def test_import_command_writes_a_run_that_matches(tmp_path, x, wrap):
    sd = make_reference(M=7, deep=True, seed=3, prompt_scale=3.0)
    src = _save(sd, tmp_path / "ref.pth", wrap=wrap)
    out = tmp_path / "run.pt"
    res = invoke("import", src, "--out", out, "--alpha", 0.3, "--location", "append", "--heads", HEADS,
                 "--classes", "a,b,c,d,e")
    assert res.exit_code == 0, res.output
    assert "M=7 deep, alpha=0.3 (m=2 Fourier), append, 5 classes, token pooling; 0 unused keys" in res.output
    run = load_run(out)
    assert run.classes == ["a", "b", "c", "d", "e"]
    assert run.preprocess.resize == [IMG, IMG] and run.preprocess.crop is None
    assert run.preprocess.mean == [0.485, 0.456, 0.406]
    assert run.backbone.source == f"imported from {src}"
    assert run.meta["import"]["arch"] == "vit" and run.meta["import"]["unused_keys"] == []
    assert_logits_close(run.model(x), reference_forward(sd, x, alpha=0.3, location="append"), "imported vs reference")
    info = invoke("info", out)
    assert info.exit_code == 0 and "M=7 deep, alpha=0.3" in info.output


@torch.no_grad()
def test_import_mae_command(tmp_path, x):
    sd = make_reference("mae", M=3, seed=1)
    out = tmp_path / "run.pt"
    res = invoke("import", _save(sd, tmp_path / "mae.pth"), "--out", out, "--alpha", 1.0, "--arch", "mae",
                 "--heads", HEADS, "--crop-pct", 0.875)
    assert res.exit_code == 0, res.output
    run = load_run(out)
    assert run.model.pool == "avg" and run.backbone.kwargs["global_pool"] == "avg"
    assert run.preprocess.crop == [IMG, IMG] and run.preprocess.resize == round(IMG / 0.875)
    assert_logits_close(run.model(x), reference_forward(sd, x, arch="mae", alpha=1.0), "imported vs reference")


def test_unused_keys_are_listed(tmp_path):
    sd = make_reference(M=2)
    sd["enc.transformer.extra_thing"] = torch.zeros(3)
    sd["side.weight"] = torch.zeros(2, 2)
    res = invoke("import", _save(sd, tmp_path / "ref.pth"), "--out", tmp_path / "run.pt", "--alpha", 0.5,
                 "--heads", HEADS)
    assert res.exit_code == 0, res.output
    assert "unused key enc.transformer.extra_thing" in res.output and "unused key side.weight" in res.output
    assert "2 unused keys" in res.output
    assert load_run(tmp_path / "run.pt").meta["import"]["unused_keys"] == ["enc.transformer.extra_thing", "side.weight"]


def _without(sd, key):
    return {k: v for k, v in sd.items() if k != key}


def _swin_like():
    return {"enc.patch_embed.proj.weight": torch.zeros(128, 3, 4, 4), "enc.prompt_embeddings": torch.zeros(1, 5, 128),
            "enc.deep_prompt_embeddings_0": torch.zeros(1, 5, 128),
            "enc.layers.0.blocks.0.attn.relative_position_bias_table": torch.zeros(169, 4),
            "head.last_layer.weight": torch.zeros(5, 1024)}


def _mlp_head():
    sd = make_reference(M=2)
    sd["head.projection.0.weight"] = torch.zeros(D, D)
    return sd


def _reshaped(sd, key, shape):
    return {**sd, key: torch.zeros(shape)}


BAD = {
    "missing-key": (lambda: _without(make_reference(M=2), "enc.transformer.encoder.layer.1.attn.key.bias"),
                    [], "1 tensors missing from the checkpoint, first enc.transformer.encoder.layer.1.attn.key.bias"),
    "missing-head": (lambda: _without(make_reference(M=2), "head.last_layer.weight"), [], "missing tensor head.last_layer.weight"),
    "missing-prompts": (lambda: _without(make_reference(M=2), "enc.transformer.prompt_embeddings"), [],
                        "missing tensor enc.transformer.prompt_embeddings"),
    "shape-mismatch": (lambda: _reshaped(make_reference(M=2), "enc.transformer.encoder.layer.2.ffn.fc2.weight", (D, 7)), [],
                       "tensor enc.transformer.encoder.layer.2.ffn.fc2.weight has shape (32, 7) but (32, 48) fits"),
    "deep-depth-mismatch": (lambda: _reshaped(make_reference(M=2), "enc.transformer.deep_prompt_embeddings", (5, 2, D)), [],
                            "tensor enc.transformer.deep_prompt_embeddings has shape (5, 2, 32) but (2, 2, 32)"),
    "swin": (_swin_like, [], "Swin checkpoint (enc.layers.*): pass --arch swin"),
    "mlp-head": (_mlp_head, [], "MLP head (head.projection.*, MLP_NUM > 0), which is not supported yet"),
    "wrong-arch": (lambda: make_reference("mae", M=2), [], "pass --arch mae or --arch moco"),
    "mae-as-moco": (lambda: make_reference("mae", M=2), ["--arch", "moco"], "pass --arch mae"),
    "vit-as-mae": (lambda: make_reference(M=2), ["--arch", "mae"], "pass --arch vit"),
    "random-location": (lambda: make_reference(M=2), ["--location", "random"], "'random' is not one of"),
    "class-count": (lambda: make_reference(M=2), ["--classes", "a,b"], "2 class names for the checkpoint's 5-class head"),
    "not-a-vfpt": (lambda: {"weight": torch.zeros(2)}, [], "not a reference VPT/VFPT ViT checkpoint"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_state_dicts_are_one_line_errors(case, tmp_path):
    make, extra, message = BAD[case]
    out = tmp_path / "run.pt"
    res = invoke("import", _save(make(), tmp_path / "ref.pth"), "--out", out, "--alpha", 0.5, "--heads", HEADS, *extra)
    assert res.exit_code == (2 if case == "random-location" else 1), res.output  # 2: a bad option value
    assert message in " ".join(res.output.split()), res.output
    assert "Traceback" not in res.output and not out.exists()


def test_bad_files_are_one_line_errors(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("this is not a checkpoint\n")
    good = _save(make_reference(M=2), tmp_path / "ref.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    listy = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], listy)
    run = tmp_path / "run.pt"
    assert invoke("import", good, "--out", run, "--alpha", 0.5, "--heads", HEADS).exit_code == 0
    for path, message in [(text, "truncated or not a torch checkpoint"), (truncated, "truncated or not a torch checkpoint"),
                          (listy, "does not hold a state dict of tensors"), (tmp_path / "nope.pth", "does not exist"),
                          (run, "already a vfpt-deploy run checkpoint")]:
        res = invoke("import", path, "--out", tmp_path / "out.pt", "--alpha", 0.5, "--heads", HEADS)
        assert res.exit_code == 1, (path, res.output)
        assert message in " ".join(res.output.split()), res.output
        assert "Traceback" not in res.output


def test_alpha_is_required(tmp_path):
    res = invoke("import", _save(make_reference(M=2), tmp_path / "ref.pth"), "--out", tmp_path / "run.pt")
    assert res.exit_code != 0 and "--alpha" in res.output


@pytest.mark.slow
@torch.no_grad()
def test_vit_b16_reference_checkpoint(tmp_path):
    """ViT-B/16 sized: the standard timm name and head count are inferred, logits match the reference."""
    sd = make_reference(M=10, seed=1, classes=100, depth=12, dim=768, hidden=3072, patch=16, img=224)
    src = _save(sd, tmp_path / "vfpt_vitb16.pth")
    out = tmp_path / "run.pt"
    res = invoke("import", src, "--out", out, "--alpha", 0.5)
    assert res.exit_code == 0, res.output
    run = load_run(out)
    assert (run.backbone.name, run.backbone.kwargs) == ("vit_base_patch16_224", {"img_size": 224})
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    assert_logits_close(run.model(x), reference_forward(sd, x, alpha=0.5, heads=12), "imported vs reference")
