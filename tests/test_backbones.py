"""Backbone weights from every source the reference uses, and MAE (avg-pool) / MoCo-v3 (CLS) prompted ViTs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from typer.testing import CliRunner

from vfpt_deploy.models.backbone import build_backbone, create_backbone, state_sha256
from vfpt_deploy.artifacts.checkpoint import load_run
from vfpt_deploy.cli import app
from vfpt_deploy.models.config import VFPTConfig
from vfpt_deploy.errors import VFPTError
from vfpt_deploy.models.vit.model import VFPTViT

from conftest import TINY, TINY_KWARGS, assert_logits_close, tiny_backbone

AVG = {**TINY_KWARGS, "global_pool": "avg"}


def _perturbed(seed=0, **overrides):
    """A tiny backbone whose LayerNorms and biases are not at their init values, so loading is visible."""
    bb = tiny_backbone(seed, **overrides)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in bb.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return bb


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- timm state dicts -----------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["pth", "pth-model-module", "safetensors"])
def test_timm_state_dict_files(tmp_path, form):
    src = _perturbed()
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    if form == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(sd, str(path))
    elif form == "pth":
        path = tmp_path / "w.pth"
        torch.save(sd, path)
    else:
        path = tmp_path / "w.pth"
        torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    loaded = build_backbone(TINY, TINY_KWARGS, str(path))
    assert _same(loaded, src) and state_sha256(loaded.state_dict()) == state_sha256(src.state_dict())


def test_mismatched_state_dict_names_the_first_misfit(tmp_path):
    wide = tmp_path / "wide.pth"
    torch.save(_perturbed(embed_dim=48).state_dict(), wide)
    with pytest.raises(VFPTError, match=r"tensor cls_token has shape \(1, 1, 48\) but the model expects \(1, 1, 32\)"):
        build_backbone(TINY, TINY_KWARGS, str(wide))
    deep = tmp_path / "deep.pth"
    torch.save(_perturbed(depth=4).state_dict(), deep)
    with pytest.raises(VFPTError, match=r"deep\.pth holds 4 transformer blocks but the model has 3"):
        build_backbone(TINY, TINY_KWARGS, str(deep))
    with pytest.raises(VFPTError, match=r"d3\.pth holds 3 transformer blocks but the model has 4"):
        build_backbone(TINY, {**TINY_KWARGS, "depth": 4}, str(_save(tmp_path / "d3.pth", _perturbed().state_dict())))
    holed = {k: v for k, v in _perturbed().state_dict().items() if k != "blocks.1.norm1.weight"}
    with pytest.raises(VFPTError, match=r"1 tensors missing, first blocks\.1\.norm1\.weight"):
        build_backbone(TINY, TINY_KWARGS, str(_save(tmp_path / "holed.pth", holed)))
    extra = {**_perturbed().state_dict(), "blocks.1.extra": torch.zeros(2)}
    with pytest.raises(VFPTError, match=r"1 unexpected tensors, first blocks\.1\.extra"):
        build_backbone(TINY, TINY_KWARGS, str(_save(tmp_path / "extra.pth", extra)))


def _save(path, obj):
    torch.save(obj, path)
    return path


# -- JAX .npz (the reference's imagenet21k_ViT-B_16.npz layout, read by timm's _load_weights) ---------
def to_jax_npz(model, path):
    """Write a timm ViT in the original JAX ViT .npz layout (per-block encoderblock_{i} keys)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    heads = model.blocks[0].attn.num_heads
    D = model.embed_dim
    hd = D // heads
    w = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": sd["patch_embed.proj.bias"],
         "cls": sd["cls_token"],
         "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
         "Transformer/encoder_norm/scale": sd["norm.weight"],
         "Transformer/encoder_norm/bias": sd["norm.bias"]}
    for i in range(len(model.blocks)):
        b, j = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        w[j + "LayerNorm_0/scale"], w[j + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        w[j + "LayerNorm_2/scale"], w[j + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        qkv_w, qkv_b = np.split(sd[b + "attn.qkv.weight"], 3), np.split(sd[b + "attn.qkv.bias"], 3)
        for n, wt, bs in zip(("query", "key", "value"), qkv_w, qkv_b):
            w[j + f"MultiHeadDotProductAttention_1/{n}/kernel"] = wt.T.reshape(D, heads, hd)
            w[j + f"MultiHeadDotProductAttention_1/{n}/bias"] = bs.reshape(heads, hd)
        w[j + "MultiHeadDotProductAttention_1/out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(heads, hd, D)
        w[j + "MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            w[j + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[j + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **w)
    return path


def test_jax_npz_loads_through_timm(tmp_path):
    src = _perturbed()
    path = to_jax_npz(src, tmp_path / "imagenet21k_ViT-T.npz")
    loaded = build_backbone(TINY, TINY_KWARGS, str(path))
    for k, v in src.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=1e-7, msg=k)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), src(x), rtol=0, atol=1e-6)


def test_mismatched_npz_is_a_clear_error(tmp_path):
    path = to_jax_npz(_perturbed(), tmp_path / "vit.npz")
    with pytest.raises(VFPTError, match=r"tensor patch_embed\.proj\.weight gets shape \(32, 3, 8, 8\) from the file "
                                        r"but the model expects \(48, 3, 8, 8\)"):
        build_backbone(TINY, {**TINY_KWARGS, "embed_dim": 48}, str(path))
    with pytest.raises(VFPTError, match="holds 3 transformer blocks but the model has 2"):
        build_backbone(TINY, {**TINY_KWARGS, "depth": 2}, str(path))
    with pytest.raises(VFPTError, match="holds 3 transformer blocks but the model has 4"):
        build_backbone(TINY, {**TINY_KWARGS, "depth": 4}, str(path))
    wide_mlp = {**TINY_KWARGS, "mlp_ratio": 2.0}
    with pytest.raises(VFPTError, match=r"tensor blocks\.0\.mlp\.fc1\.weight gets shape"):
        build_backbone(TINY, wide_mlp, str(path))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(VFPTError, match="not a readable .npz"):
        build_backbone(TINY, TINY_KWARGS, str(bad))


# -- MAE and MoCo-v3 files -------------------------------------------------------------------------------
def test_mae_pretrain_file_for_avg_and_token_pooling(tmp_path):
    """mae_pretrain_vit_*.pth: {'model': encoder (+ decoder when saved from pretraining)}."""
    src = _perturbed()
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    path = _save(tmp_path / "mae_pretrain_vit_tiny.pth",
                 {"model": {**sd, "mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.zeros(16, 32),
                            "decoder_pred.bias": torch.zeros(192)}})
    avg = build_backbone(TINY, AVG, str(path))
    assert isinstance(avg.norm, torch.nn.Identity)
    # MAE fine-tuning (and the reference) drop the encoder norm and start fc_norm as the identity LayerNorm.
    assert torch.equal(avg.fc_norm.weight, torch.ones(32)) and torch.equal(avg.fc_norm.bias, torch.zeros(32))
    for k, v in avg.state_dict().items():
        if not k.startswith("fc_norm."):
            assert torch.equal(v, sd[k]), k
    token = build_backbone(TINY, TINY_KWARGS, str(path))  # timm's own `.mae` default: CLS pooling after norm
    assert _same(token, src)


@pytest.mark.parametrize("layout", ["pretrain", "linear"])
def test_mocov3_file(tmp_path, layout):
    """MoCo-v3 .pth.tar: {'state_dict': {'module.base_encoder.*', 'module.momentum_encoder.*', ...}} from
    pretraining, or {'state_dict': {'module.*'}} from linear evaluation; plus epoch/arch/optimizer."""
    base, momentum = _perturbed(seed=0), _perturbed(seed=5)
    if layout == "pretrain":
        state = {**{f"module.base_encoder.{k}": v for k, v in base.state_dict().items()},
                 "module.base_encoder.head.0.weight": torch.zeros(64, 32),
                 **{f"module.momentum_encoder.{k}": v for k, v in momentum.state_dict().items()},
                 "module.predictor.0.weight": torch.zeros(64, 64)}
    else:
        state = {**{f"module.{k}": v for k, v in base.state_dict().items()},
                 "module.head.weight": torch.zeros(1000, 32), "module.head.bias": torch.zeros(1000)}
    path = _save(tmp_path / "mocov3-vit-tiny.pth.tar",
                 {"epoch": 300, "arch": "vit_tiny", "state_dict": state,
                  "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}})
    assert _same(build_backbone(TINY, TINY_KWARGS, str(path)), base)


def test_file_for_another_architecture_names_the_tensor(tmp_path):
    path = _save(tmp_path / "mae_pretrain_vit_base.pth", {"model": _perturbed(embed_dim=48, num_heads=3).state_dict()})
    with pytest.raises(VFPTError, match=r"mae_pretrain_vit_base\.pth: tensor cls_token has shape \(1, 1, 48\)"):
        build_backbone(TINY, AVG, str(path))


# -- avg-pooled (MAE) prompted ViTs ----------------------------------------------------------------------
def _hand_forward(model, x):
    """MAE-style VFPT forward by hand: prompts after the position embedding, deep ones replace rows
    1..M, mean over every row after CLS (last block's prompt outputs included), fc_norm, head."""
    bb, cfg = model.backbone, model.config
    M, m = cfg.num_prompts, cfg.num_fourier
    B = x.shape[0]
    h = torch.cat([bb.cls_token.expand(B, -1, -1), bb.patch_embed.proj(x).flatten(2).transpose(1, 2)], 1) + bb.pos_embed

    def prompts(i):
        p = model.prompt_embeddings[0] if i == 0 else model.deep_prompt_embeddings[i - 1]
        if m:
            f = torch.fft.fft(torch.fft.fft(p[:m], dim=-1), dim=-2).real
            p = torch.cat([f, p[m:]] if cfg.location == "prepend" else [p[m:], f])
        return p.expand(B, -1, -1)

    h = torch.cat([h[:, :1], prompts(0), h[:, 1:]], 1)
    for i, blk in enumerate(bb.blocks):
        if i and cfg.deep:
            h = torch.cat([h[:, :1], prompts(i), h[:, 1 + M:]], 1)
        h = blk(h)
    pooled = F.layer_norm(h[:, 1:].mean(1), (h.shape[-1],), bb.fc_norm.weight, bb.fc_norm.bias, eps=1e-6)
    return model.head(pooled)


@pytest.mark.parametrize("cfg", [dict(num_prompts=4, alpha=0.5, deep=True), dict(num_prompts=3, alpha=1.0, deep=False),
                                 dict(num_prompts=5, alpha=0.4, deep=True, location="append")])
@torch.no_grad()
def test_avg_pool_model_matches_hand_written_forward(cfg, images):
    torch.manual_seed(0)
    bb = create_backbone(TINY, **AVG)
    with torch.no_grad():
        bb.fc_norm.weight.add_(0.3 * torch.randn(32))
        bb.fc_norm.bias.add_(0.3 * torch.randn(32))
    model = VFPTViT(bb, 5, VFPTConfig(**cfg)).eval()
    assert model.pool == "avg"
    assert_logits_close(model(images), _hand_forward(model, images), "model vs hand-written forward")
    # The prompt rows of the last block matter under avg pooling (they do not under CLS pooling).
    feats = model.forward_features(images)
    assert not torch.allclose(model.forward_head(feats), model.head(bb.fc_norm(feats[:, 1 + cfg["num_prompts"]:].mean(1))))


def test_pool_property_and_refused_pools():
    assert VFPTViT(tiny_backbone(), 3, VFPTConfig(num_prompts=2)).pool == "token"
    for kwargs, message in [({"global_pool": "max"}, "global_pool='max'"), ({"global_pool": "avgmax"}, "global_pool='avgmax'"),
                            ({"global_pool": "map"}, "global_pool='map'"),
                            ({"global_pool": "avg", "class_token": False}, "no class token"),
                            ({"global_pool": "", "class_token": True}, "global_pool=''")]:
        with pytest.raises(VFPTError, match=message):
            create_backbone(TINY, **{**TINY_KWARGS, **kwargs})


def test_train_command_with_avg_pooling(tmp_path):
    out = tmp_path / "run.pt"
    args = ["train", "--out", out, "--model", "vit_base_patch16_224.mae", "--weights", "random", "--epochs", 1, "--prompts", 3,
            "--alpha", 0.5, "--batch-size", 256, "--warmup-epochs", 0,
            *sum((["--model-arg", f"{k}={v}"] for k, v in AVG.items()), [])]
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    run = load_run(out)
    assert run.model.pool == "avg" and run.backbone.kwargs["global_pool"] == "avg"
    assert run.preprocess.mean == [0.485, 0.456, 0.406]  # the .mae tag's normalization
