"""Which run.pt is which task of a multi-task artifact, from the command line (--ckpt PATH, --task NAME=PATH):
parsed and checked torch-free, so a usage error is one line before PyTorch is imported (seconds). The
folding itself is in vfpt_deploy/folding/multitask.py, which re-exports these."""
from __future__ import annotations

from pathlib import Path

from vfpt_deploy.artifacts.schema import MAX_TASKS, TASK_NAME
from vfpt_deploy.errors import UsageError


def task_sources(ckpts: list[Path], tasks: list[str]) -> list[tuple[str, Path]]:
    """(name, path) per task from `--ckpt PATH` (named by the file stem) and `--task NAME=PATH`, in the
    order given (--ckpt first). Names must be unique, also ignoring case (they become folder names when
    served), and usable as model names (serve, Triton)."""
    out = [(Path(p).stem, Path(p)) for p in ckpts]
    named = len(out)  # the entries from here on came from --task
    for item in tasks:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise UsageError(f"--task takes NAME=PATH (e.g. cars=cars.pt), got {item[:80]!r}")
        out.append((name, Path(path)))
    if len(out) > MAX_TASKS:
        raise UsageError(f"{len(out)} tasks; one artifact holds at most {MAX_TASKS}: split them over several")
    seen: dict[str, tuple[str, Path]] = {}
    for i, (name, path) in enumerate(out):
        if not TASK_NAME.fullmatch(name):
            fix = "pick such a NAME" if i >= named else "name it with --task NAME=PATH"
            raise UsageError(f"task name {name[:80]!r} (from {str(path)[:200]}) must be 1-64 letters, digits, '_', "
                             f"'.' or '-', starting with a letter or digit; {fix}")
        if name.lower() in seen:
            other, where = seen[name.lower()]
            same = f"named {name!r}" if other == name else f"named {other!r} and {name!r}, the same ignoring case"
            raise UsageError(f"two tasks are {same} ({where} and {path}); give them distinct names with "
                             "--task NAME=PATH")
        seen[name.lower()] = (name, path)
    return out


def source_labels(ckpts: list[Path], sources: list[tuple[str, Path]]) -> dict[str, Path]:
    """How errors name each task's file: by the option that gave it (so an output refused for naming an
    input says '--ckpt b.pt' or '--task b')."""
    given = {Path(p) for p in ckpts}
    return {(f"--ckpt {p}" if p in given else f"--task {n}"): p for n, p in sources}


def match_tasks(recorded: list[dict], ckpts: list[Path], named: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """Each recorded task's checkpoint, in the artifact's order: by name from --task NAME=PATH (whose file
    must be the one that task was exported from), else the --ckpt file whose sha256 the artifact recorded
    for it. Every task needs one; every file must match one; one line saying which does not."""
    from vfpt_deploy.artifacts.files import file_sha256, not_a_file, regular_file

    names = [t["name"] for t in recorded]
    for n, p in named:
        if n not in names:
            raise UsageError(f"--task {n[:80]}: the artifact has no such task (it holds {', '.join(names)})")
    sha = {}
    for p in [*ckpts, *(p for _, p in named)]:
        if not regular_file(p):
            raise UsageError(f"checkpoint {p} {not_a_file(p, 'pass each task' + chr(39) + 's run.pt')}")
        sha[Path(p)] = file_sha256(p)
    by_task = {t["name"]: t for t in recorded}
    for n, p in named:
        want = by_task[n].get("checkpoint_sha256")
        if want and sha[Path(p)] != want:
            raise UsageError(f"--task {n}={p} is not the run.pt task {n!r} was exported from (sha256 "
                             f"{sha[Path(p)][:12]}, recorded {want[:12]}, {by_task[n].get('checkpoint') or 'a run.pt'}): "
                             "pass that file, or re-export the artifact from this one")
    by_sha = {sha[Path(p)]: Path(p) for p in reversed(ckpts)}
    claimed = dict(named)
    found = [claimed.get(t["name"]) or by_sha.get(t.get("checkpoint_sha256")) for t in recorded]
    used = {Path(p) for p in found if p is not None}
    for p in ckpts:
        if Path(p) not in used:
            owner = next((t for t in recorded if t.get("checkpoint_sha256") == sha[Path(p)]), None)
            stem = next((t for t in recorded if t.get("checkpoint") == Path(p).name), None)
            why = (f"it is task {owner['name']!r}'s run.pt, which --task {owner['name']} already names" if owner else
                   f"it has the name task {stem['name']!r} was exported from but other contents (retrained or "
                   "edited since?): pass the original, or re-export the artifact" if stem else
                   "its sha256 matches none the artifact recorded: pass the tasks' own run.pt files")
            raise UsageError(f"--ckpt {p} is none of the artifact's tasks: {why}")
    for t, p in zip(recorded, found):
        if p is None:
            raise UsageError(f"no checkpoint given for task {t['name']!r} (exported from "
                             f"{t.get('checkpoint') or 'a run.pt'}); pass it with --ckpt or --task {t['name']}=PATH")
    return [(t["name"], Path(p)) for t, p in zip(recorded, found)]


def check_sources_exist(sources: list[tuple[str, Path]],
                        fix: str = "pass the run.pt written by 'vfpt-deploy train'") -> None:
    """Every checkpoint named is a regular file (one line if not), checked before PyTorch is imported."""
    from vfpt_deploy.artifacts.files import not_a_file, regular_file
    from vfpt_deploy.errors import InputError

    for name, path in sources:
        if not regular_file(path):
            what = f"checkpoint {path} (task {name!r})" if name else f"checkpoint {path}"
            raise InputError(f"{what} {not_a_file(path, fix)}")
