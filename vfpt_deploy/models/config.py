"""VFPT prompt and training configuration: plain keyword arguments, JSON-able, validated once. Torch-free, so a
command refuses a bad option value before torch is imported (which takes seconds)."""
from __future__ import annotations

import math
import re
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


def _check_number(name: str, v, lo: float, hi: float, integer: bool = False, open_lo: bool = False) -> None:
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or not math.isfinite(v) or not lo <= v <= hi or (open_lo and v == lo):
        kind = "an integer" if integer else "a finite number"
        bounds = f"({lo:g}, {hi:g}]" if open_lo else f"[{lo:g}, {hi:g}]"
        raise UsageError(f"--{name.replace('_', '-')} must be {kind} in {bounds}, got {v!r}")


@dataclass
class TrainSettings:
    epochs: int = 100
    lr: float = 0.1
    weight_decay: float = 1e-4
    batch_size: int = 64
    warmup_epochs: int = 10
    momentum: float = 0.9
    seed: int = 0

    def check(self) -> "TrainSettings":
        """Every number finite and in a sane range (one-line UsageError naming the option)."""
        _check_number("epochs", self.epochs, 1, 100_000, integer=True)
        _check_number("lr", self.lr, 0.0, 1e4, open_lo=True)
        _check_number("weight_decay", self.weight_decay, 0.0, 1.0)
        _check_number("batch_size", self.batch_size, 1, 65536, integer=True)
        _check_number("warmup_epochs", self.warmup_epochs, 0, 100_000, integer=True)
        _check_number("momentum", self.momentum, 0.0, 0.999)
        _check_number("seed", self.seed, 0, 2**32 - 1, integer=True)
        return self


def check_device_name(device: str | None) -> None:
    """--device's form (cpu, cuda, cuda:N), checked without torch; whether that GPU exists is train's check."""
    if device is not None and (not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d{1,4})?", device)):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {device!r}")


def check_crop_pct(crop_pct) -> float:
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1:
        raise UsageError(f"--crop-pct must be in (0, 1], got {crop_pct!r}")
    return crop_pct
