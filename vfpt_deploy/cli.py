"""The vfpt-deploy command line: parse, call a library function, print. Errors are one line, exit 1."""
from __future__ import annotations

import functools
import json
import logging
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .errors import VFPTError

app = typer.Typer(help="Train, fold, export and serve Visual Fourier Prompt Tuning (VFPT) vision transformers.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console()
err_console = Console(stderr=True)
logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[RichHandler(console=err_console, show_path=False, show_time=False)])


def cli_errors(fn):
    """Known problems become one red line on stderr and exit code 1 -- never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VFPTError as e:
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)


def parse_model_args(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise VFPTError(f"--model-arg takes KEY=VALUE (e.g. img_size=384), got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


class Location(str, Enum):
    prepend = "prepend"
    append = "append"
    random = "random"  # accepted by the parser so the refusal can say why


@app.command()
@cli_errors
def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the best-by-val run.pt is written.")] = Path("run.pt"),
    data: Annotated[str, typer.Option(help="'builtin' (offline digits, shifted domain), 'builtin:digits', or a folder with train/ and val/ (a subfolder per class).")] = "builtin",
    model: Annotated[str, typer.Option(help="timm ViT name.")] = "vit_base_patch16_224",
    model_arg: Annotated[Optional[list[str]], typer.Option("--model-arg", help="timm keyword argument KEY=VALUE, repeatable (e.g. img_size=384).")] = None,
    weights: Annotated[str, typer.Option(help="Backbone weights: 'pretrained' (timm hub), a local .pth/.safetensors/.npz, or 'random' (tests only).")] = "pretrained",
    prompts: Annotated[int, typer.Option(help="Prompt tokens per layer (M).")] = 10,
    alpha: Annotated[float, typer.Option(help="Fourier fraction: the first floor(M*alpha) prompts go through the 2-D FFT.")] = 0.5,
    deep: Annotated[bool, typer.Option("--deep/--shallow", help="Prompts before every block, or only before block 0.")] = True,
    location: Annotated[Location, typer.Option(help="Where Fourier prompts sit in a layer's prompt block.")] = Location.prepend,
    project: Annotated[int, typer.Option(help="Learn prompts at this width and project them (0 = off).")] = 0,
    dropout: Annotated[float, typer.Option(help="Prompt dropout.")] = 0.0,
    epochs: Annotated[int, typer.Option(min=1)] = 100,
    lr: Annotated[float, typer.Option(help="Base learning rate (SGD, momentum 0.9).")] = 0.1,
    weight_decay: Annotated[float, typer.Option()] = 1e-4,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    warmup_epochs: Annotated[int, typer.Option(min=0)] = 10,
    crop_pct: Annotated[float, typer.Option(help="1.0: resize to the model size (VTAB); <1: resize shorter side to size/crop_pct, center crop (FGVC: 0.875).")] = 1.0,
    prompts_only: Annotated[bool, typer.Option("--prompts-only", help="Store prompts and head without the backbone weights (loading then needs --backbone and checks its hash).")] = False,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1, ... (default: CUDA when present).")] = None,
) -> None:
    """Train VFPT prompts and a linear head on a frozen timm ViT."""
    import torch

    from .config import VFPTConfig
    from .runs import train_run
    from .train import TrainSettings

    config = VFPTConfig(num_prompts=prompts, deep=deep, alpha=alpha, location=location.value, project=project, dropout=dropout)
    settings = TrainSettings(epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                             warmup_epochs=warmup_epochs, seed=seed)
    with progress() as bar:
        task = bar.add_task("training", total=None)

        def on_epoch(r, best):
            bar.console.print(f"epoch {r.epoch:3d}  train loss {r.train_loss:.4f}  val top-1 {r.val_top1:6.2f}%"
                              + ("  [green]best, saved[/]" if best else ""))

        result = train_run(out, data=data, model_name=model, model_kwargs=parse_model_args(model_arg or []),
                           weights=weights, config=config, settings=settings, crop_pct=crop_pct,
                           include_backbone=not prompts_only, device=torch.device(device) if device else None,
                           on_epoch=on_epoch, on_step=lambda s, t: bar.update(task, completed=s, total=t))
    h = result.history
    console.print(f"best val top-1 {h.best_val_top1:.2f}% at epoch {h.best_epoch}; wrote {result.out}")


@app.command()
@cli_errors
def info(ckpt: Annotated[Path, typer.Argument(help="A run.pt.")],
         backbone: Annotated[Optional[str], typer.Option(help="Backbone weights for a prompts-only run.pt.")] = None) -> None:
    """Show a run.pt: VFPT config, parameter counts, classes, preprocessing and provenance."""
    from .checkpoint import load_run

    run = load_run(ckpt, backbone_weights=backbone)
    t = Table(title=str(ckpt), show_header=False)
    cfg = run.config
    tuned = sum(p.numel() for p in run.model.tuned_parameters().values())
    total = sum(p.numel() for p in run.model.parameters())
    t.add_row("prompts", f"M={cfg.num_prompts} {'deep' if cfg.deep else 'shallow'}, alpha={cfg.alpha} "
              f"(m={cfg.num_fourier} Fourier), location={cfg.location}, project={cfg.project}, dropout={cfg.dropout}")
    t.add_row("backbone", f"{run.backbone.name} {json.dumps(run.backbone.kwargs)}")
    t.add_row("  weights", run.backbone.source)
    t.add_row("  sha256", run.backbone.sha256)
    t.add_row("  image size", "x".join(map(str, run.model.img_size)))
    t.add_row("parameters", f"tuned {tuned:,} / total {total:,} ({100.0 * tuned / total:.3f}%)")
    t.add_row("classes", f"{len(run.classes)}: {', '.join(run.classes[:10])}{' ...' if len(run.classes) > 10 else ''}")
    p = run.preprocess
    t.add_row("preprocess", f"resize {p.resize}, crop {p.crop}, mean {p.mean}, std {p.std}, {p.interpolation}")
    train_meta = run.meta.get("train", {})
    if train_meta:
        t.add_row("training", ", ".join(f"{k}={v}" for k, v in train_meta.items()))
    t.add_row("written by", f"vfpt-deploy {run.meta.get('tool_version', '?')} at {run.meta.get('created', '?')}")
    t.add_row("file sha256", run.sha256)
    console.print(t)


@app.command()
@cli_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("runs/demo"),
    pretrain_epochs: Annotated[int, typer.Option(min=1)] = 60,
    epochs: Annotated[int, typer.Option(min=1)] = 40,
    lr: Annotated[float, typer.Option()] = 1.0,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """The built-in offline main job: pretrain a small ViT on clean digits, then compare linear probe,
    VPT and VFPT on a shifted domain, and write the VFPT run.pt."""
    from .demo import export_demo, run_demo

    with progress() as bar:
        tasks: dict[str, int] = {}

        def on_step(name, s, t):
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=t)
            bar.update(tasks[name], completed=s)

        rows, clean = run_demo(out, pretrain_epochs=pretrain_epochs, epochs=epochs, lr=lr, seed=seed,
                               status=lambda s: bar.console.print(f"[cyan]{s}[/]"), on_step=on_step)
    console.print(f"frozen backbone, clean-domain val top-1 (nearest class mean): {clean:.1f}%")
    t = Table(title="shifted-domain val top-1 (built-in digits-shifted, 397 images)")
    for col in ("method", "prompts", "tuned params", "best epoch", "val top-1", "checkpoint"):
        t.add_column(col)
    for r in rows:
        t.add_row(r.name, f"M={r.config.num_prompts}, m={r.config.num_fourier}", f"{r.tuned_params:,}",
                  str(r.best_epoch), f"{r.val_top1:.2f}%", str(r.path))
    console.print(t)
    with console.status("folding, exporting to ONNX and verifying the VFPT run"):
        result, report = export_demo(out)
    console.print(f"exported {result.path} ({result.fold_mode} fold, {result.size_bytes / 2**20:.2f} MiB, "
                  f"{result.op_count} ops, no FFT op)")
    print_verify(report)
    if not report.passed:
        raise typer.Exit(1)
    console.print(f"next: vfpt-deploy predict {result.path} IMAGE...  |  vfpt-deploy info {out / 'run.pt'}")


class Fold(str, Enum):
    auto = "auto"
    tokens = "tokens"
    kv = "kv"
    none = "none"


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"


class Format(str, Enum):
    onnx = "onnx"
    trt = "trt"
    trt_rtx = "trt-rtx"


def tolerances_from(precision: str, atol, rtol, min_cosine, min_agreement):
    from .verify import Tolerances

    base = Tolerances.for_precision(precision)
    if all(v is None for v in (atol, rtol, min_cosine, min_agreement)):
        return None
    return Tolerances(atol=atol if atol is not None else base.atol, rtol=rtol if rtol is not None else base.rtol,
                      min_cosine=min_cosine if min_cosine is not None else base.min_cosine,
                      min_agreement=min_agreement if min_agreement is not None else base.min_agreement)


def print_verify(report) -> None:
    console.print(f"verify [bold]{report.artifact}[/] against the unfolded PyTorch model of {report.checkpoint}")
    console.print(f"backend: {report.backend}; precision {report.precision}; pass if {report.tolerances}")
    t = Table()
    for col in ("inputs", "max |diff|", "max rel", "min cosine", "top-1 agree", "top-1 ref / artifact", "result"):
        t.add_column(col, overflow="fold")
    for c in report.comparisons:
        acc = f"{c.ref_top1:.2f}% / {c.artifact_top1:.2f}%" if c.ref_top1 is not None else "-"
        result = "[green]pass[/]" if not c.failures else "[red]FAIL: " + "; ".join(c.failures) + "[/]"
        t.add_row(c.inputs, f"{c.max_abs:.3g}", f"{c.max_rel:.3g}", f"{c.min_cosine:.7f}",
                  f"{c.agreement:.2f}%", acc, result)
    console.print(t)


@app.command()
@cli_errors
def export(
    ckpt: Annotated[Path, typer.Option(help="The run.pt to export.")],
    format: Annotated[Format, typer.Option("--format", "-f", help="Artifact format.")] = Format.onnx,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output path (default: beside the checkpoint).")] = None,
    fold: Annotated[Fold, typer.Option(help="kv: per-layer key/value constants (deep prompts, exact); tokens: constant prompt tokens; none: keep the live FFT; auto: kv where exact.")] = Fold.auto,
    precision: Annotated[Precision, typer.Option(help="fp16 writes a typed fp16 graph (LayerNorm/Softmax/reductions in fp32).")] = Precision.fp32,
    opset: Annotated[int, typer.Option(min=17, help="ONNX opset.")] = 17,
    fold_dtype: Annotated[str, typer.Option(help="Precision the constants are folded in: float32 or float64.")] = "float32",
    data: Annotated[Optional[str], typer.Option(help="Real images for the verification: a folder (class subfolders give top-1) or 'builtin'.")] = None,
    num_random: Annotated[int, typer.Option(min=1, help="Random inputs in the verification.")] = 16,
    backbone: Annotated[Optional[str], typer.Option(help="Backbone weights for a prompts-only run.pt.")] = None,
    batch: Annotated[Optional[int], typer.Option(min=1, help="TensorRT: fixed batch size (else --min/--opt/--max-batch).")] = None,
    min_batch: Annotated[int, typer.Option(min=1, help="TensorRT profile: smallest batch.")] = 1,
    opt_batch: Annotated[Optional[int], typer.Option(min=1, help="TensorRT profile: batch to tune for (default: max).")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="TensorRT profile: largest batch.")] = 8,
    workspace_mb: Annotated[Optional[int], typer.Option(min=1, help="TensorRT builder workspace limit, MiB.")] = None,
    opt_level: Annotated[int, typer.Option(min=0, max=5, help="TensorRT builder optimization level.")] = 3,
    timing_cache: Annotated[Optional[Path], typer.Option(help="TensorRT timing cache file (read and updated).")] = None,
    version_compatible: Annotated[bool, typer.Option(help="TensorRT: engine runs on later TensorRT versions.")] = False,
    hardware_compatible: Annotated[bool, typer.Option(help="TensorRT: engine runs on Ampere and newer GPUs.")] = False,
) -> None:
    """Fold a run.pt, export it to ONNX (and a TensorRT engine), and verify the artifact against the
    PyTorch model."""
    import torch

    from vfpt_deploy.exporters.onnx import export_onnx

    from .checkpoint import load_run
    from .verify import verify_artifact

    if fold_dtype not in ("float32", "float64"):
        raise VFPTError(f"--fold-dtype must be float32 or float64, got {fold_dtype!r}")
    stem = f"{ckpt.stem}{'' if precision == Precision.fp32 else '.fp16'}"
    engine = None
    if format != Format.onnx:
        from vfpt_deploy.exporters.tensorrt import build_engine, check_trt_available

        check_trt_available(format.value)  # fail in one line before any work
        engine = out or ckpt.with_name(f"{stem}.engine")
        out = engine.with_suffix(".onnx")
    out = out or ckpt.with_name(f"{stem}.onnx")
    with progress() as bar:
        task = bar.add_task("loading checkpoint", total=4 if engine else 3)
        run = load_run(ckpt, backbone_weights=backbone)
        bar.update(task, advance=1, description=f"folding ({fold.value}) + exporting ONNX")
        result = export_onnx(run, out, fold=fold.value, precision=precision.value, opset=opset,
                             fold_dtype=getattr(torch, fold_dtype))
        artifact = result.path
        if engine:
            bar.update(task, advance=1, description=f"building the {format.value} engine")
            built = build_engine(result.path, engine, flavor=format.value, precision=precision.value, batch=batch,
                                 min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                                 workspace_mb=workspace_mb, opt_level=opt_level, timing_cache=timing_cache,
                                 version_compatible=version_compatible, hardware_compatible=hardware_compatible)
            artifact = built.engine_path
        bar.update(task, advance=1, description="verifying against PyTorch")
        try:
            report = verify_artifact(artifact, run, data=data, num_random=num_random)
        except VFPTError as e:
            if format != Format.trt_rtx:
                raise
            # TensorRT-RTX builds anywhere but its engines run only on RTX-class GPUs: say so, and
            # verify the ONNX the engine was built from.
            bar.console.print(f"[yellow]engine built but NOT verified here: {escape(str(e))}[/]")
            report = verify_artifact(result.path, run, data=data, num_random=num_random)
        bar.update(task, advance=1, description="done")
    t = Table(title="export", show_header=False)
    t.add_row("onnx", f"{result.path} ({result.size_bytes / 2**20:.2f} MiB)")
    if engine:
        t.add_row("engine", f"{built.engine_path} ({built.engine_bytes / 2**20:.2f} MiB), sidecar {built.sidecar_path}")
        for note in built.notes:
            t.add_row("note", note)
    t.add_row("fold", result.fold_mode)
    t.add_row("precision / opset", f"{result.precision} / {result.opset}")
    t.add_row("ops", f"{result.op_count} ({', '.join(f'{k} {v}' for k, v in result.ops.most_common(6))}, ...)")
    t.add_row("FFT ops", str(sum(v for k, v in result.ops.items() if k in ('DFT', 'STFT'))))
    t.add_row("verification", "[green]pass[/]" if report.passed else "[red]FAIL[/]")
    console.print(t)
    print_verify(report)
    if not report.passed:
        raise typer.Exit(1)


@app.command()
@cli_errors
def verify(
    artifact: Annotated[Path, typer.Argument(help="An exported .onnx (or TensorRT engine).")],
    ckpt: Annotated[Path, typer.Option(help="The run.pt it was exported from.")],
    data: Annotated[Optional[str], typer.Option(help="Real images too: a folder (class subfolders give top-1), image files' folder, or 'builtin'.")] = None,
    num_random: Annotated[int, typer.Option(min=1)] = 16,
    atol: Annotated[Optional[float], typer.Option(help="Max abs logit difference (fp32 default 1e-4).")] = None,
    rtol: Annotated[Optional[float], typer.Option(help="Max relative logit difference (default: not gated).")] = None,
    min_cosine: Annotated[Optional[float], typer.Option(help="Min per-sample cosine similarity (fp16 default 0.999).")] = None,
    min_agreement: Annotated[Optional[float], typer.Option(help="Min top-1 agreement in % (fp32 100, fp16 99).")] = None,
    providers: Annotated[Optional[str], typer.Option(help="onnxruntime providers, comma separated (cpu,cuda,tensorrt).")] = None,
    report: Annotated[Optional[Path], typer.Option(help="JSON report path (default: ARTIFACT.verify.json).")] = None,
    backbone: Annotated[Optional[str], typer.Option(help="Backbone weights for a prompts-only run.pt.")] = None,
) -> None:
    """Compare an artifact with the unfolded PyTorch model on random inputs (and real images)."""
    from vfpt_deploy.runtime.onnx_runner import open_predictor

    from .checkpoint import load_run
    from .verify import verify_artifact

    run = load_run(ckpt, backbone_weights=backbone)
    precision = "fp32"
    if artifact.suffix == ".onnx" and artifact.is_file():
        precision = str(open_predictor(artifact, ["cpu"]).metadata.get("precision", "fp32"))
    tol = tolerances_from(precision, atol, rtol, min_cosine, min_agreement)
    rep = verify_artifact(artifact, run, data=data, num_random=num_random, tolerances=tol,
                          providers=providers.split(",") if providers else None, report_path=report)
    print_verify(rep)
    if not rep.passed:
        err_console.print("[bold red]error:[/] the artifact is outside tolerance (see the table above)")
        raise typer.Exit(1)


@app.command()
@cli_errors
def predict(
    model: Annotated[Path, typer.Argument(help="An exported .onnx (or TensorRT engine).")],
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders.")],
    top_k: Annotated[int, typer.Option(min=1)] = 3,
    batch: Annotated[int, typer.Option(min=1)] = 32,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    providers: Annotated[Optional[str], typer.Option(help="onnxruntime providers, comma separated (cpu,cuda,tensorrt).")] = None,
) -> None:
    """Classify images with an exported model (no torch needed)."""
    from vfpt_deploy.runtime.onnx_runner import open_predictor
    from vfpt_deploy.runtime.preprocess import find_images

    predictor = open_predictor(model, providers.split(",") if providers else None)
    predictor.max_batch = batch
    preds = predictor.predict(find_images(images), top_k=top_k)
    used = list(getattr(predictor, "providers", ["TensorRT"]))
    if as_json:
        print(json.dumps({"model": str(model), "providers": used,
                          "predictions": [{"image": p.source, "top": [{"class": c, "prob": s} for c, s in p.top]} for p in preds]},
                         indent=2))
        return
    t = Table(title=f"{model} ({', '.join(used)})")
    t.add_column("image", overflow="fold")
    for i in range(max((len(p.top) for p in preds), default=0)):
        t.add_column(f"top-{i + 1}")
    for p in preds:
        t.add_row(p.source, *(f"{c} ({s:.1%})" for c, s in p.top))
    console.print(t)
    failed = [p for p in preds if p.error]
    for p in failed:
        err_console.print(f"[bold red]error:[/] {escape(p.error)}", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


@app.command()
@cli_errors
def bench(
    ckpt: Annotated[Optional[Path], typer.Argument(help="A run.pt: gives the PyTorch backends, and is exported to ONNX for onnxruntime when no --onnx is given.")] = None,
    onnx: Annotated[Optional[list[Path]], typer.Option("--onnx", help="An exported .onnx for the ort-* backends (repeatable).")] = None,
    engine: Annotated[Optional[list[Path]], typer.Option("--engine", help="A TensorRT engine (with its .json sidecar) for the tensorrt backend (repeatable).")] = None,
    backend: Annotated[Optional[list[str]], typer.Option("--backend", "-b", help="torch, torch-folded, ort-cpu, ort-cuda, ort-trt, tensorrt (repeatable; default: all, the unusable ones reported as skipped).")] = None,
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes to sweep, comma-separated.")] = "1,8,32",
    warmup: Annotated[Optional[int], typer.Option(help="Warm-up calls per batch size (default 10).")] = None,
    warmup_time: Annotated[Optional[float], typer.Option(help="Warm up for this many seconds instead of a count.")] = None,
    iters: Annotated[Optional[int], typer.Option(help="Timed calls per batch size (default 50).")] = None,
    duration: Annotated[Optional[float], typer.Option(help="Time calls for this many seconds instead of a count.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Intra-op threads for torch and onnxruntime (default: theirs).")] = None,
    fold: Annotated[Fold, typer.Option(help="Fold of torch-folded and of the ONNX exported from the run.pt.")] = Fold.auto,
    device: Annotated[Optional[str], typer.Option(help="Device of the PyTorch backends: cpu, cuda, cuda:N (default: CUDA when present).")] = None,
    e2e: Annotated[bool, typer.Option("--e2e", help="GPU backends: also time end to end, host<->device copies included.")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write every result and the machine to this JSON file.")] = None,
    csv_out: Annotated[Optional[Path], typer.Option("--csv", help="Write one row per result (machine included) to this CSV file.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG of latency and throughput vs batch size per backend.")] = None,
    backbone: Annotated[Optional[str], typer.Option(help="Backbone weights for a prompts-only run.pt.")] = None,
    export_dir: Annotated[Optional[Path], typer.Option(help="Keep the ONNX exported from the run.pt here (default: a temp folder).")] = None,
) -> None:
    """Benchmark a run.pt and/or exported artifacts: latency statistics, throughput and peak memory per
    backend and batch size, with the machine they were measured on."""
    from .bench import BenchSettings, parse_batches, results_table, run_bench, table_width
    from vfpt_deploy.runtime.timing import LoopSpec

    loop = LoopSpec(warmup=warmup if warmup is not None or warmup_time is not None else 10, warmup_s=warmup_time,
                    iters=iters if iters is not None or duration is not None else 50, duration_s=duration)
    settings = BenchSettings(batches=parse_batches(batch), loop=loop, threads=threads, e2e=e2e, fold=fold.value,
                             device=device)
    report = run_bench(checkpoint=ckpt, onnx=onnx or [], engines=engine or [], backends=backend, settings=settings,
                       backbone_weights=backbone, export_dir=export_dir,
                       on_status=lambda s: err_console.print(f"[cyan]{s}[/]", highlight=False))
    # A console at least as wide as the table: a narrow terminal wraps lines instead of eliding numbers.
    Console(width=max(console.width, table_width(report))).print(results_table(report))
    for s in report.skipped:
        console.print(f"[yellow]skipped[/] {s.backend}{f' at batch {s.batch}' if s.batch else ''}: {s.reason}", highlight=False)
    for path, write in ((json_out, report.write_json), (csv_out, report.write_csv), (plot, report.plot)):
        if path is not None:
            console.print(f"wrote {write(path)}")


class Arch(str, Enum):
    vit = "vit"
    mae = "mae"
    moco = "moco"


@app.command("import")
@cli_errors
def import_reference(
    ckpt: Annotated[Path, typer.Argument(help="A reference VFPT/VPT checkpoint: {'model': state_dict} or a bare state dict.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The run.pt to write.")] = Path("run.pt"),
    alpha: Annotated[float, typer.Option(help="Fourier fraction the checkpoint was trained with (FOURIER_PERCENTAGE; not saved by the reference).")] = ...,
    location: Annotated[Location, typer.Option(help="Where its Fourier prompts sit (FOURIER_LOCATION).")] = Location.prepend,
    classes: Annotated[Optional[str], typer.Option(help="Class names: a comma list or a file with one a line (default 0..C-1).")] = None,
    heads: Annotated[Optional[int], typer.Option(help="Attention heads (default: the standard ViT value for the width: 192->3, 384->6, 768->12, 1024->16, 1280->16).")] = None,
    arch: Annotated[Arch, typer.Option(help="vit: the reference ViT (enc.transformer.*); mae / moco: its MAE / MoCo-v3 ViTs (enc.blocks.*; MAE mean-pools).")] = Arch.vit,
    crop_pct: Annotated[float, typer.Option(help="1.0: resize to the model size (VTAB); <1: resize shorter side to size/crop_pct, center crop (FGVC: 0.875).")] = 1.0,
) -> None:
    """Convert a reference VFPT/VPT ViT checkpoint into a run.pt (shapes give M, deep, width, depth, patch,
    image size and classes; alpha, location, heads and class names come from the options)."""
    from .reference import import_checkpoint

    result = import_checkpoint(ckpt, out, arch=arch.value, alpha=alpha, location=location.value, classes=classes,
                               heads=heads, crop_pct=crop_pct)
    for k in result.unused:
        console.print(f"unused key {k}", highlight=False, soft_wrap=True)
    m, cfg = result.model, result.model.config
    console.print(f"imported {result.backbone.name} {json.dumps(result.backbone.kwargs)}: M={cfg.num_prompts} "
                  f"{'deep' if cfg.deep else 'shallow'}, alpha={cfg.alpha} (m={cfg.num_fourier} Fourier), "
                  f"{cfg.location}, {m.num_classes} classes, {m.pool} pooling; {len(result.unused)} unused keys; "
                  f"wrote {out}", highlight=False, soft_wrap=True)
