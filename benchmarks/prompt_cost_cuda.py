"""PyTorch on one CUDA GPU: parity and cost of each form of a VFPT ViT (no onnxruntime, no TensorRT).

For every prompt count M the same random-weights ViT is built in four forms:
  plain     the backbone + head, no prompts
  eager     the unfolded VFPT model (prompts pass through the 2-D FFT at every call)
  tokens    prompts folded to constant tokens (fold_model 'tokens')
  kv        deep prompts folded to per-layer key/value constants (fold_model 'kv')

Parity: each prompted form on the GPU (fp32 with TF32 off, fp16, bf16) against the eager model in fp32
on the CPU, on `--samples` N(0,1) inputs: max abs logit difference, min cosine, top-1 agreement.
Timing: forms interleaved within a (dtype, batch) cell, a different starting form every repeat; each
repeat takes the median of `--iters` calls timed with CUDA events (inputs already on the GPU); the cell's
latency is the median over repeats and ratios to plain are taken within a repeat. TF32 is left at
PyTorch's defaults while timing (matmul off, cuDNN convolutions on).

    python benchmarks/prompt_cost_cuda.py --out OUTDIR                  # ViT-B/16, M 10 and 50
    python benchmarks/prompt_cost_cuda.py --model tiny --device cpu     # a smoke test anywhere
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from vfpt_deploy.models.backbone import create_backbone  # noqa: E402
from vfpt_deploy.models.config import VFPTConfig  # noqa: E402
from vfpt_deploy.folding import fold_model  # noqa: E402
from vfpt_deploy.models.vit.model import VFPTViT  # noqa: E402

MODELS = {
    "vit_base_patch16_224": ("vit_base_patch16_224", {}),
    "tiny": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NUM_CLASSES = 100


def build(model_name: str, m: int, alpha: float) -> dict[str, torch.nn.Module]:
    """The four forms for M prompts, in fp32 on the CPU (prompts scaled like trained ones)."""
    name, kwargs = MODELS.get(model_name, (model_name, {}))
    torch.manual_seed(0)
    backbone = create_backbone(name, **kwargs)
    torch.manual_seed(m + 1)
    model = VFPTViT(backbone, NUM_CLASSES, VFPTConfig(num_prompts=m, deep=True, alpha=alpha)).eval()
    with torch.no_grad():
        for p in model.tuned_parameters().values():
            p.mul_(10.0)
    plain = VFPTViT(backbone, NUM_CLASSES, VFPTConfig(num_prompts=0)).eval()
    plain.head.load_state_dict(model.head.state_dict())
    return {"plain": plain, "eager": model, "tokens": fold_model(model, "tokens"), "kv": fold_model(model, "kv")}


def moved(module: torch.nn.Module, device: torch.device, dtype: torch.dtype):
    import copy

    return copy.deepcopy(module).to(device=device, dtype=dtype).eval()


def parity(forms: dict, device: torch.device, samples: int, image_size) -> list[dict]:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False
    torch.manual_seed(1234)
    x = torch.randn(samples, 3, *image_size)
    with torch.no_grad():
        ref = forms["eager"](x).double()
    rows = []
    for dname, dtype in DTYPES.items():
        for form in ("eager", "tokens", "kv"):
            row = {"form": form, "dtype": dname}
            try:
                with torch.no_grad():
                    out = moved(forms[form], device, dtype)(x.to(device, dtype)).double().cpu()
            except RuntimeError as e:  # e.g. cuFFT in half precision needs power-of-two sizes
                rows.append({**row, "error": str(e).strip().splitlines()[0][:160]})
                continue
            cos = torch.nn.functional.cosine_similarity(out, ref, dim=1)
            rows.append({**row, "max_abs": float((out - ref).abs().max()), "min_cosine": float(cos.min()),
                         "top1_agreement": float((out.argmax(1) == ref.argmax(1)).double().mean() * 100),
                         "finite": bool(torch.isfinite(out).all())})
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default again for the timing
    return rows


def timer(device: torch.device):
    if device.type == "cuda":
        def time_one(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:
        def time_one(fn) -> float:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    return time_one


def timing(forms: dict, device, dtypes, batches, repeats, iters, warmup, image_size) -> list[dict]:
    time_one, rows = timer(device), []
    for dname in dtypes:
        mods = {}
        for form, module in forms.items():
            try:
                mods[form] = moved(module, device, DTYPES[dname])
                with torch.no_grad():
                    mods[form](torch.randn(1, 3, *image_size, device=device, dtype=DTYPES[dname]))
            except RuntimeError as e:
                rows.append({"form": form, "dtype": dname, "error": str(e).strip().splitlines()[0][:160]})
                mods.pop(form, None)
        for b in batches:
            x = torch.randn(b, 3, *image_size, device=device, dtype=DTYPES[dname])
            per = {f: [] for f in mods}
            names = list(mods)
            for r in range(repeats):
                for f in names[r % len(names):] + names[:r % len(names)]:
                    with torch.no_grad():
                        for _ in range(warmup):
                            mods[f](x)
                        per[f].append(statistics.median(time_one(lambda: mods[f](x)) for _ in range(iters)))
            for f in names:
                ratio = (statistics.median(a / p for a, p in zip(per[f], per["plain"])) if "plain" in per else None)
                rows.append({"form": f, "dtype": dname, "batch": b, "median_ms": statistics.median(per[f]),
                             "ratio_to_plain": ratio, "images_per_s": b / statistics.median(per[f]) * 1e3})
        del mods
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_base_patch16_224", help="timm ViT name, or 'tiny' (a smoke test)")
    ap.add_argument("--prompts", default="10,50", help="deep prompt counts M, comma separated")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", default="fp32,fp16,bf16", help="dtypes timed (parity always checks all three)")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--samples", type=int, default=16, help="inputs in the parity check")
    ap.add_argument("--out", type=Path, required=True, help="folder for prompt_cost_cuda.json")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: torch sees no CUDA GPU; use --device cpu for a smoke test")
    dtypes = [d for d in a.dtypes.split(",") if d]
    if any(d not in DTYPES for d in dtypes):
        raise SystemExit(f"error: --dtypes takes {', '.join(DTYPES)}")
    batches = [int(b) for b in a.batches.split(",")]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"model": a.model, "alpha": a.alpha, "device": gpu, "torch": torch.__version__,
              "cuda": torch.version.cuda, "repeats": a.repeats, "iters": a.iters, "by_m": {}}
    for m in (int(v) for v in a.prompts.split(",")):
        t0 = time.perf_counter()
        forms = build(a.model, m, a.alpha)
        image_size = tuple(forms["plain"].backbone.patch_embed.img_size)
        par = parity(forms, device, a.samples, image_size)
        tim = timing(forms, device, dtypes, batches, a.repeats, a.iters, a.warmup, image_size)
        result["by_m"][str(m)] = {"parity": par, "timing": tim, "seconds": time.perf_counter() - t0}
        for r in par:
            print(f"M={m:3d} parity {r['form']:6s} {r['dtype']}: " + (r.get("error") or
                  f"max|diff| {r['max_abs']:.2e} cos {r['min_cosine']:.6f} top-1 {r['top1_agreement']:.0f}%"), flush=True)
        for r in tim:
            print(f"M={m:3d} {r['dtype']} {r['form']:6s} " + (r.get("error") or
                  f"b{r['batch']:<3d} {r['median_ms']:8.3f} ms {r['images_per_s']:9.1f} img/s"
                  + (f" {r['ratio_to_plain']:.3f}x plain" if r["ratio_to_plain"] else "")), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "prompt_cost_cuda.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
