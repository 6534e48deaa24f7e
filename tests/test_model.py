"""VFPTViT against docs/model.md (sections 1-2): every test runs the model and looks at what it does."""
import numpy as np
import pytest
import torch

from vfpt_deploy.models.backbone import create_backbone
from vfpt_deploy.models.config import VFPTConfig
from vfpt_deploy.models.vit.model import VFPTViT
from vfpt_deploy.train import TrainSettings, fit

from conftest import assert_logits_close, tiny_backbone, tiny_model

N_PATCHES = 16  # conftest's tiny ViT: 32 x 32 images, 8 x 8 patches


def np_prompt_block(p: np.ndarray, m: int, location: str) -> np.ndarray:
    """Independent: numpy float64 FFT of the first m prompts, real part, placed per location."""
    if m == 0:
        return p
    f = np.fft.fft2(p[:m].astype(np.float64)).real.astype(np.float32)
    return np.concatenate([f, p[m:]] if location == "prepend" else [p[m:], f])


def expected_prompts(model: VFPTViT, layer: int) -> torch.Tensor:
    """Layer `layer`'s prompt block from the parameters, through numpy: [M, D]."""
    raw = model.prompt_embeddings[0] if layer == 0 else model.deep_prompt_embeddings[layer - 1]
    raw = model.prompt_proj(raw).detach().numpy()
    return torch.from_numpy(np_prompt_block(raw, model.config.num_fourier, model.config.location))


def reference_forward(model: VFPTViT, x: torch.Tensor) -> torch.Tensor:
    """The VFPT forward written out by hand from docs/model.md, block by block."""
    bb, cfg = model.backbone, model.config
    M = cfg.num_prompts
    B = x.shape[0]
    tokens = bb.patch_embed.proj(x).flatten(2).transpose(1, 2)  # [B, N, D]
    cls = bb.cls_token.expand(B, -1, -1)
    h = torch.cat([cls, tokens], 1) + bb.pos_embed  # position embedding on CLS + patches only

    if M:
        h = torch.cat([h[:, :1], expected_prompts(model, 0).expand(B, -1, -1), h[:, 1:]], 1)
    for i, blk in enumerate(bb.blocks):
        if i > 0 and M and cfg.deep:
            h = torch.cat([h[:, :1], expected_prompts(model, i).expand(B, -1, -1), h[:, 1 + M:]], 1)
        h = blk(h)
    h = bb.norm(h)
    pooled = h[:, 0] if bb.global_pool == "token" else bb.fc_norm(h[:, 1:].mean(1))
    return model.head(pooled)


CASES = [dict(num_prompts=M, alpha=a, deep=d, location=loc)
         for M in (1, 5) for a in (0.0, 0.4, 1.0) for d in (True, False) for loc in ("prepend", "append")]


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@torch.no_grad()
def test_model_matches_hand_written_forward(cfg, images):
    model = tiny_model(scale=4.0, **cfg)
    assert_logits_close(model(images), reference_forward(model, images), "model vs hand-written forward")


@torch.no_grad()
def test_projection_forward_matches_reference(images):
    model = tiny_model(num_prompts=4, alpha=0.5, project=6)
    assert model.prompt_embeddings.shape == (1, 4, 6)
    assert_logits_close(model(images), reference_forward(model, images), "model vs hand-written forward")


@pytest.mark.parametrize("deep", [True, False])
@torch.no_grad()
def test_mean_pooling_reads_prompt_rows_like_the_reference(deep, images):
    torch.manual_seed(1)
    model = VFPTViT(tiny_backbone(global_pool="avg"), 4, VFPTConfig(num_prompts=6, alpha=0.5, deep=deep)).eval()
    for p in model.tuned_parameters().values():
        p.mul_(4.0)
    assert_logits_close(model(images), reference_forward(model, images), "model vs hand-written forward")


# -- what each block sees ------------------------------------------------------------------------

def _block_inputs(model, x):
    seen = []
    hooks = [blk.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
             for blk in model.backbone.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("deep", [True, False])
@pytest.mark.parametrize("M", [0, 1, 7])
def test_prompts_enter_the_sequence(M, deep, images):
    model = tiny_model(num_prompts=M, alpha=0.5, deep=deep)
    seen = _block_inputs(model, images)
    assert len(seen) == model.depth
    for inp in seen:
        assert inp.shape == (images.shape[0], 1 + M + N_PATCHES, model.embed_dim)


@pytest.mark.parametrize("location", ["prepend", "append"])
def test_prompts_get_no_position_embedding(location, images):
    model = tiny_model(num_prompts=5, alpha=0.4, location=location)
    x0 = _block_inputs(model, images)[0]
    for b in range(images.shape[0]):  # rows 1..M are exactly the prompt block, nothing added
        torch.testing.assert_close(x0[b, 1:6], expected_prompts(model, 0), rtol=0, atol=1e-5)
    # CLS and patches do carry the position embedding.
    bb = model.backbone
    with torch.no_grad():
        emb = torch.cat([bb.cls_token.expand(4, -1, -1), bb.patch_embed(images)], 1) + bb.pos_embed
    torch.testing.assert_close(x0[:, [0, *range(6, x0.shape[1])]], emb)


@pytest.mark.parametrize("location", ["prepend", "append"])
def test_deep_prompts_replace_the_previous_prompt_outputs(location, images):
    model = tiny_model(num_prompts=3, alpha=0.34, deep=True, location=location)
    seen = _block_inputs(model, images)
    for i in range(1, model.depth):
        with torch.no_grad():
            prev_out = model.backbone.blocks[i - 1](seen[i - 1])
        # CLS and patch rows: the previous block's output, untouched.
        assert torch.equal(seen[i][:, 0], prev_out[:, 0])
        assert torch.equal(seen[i][:, 4:], prev_out[:, 4:])
        # Prompt rows: this layer's own prompts, not what the previous block made of its prompts.
        for b in range(images.shape[0]):
            torch.testing.assert_close(seen[i][b, 1:4], expected_prompts(model, i), rtol=0, atol=1e-5)
        assert (seen[i][:, 1:4] - prev_out[:, 1:4]).abs().max() > 0.1


@pytest.mark.parametrize("deep", [True, False])
@torch.no_grad()
def test_location_orders_the_prompt_rows_but_not_the_logits(deep, images):
    pre = tiny_model(scale=4.0, num_prompts=5, alpha=0.4, deep=deep, location="prepend")
    app = tiny_model(scale=4.0, num_prompts=5, alpha=0.4, deep=deep, location="append")
    x_pre, x_app = _block_inputs(pre, images)[0], _block_inputs(app, images)[0]
    assert torch.equal(x_pre[:, 1:3], x_app[:, 4:6])  # F(P[:2]): rows 1-2 vs rows 4-5
    assert torch.equal(x_pre[:, 3:6], x_app[:, 1:4])  # P[2:]: rows 3-5 vs rows 1-3
    assert (x_pre[:, 1:6] - x_app[:, 1:6]).abs().max() > 0.1
    # No position embedding on prompts, and blocks treat rows as a set: the order does not reach the logits.
    assert_logits_close(pre(images), app(images), "prepend vs append")


def test_shallow_prompts_flow_on(images):
    model = tiny_model(num_prompts=3, alpha=0.5, deep=False)
    assert model.deep_prompt_embeddings is None
    seen = _block_inputs(model, images)
    for i in range(1, model.depth):
        with torch.no_grad():
            prev_out = model.backbone.blocks[i - 1](seen[i - 1])
        assert torch.equal(seen[i], prev_out)  # block i sees block i-1's prompt outputs, untouched


def test_alpha_zero_feeds_the_raw_prompts(images):
    model = tiny_model(num_prompts=5, alpha=0.0, deep=True)
    seen = _block_inputs(model, images)
    raw = [model.prompt_embeddings[0]] + list(model.deep_prompt_embeddings)
    for i, inp in enumerate(seen):
        assert torch.equal(inp[:, 1:6], raw[i].detach().expand(images.shape[0], -1, -1))


# -- prompts matter, backbone frozen -------------------------------------------------------------

@pytest.mark.parametrize("location", ["prepend", "append"])
@torch.no_grad()
def test_changing_any_layers_prompt_changes_the_logits(location, images):
    model = tiny_model(num_prompts=4, alpha=0.5, deep=True, location=location)
    base = model(images)
    g = torch.Generator().manual_seed(0)
    for layer in range(model.depth):
        for row in (0, 3):  # a Fourier row and a plain one
            param = model.prompt_embeddings[0] if layer == 0 else model.deep_prompt_embeddings[layer - 1]
            old = param[row].clone()
            param[row] += 0.5 * torch.randn(param.shape[-1], generator=g)  # not a constant: LayerNorm removes those
            changed = model(images)
            param[row] = old
            assert (changed - base).abs().max() > 1e-3, (layer, row)
    assert torch.equal(model(images), base)  # restored


@torch.no_grad()
def test_changing_the_shallow_prompt_changes_the_logits(images):
    model = tiny_model(num_prompts=4, alpha=0.5, deep=False)
    base = model(images)
    model.prompt_embeddings[0, 3] += 0.5 * torch.randn(model.embed_dim, generator=torch.Generator().manual_seed(0))
    assert (model(images) - base).abs().max() > 1e-3


def test_frozen_backbone_gets_no_gradients(images):
    model = tiny_model(num_prompts=4, alpha=0.5, project=6)
    assert set(model.tuned_parameters()) == {"prompt_embeddings", "deep_prompt_embeddings", "prompt_proj.weight",
                                             "prompt_proj.bias", "head.weight", "head.bias"}
    model.train()
    loss = torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, p in model.backbone.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    for name, p in model.tuned_parameters().items():
        assert p.grad is not None and p.grad.abs().max() > 0, name


# -- init ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "v"), [("vit_tiny_patch16_224", 0.0790569415),
                                         ("vit_small_patch32_224", 0.0416666667),
                                         ("vit_base_patch16_224", 0.0625),
                                         ("vit_large_patch32_224", 0.0382732772)])
def test_reference_init_range_and_forward_at_any_fixed_size(name, v):
    bb = create_backbone(name, depth=2, img_size=96)
    model = VFPTViT(bb, 3, VFPTConfig(num_prompts=4)).eval()
    for p in (model.prompt_embeddings, model.deep_prompt_embeddings):
        assert p.abs().max() <= v and p.max() > 0.9 * v and p.min() < -0.9 * v  # uniform(-v, v)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, 3)


def test_init_range_follows_the_projection_width():
    torch.manual_seed(0)
    model = VFPTViT(tiny_backbone(), 3, VFPTConfig(num_prompts=40, project=6))
    v = 0.1740776560  # sqrt(6 / (3 * 8 * 8 + 6)): the prompts are learned 6 wide
    assert model.prompt_embeddings.abs().max() <= v and model.prompt_embeddings.abs().max() > 0.9 * v


# -- training ------------------------------------------------------------------------------------

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
    for name, p in model.backbone.named_parameters():
        assert not p.requires_grad, name
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
