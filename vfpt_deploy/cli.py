"""The vfpt-deploy command line: parse, call a library function, print.

Every library error is a VFPTError: `cli_errors` turns it into one red line on stderr and a non-zero exit
in one place. Options mean the same in every command: --ckpt (the run.pt read), --out (what is written),
--threads, --device / --providers with --allow-fallback, --batch, --json (print JSON to stdout),
--report (a JSON report file).
"""
from __future__ import annotations

import functools
import json
import logging
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape as rich_escape
from rich.table import Table

from . import __version__
from vfpt_deploy.models.config import LOCATIONS
from vfpt_deploy.models.families import ARCHS
from .errors import ArtifactError, UsageError, VFPTError
from .extras import needs_extras
from vfpt_deploy.artifacts.schema import EXPORT_FOLDS, FORMATS, PACK_FORMATS, PRECISIONS, QUANTIZE_MODES, TRT_FLAVORS
from vfpt_deploy.text import printable
from vfpt_deploy.terminal import activity, console, err_console, print_wide, progress  # a terminal or a log: decided there
from vfpt_deploy.exporters.triton import (DEFAULT_MAX_BATCH as TRITON_DEFAULT_BATCH, DEFAULT_QUEUE_DELAY_US as
                                       TRITON_QUEUE_DELAY_US, KINDS as TRITON_KINDS)

def escape(text) -> str:
    """Text for a rich console: markup escaped, and control characters shown as escapes (class names, paths
    and messages may come from a crafted artifact: vfpt_deploy/text.py)."""
    return rich_escape(printable(str(text)))


app = typer.Typer(help="Train, fold, export and serve Visual Fourier Prompt Tuning (VFPT) vision transformers.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

# -- options shared by several commands (one name, one meaning) -------------------------------------
CkptOpt = Annotated[Optional[Path], typer.Option("--ckpt", help="The run.pt to read (written by train, import or demo).")]
CkptsOpt = Annotated[Optional[list[Path]], typer.Option("--ckpt", help="The run.pt to read (written by train, import or demo); repeat it for a multi-task artifact (export: tasks named by the file stems; verify: files matched to the artifact's tasks by the sha256 it recorded).")]
TaskOpt = Annotated[Optional[list[str]], typer.Option("--task", help="A multi-task artifact's task as NAME=PATH (a run.pt); repeatable, with or instead of --ckpt.")]
CkptArg = Annotated[Optional[Path], typer.Argument(help="The run.pt (same as --ckpt).", show_default=False)]
BackboneOpt = Annotated[Optional[str], typer.Option(help="Backbone weights for a prompts-only run.pt (a file, or 'pretrained').")]
ThreadsOpt = Annotated[Optional[int], typer.Option(min=1, max=1024, help="CPU threads for torch and onnxruntime (default: every usable CPU; waiting threads sleep, so a busy machine does not stall them). Results repeat bit for bit for the same thread count.")]
SeedOpt = Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Random seed: the same command and seed on the same machine give bit-identical run.pt tensors.")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="PyTorch device: cpu, cuda, cuda:N (default: CUDA when present).")]
ProvidersOpt = Annotated[Optional[str], typer.Option(help="onnxruntime providers, comma separated: cpu, cuda, tensorrt (default: the best that really runs here).")]
FallbackOpt = Annotated[bool, typer.Option("--allow-fallback", help="Accept the CPU when the asked-for GPU device or provider cannot run here (else an error).")]
DataOpt = Annotated[Optional[str], typer.Option(help="Real images for the verification besides random inputs: 'builtin[:name]', a folder with class subfolders (gives top-1), or a folder of images (default: the run's own built-in data, where it was trained on one). With several tasks it is used for every task, except a bare 'builtin': each task's own built-in set.")]
NumRandomOpt = Annotated[int, typer.Option(min=1, max=4096, help="Random N(0,1) inputs in the verification.")]
AtolOpt = Annotated[Optional[float], typer.Option(help="Max abs logit difference (fp32 default 1e-4; fp16 not gated).")]
RtolOpt = Annotated[Optional[float], typer.Option(help="Max relative logit difference (default: not gated).")]
CosineOpt = Annotated[Optional[float], typer.Option(help="Min per-sample cosine similarity of the logits (fp16 default 0.999).")]
AgreementOpt = Annotated[Optional[float], typer.Option(help="Min top-1 agreement with PyTorch, percent (fp32 100, fp16 99, int8 98).")]
Top1DropOpt = Annotated[Optional[float], typer.Option(help="Max points the dataset top-1 may fall below PyTorch's, where labels exist (int8 default 1).")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON to stdout instead of tables.")]


def choices(name: str, values) -> type[Enum]:
    """An option's choices, built from the library's own constants (never restated here)."""
    return Enum(name, {v.replace("-", "_"): v for v in values}, type=str)


Location = choices("Location", LOCATIONS)
Fold = choices("Fold", EXPORT_FOLDS)
Format = choices("Format", FORMATS)
EngineFlavor = choices("EngineFlavor", TRT_FLAVORS)
Precision = choices("Precision", PRECISIONS)
Quantize = choices("Quantize", QUANTIZE_MODES)
FoldDtype = choices("FoldDtype", ("float32", "float64"))
Arch = choices("Arch", ARCHS)


def cli_errors(fn):
    """Known problems become one red line on stderr and a non-zero exit -- never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with needs_extras(f"vfpt-deploy {command_name(wrapper)}"):  # a missing extra: one line naming it
                return fn(*args, **kwargs)
        except VFPTError as e:
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except OSError as e:  # the file system said no (name too long, no space, ...): name the file
            what = f"{e.filename}: " if e.filename else ""
            err_console.print(f"[bold red]error:[/] {escape(what + (e.strerror or str(e)))}; check the path and "
                              "try again", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted:[/] nothing half-written was left behind", highlight=False)
            raise typer.Exit(130) from None

    return wrapper


def command_name(callback) -> str:
    """The name a command callback is registered under ('import' for import_reference)."""
    for c in app.registered_commands:
        if c.callback is callback:
            return c.name or callback.__name__.replace("_", "-")
    return callback.__name__.replace("_", "-")


def _version(value: bool) -> None:
    if value:
        console.print(f"vfpt-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_version,
                                               help="Print the version and exit.")] = False) -> None:
    """Train, fold, export and serve Visual Fourier Prompt Tuning (VFPT) vision transformers."""
    from rich.logging import RichHandler

    from vfpt_deploy.artifacts.files import sigterm_as_interrupt
    from .threads import passive_waits

    passive_waits()  # before anything loads torch: see threads.py
    logging.basicConfig(level=logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)])
    # Library warnings (numpy overflow on a broken model, torch on odd tensors) are not for the user: the
    # gate and the error lines say what is wrong.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
    sigterm_as_interrupt()


def pick_ckpt(option: Path | None, argument: Path | None) -> Path:
    if option is not None and argument is not None and option != argument:
        raise UsageError(f"two checkpoints given ({argument} and --ckpt {option}); pass one")
    if option is None and argument is None:
        raise UsageError("pass the run.pt with --ckpt FILE")
    path = option if option is not None else argument
    if not path.name or path.name in (".", ".."):
        raise UsageError(f"--ckpt {str(path)!r} names no file; pass the run.pt with --ckpt FILE")
    return path


def parse_model_args(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UsageError(f"--model-arg takes KEY=VALUE (e.g. img_size=384), got {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def split_list(text: str | None) -> list[str] | None:
    return [p.strip() for p in text.split(",") if p.strip()] if text else None


def print_json(obj) -> None:
    from vfpt_deploy.artifacts.files import dumps_json

    print(dumps_json(obj, indent=2))


# -- train / info / demo ------------------------------------------------------------------------------
@app.command()
@cli_errors
def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the best-by-val run.pt is written (.pt).")] = Path("run.pt"),
    data: Annotated[str, typer.Option(help="'builtin' (offline digits, shifted domain), 'builtin:digits', or a folder with train/ and val/ (a subfolder per class).")] = "builtin",
    model: Annotated[str, typer.Option(help="timm ViT or Swin name (e.g. swin_base_patch4_window7_224).")] = "vit_base_patch16_224",
    model_arg: Annotated[Optional[list[str]], typer.Option("--model-arg", help="timm keyword argument KEY=VALUE, repeatable (e.g. img_size=384).")] = None,
    weights: Annotated[str, typer.Option(help="Backbone weights: 'pretrained' (timm hub), a local .pth/.safetensors/.npz, or 'random' (tests only).")] = "pretrained",
    prompts: Annotated[int, typer.Option(min=0, max=10000, help="Prompt tokens per layer (M).")] = 10,
    alpha: Annotated[float, typer.Option(help="Fourier fraction in [0, 1]: the first floor(M*alpha) prompts go through the 2-D FFT.")] = 0.5,
    deep: Annotated[bool, typer.Option("--deep/--shallow", help="Prompts before every block, or only before block 0.")] = True,
    location: Annotated[Location, typer.Option(help="Where Fourier prompts sit in a layer's prompt block.")] = Location.prepend,
    project: Annotated[int, typer.Option(min=0, max=65536, help="Learn prompts at this width and project them (0 = off).")] = 0,
    dropout: Annotated[float, typer.Option(help="Prompt dropout probability in [0, 1).")] = 0.0,
    epochs: Annotated[int, typer.Option(min=1, max=100000, help="Training epochs.")] = 100,
    lr: Annotated[float, typer.Option(help="Base learning rate (SGD, momentum 0.9; cosine schedule).")] = 0.1,
    weight_decay: Annotated[float, typer.Option(help="SGD weight decay on the tuned parameters.")] = 1e-4,
    batch_size: Annotated[int, typer.Option(min=1, max=65536, help="Training batch size.")] = 64,
    warmup_epochs: Annotated[int, typer.Option(min=0, help="Linear warm-up epochs before the cosine decay.")] = 10,
    crop_pct: Annotated[float, typer.Option(help="1.0: resize to the model size (VTAB); <1: resize shorter side to size/crop_pct, center crop (FGVC: 0.875).")] = 1.0,
    prompts_only: Annotated[bool, typer.Option("--prompts-only", help="Store prompts and head without the backbone weights (loading then needs --backbone and checks its hash).")] = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = None,
    allow_fallback: FallbackOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Train VFPT prompts and a linear head on a frozen timm ViT or Swin Transformer."""
    from vfpt_deploy.artifacts.files import check_outputs, check_suffix
    from vfpt_deploy.artifacts.schema import RUN_SUFFIXES
    from vfpt_deploy.models.config import TrainSettings, VFPTConfig, check_crop_pct, check_device_name
    from .threads import resolve_threads

    # Every option value first: torch takes seconds to import.
    config = VFPTConfig(num_prompts=prompts, deep=deep, alpha=alpha, location=location.value, project=project, dropout=dropout)
    settings = TrainSettings(epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                             warmup_epochs=warmup_epochs, seed=seed).check()
    model_kwargs = parse_model_args(model_arg or [])
    check_device_name(device), check_crop_pct(crop_pct), resolve_threads(threads)
    check_outputs({"--out": check_suffix(out, RUN_SUFFIXES, "run checkpoint")}, {"--data": data, "--weights": weights})
    from .runs import train_run
    from .threads import set_torch_threads
    from .train import resolve_device

    dev = resolve_device(device, allow_fallback)
    set_torch_threads(threads)
    with progress() as bar:
        # quiet: in a log, the first line comes with the first step, so an error before it stays one line
        task = bar.add_task("training", total=None, epochs=settings.epochs, quiet=True)
        result = train_run(out, data=data, model_name=model, model_kwargs=model_kwargs,
                           weights=weights, config=config, settings=settings, crop_pct=crop_pct,
                           include_backbone=not prompts_only, device=dev, on_epoch=_epoch_printer(bar),
                           on_step=lambda s, t: bar.update(task, completed=s, total=t))
    h = result.history
    console.print(f"best val top-1 {h.best_val_top1:.2f}% at epoch {h.best_epoch} on {dev}; wrote {result.out}")


def _epoch_printer(bar):
    def on_epoch(r, best: bool) -> None:
        bar.console.print(f"epoch {r.epoch:3d}  train loss {r.train_loss:.4f}  val top-1 {r.val_top1:6.2f}%"
                          + ("  [green]best, saved[/]" if best else ""))

    return on_epoch


ArtifactArg = Annotated[Path, typer.Argument(help="A run.pt, an exported .onnx, or a TensorRT .engine/.plan (with its .json sidecar).", show_default=False)]


@app.command("inspect")
@cli_errors
def inspect_artifact(artifact: ArtifactArg, backbone: BackboneOpt = None, as_json: JsonFlag = False) -> None:
    """Show what an artifact holds without running it: task, classes (per task for a multi-task artifact),
    preprocessing, VFPT config, fold and precision, opsets, inputs/outputs, op histogram, engine sidecar,
    hashes and verification state."""
    from vfpt_deploy.inspect_artifact import inspect_artifact as inspect

    print_inspection(inspect(artifact, backbone_weights=backbone), as_json)


@app.command()
@cli_errors
def info(ckpt_arg: CkptArg = None, ckpt: CkptOpt = None, backbone: BackboneOpt = None, as_json: JsonFlag = False) -> None:
    """The same as 'inspect' (kept for scripts): a run.pt, .onnx or engine, given as the argument or --ckpt."""
    from vfpt_deploy.inspect_artifact import inspect_artifact as inspect

    print_inspection(inspect(pick_ckpt(ckpt, ckpt_arg), backbone_weights=backbone), as_json)


def print_inspection(info: dict, as_json: bool) -> None:
    from vfpt_deploy.inspect_artifact import summary_rows

    if as_json:
        print_json(info)
        return
    t = Table(title=escape(info["path"]), show_header=False)
    for k, v in summary_rows(info):
        t.add_row(escape(k), escape(v))
    console.print(t)


@app.command()
@cli_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (runs, backbone, ONNX).")] = Path("runs/demo"),
    pretrain_epochs: Annotated[int, typer.Option(min=1, max=10000, help="Epochs to pretrain the small backbone on clean digits.")] = 60,
    epochs: Annotated[int, typer.Option(min=1, max=10000, help="Epochs to tune each variant on the shifted domain.")] = 40,
    lr: Annotated[float, typer.Option(help="Base learning rate of the prompt tuning (SGD).")] = 1.0,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = None,
) -> None:
    """The built-in offline main job: pretrain a small ViT on clean digits, then compare linear probe,
    VPT and VFPT on a shifted domain, write the VFPT run.pt, export and verify it."""
    from vfpt_deploy.models.config import TrainSettings
    from .threads import resolve_threads

    TrainSettings(epochs=epochs, lr=lr, seed=seed).check()  # before torch loads (and not after pretraining)
    resolve_threads(threads)
    from .demo import export_demo, run_demo
    from .threads import set_torch_threads

    n = set_torch_threads(threads)
    with progress() as bar:
        tasks: dict[str, int] = {}

        def on_step(name, s, t):
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=t, epochs=pretrain_epochs if name == "pretrain" else epochs)
            bar.update(tasks[name], completed=s)

        rows, clean = run_demo(out, pretrain_epochs=pretrain_epochs, epochs=epochs, lr=lr, seed=seed,
                               status=lambda s: bar.console.print(f"[cyan]{s}[/]"), on_step=on_step)
    console.print(f"frozen backbone, clean-domain val top-1 (nearest class mean): {clean:.1f}%  ({n} threads)")
    t = Table(title="shifted-domain val top-1 (built-in digits-shifted, 397 images)")
    for col in ("method", "prompts", "tuned params", "best epoch", "val top-1", "checkpoint"):
        t.add_column(col)
    for r in rows:
        t.add_row(r.name, f"M={r.config.num_prompts}, m={r.config.num_fourier}", f"{r.tuned_params:,}",
                  str(r.best_epoch), f"{r.val_top1:.2f}%", str(r.path))
    console.print(t)
    with activity("folding, exporting to ONNX and verifying the VFPT run"):
        outcome = export_demo(out, threads=n)
    print_export(outcome)
    finish_verify(outcome.report, outcome.written)
    console.print(f"next: vfpt-deploy predict {outcome.paths.onnx} IMAGE...  |  vfpt-deploy inspect {Path(out) / 'run.pt'}")


# -- export / verify ----------------------------------------------------------------------------------
@app.command()
@cli_errors
def export(
    ckpt: CkptsOpt = None,
    task: TaskOpt = None,
    format: Annotated[Format, typer.Option("--format", "-f", help="Artifact: onnx, a TensorRT engine (trt; trt-rtx builds without a GPU), a prompt pack (pack) or the backbone artifact packs run on (backbone).")] = Format.onnx,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output path: .onnx, or .engine/.plan for engines (default: beside the checkpoint; a multi-task artifact needs --out).")] = None,
    fold: Annotated[Fold, typer.Option(help="kv: per-layer key/value constants (deep prompts, exact); tokens: constant prompt tokens; auto: kv where exact.")] = Fold.auto,
    precision: Annotated[Precision, typer.Option(help="fp16 writes a typed fp16 graph (LayerNorm/Softmax/reductions in fp32); int8 quantizes the linear layers (see --quantize).")] = Precision.fp32,
    quantize: Annotated[Optional[Quantize], typer.Option(help="int8: dynamic (no data; onnxruntime only), static (calibrated Q/DQ; TensorRT-parsable for trt/trt-rtx) or modelopt (NVIDIA ModelOpt Q/DQ; the modelopt extra). Default: dynamic for onnx, static for engines.")] = None,
    calib: Annotated[Optional[str], typer.Option(help="int8 static/modelopt calibration images: 'builtin[:name]' (its train split) or a folder (its train/ if it has one). Default: the run's built-in data.")] = None,
    calib_samples: Annotated[Optional[int], typer.Option(min=1, max=4096, help="Calibration images, a seeded sample of the sorted file list (default 128).")] = None,
    opset: Annotated[int, typer.Option(min=17, max=23, help="ONNX opset.")] = 17,
    fold_dtype: Annotated[FoldDtype, typer.Option(help="Precision the constants are folded in.")] = FoldDtype.float32,
    data: DataOpt = None,
    num_random: NumRandomOpt = 16,
    atol: AtolOpt = None, rtol: RtolOpt = None, min_cosine: CosineOpt = None, min_agreement: AgreementOpt = None,
    max_top1_drop: Top1DropOpt = None,
    backbone: BackboneOpt = None,
    threads: ThreadsOpt = None,
    batch: Annotated[Optional[int], typer.Option(min=1, max=65536, help="TensorRT: fixed batch size (else --min/--opt/--max-batch).")] = None,
    min_batch: Annotated[int, typer.Option(min=1, max=65536, help="TensorRT profile: smallest batch.")] = 1,
    opt_batch: Annotated[Optional[int], typer.Option(min=1, max=65536, help="TensorRT profile: batch to tune for (default: max).")] = None,
    max_batch: Annotated[int, typer.Option(min=1, max=65536, help="TensorRT profile: largest batch.")] = 8,
    workspace_mb: Annotated[Optional[int], typer.Option(min=1, max=1048576, help="TensorRT builder workspace limit, MiB.")] = None,
    opt_level: Annotated[int, typer.Option(min=0, max=5, help="TensorRT builder optimization level.")] = 3,
    timing_cache: Annotated[Optional[Path], typer.Option(help="TensorRT timing cache file (read and updated).")] = None,
    version_compatible: Annotated[bool, typer.Option(help="TensorRT: engine runs on later TensorRT versions.")] = False,
    hardware_compatible: Annotated[bool, typer.Option(help="TensorRT: engine runs on Ampere and newer GPUs.")] = False,
    backbone_artifact: Annotated[Optional[Path], typer.Option(help="--format pack: the backbone artifact (.onnx, from --format backbone) the pack runs on and is verified through.")] = None,
    max_prompts: Annotated[Optional[int], typer.Option(min=1, max=100_000, help="--format backbone: the most prompts a pack may have (default 512).")] = None,
    max_classes: Annotated[Optional[int], typer.Option(min=1, max=1_000_000, help="--format backbone: the most classes a pack may have (default 10000).")] = None,
    engine: Annotated[Optional[EngineFlavor], typer.Option("--engine", help="--format backbone: also build a TensorRT engine of it, B.engine beside B.onnx (trt-rtx builds without a GPU); profile: --min/--opt/--max-batch, --max-tasks/--opt-tasks, and 0..--max-prompts, 1..--max-classes.")] = None,
    max_tasks: Annotated[Optional[int], typer.Option(min=1, max=256, help="--engine: the most packs the engine takes at once (default 16).")] = None,
    opt_tasks: Annotated[Optional[int], typer.Option(min=1, max=256, help="--engine: the number of packs to tune for (default 8, or --max-tasks if smaller).")] = None,
) -> None:
    """Fold a run.pt, export it to ONNX (and a TensorRT engine), verify it against the PyTorch model, and
    only then put it in place (a failed export or verify leaves the previous artifact untouched). Several
    runs on one backbone (--ckpt a.pt --ckpt b.pt, or --task NAME=PATH) become one multi-task artifact.
    --format backbone writes a run's frozen backbone with the prompt tables as inputs; --format pack a run's
    prompt pack for such a backbone (--backbone-artifact; named by --task NAME=PATH or the file stem)."""
    from .pipeline import ExportSettings, export_run
    from .threads import resolve_threads, set_torch_threads

    build = None
    if format.value in TRT_FLAVORS or engine is not None:
        from vfpt_deploy.exporters.tensorrt import BuildSettings

        build = BuildSettings(batch=batch, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                              workspace_mb=workspace_mb, opt_level=opt_level, timing_cache=timing_cache,
                              version_compatible=version_compatible, hardware_compatible=hardware_compatible)
    tolerances = {k: v for k, v in dict(atol=atol, rtol=rtol, min_cosine=min_cosine, min_agreement=min_agreement,
                                        max_top1_drop=max_top1_drop).items() if v is not None}
    settings = ExportSettings(format=format.value, fold=fold.value, precision=precision.value, opset=opset,
                              fold_dtype=fold_dtype.value, quantize=quantize.value if quantize else None,
                              calib=calib, calib_samples=calib_samples,
                              build=build, tolerances=tolerances, data=data, num_random=num_random,
                              threads=resolve_threads(threads))
    inputs = {"--backbone": backbone, "--timing-cache": None}
    if format.value in PACK_FORMATS:
        return export_pack_cli(ckpt or [], task or [], settings, out, backbone, backbone_artifact, max_prompts,
                               max_classes, (engine.value if engine else None, build, max_tasks, opt_tasks))
    if engine is not None or max_tasks is not None or opt_tasks is not None:
        raise UsageError("--engine, --max-tasks and --opt-tasks apply to --format backbone only (other engines: "
                         "--format trt or trt-rtx)")
    if backbone_artifact is not None or max_prompts is not None or max_classes is not None:
        raise UsageError("--backbone-artifact, --max-prompts and --max-classes apply to --format pack / backbone only")
    load = plan_export_source(ckpt or [], task or [], settings, out, inputs)  # refuses bad input before loading
    set_torch_threads(settings.threads)
    with progress() as bar:
        step = bar.add_task("loading the checkpoint", total=None)
        run = load(backbone)
        outcome = export_run(run, settings, out, inputs=inputs, on_step=lambda s: bar.update(step, description=s))
        bar.update(step, description="done", total=1, completed=1)
    print_export(outcome)
    finish_verify(outcome.report, outcome.written)


def export_pack_cli(ckpts: list[Path], tasks: list[str], settings, out, backbone, backbone_artifact, max_prompts,
                    max_classes, engine_args=(None, None, None, None)) -> None:
    """export --format pack / backbone (vfpt_deploy/pack_pipeline.py): one run, named by --task NAME=PATH;
    engine_args (flavor, BuildSettings, max_tasks, opt_tasks): --format backbone --engine."""
    from .pack_pipeline import (build_planned_engine, check_limits, export_pack_run, plan_backbone_engine,
                                plan_pack_export)
    from .threads import set_torch_threads

    settings.check()
    if len(ckpts) + len(tasks) != 1:
        raise UsageError(f"--format {settings.format} takes one run: --ckpt run.pt, or --task NAME=run.pt")
    name, path = (None, ckpts[0]) if ckpts else tasks[0].partition("=")[::2]
    if name is not None and (not name or not path):
        raise UsageError(f"--task takes NAME=PATH (e.g. cars=cars.pt), got {tasks[0][:80]!r}")
    path = pick_ckpt(Path(path), None)
    plan = plan_pack_export(path, settings, out, backbone_artifact=backbone_artifact, name=name,
                            limits=check_limits(max_prompts, max_classes), inputs={"--backbone": backbone})
    flavor, build, max_tasks, opt_tasks = engine_args
    if (flavor is not None or max_tasks is not None or opt_tasks is not None) and settings.format != "backbone":
        raise UsageError("--engine, --max-tasks and --opt-tasks build an engine of a backbone artifact: "
                         "--format backbone")
    if flavor is None and (max_tasks is not None or opt_tasks is not None):
        raise UsageError("--max-tasks and --opt-tasks size the engine: add --engine trt or --engine trt-rtx")
    engine_plan = None if flavor is None else plan_backbone_engine(plan, flavor, build, max_tasks, opt_tasks)
    set_torch_threads(settings.threads)
    from vfpt_deploy.artifacts.checkpoint import load_run

    with progress() as bar:
        step = bar.add_task("loading the checkpoint", total=None)
        run = load_run(path, backbone_weights=backbone)
        outcome = export_pack_run(run, settings, plan, on_step=lambda s: bar.update(step, description=s))
        bar.update(step, description="done", total=1, completed=1)
    t = Table(title=f"export --format {outcome.format}", show_header=False)
    t.add_row(outcome.format, f"{outcome.plan.out} ({outcome.size_bytes / 2**20:.2f} MiB)")
    if outcome.plan.backbone is not None:
        t.add_row("runs on", escape(str(outcome.plan.backbone)))
    for note in outcome.notes:
        t.add_row("note", f"[yellow]{escape(note)}[/]")
    t.add_row("verification", "[green]pass[/]" if outcome.passed else "[red]FAIL[/]")
    console.print(t)
    finish_verify(outcome.report, outcome.written)
    if engine_plan is not None:
        with activity(f"building the {engine_plan.build.flavor} engine of {outcome.plan.out.name}"):
            res = build_planned_engine(engine_plan, outcome.plan.out)
        r = res.sidecar["profile"]["ranges"]
        console.print(f"engine {res.engine_path} ({res.engine_bytes / 2**20:.2f} MiB, built in "
                      f"{res.build_seconds:.1f} s), profile: " + ", ".join(f"{k} {v[0]}..{v[2]} (opt {v[1]})" for k, v in r.items()))
        for note in res.notes:
            console.print(f"note: {escape(note)}")


def plan_export_source(ckpts: list[Path], tasks: list[str], settings, out: Path | None, inputs: dict):
    """Check an export's settings, sources and outputs; return what loads its run (or its TaskSet)."""
    from .pipeline import check_multitask_settings, plan_export

    from vfpt_deploy.artifacts.task_sources import check_sources_exist, source_labels, task_sources

    settings.check()  # every option value and source, before torch is imported (multitask and checkpoint load it)
    if len(ckpts) > 1 or tasks:
        check_multitask_settings(settings)
        sources = task_sources(ckpts, tasks)
        plan_export(None, settings, out, {**inputs, **source_labels(ckpts, sources)})
        check_sources_exist(sources)
        from vfpt_deploy.folding.multitask import load_tasks

        return lambda backbone: load_tasks(sources, backbone)
    path = pick_ckpt(ckpts[0] if ckpts else None, None)
    plan_export(path, settings, out, inputs)
    check_sources_exist([("", path)])
    from vfpt_deploy.artifacts.checkpoint import load_run

    return lambda backbone: load_run(path, backbone_weights=backbone)


def print_export(outcome) -> None:
    t = Table(title="export", show_header=False)
    onnx, eng = outcome.onnx, outcome.engine
    t.add_row("onnx", f"{outcome.paths.onnx} ({onnx.size_bytes / 2**20:.2f} MiB)")
    if eng is not None:
        t.add_row("engine", f"{outcome.paths.engine} ({eng.engine_bytes / 2**20:.2f} MiB), with its .json sidecar")
        for note in eng.notes:
            t.add_row("note", note)
    t.add_row("fold / precision / opset", f"{onnx.fold_mode} / {onnx.precision} / {onnx.opset}")
    if outcome.report.tasks:
        t.add_row("tasks", escape(", ".join(outcome.report.tasks)))
    t.add_row("ops", f"{onnx.op_count} ({', '.join(f'{k} {v}' for k, v in onnx.ops.most_common(6))}, ...); "
              f"FFT ops {sum(v for k, v in onnx.ops.items() if k in ('DFT', 'STFT'))}")
    for note in outcome.notes:
        t.add_row("note", f"[yellow]{escape(note)}[/]")
    t.add_row("verification", "[green]pass[/]" if outcome.passed else "[red]FAIL[/]")
    console.print(t)


def print_verify(report) -> None:
    against = (report.checkpoint if report.checkpoint.startswith("golden set")
               else f"the unfolded PyTorch model of {report.checkpoint}")
    console.print(f"verify [bold]{escape(report.artifact)}[/] against {escape(against)}", highlight=False,
                  soft_wrap=True)
    console.print(f"backend: {escape(report.backend)}; precision {report.precision}; pass if {report.tolerances}",
                  highlight=False, soft_wrap=True)
    if report.hardware:
        from vfpt_deploy.runtime.hardware import summary

        console.print(f"ran on: {escape(summary(report.hardware))}", highlight=False, soft_wrap=True)
    t = Table()
    for col in ("inputs", "max |diff|", "max rel", "min cosine", "top-1 agree", "top-k order", "top-1 ref / artifact", "result"):
        t.add_column(col, overflow="fold")
    for c in report.comparisons:
        acc = (f"{c.ref_top1:.2f}% / {c.artifact_top1:.2f}% ({c.artifact_top1 - c.ref_top1:+.2f})"
               if c.ref_top1 is not None else "-")
        result = ("[red]FAIL: " + escape("; ".join(c.failures)) + "[/]" if c.failures
                  else "[green]pass[/]" if c.gated else "reported, not gated")
        t.add_row(escape(c.inputs), f"{c.max_abs:.3g}", f"{c.max_rel:.3g}", f"{c.min_cosine:.7f}",
                  f"{c.agreement:.2f}%", f"{c.topk_order:.2f}%", acc, result)
    console.print(t)
    for p in report.problems:
        console.print(f"[red]problem:[/] {escape(p)}", highlight=False, soft_wrap=True)
    for n in report.notes:
        console.print(f"note: {escape(n)}", highlight=False, soft_wrap=True)


def finish_verify(report, written: list | None = None) -> None:
    """Print the comparison; exit 1 (one line) when it failed."""
    print_verify(report)
    if not report.passed:
        err_console.print(f"[bold red]error:[/] {escape(verify_failure(report, written))}", highlight=False,
                          soft_wrap=True)
        raise typer.Exit(1)


def verify_failure(report, written: list | None = None) -> str:
    """The one line a failed verification ends with: the check that really failed (a problem such as a
    checkpoint that is not the artifact's, else the tolerances) and what happened to the files."""
    if written is not None:
        kept = "; nothing was written, the previous artifact and report are untouched"
    elif any(n.startswith("the earlier report was kept") for n in report.notes):
        kept = "; the earlier report was kept"
    else:
        kept = ""
    outside = any(c.failures for c in report.comparisons)
    if report.problems:
        more = len(report.problems) - 1
        return (report.problems[0] + (f" (and {more} more problem{'s' if more > 1 else ''} above)" if more else "")
                + ("; the logits are outside tolerance too (see the table above)" if outside else "") + kept)
    return (f"the artifact is outside tolerance (see the table above{kept}); re-export it, or state looser tolerances "
            "with --atol/--min-cosine/--min-agreement/--max-top1-drop if that is intended")


@app.command()
@cli_errors
def verify(
    artifact: Annotated[Path, typer.Argument(help="An exported .onnx (or a TensorRT .engine/.plan).")],
    ckpt: CkptsOpt = None,
    task: TaskOpt = None,
    data: DataOpt = None,
    num_random: NumRandomOpt = 16,
    atol: AtolOpt = None, rtol: RtolOpt = None, min_cosine: CosineOpt = None, min_agreement: AgreementOpt = None,
    max_top1_drop: Top1DropOpt = None,
    providers: ProvidersOpt = None,
    allow_fallback: FallbackOpt = False,
    report: Annotated[Optional[Path], typer.Option(help="JSON report path, .json (default: ARTIFACT.verify.json, replaced only by a report at least as strong: same or more data, same or tighter tolerances, same checkpoint; else ARTIFACT.verify.weaker.json).")] = None,
    backbone: BackboneOpt = None,
    threads: ThreadsOpt = None,
    pack: Annotated[Optional[Path], typer.Option(help="A prompt pack to verify on ARTIFACT, its backbone artifact (report: PACK.verify.json, or PACK.golden.verify.json without --ckpt).")] = None,
) -> None:
    """Compare an artifact with the unfolded PyTorch model on random inputs and real images (--data; by default
    the run's own built-in data, as the export used). A multi-task
    artifact is checked task by task against each task's own run.pt (--ckpt files are matched to tasks by
    the sha256 the artifact recorded; --task NAME=PATH names one), on one mixed-task stream.
    Without --ckpt/--task: replay the golden set the artifact carries on this machine's runtime, without
    PyTorch (report: ARTIFACT.golden.verify.json)."""
    from vfpt_deploy.artifacts.compare import Tolerances
    from vfpt_deploy.artifacts.files import check_outputs, check_suffix
    from vfpt_deploy.artifacts.schema import report_path

    overrides = dict(atol=atol, rtol=rtol, min_cosine=min_cosine, min_agreement=min_agreement,
                     max_top1_drop=max_top1_drop)
    Tolerances().override(**overrides)  # range-check before any work
    if pack is not None:
        return verify_pack_cli(artifact, pack, ckpt or [], task or [], data, num_random, backbone, overrides,
                               providers, allow_fallback, report, threads)
    if not ckpt and not task:
        return verify_golden_cli(artifact, data, num_random, backbone, overrides, providers, allow_fallback, report,
                                 threads)
    out = check_suffix(report, (".json",), "JSON report", "--report") if report else report_path(artifact)
    load, sources = plan_verify_source(artifact, ckpt or [], task or [])
    check_outputs({"--report": out}, {"ARTIFACT": artifact, "--data": data, "--backbone": backbone, **sources})
    from .pipeline import ExportSettings, verification_inputs
    from .threads import set_torch_threads
    from .verify import verify_artifact  # (torch: after every usage error)

    n = set_torch_threads(threads)
    with activity(f"verifying {artifact}"):
        run = load(backbone)
        sets, notes = verification_inputs(run, ExportSettings(data=data, num_random=num_random))  # as the export did
        rep = verify_artifact(artifact, run, inputs=sets, notes=notes, overrides=overrides,
                              providers=split_list(providers), report_path=out, threads=n,
                              allow_fallback=allow_fallback)
    finish_verify(rep)


def verify_golden_cli(artifact: Path, data, num_random, backbone, overrides, providers, allow_fallback, report,
                      threads) -> None:
    """verify without a checkpoint: the golden-set replay (torch-free)."""
    from vfpt_deploy.artifacts.files import check_outputs, check_suffix
    from vfpt_deploy.runtime.selfcheck import golden_report_path, verify_golden

    given = [o for o, v in (("--data", data), ("--num-random", num_random != 16), ("--backbone", backbone)) if v]
    if given:
        raise UsageError(f"{given[0]} needs the checkpoint: pass --ckpt run.pt (without it, verify replays the golden "
                         "set the artifact carries)")
    out = check_suffix(report, (".json",), "JSON report", "--report") if report else golden_report_path(artifact)
    check_outputs({"--report": out}, {"ARTIFACT": artifact})
    with activity(f"replaying the golden set of {artifact}"):
        rep = verify_golden(artifact, providers=split_list(providers), threads=threads,
                            allow_fallback=allow_fallback, overrides=overrides, report_path_=out)
    finish_verify(rep)


def verify_pack_cli(artifact: Path, pack: Path, ckpts: list[Path], tasks: list[str], data, num_random, backbone,
                    overrides, providers, allow_fallback, report, threads) -> None:
    """verify BACKBONE --pack PACK: the pack through its backbone artifact, against its run (--ckpt) or, without
    one, its golden set replayed here (torch-free)."""
    from vfpt_deploy.artifacts.files import check_outputs, check_suffix
    from vfpt_deploy.artifacts.schema import report_path
    from vfpt_deploy.runtime.packs import open_pack_predictor

    if tasks or len(ckpts) > 1:
        raise UsageError("a pack is one task: pass its one run.pt with --ckpt")
    if not ckpts:
        from vfpt_deploy.runtime.selfcheck import golden_report_path, verify_golden

        given = [o for o, v in (("--data", data), ("--num-random", num_random != 16), ("--backbone", backbone)) if v]
        if given:
            raise UsageError(f"{given[0]} needs the checkpoint: pass --ckpt run.pt (without it, verify replays the "
                             "golden set the pack carries)")
        out = check_suffix(report, (".json",), "JSON report", "--report") if report else golden_report_path(pack)
        check_outputs({"--report": out}, {"ARTIFACT": artifact, "--pack": pack})
        predictor = open_pack_predictor(artifact, [pack], providers=split_list(providers), threads=threads,
                                        allow_fallback=allow_fallback)
        return finish_verify(verify_golden(pack, overrides=overrides, report_path_=out, predictor=predictor))
    from vfpt_deploy.artifacts.checkpoint import load_run
    from .threads import set_torch_threads
    from .verify import verify_artifact

    path = pick_ckpt(ckpts[0], None)
    out = check_suffix(report, (".json",), "JSON report", "--report") if report else report_path(pack)
    check_outputs({"--report": out}, {"ARTIFACT": artifact, "--pack": pack, "--ckpt": path, "--data": data,
                                      "--backbone": backbone})
    n = set_torch_threads(threads)
    predictor = open_pack_predictor(artifact, [pack], providers=split_list(providers), threads=n,
                                    allow_fallback=allow_fallback)
    try:
        run = load_run(path, backbone_weights=backbone)
    except BaseException:
        predictor.close()
        raise
    from .pipeline import ExportSettings, verification_inputs

    try:  # the run's own data when --data is not given, as verify of an artifact and the pack's export do
        sets, notes = verification_inputs(run, ExportSettings(data=data, num_random=num_random))
    except BaseException:
        predictor.close()
        raise
    finish_verify(verify_artifact(pack, run, inputs=sets, notes=notes, overrides=overrides, report_path=out,
                                  predictor=predictor))


def plan_verify_source(artifact: Path, ckpts: list[Path], tasks: list[str]):
    """What verify loads: one run, or (for a multi-task artifact) each task's run matched to it; and the
    input files by option, so the report never overwrites one."""
    from vfpt_deploy.artifacts.schema import artifact_tasks
    from vfpt_deploy.artifacts.task_sources import check_sources_exist, match_tasks, source_labels, task_sources

    recorded = artifact_tasks(artifact) if artifact.is_file() else []
    if recorded and not ckpts and not tasks:
        files = " ".join(f"--ckpt {t.get('checkpoint') or t['name'] + '.pt'}" for t in recorded[:4])
        raise UsageError(f"{artifact} holds {len(recorded)} tasks; pass each task's run.pt ({files}"
                         f"{' ...' if len(recorded) > 4 else ''}), matched to the tasks by sha256")
    if recorded or tasks or len(ckpts) > 1:
        if not recorded:
            raise UsageError(f"{artifact} is a single-task artifact; pass its one run.pt with --ckpt")
        named = task_sources([], tasks)
        sources = match_tasks(recorded, ckpts, named)
        from vfpt_deploy.folding.multitask import load_tasks  # (torch: after every usage error)

        return (lambda backbone: load_tasks(sources, backbone)), source_labels(ckpts, sources)
    path = pick_ckpt(ckpts[0] if ckpts else None, None)
    check_sources_exist([("", path)])
    from vfpt_deploy.artifacts.checkpoint import load_run

    return (lambda backbone: load_run(path, backbone_weights=backbone)), {"--ckpt": path}


TritonKind = choices("TritonKind", TRITON_KINDS)


@app.command()
@cli_errors
def triton(
    model: Annotated[Path, typer.Argument(help="A verified .onnx, or a TensorRT .engine/.plan with its .json sidecar.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="The Triton model repository folder (created if missing; other models in it are left alone).")],
    name: Annotated[Optional[str], typer.Option(help="Model name, which is its folder (default: the artifact's file stem). In an existing model folder only 1/, config.pbtxt and labels.txt are replaced; everything else is kept.")] = None,
    max_batch: Annotated[Optional[int], typer.Option(min=1, max=65536, help=f"max_batch_size (default: an engine's profile max; {TRITON_DEFAULT_BATCH} for an ONNX with a dynamic batch).")] = None,
    preferred_batch: Annotated[Optional[list[int]], typer.Option("--preferred-batch", min=1, max=65536, help="Batch size the dynamic batcher aims for (repeatable; default: an engine's opt batch when below max, else none).")] = None,
    max_queue_delay_us: Annotated[int, typer.Option(min=0, max=10_000_000, help="How long Triton may hold a request to batch it with later ones, microseconds.")] = TRITON_QUEUE_DELAY_US,
    instances: Annotated[int, typer.Option(min=1, max=1024, help="Model instances (instance_group count).")] = 1,
    kind: Annotated[TritonKind, typer.Option(help="Where the instances run (an engine: gpu only).")] = TritonKind.gpu,
    no_verify_check: Annotated[bool, typer.Option("--no-verify-check", help="Write the repository even without a passing verification report for this very file.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Write a Triton Inference Server model repository entry for a verified artifact: NAME/config.pbtxt
    (Triton's own schema), NAME/labels.txt and NAME/1/model.onnx or model.plan."""
    from vfpt_deploy.exporters.triton import TritonSettings, write_triton_repository

    settings = TritonSettings(name=name, max_batch_size=max_batch, instances=instances, kind=kind.value,
                              preferred_batch_sizes=tuple(preferred_batch) if preferred_batch else None,
                              max_queue_delay_us=max_queue_delay_us)
    res = write_triton_repository(model, out, settings, require_verified=not no_verify_check)
    if as_json:
        print_json({"model": str(model), "folder": str(res.folder), "name": res.name, "platform": res.platform,
                    "max_batch_size": res.max_batch_size, "files": [str(f) for f in res.files], "notes": res.notes,
                    "config_pbtxt": res.config_text})
        return
    console.print(f"wrote [bold]{escape(str(res.folder))}[/] ({res.platform}, max_batch_size {res.max_batch_size}):",
                  highlight=False)
    for f in res.files:
        console.print(f"  {escape(str(f))}", highlight=False)
    for note in res.notes:
        console.print(f"[cyan]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    gpus = "--gpus all " if settings.kind == "gpu" else ""  # CPU instances need no GPU in the container
    console.print(f"serve it: docker run {gpus}-p8000:8000 -p8001:8001 -p8002:8002 -v {escape(str(out.resolve()))}:/models "
                  "nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models", highlight=False,
                  soft_wrap=True)


# -- predict / bench ----------------------------------------------------------------------------------
@app.command()
@cli_errors
def predict(
    model: Annotated[Path, typer.Argument(help="An exported .onnx (or a TensorRT .engine/.plan).")],
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders.")],
    top_k: Annotated[int, typer.Option(min=1, max=1000, help="How many classes to show per image.")] = 3,
    batch: Annotated[int, typer.Option(min=1, max=4096, help="Images per inference call.")] = 32,
    as_json: JsonFlag = False,
    providers: ProvidersOpt = None,
    allow_fallback: FallbackOpt = False,
    threads: ThreadsOpt = None,
    task: Annotated[Optional[str], typer.Option(help="Multi-task artifacts: the task to classify for (inspect lists them).")] = None,
    self_check: Annotated[bool, typer.Option("--self-check", help="First replay the artifact's golden set on this machine; refuse (one line) if it does not reproduce or carries none.")] = False,
    pack: Annotated[Optional[list[Path]], typer.Option("--pack", help="Prompt packs to load on MODEL, a backbone artifact (repeatable; several: pick one with --task).")] = None,
) -> None:
    """Classify images with an exported model (no torch needed). An unreadable image is reported and the
    others still run; the exit code is 1 if any failed."""
    from vfpt_deploy.runtime.onnx_runner import open_predictor
    from vfpt_deploy.runtime.preprocess import find_images

    from vfpt_deploy.artifacts.schema import is_engine
    from .threads import resolve_threads

    kwargs = {} if is_engine(model) else {"threads": resolve_threads(threads), "allow_fallback": allow_fallback}
    if pack:
        from vfpt_deploy.runtime.packs import open_pack_predictor

        opened = open_pack_predictor(model, pack, task, split_list(providers), **kwargs)
        task, shown = None, opened.name  # the predictor is that one pack's
    else:
        opened, shown = open_predictor(model, split_list(providers), **kwargs), task
    with opened as predictor:
        predictor.max_batch = batch
        predictor.task_ids(task, 0 if task is None else 1)  # a wrong or missing --task: one line, before any image
        if self_check:
            from vfpt_deploy.runtime.selfcheck import check_on_load, describe_check

            if check_on_load(predictor, str(model)) is None:
                raise ArtifactError(f"{model} carries no golden set to self-check (exported before vfpt-deploy "
                                    "recorded one); re-export it, or drop --self-check")
            err_console.print(f"{escape(str(model))}: {describe_check(predictor.self_check_result)}", highlight=False)
        preds = predictor.predict(find_images(images), top_k=top_k, task=task)
        used = list(getattr(predictor, "providers", None) or ["TensorRT"])
        for note in predictor.notes:  # stderr: --json keeps stdout clean
            err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    if as_json:
        print_json({"model": str(model), "providers": used, **({"task": shown} if shown else {}), "predictions": [
            {"image": p.source, "error": p.error} if p.error else
            {"image": p.source, "top": [{"class": c, "prob": s} for c, s in p.top]} for p in preds]})
    else:
        print_predictions(model, used, preds)
    failed = [p for p in preds if p.error]
    for p in failed:
        err_console.print(f"[bold red]error:[/] {escape(p.error)}", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


def print_predictions(model: Path, used: list[str], preds) -> None:
    task = next((p.task for p in preds if p.task), None)
    t = Table(title=escape(f"{model}{f', task {task}' if task else ''} ({', '.join(used)})"))
    t.add_column("image", overflow="fold")
    for i in range(max((len(p.top) for p in preds), default=0)):
        t.add_column(f"top-{i + 1}")
    for p in preds:
        cells = [escape(f"{c} ({s:.1%})") for c, s in p.top] if not p.error else ["[red]not classified[/]"]
        t.add_row(escape(p.source), *cells)
    console.print(t)


@app.command()
@cli_errors
def bench(
    ckpt_arg: CkptArg = None,
    ckpt: CkptOpt = None,
    onnx: Annotated[Optional[list[Path]], typer.Option("--onnx", help="An exported .onnx for the ort-* backends (repeatable).")] = None,
    engine: Annotated[Optional[list[Path]], typer.Option("--engine", help="A TensorRT engine (with its .json sidecar) for the tensorrt backend (repeatable).")] = None,
    backend: Annotated[Optional[list[str]], typer.Option("--backend", "-b", help="torch, torch-folded, ort-cpu, ort-cuda, ort-cuda-graph (onnxruntime's CUDA graphs), ort-trt, tensorrt (repeatable; default: all, the unusable ones reported as skipped).")] = None,
    batch: Annotated[Optional[list[str]], typer.Option("--batch", help="Batch size(s) to sweep: repeatable and/or comma-separated (default 1,8,32).")] = None,
    warmup: Annotated[Optional[int], typer.Option(min=0, max=1_000_000, help="Warm-up calls per batch size (default 10).")] = None,
    warmup_time: Annotated[Optional[float], typer.Option(help="Warm up for this many seconds (0 < s <= 3600) instead of a count.")] = None,
    iters: Annotated[Optional[int], typer.Option(min=1, max=1_000_000, help="Timed calls per batch size (default 50).")] = None,
    duration: Annotated[Optional[float], typer.Option(help="Time calls for this many seconds (0 < s <= 3600) instead of a count.")] = None,
    threads: ThreadsOpt = None,
    fold: Annotated[Fold, typer.Option(help="Fold of torch-folded and of the ONNX exported from the run.pt.")] = Fold.auto,
    device: DeviceOpt = None,
    dtype: Annotated[str, typer.Option(help="PyTorch backends: fp32, fp16 or bf16 (an ONNX file keeps its own precision).")] = "fp32",
    e2e: Annotated[bool, typer.Option("--e2e", help="GPU backends: also time end to end, host<->device copies included.")] = False,
    as_json: JsonFlag = False,
    report: Annotated[Optional[Path], typer.Option(help="Write every result and the machine to this JSON file (.json).")] = None,
    csv_out: Annotated[Optional[Path], typer.Option("--csv", help="Write one row per result (machine included) to this CSV file (.csv).")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG of latency and throughput vs batch size per backend (.png).")] = None,
    backbone: BackboneOpt = None,
    export_dir: Annotated[Optional[Path], typer.Option(help="Keep the ONNX exported from the run.pt in this folder (default: a temp folder).")] = None,
    task: Annotated[Optional[str], typer.Option(help="Multi-task .onnx/.engine: after each mixed-task batch (the default stream: tasks drawn at random, seeded), also time a batch of this task alone, to compare the two (inspect lists the tasks).")] = None,
) -> None:
    """Benchmark a run.pt and/or exported artifacts: latency statistics, throughput and peak memory per
    backend and batch size, with the machine they were measured on. A multi-task artifact replays a
    mixed-task stream (each image's task drawn at random, a batch of b holding min(b, T) tasks); each row says
    which stream it measured."""
    from .bench import BenchSettings, parse_batches, results_table, run_bench, skip_lines
    from .extras import require
    from vfpt_deploy.artifacts.files import check_outputs, check_suffix
    from .threads import resolve_threads
    from vfpt_deploy.runtime.timing import LoopSpec

    ckpt = pick_ckpt(ckpt, ckpt_arg) if (ckpt or ckpt_arg) else None
    outs = {k: check_suffix(p, (s,), k.strip("-").upper(), k) for k, p, s in
            (("--report", report, ".json"), ("--csv", csv_out, ".csv"), ("--plot", plot, ".png")) if p is not None}
    check_outputs(outs, {"--ckpt": ckpt, "--backbone": backbone,
                         **{f"--onnx {p}": p for p in onnx or []}, **{f"--engine {p}": p for p in engine or []}})
    if plot is not None:
        require("matplotlib", "vfpt-deploy bench --plot")  # before measuring, not after
    loop = LoopSpec(warmup=warmup if warmup is not None or warmup_time is not None else 10, warmup_s=warmup_time,
                    iters=iters if iters is not None or duration is not None else 50, duration_s=duration).check()
    settings = BenchSettings(batches=parse_batches(",".join(batch or ["1,8,32"])), loop=loop,
                             threads=resolve_threads(threads), e2e=e2e, fold=fold.value, device=device, task=task,
                             dtype=dtype)
    with activity("benchmarking") as say:
        result = run_bench(checkpoint=ckpt, onnx=onnx or [], engines=engine or [], backends=backend,
                           settings=settings, backbone_weights=backbone, export_dir=export_dir, on_status=say)
    if as_json:
        print_json(result.to_dict())
    else:  # at the table's own width: narrow terminals wrap lines instead of eliding numbers
        print_wide(results_table(result))
    for line in skip_lines(result.skipped):  # each skip once, whatever the batch sweep
        err_console.print(f"[yellow]skipped[/] {escape(line)}", highlight=False)
    for path, write in ((report, result.write_json), (csv_out, result.write_csv), (plot, result.plot)):
        if path is not None:
            err_console.print(f"wrote {write(path)}", highlight=False)


# -- serve --------------------------------------------------------------------------------------------
PortOpt = Optional[int]


@app.command()
@cli_errors
def serve(
    models: Annotated[list[str], typer.Argument(help="Exported models (.onnx, .engine, .plan): PATH (named by its file stem) or NAME=PATH. A multi-task artifact serves one model per task, named TASK (NAME.TASK with NAME=PATH), all on one session and batcher.", show_default=False)],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface, as MLServer).")] = "0.0.0.0",
    port: Annotated[PortOpt, typer.Option(min=1, max=65535, help="HTTP/REST port (default 8080).")] = None,
    grpc_port: Annotated[PortOpt, typer.Option(min=1, max=65535, help="gRPC port (default 8081).")] = None,
    metrics_port: Annotated[PortOpt, typer.Option(min=1, max=65535, help="Prometheus /metrics port (default 8082).")] = None,
    max_batch_size: Annotated[int, typer.Option(min=1, max=65536, help="Most images per inference call: concurrent requests are batched up to this many rows (Triton's max_batch_size); also the largest request accepted.")] = 32,
    max_batch_delay_ms: Annotated[float, typer.Option(help="Most milliseconds a request waits for others to share its inference call, 0..60000 (MLServer's max_batch_time, Triton's max_queue_delay).")] = 5.0,
    threads: ThreadsOpt = None,
    providers: ProvidersOpt = None,
    allow_fallback: FallbackOpt = False,
    write_settings: Annotated[Optional[Path], typer.Option(help="Write the MLServer settings folder (settings.json, NAME/model-settings.json and a copy of each artifact) here and exit without serving: for 'mlserver start DIR' or a KServe storageUri.")] = None,
    self_check: Annotated[bool, typer.Option("--self-check/--no-self-check", help="Replay each artifact's golden set when it loads and refuse a model that does not reproduce on this machine (reported in the log, model metadata and the vfpt_self_check_passed metric).")] = True,
    packs: Annotated[Optional[Path], typer.Option(help="Serve every prompt pack (NAME.pack.safetensors) in this folder as model NAME, all on one session of the backbone artifact given as MODELS and one batcher; packs dropped in later are loaded with POST /v2/repository/models/NAME/load (and /unload).")] = None,
) -> None:
    """Serve exported models over the V2 / Open Inference Protocol (REST and gRPC) on MLServer, with
    adaptive batching, health endpoints and Prometheus metrics; no torch needed. Ctrl-C stops it."""
    from .extras import require

    require("mlserver", "vfpt-deploy serve")  # before any work: one line naming the [serve] extra
    from vfpt_deploy.runtime.serve_settings import ServeOptions, serve as run_server, write_settings as write_folder

    opts = ServeOptions(host=host, http_port=port, grpc_port=grpc_port, metrics_port=metrics_port,
                        max_batch_size=max_batch_size, max_batch_delay_ms=max_batch_delay_ms, threads=threads,
                        providers=tuple(split_list(providers) or ()) or None, allow_fallback=allow_fallback,
                        self_check=self_check)
    status = lambda s: err_console.print(f"[cyan]{escape(s)}[/]", highlight=False)  # noqa: E731
    if packs is not None:
        from vfpt_deploy.runtime import serve_packs

        if write_settings is not None:
            for path in serve_packs.write_settings(write_settings, models, packs, opts, on_status=status):
                console.print(f"wrote {escape(str(path))}", highlight=False)
            return
        serve_packs.serve(models, packs, opts, on_status=status)
        err_console.print("server stopped", highlight=False)
        return
    if write_settings is not None:
        for path in write_folder(write_settings, models, opts, on_status=status):
            console.print(f"wrote {escape(str(path))}", highlight=False)
        return
    run_server(models, opts, on_status=status)
    err_console.print("server stopped", highlight=False)


# -- import -------------------------------------------------------------------------------------------
@app.command("import")
@cli_errors
def import_reference(
    ckpt_arg: Annotated[Optional[Path], typer.Argument(help="The reference checkpoint (same as --ckpt).", show_default=False)] = None,
    ckpt: Annotated[Optional[Path], typer.Option("--ckpt", help="A reference VFPT/VPT checkpoint: {'model': state_dict} or a bare state dict.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="The run.pt to write (.pt).")] = Path("run.pt"),
    alpha: Annotated[float, typer.Option(help="Fourier fraction the checkpoint was trained with (FOURIER_PERCENTAGE; not saved by the reference).")] = ...,
    location: Annotated[Location, typer.Option(help="Where its Fourier prompts sit (FOURIER_LOCATION).")] = Location.prepend,
    classes: Annotated[Optional[str], typer.Option(help="Class names: a comma list or a file with one a line (default 0..C-1).")] = None,
    heads: Annotated[Optional[int], typer.Option(min=1, max=1024, help="Attention heads of a ViT (default: the standard value for the width: 192->3, 384->6, 768->12, 1024->16, 1280->16; a Swin's are read off the checkpoint).")] = None,
    arch: Annotated[Arch, typer.Option(help="vit: the reference ViT (enc.transformer.*); mae / moco: its MAE / MoCo-v3 ViTs (enc.blocks.*; MAE mean-pools); swin: its Swin (enc.layers.*; average pool).")] = Arch.vit,
    crop_pct: Annotated[float, typer.Option(help="1.0: resize to the model size (VTAB); <1: resize shorter side to size/crop_pct, center crop (FGVC: 0.875).")] = 1.0,
) -> None:
    """Convert a reference VFPT/VPT ViT or Swin checkpoint into a run.pt (shapes give M, deep, width, depth,
    patch, image size and classes; alpha, location, heads and class names come from the options)."""
    from vfpt_deploy.artifacts.files import check_suffix
    from vfpt_deploy.artifacts.schema import RUN_SUFFIXES
    from vfpt_deploy.models.config import VFPTConfig, check_crop_pct

    from vfpt_deploy.artifacts.task_sources import check_sources_exist

    VFPTConfig(alpha=alpha, location=location.value), check_crop_pct(crop_pct)  # before torch loads
    check_suffix(out, RUN_SUFFIXES, "run checkpoint")
    src = pick_ckpt(ckpt, ckpt_arg)
    check_sources_exist([("", src)], "pass the reference's saved .pth")
    from vfpt_deploy.reference import import_checkpoint

    result = import_checkpoint(src, out, arch=arch.value, alpha=alpha, location=location.value, classes=classes,
                               heads=heads, crop_pct=crop_pct)
    for k in result.unused:
        console.print(f"unused key {escape(k)}", highlight=False, soft_wrap=True)
    m, cfg = result.model, result.model.config
    console.print(f"imported {result.backbone.name} {json.dumps(result.backbone.kwargs)}: M={cfg.num_prompts} "
                  f"{'deep' if cfg.deep else 'shallow'}, alpha={cfg.alpha} (m={cfg.num_fourier} Fourier), "
                  f"{cfg.location}, {m.num_classes} classes, {m.pool} pooling; {len(result.unused)} unused keys; "
                  f"wrote {out}", highlight=False, soft_wrap=True)


def run() -> None:
    """The console script: the app, with usage errors (bad option values, missing arguments) as one
    line too, instead of the usage box."""
    import sys

    command = typer.main.get_command(app)
    try:
        code = command.main(prog_name="vfpt-deploy", standalone_mode=False)
    except Exception as e:  # click's exceptions (typer ships its own copy of click): matched by name
        code = _usage_error(e)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


def _usage_error(e: Exception) -> int:
    kinds = {c.__name__ for c in type(e).__mro__}
    ctx = getattr(e, "ctx", None)
    if "NoArgsIsHelpError" in kinds and ctx is not None:
        console.print(ctx.get_help())
        return 0
    if "Abort" in kinds:
        return 130
    if "ClickException" not in kinds:
        raise e
    command = f"vfpt-deploy {ctx.info_name} --help" if ctx is not None and ctx.parent is not None else "vfpt-deploy --help"
    err_console.print(f"[bold red]error:[/] {escape(e.format_message())} (see '{command}')", highlight=False,
                      soft_wrap=True)
    return int(getattr(e, "exit_code", 2))
