"""What the code promises about its own shape: a thin CLI, short functions at the seams, a torch-free
engine builder and runtime, help on every option, and a repository that stands on its own."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from vfpt_deploy.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _body_lines(fn) -> int:
    """Lines from the first statement after the docstring to the end (the signature not counted)."""
    body = fn.body[1:] if fn.body and isinstance(fn.body[0], ast.Expr) and isinstance(fn.body[0].value, ast.Constant) else fn.body
    return (fn.end_lineno - body[0].lineno + 1) if body else 0


def test_cli_command_bodies_are_short():
    commands = {c.callback.__name__ for c in app.registered_commands}
    long = {f.name: _body_lines(f) for f in _functions(ROOT / "vfpt_deploy" / "cli.py")
            if f.name in commands and _body_lines(f) > 40}
    assert not long, f"command bodies over 40 lines: {long}"


@pytest.mark.parametrize("folder", ["exporters", "runtime"])
def test_no_long_functions_at_the_seams(folder):
    long = {f"{p.name}:{f.name}": f.end_lineno - f.lineno + 1 for p in (ROOT / folder).glob("*.py")
            for f in _functions(p) if f.end_lineno - f.lineno + 1 > 60}
    assert not long, f"functions over 60 lines: {long}"


# The runtime and the torch-free artifact modules never import torch at all, not even inside a function:
# an import-linter contract (pyproject.toml, tests/test_layers.py). These import it lazily, on the torch
# side of a command, and must stay free of it when imported.
@pytest.mark.parametrize("module", ["vfpt_deploy", "vfpt_deploy.cli", "vfpt_deploy.models.families",
                                    "vfpt_deploy.inspect_artifact", "vfpt_deploy.exporters.tensorrt",
                                    "vfpt_deploy.exporters.triton"])
def test_torch_free_imports(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules and 'timm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_option_has_help():
    command = typer.main.get_command(app)
    missing = [f"{name} {p.name}" for name, cmd in command.commands.items() for p in cmd.params
               if not getattr(p, "help", None)]
    assert not missing, f"options without help: {missing}"


def test_version():
    out = subprocess.run([sys.executable, "-c", "from vfpt_deploy.cli import run; run()", "--version"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and re.fullmatch(r"vfpt-deploy \S+\n", out.stdout)


def test_the_repository_stands_on_its_own():
    pattern = re.compile(r"shared/ENVIRONMENT|VFPT_SPEC|\bbrief\b|/work/|/home/\w|/root/|/tmp/")
    hits = []
    for path in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "docs").rglob("*.json"),
                 *(ROOT / "vfpt_deploy").rglob("*.py"),
                 *(ROOT / "exporters").glob("*.py"), *(ROOT / "runtime").glob("*.py"),
                 *(ROOT / "benchmarks").glob("*.py"), *(p for p in (ROOT / "scripts").iterdir() if p.is_file())]:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:80]}")
    assert not hits, "\n".join(hits)
