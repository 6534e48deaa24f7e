import numpy as np
import pytest
import torch

from vfpt_deploy.backbone import create_backbone
from vfpt_deploy.config import VFPTConfig
from vfpt_deploy.model import VFPTViT
from vfpt_deploy.train import TrainSettings, fit

from conftest import tiny_backbone, tiny_model


def np_prompt_block(p: np.ndarray, m: int, location: str) -> np.ndarray:
    """Independent: numpy float64 FFT of the first m prompts, real part, placed per location."""
    if m == 0:
        return p
    f = np.fft.fft2(p[:m].astype(np.float64)).real.astype(np.float32)
    return np.concatenate([f, p[m:]] if location == "prepend" else [p[m:], f])


def reference_forward(model: VFPTViT, x: torch.Tensor) -> torch.Tensor:
    """The VFPT forward written out by hand from the spec, block by block."""
    bb, cfg = model.backbone, model.config
    M, m = cfg.num_prompts, cfg.num_fourier
    B = x.shape[0]
    tokens = bb.patch_embed.proj(x).flatten(2).transpose(1, 2)  # [B, N, D]
    cls = bb.cls_token.expand(B, -1, -1)
    h = torch.cat([cls, tokens], 1) + bb.pos_embed  # position embedding on CLS + patches only

    def prompts(layer):
        raw = model.prompt_embeddings[0] if layer == 0 else model.deep_prompt_embeddings[layer - 1]
        raw = model.prompt_proj(raw).detach().numpy()
        return torch.from_numpy(np_prompt_block(raw, m, cfg.location)).expand(B, -1, -1)

    if M:
        h = torch.cat([h[:, :1], prompts(0), h[:, 1:]], 1)
    for i, blk in enumerate(bb.blocks):
        if i > 0 and M and cfg.deep:
            h = torch.cat([h[:, :1], prompts(i), h[:, 1 + M:]], 1)
        h = blk(h)
    return model.head(bb.norm(h)[:, 0])


CASES = [dict(num_prompts=M, alpha=a, deep=d, location=loc)
         for M in (1, 5) for a in (0.0, 0.4, 1.0) for d in (True, False) for loc in ("prepend", "append")]


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@torch.no_grad()
def test_model_matches_hand_written_forward(cfg, images):
    model = tiny_model(scale=4.0, **cfg)
    np.testing.assert_allclose(model(images).numpy(), reference_forward(model, images).numpy(), atol=2e-5)


@torch.no_grad()
def test_projection_forward_matches_reference(images):
    model = tiny_model(num_prompts=4, alpha=0.5, project=6)
    assert model.prompt_embeddings.shape == (1, 4, 6)
    np.testing.assert_allclose(model(images).numpy(), reference_forward(model, images).numpy(), atol=2e-5)


def test_alpha_zero_is_plain_vpt():
    model = tiny_model(num_prompts=5, alpha=0.0)
    assert model.config.num_fourier == 0
    for layer in range(model.depth):
        assert torch.equal(model.layer_prompts(layer, 2)[0], model.raw_prompts(layer)[0])


def _block_inputs(model, x):
    seen = []
    hooks = [blk.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
             for blk in model.backbone.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_prompts_get_no_position_embedding_and_deep_prompts_replace(images):
    model = tiny_model(num_prompts=3, alpha=0.34, deep=True)
    seen = _block_inputs(model, images)
    for i, inp in enumerate(seen):
        assert torch.equal(inp[:, 1:4], model.layer_prompts(i, images.shape[0]))  # exactly the block, nothing added
    # CLS and patches do carry the position embedding.
    bb = model.backbone
    emb = torch.cat([bb.cls_token.expand(4, -1, -1), bb.patch_embed(images)], 1) + bb.pos_embed
    torch.testing.assert_close(seen[0][:, [0, *range(4, seen[0].shape[1])]], emb.detach())


def test_shallow_prompts_flow_on(images):
    model = tiny_model(num_prompts=3, alpha=0.5, deep=False)
    assert model.deep_prompt_embeddings is None
    seen = _block_inputs(model, images)
    with torch.no_grad():
        out0 = model.backbone.blocks[0](seen[0])
    assert torch.equal(seen[1], out0)  # block 1 sees block 0's prompt outputs, untouched


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch32_224", "vit_base_patch16_224",
                                  "vit_large_patch32_224"])
def test_standard_vits_build_at_any_fixed_size(name):
    bb = create_backbone(name, depth=1, img_size=96)
    model = VFPTViT(bb, 3, VFPTConfig(num_prompts=2)).eval()
    ph = bb.patch_embed.patch_size[0]
    v = (6.0 / (3 * ph * ph + bb.embed_dim)) ** 0.5
    assert model.prompt_embeddings.abs().max() <= v
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, 3)


def test_reference_init_value_for_vit_b16():
    bb = create_backbone("vit_base_patch16_224", depth=1)
    v = (6.0 / (3 * 16 * 16 + 768)) ** 0.5
    assert abs(v - 0.0625) < 1e-12
    model = VFPTViT(bb, 2, VFPTConfig(num_prompts=50))
    assert 0.05 < model.prompt_embeddings.abs().max() <= v


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, n=24):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.randint(0, 5, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_training_changes_prompts_and_head_only():
    bb = tiny_backbone(drop_rate=0.5, drop_path_rate=0.5, attn_drop_rate=0.5)  # would be noisy if not in eval
    model = VFPTViT(bb, 5, VFPTConfig(num_prompts=3, alpha=0.5, project=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, _Pairs(), _Pairs(8), TrainSettings(epochs=2, lr=0.5, batch_size=8, warmup_epochs=0),
        device=torch.device("cpu"))
    after = model.state_dict()
    for k in before:
        if k.startswith("backbone."):
            assert torch.equal(before[k], after[k]), k
            assert not model.get_parameter(k).requires_grad if k in dict(model.named_parameters()) else True
    for k in ("prompt_embeddings", "deep_prompt_embeddings", "prompt_proj.weight", "head.weight", "head.bias"):
        assert not torch.equal(before[k], after[k]), k
    model.train()
    assert not model.backbone.training and all(not m.training for m in model.backbone.modules())
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(model(x), model(x))  # frozen backbone: no dropout even in train mode


def test_prompt_dropout_only_while_training():
    model = tiny_model(num_prompts=4, alpha=0.5, dropout=0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        torch.manual_seed(0)
        a = model(x)
        assert not torch.equal(a, model(x))
