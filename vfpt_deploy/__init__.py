"""vfpt-deploy: train, fold, export and serve Visual Fourier Prompt Tuning (VFPT) ViTs."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vfpt-deploy")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from vfpt_deploy.models.config import VFPTConfig  # noqa: E402
from .errors import VFPTError  # noqa: E402

__all__ = ["VFPTConfig", "VFPTError", "__version__"]
