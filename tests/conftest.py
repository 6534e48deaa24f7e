import os
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach for the hub

import numpy as np
import pytest
import torch

from vfpt_deploy.models.backbone import create_backbone
from vfpt_deploy.models.config import VFPTConfig
from vfpt_deploy.models.vit.model import VFPTViT

TINY = "vit_tiny_patch16_224"
TINY_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}


def tiny_backbone(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return create_backbone(TINY, **{**TINY_KWARGS, **overrides})


def tiny_model(num_classes: int = 5, seed: int = 0, scale: float = 1.0, **cfg) -> VFPTViT:
    """A tiny VFPT model; `scale` enlarges the prompts (trained prompts are far from their init)."""
    bb = tiny_backbone(seed)
    torch.manual_seed(seed + 1)
    model = VFPTViT(bb, num_classes, VFPTConfig(**cfg)).eval()
    with torch.no_grad():
        for p in model.tuned_parameters().values():
            p.mul_(scale)
    return model


# -- float32 parity: the one rule for every fold / export / re-statement parity test ----------------------
PARITY_ATOL = 3e-5
PARITY_RTOL = 8e-6


def parity_limit(expected) -> float:
    """The largest |actual - expected| a float32 parity test accepts: PARITY_ATOL + PARITY_RTOL x max|expected|
    (over the finite entries).

    Why: two float32 computations of the same logits (folded vs live, ONNX Runtime vs PyTorch, a hand-written
    forward vs the model, a batch vs one image) add the same products in another order, and the order depends
    on the CPU: oneDNN, MKL and ONNX Runtime's MLAS pick AVX2, AVX-512 or AMX kernels with other blockings.
    Each reordered sum is off by a few float32 ulps (2^-23 = 1.2e-7 relative) of what it adds, and the
    matmuls, softmaxes and LayerNorms of every block add those up at the logits: 8e-6 is about 67 ulps of the
    largest logit, 3e-5 about 250 ulps of the O(1) normalized features the head reads (the whole error when
    the logits are small). Measured on these tests: at most 1.7e-5, always on the Swin models (8 blocks, 3
    patch merges, logits 1.6-7), on an AVX-512 CPU with PyTorch's AVX-512, AVX2 and scalar kernels and on an
    emulated AVX2-only CPU (qemu -cpu Haswell: PyTorch and ONNX Runtime); this rule leaves 4.3x headroom or
    more on every check. A flat 1e-5 sat on that floor (an AVX2-only Zen 3 reached 1.05e-5).
    The tests built to catch real errors still do, by a wide margin (checked by breaking the code on purpose):
    prompt keys off by 0.1% under sharp attention (test_fold's peaked models, Swin kv folds) by 60x or more,
    two prompts' keys swapped by 20x or more (18000x in the peaked models), two layers' prompts swapped by
    3000x or more, a padded prompt row that gets weight by 800x (test_multitask's padding test is exact). Errors that small in a tiny random model with
    near-uniform attention (keys off by 0.1%: 2e-5) are below any float32 limit; the peaked models exist
    for them."""
    e = np.asarray(_numpy(expected), dtype=np.float64)
    e = e[np.isfinite(e)]
    return PARITY_ATOL + PARITY_RTOL * (float(np.abs(e).max()) if e.size else 0.0)


def logits_diff(actual, expected) -> float:
    """max |actual - expected| over the finite entries; the non-finite ones (-inf padding) must match exactly."""
    a, e = np.asarray(_numpy(actual), dtype=np.float64), np.asarray(_numpy(expected), dtype=np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
    fin = np.isfinite(e)
    assert np.array_equal(fin, np.isfinite(a)) and np.array_equal(a[~fin], e[~fin]), "non-finite logits differ"
    return float(np.abs(a[fin] - e[fin]).max()) if fin.any() else 0.0


def assert_logits_close(actual, expected, what: str = "logits") -> float:
    """Float32 parity of `actual` with `expected` by parity_limit's rule; returns the max |diff|."""
    diff, limit = logits_diff(actual, expected), parity_limit(expected)
    _log_parity(what, diff, limit, expected)
    assert diff <= limit, (f"{what}: max |diff| {diff:.3g} > {limit:.3g} "
                           f"(= {PARITY_ATOL:g} + {PARITY_RTOL:g} x max|expected|)")
    return diff


def _numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


def _log_parity(what: str, diff: float, limit: float, expected) -> None:
    """VFPT_PARITY_LOG=FILE appends one JSON line per check (test, what, diff, limit, max|expected|): the
    headroom on the CPU the tests ran on."""
    path = os.environ.get("VFPT_PARITY_LOG")
    if path:
        import json

        e = np.asarray(_numpy(expected), dtype=np.float64)
        scale = float(np.abs(e[np.isfinite(e)]).max()) if np.isfinite(e).any() else 0.0
        with open(path, "a") as f:
            f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], "what": what,
                                "diff": diff, "limit": limit, "scale": scale}) + "\n")


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on loopback (all held open at once, so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def color_image_folder(root, per_class: int = 3) -> None:
    """root/train and root/val, classes red and blue: noisy solid 40x48 PNGs (an image-folder dataset)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, color in (("red", (200, 20, 20)), ("blue", (20, 20, 200))):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                a = np.clip(np.array(color) + rng.integers(-20, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(d / f"{i}.png")


@pytest.fixture
def images():
    torch.manual_seed(123)
    return torch.randn(4, 3, 32, 32)


@pytest.fixture(scope="session")
def exported_run(tmp_path_factory):
    """A tiny deep VFPT run.pt (classes a..d) and its verified kv ONNX export."""
    from vfpt_deploy.artifacts.checkpoint import BackboneInfo, load_run, save_run
    from vfpt_deploy.exporters.onnx import export_onnx
    from vfpt_deploy.runtime.preprocess import Preprocess

    d = tmp_path_factory.mktemp("exported")
    model = tiny_model(num_classes=4, scale=4.0, num_prompts=6, alpha=0.5)
    pre = Preprocess(resize=[32, 32], mean=[0.5] * 3, std=[0.5] * 3)
    save_run(d / "run.pt", model, BackboneInfo(TINY, dict(TINY_KWARGS)), ["a", "b", "c", "d"], pre)
    run = load_run(d / "run.pt")
    return run, export_onnx(run, d / "run.onnx").path


# Three tiny runs on one backbone, as a multi-task artifact holds them: deep with 6 prompts and 4 classes,
# deep with 3 prompts and 7 classes (alpha 1: every prompt through the FFT), shallow with 5 prompts, 2 classes.
TASK_SPECS = {"cars": dict(num_classes=4, num_prompts=6, alpha=0.5),
              "birds": dict(num_classes=7, num_prompts=3, alpha=1.0),
              "flat": dict(num_classes=2, num_prompts=5, alpha=0.4, deep=False)}


def save_task_runs(folder, specs: dict = TASK_SPECS, **backbone) -> dict:
    """run.pt files (name -> path) of tiny runs sharing one backbone; each task's prompts and head differ."""
    from vfpt_deploy.artifacts.checkpoint import BackboneInfo, save_run
    from vfpt_deploy.runtime.preprocess import Preprocess

    pre = Preprocess(resize=[32, 32], mean=[0.5] * 3, std=[0.5] * 3)
    paths = {}
    for i, (name, spec) in enumerate(specs.items()):
        model = tiny_model(scale=4.0, seed=0, **spec) if not backbone else _tiny_on(backbone, spec)
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for p in model.tuned_parameters().values():
                p.add_(torch.randn_like(p) * 0.5)
        paths[name] = folder / f"{name}.pt"
        save_run(paths[name], model, BackboneInfo(TINY, {**TINY_KWARGS, **backbone}),
                 [f"{name}-{c}" for c in range(spec["num_classes"])], pre)
    return paths


def _tiny_on(backbone: dict, spec: dict) -> VFPTViT:
    spec = dict(spec)
    n = spec.pop("num_classes")
    model = VFPTViT(tiny_backbone(0, **backbone), n, VFPTConfig(**spec)).eval()
    with torch.no_grad():
        for p in model.tuned_parameters().values():
            p.mul_(4.0)
    return model


@pytest.fixture(scope="session")
def task_runs(tmp_path_factory) -> dict:
    """name -> run.pt of the three TASK_SPECS runs (shared backbone)."""
    return save_task_runs(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="session")
def tasks_onnx(task_runs):
    """A verified multi-task ONNX of task_runs (tasks cars, birds, flat in that order), written by the pipeline."""
    from vfpt_deploy.folding.multitask import load_tasks
    from vfpt_deploy.pipeline import ExportSettings, export_run

    tasks = load_tasks(list(task_runs.items()))
    out = next(iter(task_runs.values())).parent / "tasks.onnx"
    outcome = export_run(tasks, ExportSettings(), out)
    assert outcome.passed, outcome.report.to_json()
    return out


def pytest_report_header(config):
    """The CPU and the ISA flags that change numerics, once per run (also under -q: see below)."""
    from vfpt_deploy.runtime.hardware import summary

    return f"vfpt-deploy tests on: {summary()}"


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session):
    # -q hides report headers, and CI runs pytest -q: write the machine line to the terminal anyway.
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and session.config.get_verbosity() < 0:
        reporter.write_line(pytest_report_header(session.config))
