"""onnxruntime vs PyTorch, plain backbone vs kv fold, in ONE interleaved run (made for the GPU check).

One random-weights ViT (prompts scaled like trained ones) in two forms that share backbone and head:
  plain   the backbone + head, no prompts (VFPTViT with M = 0)
  kv      M deep prompts folded to per-layer key/value constants (fold_model 'kv')
each run by up to three runtimes, through vfpt_deploy.bench's own backends:
  torch      PyTorch eager (TorchBackend) in --dtype, on --device
  ort        onnxruntime with IO binding (OrtBackend 'ort-cuda'; 'ort-cpu' with --device cpu) on the ONNX
             exported in --dtype (fp32 or fp16; an fp16 graph keeps float32 I/O)
  ort-graph  the same with onnxruntime's CUDA graphs (OrtBackend 'ort-cuda-graph'); CUDA only
Inside each batch size every (runtime, form) is measured in every repeat, in an order that rotates from
repeat to repeat; a repeat's value is the median of --iters calls (CUDA events on the GPU, inputs and
outputs already on the device; perf_counter on the CPU) after --warmup calls. Ratios are taken within a
repeat, then the median over repeats: kv / plain per runtime (the prompt cost), runtime / torch per form,
ort-graph / ort per form. Whatever cannot run here is listed under "skipped" with the reason.

    python benchmarks/runtime_cost.py --out OUTDIR                                  # ViT-B/16, M 50, fp16, CUDA
    python benchmarks/runtime_cost.py --model tiny --device cpu --dtype fp32 --out OUTDIR   # a smoke test
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
from vfpt_deploy.bench import OrtBackend, TorchBackend, Unavailable  # noqa: E402
from vfpt_deploy.artifacts.checkpoint import BackboneInfo, load_run, save_run  # noqa: E402
from vfpt_deploy.models.config import VFPTConfig  # noqa: E402
from vfpt_deploy.errors import VFPTError  # noqa: E402
from vfpt_deploy.folding import fold_model  # noqa: E402
from vfpt_deploy.models.vit.model import VFPTViT  # noqa: E402
from vfpt_deploy.runtime.preprocess import Preprocess  # noqa: E402
from vfpt_deploy.runtime.timing import machine_info  # noqa: E402

MODELS = {
    "vit_base_patch16_224": ("vit_base_patch16_224", {}),
    "tiny": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}),
}
RUNTIMES = ("torch", "ort", "ort-graph")
FORMS = ("plain", "kv")
NUM_CLASSES = 100


def save_forms(model_name: str, m: int, alpha: float, work: Path) -> dict[str, Path]:
    """run.pt of the plain and the prompted model (one backbone, one head), in fp32."""
    name, kwargs = MODELS.get(model_name, (model_name, {}))
    torch.manual_seed(0)
    backbone = create_backbone(name, **kwargs)
    torch.manual_seed(m + 1)
    prompted = VFPTViT(backbone, NUM_CLASSES, VFPTConfig(num_prompts=m, deep=True, alpha=alpha)).eval()
    with torch.no_grad():
        for p in prompted.tuned_parameters().values():
            p.mul_(10.0)
    plain = VFPTViT(backbone, NUM_CLASSES, VFPTConfig(num_prompts=0)).eval()
    plain.head.load_state_dict(prompted.head.state_dict())
    pre = Preprocess(resize=list(prompted.img_size))
    classes = [f"class{i}" for i in range(NUM_CLASSES)]
    paths = {"plain": work / "plain.pt", "kv": work / f"kv{m}.pt"}
    for form, model in (("plain", plain), ("kv", prompted)):
        save_run(paths[form], model, BackboneInfo(name, dict(kwargs)), classes, pre)
    return paths


def make_backends(args, runs: dict, work: Path, skipped: list, say) -> dict:
    """(runtime, form) -> a bench backend, for everything that can run here."""
    cuda = torch.device(args.device).type == "cuda"
    backends = {}
    for form in FORMS:
        run = runs[form]
        module = fold_model(run.model, "kv") if form == "kv" else run.model
        if "torch" in args.runtimes:
            try:
                backends[("torch", form)] = TorchBackend(f"torch:{form}", module, run.model.img_size, args.device,
                                                         0, {"form": form}, args.dtype)
            except Unavailable as e:
                skipped.append({"runtime": "torch", "form": form, "reason": str(e)})
        ort_runtimes = [r for r in ("ort", "ort-graph") if r in args.runtimes]
        if not ort_runtimes:
            continue
        if args.dtype == "bf16":
            for r in ort_runtimes:
                skipped.append({"runtime": r, "form": form, "reason": "ONNX exports are fp32 or fp16, not bf16"})
            continue
        from vfpt_deploy.exporters.onnx import export_onnx

        onnx_path = work / f"{form}.{args.dtype}.onnx"
        t0 = time.perf_counter()
        export_onnx(run, onnx_path, fold="kv" if form == "kv" else "auto", precision=args.dtype)
        say(f"exported {onnx_path.name} in {time.perf_counter() - t0:.1f} s")
        for r in ort_runtimes:
            if r == "ort-graph" and not cuda:
                skipped.append({"runtime": r, "form": form, "reason": "CUDA graphs need the CUDA provider (--device cuda)"})
                continue
            kind = "ort-cuda-graph" if r == "ort-graph" else ("ort-cuda" if cuda else "ort-cpu")
            try:
                backends[(r, form)] = OrtBackend(f"{r}:{form}", kind, onnx_path, args.threads, 0, {"form": form})
            except (Unavailable, VFPTError) as e:
                skipped.append({"runtime": r, "form": form, "reason": str(e)})
    return backends


def interleaved(backends: dict, batch: int, args, skipped: list) -> dict:
    """(runtime, form) -> per-repeat medians in ms, the order rotating between repeats."""
    runners = {}
    for key, backend in backends.items():
        try:
            runners[key] = (backend.runner(batch, False), backend.timer(False))
        except Unavailable as e:
            skipped.append({"runtime": key[0], "form": key[1], "batch": batch, "reason": str(e)})
    names = list(runners)
    per = {k: [] for k in names}
    for r in range(args.repeats):
        for key in names[r % len(names):] + names[:r % len(names)]:
            fn, timer = runners[key]
            for _ in range(args.warmup):
                fn()
            per[key].append(statistics.median(timer.time(fn) for _ in range(args.iters)) * 1e3)
    return per


def ratio(per: dict, a, b) -> float | None:
    if a not in per or b not in per:
        return None
    return statistics.median(x / y for x, y in zip(per[a], per[b]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_base_patch16_224", help="timm ViT name, or 'tiny' (a smoke test)")
    ap.add_argument("--prompts", type=int, default=50, help="deep prompts M of the kv form")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--dtype", default="fp16", choices=("fp32", "fp16", "bf16"))
    ap.add_argument("--runtimes", default=",".join(RUNTIMES), help=f"comma separated, of {', '.join(RUNTIMES)}")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (CPU)")
    ap.add_argument("--out", type=Path, required=True, help="folder for runtime_cost.json and the run.pt/ONNX files")
    a = ap.parse_args(argv)
    a.runtimes = [r for r in a.runtimes.split(",") if r]
    if any(r not in RUNTIMES for r in a.runtimes) or not a.runtimes:
        raise SystemExit(f"error: --runtimes takes {', '.join(RUNTIMES)}")
    if torch.device(a.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: torch sees no CUDA GPU; use --device cpu for a smoke test")
    if min(a.repeats, a.iters) < 1 or a.warmup < 0 or a.prompts < 1:
        raise SystemExit("error: --repeats, --iters and --prompts are >= 1, --warmup >= 0")
    batches = [int(b) for b in a.batches.split(",") if b]

    def say(line: str) -> None:
        print(line, flush=True)

    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = save_forms(a.model, a.prompts, a.alpha, a.out)
    runs = {form: load_run(p) for form, p in paths.items()}
    skipped: list = []
    backends = make_backends(a, runs, a.out, skipped, say)
    for s in skipped:
        say(f"skipped {s['runtime']}:{s['form']}: {s['reason']}")
    result = {"model": a.model, "prompts": a.prompts, "alpha": a.alpha, "dtype": a.dtype, "device": a.device,
              "gpu": torch.cuda.get_device_name(torch.device(a.device)) if torch.device(a.device).type == "cuda" else None,
              "repeats": a.repeats, "iters": a.iters, "warmup": a.warmup, "machine": machine_info(),
              "providers": {f"{k[0]}:{k[1]}": b.providers for k, b in backends.items() if k[0] != "torch"},
              "rows": [], "ratios": [], "skipped": skipped}
    for b in batches:
        per = interleaved(backends, b, a, skipped)
        for (rt, form), ms in per.items():
            row = {"runtime": rt, "form": form, "batch": b, "median_ms": statistics.median(ms),
                   "min_ms": min(ms), "repeat_ms": ms, "images_per_s": b / statistics.median(ms) * 1e3}
            result["rows"].append(row)
            say(f"b{b:<3d} {rt:9s} {form:5s} {row['median_ms']:9.3f} ms {row['images_per_s']:9.1f} img/s")
        for rt in RUNTIMES:
            v = ratio(per, (rt, "kv"), (rt, "plain"))
            if v is not None:
                result["ratios"].append({"batch": b, "what": f"{rt} kv / plain", "ratio": v})
        for form in FORMS:
            for rt in ("ort", "ort-graph"):
                v = ratio(per, (rt, form), ("torch", form))
                if v is not None:
                    result["ratios"].append({"batch": b, "what": f"{form}: {rt} / torch", "ratio": v})
            v = ratio(per, ("ort-graph", form), ("ort", form))
            if v is not None:
                result["ratios"].append({"batch": b, "what": f"{form}: ort-graph / ort", "ratio": v})
        for r in (r for r in result["ratios"] if r["batch"] == b):
            say(f"b{b:<3d} {r['what']}: {r['ratio']:.3f}x")
    for backend in backends.values():
        backend.close()
    result["seconds"] = time.perf_counter() - t0
    (a.out / "runtime_cost.json").write_text(json.dumps(result, indent=1))
    say(f"wrote {a.out / 'runtime_cost.json'} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
