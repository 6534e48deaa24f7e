"""The layer rules of pyproject.toml ([tool.importlinter]; docs/architecture.md) checked by import-linter: no
import circles, the pipeline's layers, families independent of each other, a torch-free runtime.

import-linter reads the package's folders, and pyproject's package-dir installs exporters/ and runtime/ as
vfpt_deploy.exporters and vfpt_deploy.runtime; so the checks run on a copy laid out as it installs. Each
contract is also broken once on purpose in such a copy, to show that it can fail."""
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def installed_layout(dest: Path) -> Path:
    """The package folders as pip installs them (pyproject's [tool.setuptools.package-dir]), under dest."""
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(dirs.items()):  # vfpt_deploy before the subpackages mapped into it
        shutil.copytree(ROOT / folder, dest / package.replace(".", "/"), ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def lint_imports(where: Path, *contracts: str) -> subprocess.CompletedProcess:
    try:
        import importlinter  # noqa: F401
    except ImportError:
        pytest.fail("import-linter is not installed: pip install -e '.[dev]' (or pip install import-linter)")
    args = [arg for c in contracts for arg in ("--contract", c)]
    return subprocess.run([sys.executable, "-c", LINT, str(ROOT / "pyproject.toml"), "--no-cache", "--no-logo", *args],
                          cwd=where, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(where)}, capture_output=True,
                          text=True, timeout=300)


def test_the_layer_rules_hold(tmp_path):
    out = lint_imports(installed_layout(tmp_path))
    assert out.returncode == 0 and "0 broken" in out.stdout, out.stdout + out.stderr


# Each line brings back a dependency the rules exist to keep out (the first is one of the circles Swin
# once brought in: its fold taking the fold modes from the ViT's fold module, which dispatched to it).
BREAKS = [
    ("no-circles", "vfpt_deploy/models/vit/fold.py", "from vfpt_deploy.folding import fold_model"),
    ("families", "vfpt_deploy/models/swin/fold.py", "from vfpt_deploy.models.vit.fold import FOLD_MODES"),
    ("layers", "vfpt_deploy/exporters/onnx.py", "from vfpt_deploy.pipeline import ExportSettings"),
    ("models", "vfpt_deploy/models/vit/reference.py", "from vfpt_deploy.models.backbone import create_backbone"),
    ("bench", "vfpt_deploy/bench/report.py", "from vfpt_deploy.bench.loop import run_bench"),
    ("torch-free", "vfpt_deploy/runtime/predictor.py", "import torch"),
    ("torch-free", "vfpt_deploy/artifacts/schema.py", "from vfpt_deploy.artifacts.checkpoint import load_run"),
    ("torch-free-sizes", "vfpt_deploy/models/vit/sizes.py", "from vfpt_deploy.models.common import check_tensors"),
    ("torch-free-sizes", "vfpt_deploy/artifacts/run_reader.py", "from vfpt_deploy.models.backbone import state_sha256"),
]


@pytest.mark.parametrize("contract, module, line", BREAKS, ids=[f"{c}-{Path(m).stem}" for c, m, _ in BREAKS])
def test_each_rule_fails_when_broken(tmp_path, contract, module, line):
    where = installed_layout(tmp_path)
    path = where / module
    path.write_text(path.read_text() + f"\n{line}  # added by tests/test_layers.py\n")
    out = lint_imports(where, contract)
    assert out.returncode != 0 and "1 broken" in out.stdout, out.stdout + out.stderr
