"""File helpers every writer and reader shares: hashes, atomic writes with the umask's mode, the output
policy (an output never names an input), staging of new artifacts until they pass verification, strict
JSON, and SIGTERM cleanup. Torch-free: the exporters and the runtime use it alike.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from vfpt_deploy.errors import OutputError, VFPTError


def read_json(path: str | os.PathLike, what: str, fix: str, error=None):
    """A JSON file's value, or one error line (missing, unreadable, not UTF-8, not JSON, nested too deep)."""
    from vfpt_deploy.errors import InputError

    if os.path.exists(path) and not regular_file(path):  # a FIFO would block the read; a folder: its own line
        raise (error or InputError)(f"{what} {path} {not_a_file(path, fix)}")
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0][:120]
        raise (error or InputError)(f"{what} {path} is not valid JSON ({why}); {fix}") from None


# -- what a path is ---------------------------------------------------------------------------------
_KINDS = ((stat.S_ISDIR, "is a folder, not a file"), (stat.S_ISFIFO, "is a named pipe (FIFO), not a regular file"),
          (stat.S_ISSOCK, "is a socket, not a regular file"), (stat.S_ISCHR, "is a character device, not a regular file"),
          (stat.S_ISBLK, "is a block device, not a regular file"))
SPECIAL_FIX = "vfpt-deploy reads regular files only (it seeks in them): save the content to a file and pass that"


def regular_file(path: str | os.PathLike) -> bool:
    """`path` is a regular file (symlinks followed). Never opens it (opening a FIFO for reading blocks until a
    writer comes), and never raises: a name the file system cannot even look up (over NAME_MAX) is not one."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def not_a_file(path: str | os.PathLike, fix: str) -> str:
    """Why `path` is no regular file, and what to do, as the end of a one-line error: 'does not exist; FIX',
    'is a folder, not a file; FIX', 'is a named pipe (FIFO), not a regular file; <save it to a file>', ...
    (a FIFO, socket or device gets that fix instead of the caller's, which assumes a missing file)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return f"is a broken symbolic link (to {os.readlink(path)}); {fix}"
        return f"does not exist; {fix}"
    except (OSError, ValueError) as e:
        return f"cannot be looked up ({getattr(e, 'strerror', None) or e}); {fix}"
    for test, what in _KINDS:
        if test(mode):
            return f"{what}; {fix if test is stat.S_ISDIR else SPECIAL_FIX}"
    return f"is not a regular file; {fix}" if not stat.S_ISREG(mode) else f"is a file; {fix}"


def name_max(folder: str | os.PathLike) -> int:
    """The longest file name (bytes) the file system under `folder` takes (255 on Linux's usual ones)."""
    folder = Path(folder)
    for d in (folder, *folder.parents):
        try:
            return os.pathconf(d, "PC_NAME_MAX")
        except (OSError, ValueError):
            continue
    return 255


def check_name_length(path: str | os.PathLike, what: str, fix: str) -> None:
    """One line when `path`'s file name is longer than its file system allows (the OSError would come late,
    at the write, as 'File name too long')."""
    path = Path(path)
    n, limit = len(os.fsencode(path.name)), name_max(path.parent if str(path.parent) else ".")
    if n > limit:
        raise OutputError(f"{what} {path} cannot be written: its file name is {n} bytes, over the {limit} this file "
                          f"system allows; {fix}")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def umask_mode() -> int:
    """The mode a plain open() would give a new file: 0o666 less the umask (0o644 under umask 022).
    mkstemp creates files 0o600, which a serving container running as another user cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


STALE_AFTER_S = 60  # a temporary file or staging folder of a dead process this old is litter (kill -9)
_OURS = re.compile(r"\.(?:vfpt-stage-(\d+)-.*|.+\.(\d+)\.[^.]+\.tmp)")


def make_dirs(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (outermost first), so a failure can remove them again."""
    created = []
    for d in reversed([folder, *folder.parents]):
        if not d.exists():
            d.mkdir()
            created.append(d)
    return created


def remove_new_dirs(created: list[Path]) -> None:
    """Remove folders make_dirs created, innermost first, where still empty: a failed command leaves none."""
    for d in reversed(created):
        with contextlib.suppress(OSError):
            d.rmdir()


def clean_stale(folder: Path) -> list[Path]:
    """Remove this tool's own temporary files and staging folders in `folder` that a killed run left behind:
    recognised by name (.NAME.PID.XXXX.tmp, .vfpt-stage-PID-XXXX), their process gone and older than
    STALE_AFTER_S. Returns what was removed."""
    import time

    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = _OURS.fullmatch(e.name)
        if not m:
            continue
        pid = int(m.group(1) or m.group(2))
        try:
            old = time.time() - e.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
        except OSError:
            continue
        if not old or _alive(pid):
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(e.path) if e.is_dir(follow_symlinks=False) else os.unlink(e.path)
            removed.append(Path(e.path))
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but not ours to signal
        return True
    return True


def write_failure(e: BaseException, path: Path) -> OutputError | None:
    """A failed write as one line, or None when `e` is not about writing. torch.save reports a full disk as a
    RuntimeError from its zip writer ('basic_ios::clear', 'inline_container.cc ... unexpected pos', 'failed
    writing file'), safetensors as its own SafetensorError; both become the same line as an OSError."""
    text = str(e)
    full = False
    with contextlib.suppress(OSError):
        full = shutil.disk_usage(path.parent if path.parent.exists() else ".").free < 64 * 2**20
    if isinstance(e, OSError):
        why = e.strerror or text
    elif type(e).__name__ == "SafetensorError" or (isinstance(e, RuntimeError) and (full or any(
            k in text for k in ("basic_ios", "inline_container", "failed writing", "No space left", "file write failed")))):
        why = "No space left on device" if full or "space" in text.lower() else text.strip().splitlines()[0][:120]
    else:
        return None
    return OutputError(f"cannot write {path} ({why}{'; the disk is full' if full and 'space' not in why else ''}); "
                       "free some space or choose another output path (nothing was replaced)")


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it onto `path`: readers never
    see a half-written file, and a failed write leaves the old file as it was (and no new empty folder)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder; name a file to write")
    created: list[Path] = []
    try:
        created = make_dirs(path.parent)
        clean_stale(path.parent)
        # the name cut short: a file named near NAME_MAX still gets a temporary name the file system takes
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:100]}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        remove_new_dirs(created)
        raise OutputError(f"cannot write {path} ({e.strerror}); choose a writable output path") from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException as e:
        # judged before the partial file goes: a torch.save on a full disk names only its zip writer's position
        err = None if isinstance(e, (KeyboardInterrupt, SystemExit)) else write_failure(e, path)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        remove_new_dirs(created)
        if err is not None:
            raise err from None
        raise


# -- strict JSON -------------------------------------------------------------------------------------
def finite_or_none(obj):
    """obj with every non-finite float replaced by None, recursively (JSON has no NaN or Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def dumps_json(obj, **kwargs) -> str:
    """Strict JSON (allow_nan=False): a non-finite number is written as null, never as a bare NaN."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


# -- the output policy -------------------------------------------------------------------------------
def _same(a: Path, b: Path) -> bool:
    """Same file: equal resolved paths (symlinks followed), or, where both exist, the same inode."""
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (refused by check_outputs)
        return False


def check_outputs(outputs: dict[str, str | os.PathLike | None], inputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse, in one line, an output that is one of the command's inputs, an existing folder, a path
    with no file name, or the same file as another output. Keys are what the user calls them."""
    outs = {k: Path(v) for k, v in outputs.items() if v is not None}
    for oname, o in outs.items():
        if not o.name or o.name in (".", ".."):
            raise OutputError(f"{oname} {str(o)!r} names no file; give a file name")
        try:
            o.resolve(strict=False)
        except (OSError, RuntimeError) as e:
            raise OutputError(f"{oname} {o} cannot be used ({getattr(e, 'strerror', None) or e}); choose another path") from None
        check_name_length(o, oname, _shorter(oname))
    ins = {k: Path(v) for k, v in inputs.items() if v is not None and str(v) not in ("", "builtin", "random", "pretrained")}
    for oname, o in outs.items():
        if o.is_dir():
            raise OutputError(f"{oname} {o} is an existing folder; name a file to write")
        for iname, i in ins.items():
            if _same(o, i):
                raise OutputError(f"{oname} {o} is the same file as {iname}; writing it would destroy the input: "
                                  "choose another output path")
    names = list(outs)
    for a_i, a in enumerate(names):
        for b in names[a_i + 1:]:
            if _same(outs[a], outs[b]):
                raise OutputError(f"{a} and {b} both name {outs[a]}; give them different paths")


def _shorter(oname: str) -> str:
    """The fix for an output name over NAME_MAX: a report named after its artifact needs a shorter artifact name."""
    if oname == "--report":
        return ("pass a shorter --report FILE (by default a report is named after its artifact: ARTIFACT.verify.json)")
    if not oname.startswith("--"):
        return "give --out a shorter name (this file is named after it)"
    return f"give {oname} a shorter name"


def check_suffix(path: str | os.PathLike, suffixes: Iterable[str], what: str, option: str = "--out") -> Path:
    path = Path(path)
    suffixes = tuple(suffixes)
    if not path.name or path.name in (".", ".."):
        raise OutputError(f"{option} {str(path)!r} names no file; give a file name like model{suffixes[0]}")
    if path.suffix.lower() not in suffixes:
        raise OutputError(f"{option} {path}: {what} files end in {' or '.join(suffixes)}; "
                          f"e.g. {path.with_suffix(suffixes[0]).name}")
    return path


class Staging:
    """New artifacts are written into a private folder beside their final place, under their final
    names (so suffix-based readers and sidecars work there), verified, and only then moved into place.
    Leaving the block without commit() removes everything staged: the old artifacts stay untouched.

        with Staging(out.parent) as stage:
            tmp = stage.path(out)        # write here
            ...verify tmp...
            stage.commit()               # os.replace each staged file onto its final path
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.dir: Path | None = None
        self.finals: dict[Path, Path] = {}  # staged -> final

    def __enter__(self) -> "Staging":
        self.created: list[Path] = []
        try:
            self.created = make_dirs(self.folder)
            clean_stale(self.folder)
            self.dir = Path(tempfile.mkdtemp(prefix=f".vfpt-stage-{os.getpid()}-", dir=self.folder))
        except OSError as e:
            remove_new_dirs(self.created)
            raise OutputError(f"cannot write in {self.folder} ({e.strerror}); choose a writable output folder") from None
        return self

    def path(self, final: str | os.PathLike) -> Path:
        """Where to write the file that will become `final` (same name, so same suffix)."""
        final = Path(final)
        staged = self.dir / final.name
        if staged in self.finals and self.finals[staged] != final:
            raise OutputError(f"two outputs are named {final.name}; give them different names")
        self.finals[staged] = final
        return staged

    def commit(self) -> list[Path]:
        """Move every staged file that exists onto its final path (same file system: atomic renames)."""
        done = []
        mode = umask_mode()
        for staged, final in self.finals.items():
            if staged.is_file():
                final.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(staged, mode)
                os.replace(staged, final)
                done.append(final)
        return done

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        if exc is not None:
            remove_new_dirs(self.created)  # a failed command leaves no new empty folder
            err = None if isinstance(exc, (KeyboardInterrupt, SystemExit, VFPTError)) else write_failure(exc, self.folder)
            if err is not None:
                raise err from None


# -- signals -----------------------------------------------------------------------------------------
def sigterm_as_interrupt() -> None:
    """SIGTERM raises KeyboardInterrupt, like SIGINT, so `finally` blocks remove temporary files."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    with contextlib.suppress(ValueError):  # only the main thread may set handlers
        signal.signal(signal.SIGTERM, handler)

