"""The Fourier part of VFPT: a layer's constant prompt block from its prompt parameters.

See docs/model.md (section 2).
"""
from __future__ import annotations

import torch


def fourier_transform(p: torch.Tensor) -> torch.Tensor:
    """Re(FFT_seq(FFT_hidden(p))) over the last two dims, unnormalized, as the reference computes it.

    The nested form is kept on purpose: it is mathematically Re(fft2(p)) but not bit-identical in float32.
    """
    return torch.fft.fft(torch.fft.fft(p, dim=-1), dim=-2).real.contiguous()


def prompt_block(p: torch.Tensor, num_fourier: int, location: str) -> torch.Tensor:
    """A layer's prompt block from prompts p[..., M, D]: the first m go through the FFT.

    prepend -> [F(p[:m]), p[m:]]; append -> [p[m:], F(p[:m])].
    """
    if num_fourier == 0:
        return p
    f = fourier_transform(p[..., :num_fourier, :])
    rest = p[..., num_fourier:, :]
    parts = (f, rest) if location == "prepend" else (rest, f)
    return torch.cat(parts, dim=-2)
