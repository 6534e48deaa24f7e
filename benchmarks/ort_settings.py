"""Which onnxruntime session settings pay off for a folded VFPT model on this CPU.

Measures, for one ONNX file (or a freshly exported kv fold of a tiny / ViT-B/16 model):
  - graph optimization level: disable / basic / extended / all (latency and session creation time)
  - intra-op threads: 1 .. cores and onnxruntime's default
  - a saved optimized model (SessionOptions.optimized_model_filepath), reloaded with optimizations off:
    creation time and latency against optimizing the original at load
Configurations are interleaved round-robin within a batch size (a different start every repeat) so
machine noise hits them alike; latency is the median over repeats of per-repeat medians.

    .venv/bin/python benchmarks/ort_settings.py --model tiny --out docs/benchmarks
    .venv/bin/python benchmarks/ort_settings.py --onnx model.onnx --batches 1,8 --out docs/benchmarks
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vfpt_deploy.bench import make_input  # noqa: E402
from vfpt_deploy.artifacts.files import atomic_write  # noqa: E402
from vfpt_deploy.runtime.onnx_runner import make_session  # noqa: E402
from vfpt_deploy.runtime.timing import machine_info, physical_cores  # noqa: E402


def export_kv(model: str, prompts: int, path: Path) -> Path:
    import torch

    from vfpt_deploy.models.backbone import create_backbone
    from vfpt_deploy.models.config import VFPTConfig
    from vfpt_deploy.exporters.onnx import export_module
    from vfpt_deploy.folding import fold_model
    from vfpt_deploy.models.vit.model import VFPTViT

    name, kwargs = {"tiny": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3,
                                                      "num_heads": 2})}.get(model, (model, {}))
    torch.manual_seed(0)
    bb = create_backbone(name, **kwargs)
    vfpt = VFPTViT(bb, 100, VFPTConfig(num_prompts=prompts, deep=True, alpha=0.5)).eval()
    export_module(fold_model(vfpt, "kv"), path, image_size=tuple(bb.patch_embed.img_size))
    return path


def timed_session(path: Path, **kwargs):
    t0 = time.perf_counter()
    sess = make_session(path, ["CPUExecutionProvider"], **kwargs)
    return sess, time.perf_counter() - t0


def median_call(sess, feed, out_name, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        sess.run([out_name], feed)
    t = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sess.run([out_name], feed)
        t.append(time.perf_counter() - t0)
    return float(np.median(t))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--onnx", type=Path, default=None, help="an exported model (default: export a kv fold of --model)")
    ap.add_argument("--model", default="tiny", help="'tiny' or a timm ViT name, exported as a kv fold with --prompts")
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    log = lambda s: print(s, flush=True)  # noqa: E731

    tmp = tempfile.TemporaryDirectory(prefix="vfpt-ort-settings-")
    work = Path(tmp.name)
    path = args.onnx or export_kv(args.model, args.prompts, work / f"{args.model}_kv{args.prompts}.onnx")
    label = args.onnx.name if args.onnx else f"{args.model} kv fold M={args.prompts}"
    cores = physical_cores() or os.cpu_count()

    configs: dict[str, dict] = {}
    for level in ("disable", "basic", "extended", "all"):
        configs[f"opt={level}"] = dict(optimization=level)
    for n in sorted({1, cores} | set(range(1, cores + 1))):
        configs[f"threads={n}"] = dict(threads=n)
    saved = work / "optimized.onnx"
    configs["saved optimized, opt=disable"] = dict(optimization="disable")

    # Creation time: each config created 3 times, median; the saved model is written once first.
    make_session(path, ["CPUExecutionProvider"], optimization="all", optimized_model_path=str(saved))
    sessions, create_s = {}, {}
    for name, kw in configs.items():
        src = saved if name.startswith("saved") else path
        times = []
        for _ in range(3):
            sess, dt = timed_session(src, **kw)
            times.append(dt)
        sessions[name], create_s[name] = sess, float(np.median(times))
    in_name, out_name = sessions["opt=all"].get_inputs()[0].name, sessions["opt=all"].get_outputs()[0].name
    image_size = tuple(sessions["opt=all"].get_inputs()[0].shape[2:4])

    names = list(configs)
    latency: dict[str, dict[int, list[float]]] = {n: {} for n in names}
    for b in batches:
        feed = {in_name: make_input(b, image_size, seed=b)}
        for n in names:
            latency[n][b] = []
        for r in range(args.repeats):
            for n in names[r % len(names):] + names[:r % len(names)]:
                latency[n][b].append(median_call(sessions[n], feed, out_name, args.warmup, args.iters))
        log(f"batch {b} done")

    rows = []
    base = {b: np.array(latency["opt=all"][b]) for b in batches}
    for n in names:
        row = {"config": n, "create_s": create_s[n]}
        for b in batches:
            t = np.array(latency[n][b])
            row[f"b{b}_ms"] = float(np.median(t) * 1e3)
            row[f"b{b}_vs_all"] = float(np.median(t / base[b]))
        rows.append(row)
    log(f"\n{label}: {path.stat().st_size / 2**20:.0f} MiB, {cores} cores, median of {args.repeats} repeats x {args.iters} calls")
    head = f"{'config':32s} {'create s':>9s}" + "".join(f" {f'b{b} ms':>9s} {'x all':>6s}" for b in batches)
    log(head)
    for row in rows:
        log(f"{row['config']:32s} {row['create_s']:9.3f}" + "".join(
            f" {row[f'b{b}_ms']:9.2f} {row[f'b{b}_vs_all']:6.3f}" for b in batches))
    result = {"format": "vfpt-deploy.ort-settings", "version": 1, "machine": machine_info(), "model": label,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "loadavg": os.getloadavg(), "rows": rows,
              "raw_seconds": {n: {str(b): v for b, v in d.items()} for n, d in latency.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"ort_settings_{args.model if not args.onnx else args.onnx.stem}"
    atomic_write(args.out / f"{stem}.json", lambda t: Path(t).write_text(json.dumps(result, indent=2) + "\n"))
    log(f"wrote {args.out / (stem + '.json')}")
    sessions.clear()
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
