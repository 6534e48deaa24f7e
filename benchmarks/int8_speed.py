"""INT8 on onnxruntime CPU: latency, file size and logit fidelity of the kv-folded VFPT export (M deep
prompts, random weights) quantized by the exporter's own recipes, against the plain fp32 backbone.

Forms (one interleaved run, every form in each round, a different starting form every repeat):
  plain        the fp32 backbone + head, no prompts (the yardstick: ratios are to it)
  kv           fp32, prompts folded to per-layer key/value constants
  int8-<mode>  kv quantized with `export --precision int8 --quantize <mode>` (dynamic, static; calibrated on
               the built-in digits-shifted train split, preprocessed by the run's own preprocessing)
  int8-<mode>-<w>  the same with the weight form w (--weights int7,int8,uint8: exporters/quantize.py)
Fidelity: logits of each kv form vs the fp32 PyTorch model on real images from the built-in sets
(digits-shifted and digits val, upscaled to the model size): min / mean cosine and top-1 agreement.

    .venv/bin/python benchmarks/int8_speed.py --out docs/benchmarks            # ViT-B/16 M=50, ~15 min on 2 cores
    .venv/bin/python benchmarks/int8_speed.py --model tiny --images 16 --repeats 2 --out i8   # seconds

Targets (issue 12): int8 kv latency <= 0.5x plain at batch 1 and 8 (onnxruntime CPU, 1 thread), file
<= 0.3x the fp32 kv file, logit cosine >= 0.99.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from prompt_cost import MODELS, NUM_CLASSES, ints, time_calls  # noqa: E402
from vfpt_deploy.models.backbone import create_backbone  # noqa: E402
from vfpt_deploy.calibration import calibration_set  # noqa: E402
from vfpt_deploy.artifacts.checkpoint import BackboneInfo, load_run, save_run  # noqa: E402
from vfpt_deploy.models.config import VFPTConfig  # noqa: E402
from vfpt_deploy.data import builtin_split  # noqa: E402
from vfpt_deploy.exporters.onnx import export_module, export_onnx  # noqa: E402
from vfpt_deploy.exporters.quantize import quantize_onnx  # noqa: E402
from vfpt_deploy.artifacts.files import atomic_write, dumps_json  # noqa: E402
from vfpt_deploy.models.vit.model import VFPTViT  # noqa: E402
from vfpt_deploy.pipeline import ExportSettings  # noqa: E402
from vfpt_deploy.runs import preprocess_for  # noqa: E402
from vfpt_deploy.artifacts.schema import read_graph  # noqa: E402
from vfpt_deploy.runtime import hardware  # noqa: E402
from vfpt_deploy.runtime.onnx_runner import make_session  # noqa: E402
from vfpt_deploy.runtime.timing import machine_info  # noqa: E402
from vfpt_deploy.verify import reference_logits  # noqa: E402

TARGETS = {"latency_ratio": 0.5, "size_ratio": 0.3, "min_cosine": 0.99}


def build(model_name: str, prompts: int, modes: list[str], samples: int, work: Path, log,
          weights: tuple[str, ...] = ("default",)) -> tuple[dict, object]:
    """plain + kv fp32 exports and the int8 forms of kv; returns ({form: path}, the Run)."""
    name, kwargs = MODELS.get(model_name, (model_name, {}))
    torch.manual_seed(0)
    backbone = create_backbone(name, **kwargs)
    paths = {"plain": work / "plain.onnx", "kv": work / "kv.onnx"}
    torch.manual_seed(prompts + 1)
    model = VFPTViT(backbone, NUM_CLASSES, VFPTConfig(num_prompts=prompts, deep=True, alpha=0.5)).eval()
    with torch.no_grad():  # trained prompts are far from their tiny init (as benchmarks/prompt_cost.py)
        for p in model.tuned_parameters().values():
            p.mul_(10.0)
    save_run(work / "run.pt", model, BackboneInfo(name, kwargs, source="random"), [str(i) for i in range(NUM_CLASSES)],
             preprocess_for(backbone))
    run = load_run(work / "run.pt")
    plain = VFPTViT(backbone, NUM_CLASSES, VFPTConfig(num_prompts=0)).eval()
    export_module(plain, paths["plain"], image_size=tuple(backbone.patch_embed.img_size))
    export_onnx(run, paths["kv"], fold="kv")
    calib = calibration_set(run, "builtin:digits-shifted", samples)
    for mode in modes:
        for w in weights:
            spec = ExportSettings(precision="int8", quantize=mode).quant_spec()
            form = f"int8-{mode}" if w == "default" else f"int8-{mode}-{w}"
            if w != "default":
                spec = dataclasses.replace(spec, weights=w).check()
            t0 = time.perf_counter()
            paths[form] = quantize_onnx(paths["kv"], work / f"{form}.onnx", spec, calib=calib.x,
                                        calib_info=calib.info).path
            log(f"  {form}: {time.perf_counter() - t0:.1f} s")
    return paths, run


def fidelity(run, paths: dict, images: int, threads: int | None) -> dict:
    """Per kv form: min / mean logit cosine and top-1 agreement with the fp32 PyTorch model."""
    pics = []
    for name in ("digits-shifted", "digits"):
        s = builtin_split(name, "val")
        pics += [s.image(i) for i in range(0, len(s), max(1, len(s) // (images // 2)))][: images // 2]
    x = run.preprocess.batch(pics)
    ref = reference_logits(run, x)
    out = {}
    for form, path in paths.items():
        if form == "plain":
            continue
        sess = make_session(path, threads=threads)
        y = np.concatenate([sess.run(None, {"images": x[i:i + 8]})[0] for i in range(0, len(x), 8)])
        cos = (ref * y).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(y, axis=1))
        out[form] = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
                     "agreement": 100.0 * float((ref.argmax(1) == y.argmax(1)).mean()), "images": len(x)}
    return out


def timings(paths: dict, batches: list[int], image_size, args, log) -> dict:
    """Interleaved round-robin: {form: {batch: [median seconds per repeat]}}."""
    sessions = {f: make_session(p, threads=args.threads) for f, p in paths.items()}
    forms = list(paths)
    raw: dict = {f: {} for f in forms}
    for b in batches:
        x = np.random.default_rng(b).standard_normal((b, 3, *image_size)).astype(np.float32)
        per = {f: [] for f in forms}
        for r in range(args.repeats):
            for f in forms[r % len(forms):] + forms[:r % len(forms)]:
                per[f].append(time_calls(sessions[f], {"images": x}, "logits", args.warmup, args.iters))
            log(f"batch {b} repeat {r + 1}/{args.repeats}: " + ", ".join(f"{f} {per[f][-1] * 1e3:.1f}" for f in forms) + " ms")
        for f in forms:
            raw[f][b] = per[f]
    return raw


def summarize(raw: dict, paths: dict, fid: dict, batches: list[int]) -> list[dict]:
    rows = []
    for f, path in paths.items():
        row = {"form": f, "size_mib": path.stat().st_size / 2**20,
               "size_ratio_to_kv": path.stat().st_size / paths["kv"].stat().st_size, **fid.get(f, {})}
        for b in batches:
            plain, mine = np.array(raw["plain"][b]), np.array(raw[f][b])
            row[f"b{b}_ms"] = float(np.median(mine)) * 1e3
            row[f"b{b}_ratio"] = float(np.median(mine / plain))  # within-repeat ratios, then the median
        rows.append(row)
    return rows


def table(rows: list[dict], batches: list[int]) -> str:
    head = ["form"] + [f"batch {b} ms (x plain)" for b in batches] + ["file MiB (x kv fp32)", "min / mean cosine", "top-1 agree"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["form"]] + [f"{r[f'b{b}_ms']:.1f} ({r[f'b{b}_ratio']:.2f}x)" for b in batches]
        cells.append(f"{r['size_mib']:.1f} ({r['size_ratio_to_kv']:.2f}x)")
        cells += ([f"{r['min_cosine']:.4f} / {r['mean_cosine']:.5f}", f"{r['agreement']:.1f}%"]
                  if "min_cosine" in r else ["-", "-"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224", help="timm ViT name, or 'tiny' (a smoke test)")
    ap.add_argument("--prompts", type=int, default=50, help="deep prompt count M of the kv fold")
    ap.add_argument("--modes", default="dynamic,static", help="int8 modes (export --quantize), comma separated")
    ap.add_argument("--weights", default="default", help="int8 weight forms, comma separated: default (the "
                    "exporter's), int7, int8, uint8 (exporters/quantize.py); forms other than default are named "
                    "int8-<mode>-<weights>")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--calib-samples", type=int, default=128, help="static calibration images (built-in train split)")
    ap.add_argument("--images", type=int, default=64, help="real images for the fidelity check")
    ap.add_argument("--repeats", type=int, default=5, help="round-robin repeats per batch size")
    ap.add_argument("--iters", type=int, default=3, help="timed calls per form per repeat (median taken)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per form per repeat")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="folder for int8_speed.json")
    ap.add_argument("--work", type=Path, default=None, help="folder for the ONNX files (default: a temp folder)")
    args = ap.parse_args(argv)
    batches = ints(args.batches)
    if min(batches) < 1 or args.repeats < 1 or args.iters < 1 or args.images < 2 or args.prompts < 1:
        raise SystemExit("error: batches, --repeats, --iters, --prompts must be >= 1 and --images >= 2")
    log = lambda s: print(s, flush=True)  # noqa: E731
    tmp = tempfile.TemporaryDirectory(prefix="vfpt-int8-") if args.work is None else None
    work = Path(tmp.name) if tmp else args.work
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    machine, load = {**machine_info(), "hardware": hardware.describe(["CPUExecutionProvider"])}, os.getloadavg()
    log(f"machine: {hardware.summary(machine['hardware'])}, {machine['usable_cpus']} usable CPUs, load {load[0]:.2f}")
    t0 = time.perf_counter()
    paths, run = build(args.model, args.prompts, [m for m in args.modes.split(",") if m], args.calib_samples, work, log,
                       tuple(w for w in args.weights.split(",") if w))
    fid = fidelity(run, {f: p for f, p in paths.items() if f != "plain"}, args.images, args.threads)
    raw = timings(paths, batches, run.model.img_size, args, log)
    rows = summarize(raw, paths, fid, batches)
    log(table(rows, batches))
    result = {"model": args.model, "prompts": args.prompts, "threads": args.threads, "targets": TARGETS,
              "machine": machine, "load_before": load, "load_after": os.getloadavg(), "rows": rows, "raw_seconds": raw,
              "settings": vars(args) | {"out": str(args.out), "work": str(args.work)},
              "quantization": {f: read_graph(p).metadata.get("quantization") for f, p in paths.items()},
              "wall_s": time.perf_counter() - t0}
    out = args.out / "int8_speed.json"
    atomic_write(out, lambda p: Path(p).write_text(dumps_json(result, indent=2) + "\n"))
    log(f"wrote {out} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
