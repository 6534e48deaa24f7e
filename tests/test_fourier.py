import numpy as np
import pytest
import torch

from vfpt_deploy.config import VFPTConfig
from vfpt_deploy.errors import VFPTError
from vfpt_deploy.fourier import fourier_transform, prompt_block


def dft_real_closed_form(x: np.ndarray) -> np.ndarray:
    """Re(2-D DFT) from cos/sin matrices, float64: Re(C_m X C_d - S_m X S_d)."""
    m, d = x.shape
    km = np.outer(np.arange(m), np.arange(m)) * 2 * np.pi / m
    kd = np.outer(np.arange(d), np.arange(d)) * 2 * np.pi / d
    return np.cos(km) @ x @ np.cos(kd) - np.sin(km) @ x @ np.sin(kd)


@pytest.mark.parametrize("shape", [(1, 8), (3, 16), (10, 768), (7, 5)])
def test_fourier_matches_float64_references(shape):
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.06, 0.06, size=shape)
    ours64 = fourier_transform(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours64, np.fft.fft2(x).real, atol=1e-12)
    np.testing.assert_allclose(ours64, dft_real_closed_form(x), atol=1e-10)
    ours32 = fourier_transform(torch.from_numpy(x).float()).numpy()
    np.testing.assert_allclose(ours32, np.fft.fft2(x).real, atol=2e-5 * max(1.0, shape[1] / 64))


def test_nested_order_and_contiguity():
    x = torch.randn(2, 10, 768)
    got = fourier_transform(x)
    assert got.is_contiguous()
    # Bit-for-bit the reference's nested form (hidden FFT first, then sequence FFT).
    assert torch.equal(got, torch.fft.fft(torch.fft.fft(x, dim=-1), dim=-2).real)


@pytest.mark.parametrize(("m_total", "alpha", "m"), [(10, 0.0, 0), (10, 1.0, 10), (10, 0.3, 3), (10, 0.05, 0),
                                                     (1, 0.5, 0), (1, 1.0, 1), (50, 0.5, 25), (7, 0.99, 6)])
def test_num_fourier_floors(m_total, alpha, m):
    assert VFPTConfig(num_prompts=m_total, alpha=alpha).num_fourier == m


def test_sequence_fft_covers_fourier_prompts_only():
    p = torch.randn(1, 10, 16, dtype=torch.float64)
    block = prompt_block(p, 4, "prepend")
    np.testing.assert_allclose(block[0, :4].numpy(), np.fft.fft2(p[0, :4].numpy()).real, atol=1e-12)
    assert torch.equal(block[:, 4:], p[:, 4:])
    # An FFT over all 10 rows would differ.
    assert not np.allclose(block[0, :4].numpy(), np.fft.fft2(p[0].numpy()).real[:4])


def test_prepend_and_append_order():
    p = torch.randn(1, 6, 8)
    f = fourier_transform(p[:, :2])
    assert torch.equal(prompt_block(p, 2, "prepend"), torch.cat([f, p[:, 2:]], 1))
    assert torch.equal(prompt_block(p, 2, "append"), torch.cat([p[:, 2:], f], 1))
    assert prompt_block(p, 0, "append") is p


@pytest.mark.parametrize("bad", [{"location": "random"}, {"location": "middle"}, {"alpha": 1.5},
                                 {"alpha": -0.1}, {"num_prompts": -1}, {"dropout": 1.0}, {"project": -2}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(VFPTError):
        VFPTConfig(**bad)


def test_random_location_message_says_why():
    with pytest.raises(VFPTError, match="cannot be deployed"):
        VFPTConfig(location="random")
