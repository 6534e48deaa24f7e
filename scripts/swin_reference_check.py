"""Check `vfpt-deploy import --arch swin` against the reference Swin VFPT code itself, on CPU.

Builds the reference's PromptedSwinTransformer_fourier (from a checkout of github.com/runtsang/VFPT)
with a small Swin configuration and random weights far from their init, saves it the way the reference
does (torch.save({"model": state_dict}), backbone under `enc.`, head `head.last_layer`), imports that
file with this package, and compares logits:
  deep     the whole batch at once (the reference's prompt copies are identical per image there);
  shallow  one image at a time (with a batch of several, the reference mixes the images' prompt rows,
           see docs/model.md section 5; that difference is printed, not gated).
Exits 1 if any gated difference exceeds --atol.

    .venv/bin/python scripts/swin_reference_check.py --reference PATH/TO/VFPT
    .venv/bin/python scripts/swin_reference_check.py --reference PATH/TO/VFPT --swin-b   # Swin-B/4 w7 224 too

Only torch, timm and torchvision are needed: the reference's logging helper (which wants simplejson and
termcolor) is replaced by the standard library's; nothing else of it is changed.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import types
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY = dict(img_size=32, patch_size=2, embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=4)
SWIN_B = dict(img_size=224, patch_size=4, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=7)


def load_reference(root: Path):
    """The reference's PromptedSwinTransformer_fourier class, imported from its source tree."""
    if not (root / "src" / "models" / "vit_prompt" / "swin_transformer_fourier.py").is_file():
        raise SystemExit(f"error: {root} is not a checkout of github.com/runtsang/VFPT (no "
                         "src/models/vit_prompt/swin_transformer_fourier.py)")
    stub = types.ModuleType("src.utils.logging")
    stub.get_logger = logging.getLogger
    sys.modules["src.utils.logging"] = stub
    sys.path.insert(0, str(root))
    from src.models.vit_prompt.swin_transformer_fourier import PromptedSwinTransformer_fourier

    return PromptedSwinTransformer_fourier


class ReferenceModel(nn.Module):
    """The reference's Swin model: encoder `enc` and a linear head `head.last_layer` (MLP_NUM = 0)."""

    def __init__(self, cls, arch: dict, num_tokens: int, deep: bool, alpha: float, classes: int) -> None:
        super().__init__()
        cfg = types.SimpleNamespace(LOCATION="prepend", NUM_TOKENS=num_tokens, DEEP=deep, DROPOUT=0.0, PROJECT=-1,
                                    INITIATION="random", FOURIER_PERCENTAGE=alpha, FOURIER_LOCATION="prepend")
        self.enc = cls(cfg, num_classes=-1, drop_path_rate=0.5, **arch)
        self.head = nn.Module()
        self.head.last_layer = nn.Linear(self.enc.num_features, classes)

    def forward(self, x):
        return self.head.last_layer(self.enc(x))


@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> None:
    """Every tensor moved well away from its init, like a trained model (prompts large, norms not 1/0)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if "prompt" in name:
            p.copy_(noise)
        elif "relative_position_bias_table" in name or name.endswith("bias"):
            p.copy_(0.5 * noise)
        elif p.ndim == 1:
            p.copy_(1 + 0.2 * noise)
        else:
            p.copy_(noise / math.sqrt(p[0].numel()))


def check(cls, arch: dict, M: int, deep: bool, alpha: float, work: Path, batch: int = 3) -> tuple[float, float | None]:
    """(gated max |diff|, whole-batch max |diff| of a shallow model or None)."""
    from vfpt_deploy.artifacts.checkpoint import load_run
    from vfpt_deploy.reference import import_checkpoint

    torch.manual_seed(0)
    ref = ReferenceModel(cls, arch, M, deep, alpha, classes=7)
    randomize(ref, seed=M * 10 + int(alpha * 4) + deep)
    ref.eval()
    src, out = work / "reference.pth", work / "run.pt"
    torch.save({"model": ref.state_dict()}, src)
    result = import_checkpoint(src, out, arch="swin", alpha=alpha)
    if result.unused:
        raise SystemExit(f"error: unused keys {result.unused[:3]}")
    run = load_run(out)
    side = arch["img_size"]
    x = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = run.model(x)
        whole = ref(x)
        if deep:
            return float((ours - whole).abs().max()), None
        single = torch.cat([ref(x[i : i + 1]) for i in range(batch)])
        return float((ours - single).abs().max()), float((ours - whole).abs().max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", type=Path, required=True, help="a checkout of github.com/runtsang/VFPT")
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--swin-b", action="store_true", help="also check Swin-B/4 w7 224, M=50 deep, alpha 0.5 (slow)")
    args = ap.parse_args(argv)
    cls = load_reference(args.reference.resolve())
    # The reference crashes when floor(M * alpha) is 0 (an FFT of no rows): alpha 0 and M=1 alpha 0.5 are
    # not checkable against it.
    cases = [(TINY, M, deep, alpha) for deep in (True, False) for M in (1, 8) for alpha in (0.5, 1.0)
             if math.floor(M * alpha) > 0]
    cases += [(TINY, 5, True, 0.3), (TINY, 5, False, 0.3)]
    if args.swin_b:
        cases.append((SWIN_B, 50, True, 0.5))
    worst = 0.0
    with tempfile.TemporaryDirectory(prefix="vfpt-swin-ref-") as tmp:
        for arch, M, deep, alpha in cases:
            gated, whole = check(cls, arch, M, deep, alpha, Path(tmp))
            worst = max(worst, gated)
            name = "swin-b" if arch is SWIN_B else "tiny"
            extra = "" if whole is None else f"   (whole batch, not gated: {whole:.2e})"
            print(f"{name:6s} M={M:2d} {'deep   ' if deep else 'shallow'} alpha={alpha:<4}  max |ours - reference| "
                  f"{'(whole batch)' if deep else '(per image)  '} = {gated:.2e}{extra}", flush=True)
    ok = worst <= args.atol
    print(f"{'PASS' if ok else 'FAIL'}: worst gated difference {worst:.2e} (limit {args.atol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
