"""Optional extras: which one a missing module comes from, and the one-onnxruntime guard.

The base install (`pip install .` from a checkout, or its wheel) is the torch-free runtime (onnxruntime,
onnx, numpy, safetensors, Pillow, typer, rich). No package index serves vfpt-deploy, so hints name the
checkout and the wheel.
Training, import, folding and export need `[export]`, the server `[serve]`, engines `[tensorrt]` or
`[trt-rtx]`. A command that reaches a module of a missing extra stops with one line naming the extra
(`MissingExtra`), never a ModuleNotFoundError traceback. Torch-free; imports nothing optional itself.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
from importlib import metadata

from .errors import RuntimeSetupError, Unavailable

PACKAGE = "vfpt-deploy"

# top-level module -> (what to call it, the extra that brings it; None: the base install)
MODULES = {
    "torch": ("PyTorch", "export"),
    "torchvision": ("torchvision", "export"),
    "timm": ("timm", "export"),
    "onnxscript": ("onnxscript", "export"),
    "onnxconverter_common": ("onnxconverter-common", "export"),
    "safetensors": ("safetensors", None),
    "sklearn": ("scikit-learn", "export"),
    "mlserver": ("MLServer", "serve"),
    "tensorrt": ("TensorRT", "tensorrt"),
    "tensorrt_rtx": ("TensorRT-RTX", "trt-rtx"),
    "matplotlib": ("matplotlib", "bench"),
    "modelopt": ("NVIDIA ModelOpt", "modelopt"),
    "tritonclient": ("tritonclient", "triton"),
    "onnxruntime": ("onnxruntime", None),
    "onnx": ("onnx", None),
    "numpy": ("NumPy", None),
    "PIL": ("Pillow", None),
}

# Distributions that all install the one `onnxruntime` module (a second one overwrites the first's files).
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                     "onnxruntime-qnn", "onnxruntime-training")


class MissingExtra(Unavailable, ImportError):
    """A module of an optional extra is not installed; the message names the extra. Also an ImportError,
    so code that already handles a missing optional module keeps working."""


def extra_install(extra: str) -> str:
    """How to add an extra, as it works without a package index serving vfpt-deploy (README, "Install")."""
    return f"pip install '.[{extra}]' in the {PACKAGE} checkout, or 'WHEEL[{extra}]' for its wheel"


def install_hint(module: str) -> str | None:
    """How to install the extra that brings a known module (extra_install); None for a module we do not know."""
    top = module.split(".")[0]
    if top not in MODULES:
        return None
    name, extra = MODULES[top]
    if top == "onnxruntime":
        return "pip install onnxruntime (or onnxruntime-gpu for CUDA; never both)"
    return extra_install(extra) if extra else f"pip install --force-reinstall . in the {PACKAGE} checkout, or its wheel"


def missing_extra(error: ImportError, purpose: str) -> MissingExtra | None:
    """The one-line MissingExtra for a ModuleNotFoundError of a known optional module, else None."""
    module = getattr(error, "name", None) or ""
    hint = install_hint(module)
    if not isinstance(error, ModuleNotFoundError) or hint is None:
        return None
    top = module.split(".")[0]
    what = MODULES[top][0]
    if _installed(top):  # the package is there but lacks a module: a version this code does not fit
        return MissingExtra(f"{purpose} needs {what}, but the installed one has no module {module!r} (an "
                            f"incompatible version?): {hint.replace('pip install', 'pip install -U', 1)}",
                            name=module)
    return MissingExtra(f"{purpose} needs {what}, which is not installed: {hint}", name=module)


def _installed(top: str) -> bool:
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):  # a finder that refuses it, or a half-imported module
        return False


@contextlib.contextmanager
def needs_extras(purpose: str):
    """Turn a missing optional module inside the block into MissingExtra ('vfpt-deploy train needs PyTorch,
    which is not installed: pip install ...'); other import errors pass through unchanged."""
    try:
        yield
    except ModuleNotFoundError as e:
        err = missing_extra(e, purpose)
        if err is None:
            raise
        raise err from None


def require(module: str, purpose: str):
    """import_module(module), or MissingExtra naming the extra that brings it."""
    with needs_extras(purpose):
        return importlib.import_module(module)


def installed_ort_distributions() -> list[str]:
    """The onnxruntime flavours installed here (package metadata only: imports nothing)."""
    found = []
    for dist in ORT_DISTRIBUTIONS:
        try:
            metadata.distribution(dist)
        except metadata.PackageNotFoundError:
            continue
        found.append(dist)
    return found


def check_one_onnxruntime() -> None:
    """Refuse two onnxruntime flavours side by side: their shared module is whichever was written last,
    partly overwritten, so which providers (and which bugs) it has is an accident of install order."""
    found = installed_ort_distributions()
    if len(found) > 1:
        keep = next((d for d in found if d != "onnxruntime"), found[0])
        raise RuntimeSetupError(f"{' and '.join(found)} are both installed and overwrite each other's "
                                f"'onnxruntime' module; keep one: pip uninstall -y {' '.join(found)} && "
                                f"pip install {keep}")


def import_onnxruntime(purpose: str = "running an ONNX model"):
    """The onnxruntime module, after the one-flavour check; MissingExtra when none is installed."""
    check_one_onnxruntime()
    return require("onnxruntime", purpose)
