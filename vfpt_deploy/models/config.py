"""VFPT prompt configuration: plain keyword arguments, JSON-able, validated once."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from vfpt_deploy.errors import UsageError

LOCATIONS = ("prepend", "append")
MAX_PROMPTS = 10_000  # prompt tokens per layer; the reference uses up to a few hundred
MAX_PROJECT = 65_536  # prompt projection width


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class VFPTConfig:
    """How prompts are added to a frozen ViT (docs/model.md, sections 1 and 2).

    num_prompts: M prompt tokens per layer.
    deep: a prompt block before every transformer block (else one block before block 0).
    alpha: Fourier fraction; the first m = floor(M * alpha) prompts of each layer go through the FFT.
    location: where the Fourier prompts sit inside a layer's prompt block ("prepend" or "append").
    project: if > 0, prompts are learned at this width and mapped to the ViT width by a Linear.
    dropout: prompt dropout (active only while the prompt module trains).

    Every field is type- and range-checked here, so a config read from a file is as safe as one
    typed on the command line (a float 4.0, a bool or a string "0.5" is refused, not coerced).
    """

    num_prompts: int = 10
    deep: bool = True
    alpha: float = 0.5
    location: str = "prepend"
    project: int = 0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not _is_int(self.num_prompts) or not 0 <= self.num_prompts <= MAX_PROMPTS:
            raise UsageError(f"num_prompts must be an integer in [0, {MAX_PROMPTS}], got {self.num_prompts!r}")
        if not isinstance(self.deep, bool):
            raise UsageError(f"deep must be true or false, got {self.deep!r}")
        if not _is_real(self.alpha) or not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"alpha (Fourier fraction) must be a number in [0, 1], got {self.alpha!r}")
        if self.location == "random":
            raise UsageError(
                "location 'random' reshuffles prompts on every forward pass (eval too), so it cannot "
                "be deployed; use 'prepend' or 'append'"
            )
        if self.location not in LOCATIONS:  # so a str
            raise UsageError(f"location must be one of {', '.join(LOCATIONS)}, got {self.location!r}")
        if not _is_int(self.project) or not 0 <= self.project <= MAX_PROJECT:
            raise UsageError(f"project must be an integer in [0, {MAX_PROJECT}] (0 = no prompt projection), "
                             f"got {self.project!r}")
        if not _is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"dropout must be a number in [0, 1), got {self.dropout!r}")

    @property
    def num_fourier(self) -> int:
        """m = floor(M * alpha). Where alpha > 0 floors to 0 the reference crashes; we run plain VPT."""
        # The small epsilon keeps e.g. 10 * 0.3 = 2.9999999999999996 at 3, as a person means it.
        return min(self.num_prompts, int(math.floor(self.num_prompts * self.alpha + 1e-9)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VFPTConfig":
        if not isinstance(d, dict):
            raise UsageError(f"a VFPT config must be a mapping of its fields, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(map(str, set(d) - known))
        if unknown:
            raise UsageError(f"unknown VFPT config keys {unknown[:5]}; known keys are {sorted(known)}")
        return cls(**d)
