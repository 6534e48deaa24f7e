"""What a golden set costs: how much it adds to an exported ONNX, and how long the load-time self-check
(`serve`, `predict --self-check`) and the torch-free `verify ARTIFACT` take, on onnxruntime CPU.

The model: ViT-B/16 with M deep prompts (random weights, prompts scaled as trained ones), kv fold, exported
by the real pipeline (`export_run`: fold, ONNX, golden set, verify) with real images (the built-in digits val
images written to a folder without labels) so the golden set holds random inputs and images as it does for
a user's export.

    .venv/bin/python benchmarks/golden_cost.py --out docs/benchmarks        # ViT-B/16 M=50: a few minutes
    .venv/bin/python benchmarks/golden_cost.py --model tiny --out g         # seconds

Targets (issue 19): the golden set adds well under 1% to a ViT-B/16 fp32 artifact; the self-check at load
takes under 1 s.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from prompt_cost import MODELS, NUM_CLASSES  # noqa: E402
from vfpt_deploy.models.backbone import create_backbone  # noqa: E402
from vfpt_deploy.artifacts.checkpoint import BackboneInfo, load_run, save_run  # noqa: E402
from vfpt_deploy.models.config import VFPTConfig  # noqa: E402
from vfpt_deploy.data import builtin_split  # noqa: E402
from vfpt_deploy.artifacts.files import atomic_write, dumps_json  # noqa: E402
from vfpt_deploy.artifacts.golden import KEY  # noqa: E402
from vfpt_deploy.models.vit.model import VFPTViT  # noqa: E402
from vfpt_deploy.pipeline import ExportSettings, export_run  # noqa: E402
from vfpt_deploy.runs import preprocess_for  # noqa: E402
from vfpt_deploy.runtime.hardware import describe, summary  # noqa: E402
from vfpt_deploy.runtime.onnx_runner import OnnxPredictor  # noqa: E402
from vfpt_deploy.runtime.selfcheck import self_check, verify_golden  # noqa: E402
from vfpt_deploy.artifacts.schema import read_graph  # noqa: E402


def make_run(model_name: str, prompts: int, work: Path):
    name, kwargs = MODELS.get(model_name, (model_name, {}))
    torch.manual_seed(0)
    backbone = create_backbone(name, **kwargs)
    torch.manual_seed(prompts + 1)
    model = VFPTViT(backbone, NUM_CLASSES, VFPTConfig(num_prompts=prompts, deep=True, alpha=0.5)).eval()
    with torch.no_grad():
        for p in model.tuned_parameters().values():
            p.mul_(10.0)
    save_run(work / "run.pt", model, BackboneInfo(name, kwargs, source="random"), [str(i) for i in range(NUM_CLASSES)],
             preprocess_for(backbone))
    return load_run(work / "run.pt")


def image_folder(work: Path, count: int) -> Path:
    folder = work / "images"
    folder.mkdir()
    s = builtin_split("digits", "val")
    for i in range(count):
        s.image(i).save(folder / f"{i}.png")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_base_patch16_224", help="prompt_cost.MODELS key or a timm name")
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5, help="self-check replays timed (after the first)")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: every core)")
    ap.add_argument("--out", type=Path, required=True, help="folder for golden_cost.json")
    args = ap.parse_args()
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="golden-cost-", dir=".") as tmp:
        work = Path(tmp)
        run = make_run(args.model, args.prompts, work)
        t0 = time.perf_counter()
        out = export_run(run, ExportSettings(fold="kv", data=str(image_folder(work, 32)), num_random=4,
                                             threads=args.threads), work / "model.onnx")
        export_s = time.perf_counter() - t0
        assert out.passed, out.report.to_json()
        path = work / "model.onnx"
        meta = read_graph(path).metadata
        golden_chars = len(dumps_json(meta[KEY]))
        size = path.stat().st_size
        t0 = time.perf_counter()
        predictor = OnnxPredictor(path, ["cpu"], threads=args.threads)
        open_s = time.perf_counter() - t0
        with predictor:
            first = self_check(predictor, str(path), at_load=True)  # what serve runs at load
            times = [self_check(predictor, str(path), at_load=True).seconds for _ in range(args.repeats)]
            replayed = sum(c.samples for c in first.comparisons)
        t0 = time.perf_counter()
        rep = verify_golden(path, providers=["cpu"], threads=args.threads)
        verify_s = time.perf_counter() - t0
    result = {
        "model": args.model, "prompts": args.prompts, "fold": "kv", "precision": "fp32",
        "onnx_bytes": size, "golden_json_chars": golden_chars, "golden_fraction": golden_chars / size,
        "golden_rows": first.golden.rows, "self_check_rows": replayed, "golden_sets": [s["what"] for s in first.golden.sets],
        "self_check_first_s": first.seconds, "self_check_median_s": statistics.median(times), "self_check_s": times,
        "self_check_passed": first.passed, "open_session_s": open_s, "verify_golden_s": verify_s,
        "verify_golden_passed": rep.passed, "export_s": export_s, "threads": args.threads,
        "machine": describe(["CPUExecutionProvider"]), "load_before": load0, "load_after": os.getloadavg(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "golden_cost.json", lambda t: Path(t).write_text(dumps_json(result, indent=2) + "\n"))
    print(f"{args.model} M={args.prompts} on {summary(result['machine'])}")
    print(f"ONNX {size / 2**20:.1f} MiB, golden set {golden_chars / 2**10:.0f} KiB ({100 * golden_chars / size:.2f}%), "
          f"{first.golden.rows} inputs")
    print(f"self-check at load ({result['self_check_rows']} rows) first {first.seconds:.3f} s, median {statistics.median(times):.3f} s of {len(times)}; session open "
          f"{open_s:.2f} s; verify ARTIFACT (all rows) {verify_s:.2f} s; load {load0[0]:.1f} -> {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
