import pytest
import torch

from vfpt_deploy.errors import VFPTError
from vfpt_deploy.fold import fold_model, prompt_blocks
from vfpt_deploy.fourier import prompt_block

from conftest import tiny_model

CASES = [dict(num_prompts=M, alpha=a, deep=d, location=loc)
         for M in (1, 10, 50) for a in (0.0, 0.3, 1.0) for d in (True, False) for loc in ("prepend", "append")]


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@torch.no_grad()
def test_fold_parity(cfg, dtype, images):
    model = tiny_model(scale=4.0, **cfg)  # trained prompts are far from their tiny init
    ref = model(images)
    modes = ["tokens", "kv"] if cfg["deep"] else ["tokens"]
    for mode in modes:
        folded = fold_model(model, mode, dtype)
        assert folded.fold_mode == mode
        assert (folded(images) - ref).abs().max() <= 1e-5, mode
    if not cfg["deep"]:
        with pytest.raises(VFPTError, match="shallow prompts"):
            fold_model(model, "kv")
    assert fold_model(model, "auto").fold_mode == ("kv" if cfg["deep"] else "tokens")


def test_folded_modules_hold_no_fft_and_no_prompt_parameters():
    model = tiny_model(num_prompts=6, alpha=0.5)
    for mode in ("tokens", "kv"):
        folded = fold_model(model, mode)
        names = {n for n, _ in folded.named_parameters()}
        assert not any("prompt" in n for n in names)
    kv = fold_model(model, "kv")
    assert kv.prompt_keys.shape == (model.depth, 2, 6, 16)  # [layers, heads, M, head_dim]
    assert kv.prompt_tokens.shape[0] == 0


def test_prompt_blocks_are_the_constant_blocks():
    model = tiny_model(num_prompts=4, alpha=0.5, project=3)
    blocks = prompt_blocks(model)
    for i in range(model.depth):
        assert torch.equal(blocks[i], prompt_block(model.raw_prompts(i), 2, "prepend")[0].detach())


def test_live_mode_is_the_model(images):
    model = tiny_model(num_prompts=3, alpha=0.5)
    live = fold_model(model, "none")
    with torch.no_grad():
        assert torch.equal(live(images), model(images))


def test_bad_fold_arguments():
    model = tiny_model(num_prompts=0)
    with pytest.raises(VFPTError, match="no prompts"):
        fold_model(model, "kv")
    with pytest.raises(VFPTError, match="fold mode"):
        fold_model(model, "magic")
    with pytest.raises(VFPTError, match="float32 or float64"):
        fold_model(model, "tokens", torch.float16)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@torch.no_grad()
def test_mae_mean_pooling_kv_fold_is_exact(alpha, images):
    from vfpt_deploy.config import VFPTConfig
    from vfpt_deploy.model import VFPTViT

    from conftest import tiny_backbone

    bb = tiny_backbone(global_pool="avg")  # MAE: mean over x[:, 1:] (prompts included), then fc_norm
    torch.manual_seed(1)
    model = VFPTViT(bb, 4, VFPTConfig(num_prompts=6, alpha=alpha)).eval()
    for p in model.tuned_parameters().values():
        p.mul_(4.0)
    assert model.pool == "avg"
    folded = fold_model(model, "auto")
    assert folded.fold_mode == "kv" and folded.num_kv == model.depth - 1  # last block keeps its prompt rows
    assert folded.prompt_tokens.shape[0] == 1
    assert (folded(images) - model(images)).abs().max() <= 1e-5
