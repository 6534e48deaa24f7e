"""fourier_transform / prompt_block against references that share no code with them (docs/model.md, section 2)."""
import numpy as np
import pytest
import torch

from vfpt_deploy.models.config import VFPTConfig
from vfpt_deploy.errors import VFPTError
from vfpt_deploy.models.fourier import fourier_transform, prompt_block


def closed_form(p: np.ndarray) -> np.ndarray:
    """F(p)[k, l] = sum_{s,h} p[s, h] cos(2 pi (s k / S + h l / H)), float64, summed term by term."""
    S, H = p.shape
    s, h = np.arange(S), np.arange(H)
    out = np.empty((S, H))
    for k in range(S):
        for l in range(H):
            phase = 2 * np.pi * (s[:, None] * k / S + h[None, :] * l / H)
            out[k, l] = (p * np.cos(phase)).sum()
    return out


def numpy_fft(p: np.ndarray) -> np.ndarray:
    return np.fft.fft2(p.astype(np.float64)).real


# -- the transform -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 8), (3, 16), (7, 5), (10, 48)])
def test_transform_matches_closed_form_and_numpy_fft2(shape):
    rng = np.random.default_rng(sum(shape))
    p = rng.uniform(-0.06, 0.06, size=shape)
    got = fourier_transform(torch.from_numpy(p))
    assert got.dtype == torch.float64 and got.shape == shape  # real-valued, same shape
    np.testing.assert_allclose(got.numpy(), closed_form(p), atol=1e-12)
    np.testing.assert_allclose(got.numpy(), numpy_fft(p), atol=1e-12)


def test_float32_transform_at_vit_b16_width():
    p = np.random.default_rng(0).uniform(-0.0625, 0.0625, size=(10, 768))
    got = fourier_transform(torch.from_numpy(p).float())
    assert got.dtype == torch.float32 and got.is_contiguous()
    np.testing.assert_allclose(got.numpy(), numpy_fft(p), atol=2e-4)


def test_batched_input_transforms_each_sample_over_the_last_two_dims():
    p = np.random.default_rng(1).normal(size=(3, 4, 6))
    got = fourier_transform(torch.from_numpy(p)).numpy()
    for b in range(3):
        np.testing.assert_allclose(got[b], numpy_fft(p[b]), atol=1e-12)


def test_hand_computed_small_cases():
    def F(rows):
        return fourier_transform(torch.tensor(rows, dtype=torch.float64)).numpy()

    # A delta at the origin has a flat spectrum.
    np.testing.assert_allclose(F([[1, 0, 0], [0, 0, 0]]), np.ones((2, 3)), atol=1e-15)
    # A constant c on [S, H] puts S*H*c at DC, zero elsewhere.
    np.testing.assert_allclose(F([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]), [[3.0, 0, 0], [0, 0, 0]], atol=1e-15)
    # A delta at h = 1 of a single row of 4: cos(2 pi l / 4) = [1, 0, -1, 0].
    np.testing.assert_allclose(F([[0, 1, 0, 0]]), [[1, 0, -1, 0]], atol=1e-15)
    # [[1, 2], [3, 4]]: DC 10; along h: (1 - 2) + (3 - 4) = -2; along s: (1 + 2) - (3 + 4) = -4; both: 0.
    np.testing.assert_allclose(F([[1, 2], [3, 4]]), [[10, -2], [-4, 0]], atol=1e-15)
    # [1, 2, 3]: the DFT is [6, -1.5 + 0.866i, -1.5 - 0.866i]; only the real part is kept.
    np.testing.assert_allclose(F([[1, 2, 3]]), [[6, -1.5, -1.5]], atol=1e-14)
    # A delta at (s, h) = (1, 0) of a 3 x 1 column: cos(2 pi k / 3) = [1, -0.5, -0.5].
    np.testing.assert_allclose(F([[0], [1], [0]]), [[1], [-0.5], [-0.5]], atol=1e-15)


# -- the prompt block ----------------------------------------------------------------------------

def distinct_prompts(M: int, D: int) -> torch.Tensor:
    """Prompts whose rows are easy to tell apart: row r holds r + 1 plus a little noise."""
    g = torch.Generator().manual_seed(M * 100 + D)
    return (torch.arange(1, M + 1, dtype=torch.float64)[:, None] + 0.01 * torch.randn(M, D, generator=g,
                                                                                      dtype=torch.float64))[None]


@pytest.mark.parametrize("m", [1, 2, 4])
def test_prepend_puts_transformed_rows_first(m):
    p = distinct_prompts(6, 8)
    block = prompt_block(p, m, "prepend")[0].numpy()
    raw = p[0].numpy()
    assert block.shape == (6, 8)
    np.testing.assert_allclose(block[:m], numpy_fft(raw[:m]), atol=1e-12)  # rows 0..m-1: F(P[:m])
    np.testing.assert_array_equal(block[m:], raw[m:])  # rows m..M-1: P[m:] unchanged, in order


@pytest.mark.parametrize("m", [1, 2, 4])
def test_append_puts_transformed_rows_last(m):
    p = distinct_prompts(6, 8)
    block = prompt_block(p, m, "append")[0].numpy()
    raw = p[0].numpy()
    assert block.shape == (6, 8)
    np.testing.assert_array_equal(block[: 6 - m], raw[m:])  # rows 0..M-m-1: P[m:] unchanged, in order
    np.testing.assert_allclose(block[6 - m :], numpy_fft(raw[:m]), atol=1e-12)  # last m rows: F(P[:m])


def test_sequence_fft_covers_the_fourier_prompts_only():
    p = distinct_prompts(10, 16)
    block = prompt_block(p, 4, "prepend")[0].numpy()
    np.testing.assert_allclose(block[:4], numpy_fft(p[0, :4].numpy()), atol=1e-12)
    # An FFT over all 10 rows, cut to 4, would be something else.
    assert np.abs(block[:4] - numpy_fft(p[0].numpy())[:4]).max() > 1.0


@pytest.mark.parametrize("location", ["prepend", "append"])
def test_all_fourier_and_no_fourier(location):
    p = distinct_prompts(5, 6)
    np.testing.assert_allclose(prompt_block(p, 5, location)[0].numpy(), numpy_fft(p[0].numpy()), atol=1e-12)
    assert torch.equal(prompt_block(p, 0, location), p)


def test_prompt_block_keeps_the_batch_dimension():
    p = torch.randn(3, 5, 4, dtype=torch.float64)
    block = prompt_block(p, 2, "prepend").numpy()
    for b in range(3):
        np.testing.assert_allclose(block[b, :2], numpy_fft(p[b, :2].numpy()), atol=1e-12)


# -- configuration -------------------------------------------------------------------------------

@pytest.mark.parametrize(("num_prompts", "alpha", "m"), [
    (10, 0.0, 0), (10, 1.0, 10), (10, 0.5, 5),
    (10, 0.3, 3),    # 10 * 0.3 = 2.9999999999999996 in binary: still 3
    (10, 0.7, 7), (100, 0.29, 29), (3, 1 / 3, 1),
    (10, 0.05, 0),   # alpha > 0 that floors to 0: plain VPT
    (10, 0.19, 1), (7, 0.99, 6), (1, 0.5, 0), (1, 1.0, 1), (0, 0.5, 0), (50, 0.5, 25), (200, 0.2, 40),
])
def test_num_fourier_is_floor_of_m_times_alpha(num_prompts, alpha, m):
    assert VFPTConfig(num_prompts=num_prompts, alpha=alpha).num_fourier == m


@pytest.mark.parametrize("bad", [{"location": "random"}, {"location": "middle"}, {"alpha": 1.5},
                                 {"alpha": -0.1}, {"num_prompts": -1}, {"dropout": 1.0}, {"project": -2}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(VFPTError):
        VFPTConfig(**bad)


def test_random_location_message_says_why():
    with pytest.raises(VFPTError, match="cannot be deployed"):
        VFPTConfig(location="random")
