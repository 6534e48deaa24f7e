"""VFPT prompt configuration: plain keyword arguments, JSON-able, validated once."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from .errors import VFPTError

LOCATIONS = ("prepend", "append")


@dataclass(frozen=True)
class VFPTConfig:
    """How prompts are added to a frozen ViT (VFPT_SPEC sections 1-2).

    num_prompts: M prompt tokens per layer.
    deep: a prompt block before every transformer block (else one block before block 0).
    alpha: Fourier fraction; the first m = floor(M * alpha) prompts of each layer go through the FFT.
    location: where the Fourier prompts sit inside a layer's prompt block ("prepend" or "append").
    project: if > 0, prompts are learned at this width and mapped to the ViT width by a Linear.
    dropout: prompt dropout (active only while the prompt module trains).
    """

    num_prompts: int = 10
    deep: bool = True
    alpha: float = 0.5
    location: str = "prepend"
    project: int = 0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.num_prompts < 0:
            raise VFPTError(f"num_prompts must be >= 0, got {self.num_prompts}")
        if not 0.0 <= self.alpha <= 1.0:
            raise VFPTError(f"alpha (Fourier fraction) must be in [0, 1], got {self.alpha}")
        if self.location == "random":
            raise VFPTError(
                "location 'random' reshuffles prompts on every forward pass (eval too), so it cannot "
                "be deployed; use 'prepend' or 'append'"
            )
        if self.location not in LOCATIONS:
            raise VFPTError(f"location must be one of {', '.join(LOCATIONS)}, got {self.location!r}")
        if self.project < 0:
            raise VFPTError(f"project must be >= 0 (0 = no prompt projection), got {self.project}")
        if not 0.0 <= self.dropout < 1.0:
            raise VFPTError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def num_fourier(self) -> int:
        """m = floor(M * alpha). Where alpha > 0 floors to 0 the reference crashes; we run plain VPT."""
        # The small epsilon keeps e.g. 10 * 0.3 = 2.9999999999999996 at 3, as a person means it.
        return min(self.num_prompts, int(math.floor(self.num_prompts * self.alpha + 1e-9)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VFPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise VFPTError(f"unknown VFPT config keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)
