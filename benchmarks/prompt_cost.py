"""What deep prompts cost at inference, and what the kv fold saves (onnxruntime CPU).

One run measures three forms of the same ViT for every prompt count M:
  plain    the backbone + head, no prompts (M = 0)
  tokens   prompts folded to constant tokens: every block runs on 1 + M + N tokens
  kv       prompts folded to per-layer key/value constants: every block runs on 1 + N tokens

Forms are interleaved within a batch size (round-robin, a different starting form every repeat) so
machine noise hits them alike; each repeat takes the median of `--iters` calls, and the reported
latency is the median over repeats. Ratios to plain are taken within a repeat, then the median.

    .venv/bin/python benchmarks/prompt_cost.py --out docs/benchmarks          # ViT-B/16, ~10 min on 2 cores
    .venv/bin/python benchmarks/prompt_cost.py --model tiny --prompts 0,4,16 --out pc   # seconds
    .venv/bin/python benchmarks/prompt_cost.py --model swin_base_patch4_window7_224 --prompts 0,10,50 \
        --threads 1 --flush-denormals --out docs/benchmarks      # Swin-B (also times timm's own forward)

Targets (issue 5): kv within 1.05x of plain at M = 50 and 1.10x at M = 200; tokens grows with M
(about +25% at M = 50). --profile adds an onnxruntime per-op profile of plain / tokens / kv at the
largest M to explain where the time goes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from vfpt_deploy.models.backbone import create_backbone  # noqa: E402
from vfpt_deploy.bench import make_input  # noqa: E402
from vfpt_deploy.artifacts.files import atomic_write  # noqa: E402
from vfpt_deploy.models.config import VFPTConfig  # noqa: E402
from vfpt_deploy.exporters.onnx import export_module  # noqa: E402
from vfpt_deploy.folding import fold_model  # noqa: E402
from vfpt_deploy.models.families import vfpt_model  # noqa: E402
from vfpt_deploy.models.swin.model import VFPTSwin  # noqa: E402
from vfpt_deploy.runtime.onnx_runner import make_session  # noqa: E402
from vfpt_deploy.runtime.timing import machine_info  # noqa: E402

MODELS = {
    "vit_base_patch16_224": ("vit_base_patch16_224", {}),
    "tiny": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}),
    "swin_base_patch4_window7_224": ("swin_base_patch4_window7_224", {}),
    "swin-tiny": ("swin_tiny_patch4_window7_224", {"img_size": 32, "patch_size": 2, "embed_dim": 16,
                                                   "depths": [2, 2, 2, 2], "num_heads": [1, 2, 2, 4], "window_size": 4}),
}
TARGETS = {("kv", 50): 1.05, ("kv", 200): 1.10}
NUM_CLASSES = 100


def ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"error: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise SystemExit(f"error: expected non-negative integers, got {text!r}")
    return values


def build_forms(model_name: str, prompts: list[int], alpha: float, work: Path, log,
                reuse: bool = False) -> tuple[dict, tuple[int, int]]:
    """Export plain + tokens/kv folds for every M > 0 (or reuse the files a previous run left in `work`).
    Returns {(form, M): onnx path}, image size."""
    name, kwargs = MODELS.get(model_name, (model_name, {}))
    torch.manual_seed(0)
    backbone = create_backbone(name, **kwargs)
    image_size = tuple(backbone.patch_embed.img_size)
    paths = {}
    for m in sorted(set(prompts) | {0}):
        torch.manual_seed(m + 1)
        model = vfpt_model(backbone, NUM_CLASSES, VFPTConfig(num_prompts=m, deep=True, alpha=alpha)).eval()
        with torch.no_grad():  # trained prompts are far from their tiny init; keep the values realistic
            for p in model.tuned_parameters().values():
                p.mul_(10.0)
        forms = [("plain", model)] if m == 0 else [(f, fold_model(model, f)) for f in ("tokens", "kv")]
        if m == 0 and isinstance(model, VFPTSwin):
            # Also timm's own Swin forward (what exporting the plain timm model gives): VFPTSwin computes the
            # blocks with constant sizes, so its plain form is the like-for-like baseline for the folds.
            forms.append(("timm", torch.nn.Sequential(backbone, model.head).eval()))
        for form, module in forms:
            path = work / f"{form}_M{m}_a{alpha}.onnx"
            if path.is_file() and reuse:
                log(f"  reusing {path}")
                paths[(form, m)] = path
                continue
            t0 = time.perf_counter()
            export_module(module, path, image_size=image_size)
            log(f"  exported {form:6s} M={m:3d} in {time.perf_counter() - t0:5.1f} s ({path.stat().st_size / 2**20:.0f} MiB)")
            paths[(form, m)] = path
    return paths, image_size


def open_session(path: Path, threads: int | None, flush_denormals: bool):
    if not flush_denormals:
        return make_session(path, threads=threads)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or 0
    so.add_session_config_entry("session.set_denormal_as_zero", "1")  # onnxruntime's intra-op threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def time_calls(sess, feed, out_name, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        sess.run([out_name], feed)
    t = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sess.run([out_name], feed)
        t.append(time.perf_counter() - t0)
    return float(np.median(t))


def profile_ops(path: Path, x: np.ndarray, threads: int | None, runs: int, work: Path) -> dict[str, float]:
    """onnxruntime's own per-node profile: milliseconds per run by op type."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(work / f"profile_{path.stem}")
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name_in, name_out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    warmup = 2
    for _ in range(warmup + runs):
        sess.run([name_out], {name_in: x})
    prof = Path(sess.end_profiling())
    events = json.loads(prof.read_text())
    prof.unlink()
    # Count only nodes after the warm-up runs (the first run also pays for lazy initialisation).
    run_events = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                        key=lambda e: e["ts"])
    after = run_events[warmup - 1]["ts"] + run_events[warmup - 1]["dur"]
    by_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= after:
            by_op[e["args"]["op_name"]] += e["dur"] / 1e3 / runs
    return dict(sorted(by_op.items(), key=lambda kv: -kv[1]))


def plot(summary: list[dict], batches: list[int], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, b in zip(axes[0], batches):
        rows = [r for r in summary if r["batch"] == b]
        plain = next(r for r in rows if r["form"] == "plain")
        ms_all = sorted({r["M"] for r in rows})
        for form, style in (("tokens", "o-"), ("kv", "s-")):
            pts = [(0, plain["median_ms"])] + sorted((r["M"], r["median_ms"]) for r in rows if r["form"] == form)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{form} fold")
        ax.axhline(plain["median_ms"], color="gray", ls="--", label="plain backbone (no prompts)")
        ax.set_xticks(ms_all)
        ax.set_xlabel("deep prompts per layer, M")
        ax.set_ylabel("latency per call, ms (median of repeats)")
        ax.set_title(f"batch {b}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        for r in rows:
            if r["form"] != "plain":
                ax.annotate(f"{'timm ' if r['form'] == 'timm' else ''}{r['ratio']:.2f}x", (r["M"], r["median_ms"]),
                            textcoords="offset points",
                            xytext=(4, -12 if r["form"] == "kv" else 6), fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224",
                    help="timm ViT or Swin name, or 'tiny' / 'swin-tiny' (smoke tests)")
    ap.add_argument("--prompts", default="0,10,50,100,200", help="deep prompt counts M (0 = the plain backbone)")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=5, help="round-robin repeats per batch size")
    ap.add_argument("--iters", type=int, default=5, help="timed calls per form per repeat (median taken)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per form per repeat")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own)")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="folder for prompt_cost.json/.png")
    ap.add_argument("--work", type=Path, default=None,
                    help="folder for the ONNX files, kept and reused by later runs (default: a temp folder)")
    ap.add_argument("--tag", default="", help="suffix of the output file names (prompt_cost<tag>.json/.png)")
    ap.add_argument("--profile", action="store_true", help="also profile plain/tokens/kv at the largest M")
    ap.add_argument("--flush-denormals", action="store_true",
                    help="treat float32 denormals as zero (flush-to-zero / denormals-are-zero): on this thread, where "
                         "onnxruntime computes with --threads 1, and in onnxruntime's own threads. A Swin's shift mask "
                         "(-100) makes softmax outputs denormal, which x86 CPUs compute very slowly")
    args = ap.parse_args(argv)
    prompts, batches = ints(args.prompts), ints(args.batches)
    if any(b < 1 for b in batches) or args.repeats < 1 or args.iters < 1 or args.warmup < 0:
        raise SystemExit("error: batches, --repeats and --iters must be >= 1, --warmup >= 0")
    log = lambda s: print(s, flush=True)  # noqa: E731

    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="vfpt-prompt-cost-")
        work = Path(tmp.name)
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    load_before = os.getloadavg()
    log(f"machine: {machine['cpu_model']}, {machine['physical_cores']} cores, {machine['usable_cpus']} usable CPUs, "
        f"load {load_before[0]:.2f}")
    t_start = time.perf_counter()
    log(f"exporting {args.model}, M in {prompts}, alpha {args.alpha}")
    paths, image_size = build_forms(args.model, prompts, args.alpha, work, log, reuse=args.work is not None)
    forms = sorted(paths, key=lambda k: (k[1], k[0]))  # (form, M)
    if args.flush_denormals:
        torch.set_flush_denormal(True)
    sessions = {k: open_session(p, args.threads, args.flush_denormals) for k, p in paths.items()}
    providers = {s.get_providers()[0] for s in sessions.values()}
    log(f"{len(sessions)} sessions on {', '.join(sorted(providers))}")
    in_name = next(iter(sessions.values())).get_inputs()[0].name
    out_name = next(iter(sessions.values())).get_outputs()[0].name

    raw: dict[str, list] = {}
    agreement = {}
    for b in batches:
        x = make_input(b, image_size, seed=b)
        feed = {in_name: x}
        if b == batches[0]:
            # The folds compute the same function: check that before timing them.
            for m in sorted({k[1] for k in forms if k[1]}):
                yt = sessions[("tokens", m)].run([out_name], feed)[0]
                yk = sessions[("kv", m)].run([out_name], feed)[0]
                agreement[m] = float(np.abs(yt - yk).max())
            if ("timm", 0) in sessions:
                yt = sessions[("timm", 0)].run([out_name], feed)[0]
                agreement["timm_vs_plain"] = float(np.abs(yt - sessions[("plain", 0)].run([out_name], feed)[0]).max())
        per_repeat = {k: [] for k in forms}
        for r in range(args.repeats):
            order = forms[r % len(forms):] + forms[:r % len(forms)]
            for k in order:
                per_repeat[k].append(time_calls(sessions[k], feed, out_name, args.warmup, args.iters))
            log(f"batch {b} repeat {r + 1}/{args.repeats}: " + ", ".join(
                f"{f}{m if m else ''} {per_repeat[(f, m)][-1] * 1e3:.1f}" for f, m in forms) + " ms")
        for k, v in per_repeat.items():
            raw[f"{k[0]}_M{k[1]}_b{b}"] = v

    summary = []
    for b in batches:
        plain = np.array(raw[f"plain_M0_b{b}"])
        for f, m in forms:
            t = np.array(raw[f"{f}_M{m}_b{b}"])
            ratios = t / plain
            summary.append({"form": f, "M": m, "batch": b, "median_ms": float(np.median(t) * 1e3),
                            "min_ms": float(t.min() * 1e3), "max_ms": float(t.max() * 1e3),
                            "ratio": float(np.median(ratios)), "ratio_min": float(ratios.min()),
                            "ratio_max": float(ratios.max()),
                            # least-disturbed repeat of each form: robust when the machine is busy
                            "ratio_of_fastest": float(t.min() / plain.min())})

    log("")
    log(f"{'form':8s} {'M':>4s} {'batch':>5s} {'median ms':>10s} {'x plain':>8s} {'(repeats min..max)':>20s} "
        f"{'fastest ms':>10s} {'x plain':>8s}")
    for r in summary:
        log(f"{r['form']:8s} {r['M']:4d} {r['batch']:5d} {r['median_ms']:10.1f} {r['ratio']:8.3f} "
            f"{r['ratio_min']:9.3f}..{r['ratio_max']:<8.3f} {r['min_ms']:10.1f} {r['ratio_of_fastest']:8.3f}")
    verdicts = []
    for (form, m), limit in TARGETS.items():
        for r in summary:
            if r["form"] == form and r["M"] == m:
                ok = r["ratio"] <= limit
                verdicts.append({"form": form, "M": m, "batch": r["batch"], "ratio": r["ratio"], "limit": limit, "met": ok})
                log(f"target {form} M={m} batch {r['batch']}: {r['ratio']:.3f}x (limit {limit:.2f}x) "
                    f"{'met' if ok else 'MISSED'}")
    for r in summary:
        if r["form"] == "tokens" and r["M"] == 50:
            log(f"tokens M=50 batch {r['batch']}: {100 * (r['ratio'] - 1):+.1f}% (expected about +25%)")
    if agreement:
        log("max |tokens - kv| logits: " + ", ".join(f"{'M=' if isinstance(m, int) else ''}{m}: {d:.1e}"
                                                     for m, d in agreement.items()))

    profile = {}
    if args.profile:
        m_max = max(k[1] for k in forms)
        x1 = make_input(1, image_size, seed=1)
        for k in [("plain", 0), ("timm", 0), ("tokens", m_max), ("kv", m_max)]:
            if k in paths:
                profile[f"{k[0]}_M{k[1]}"] = ops = profile_ops(paths[k], x1, args.threads, 10, work)
                top = list(ops.items())[:8]
                log(f"profile {k[0]} M={k[1]} batch 1, ms/run by op: total {sum(ops.values()):.1f}; "
                    + ", ".join(f"{o} {t:.1f}" for o, t in top))

    load_after = os.getloadavg()
    elapsed = time.perf_counter() - t_start
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {"format": "vfpt-deploy.prompt-cost", "version": 1, "machine": machine, "settings": settings,
              "image_size": list(image_size), "providers": sorted(providers),
              "loadavg_before": load_before, "loadavg_after": load_after, "elapsed_s": elapsed,
              "summary": summary, "targets": verdicts, "tokens_vs_kv_max_abs_diff": agreement,
              "raw_seconds": raw, "profile_ms_per_run": profile}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = ("prompt_cost" if args.model == "vit_base_patch16_224" else f"prompt_cost_{args.model}") + args.tag
    json_path = args.out / f"{stem}.json"
    atomic_write(json_path, lambda tmp_: Path(tmp_).write_text(json.dumps(result, indent=2) + "\n"))
    title = (f"{args.model}, deep prompts, alpha {args.alpha}, onnxruntime CPU ({machine['cpu_model']}, "
             f"{machine['usable_cpus']} CPUs, threads {args.threads or 'default'}), median of {args.repeats} repeats"
             + (", denormals flushed" if args.flush_denormals else ""))
    plot(summary, batches, title, args.out / f"{stem}.png")
    log(f"wrote {json_path} and {args.out / (stem + '.png')} in {elapsed:.0f} s (load {load_before[0]:.2f} -> {load_after[0]:.2f})")
    if tmp is not None:
        sessions.clear()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
