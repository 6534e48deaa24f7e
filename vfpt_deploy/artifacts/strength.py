"""What a verification report vouches for, and how strongly: on which data (each data set by name, with how
many inputs), under which tolerances, against which checkpoint. `verify` writes its report beside the
artifact (NAME.verify.json) only when it is at least as strong as the one already there (`weaker_in`);
`triton`, `inspect` and `serve` say what that report covers and flag tolerances looser than the precision's
default (`summary`). Torch-free.

Reports written before these fields existed (no `data`, `limits`, `checkpoint_sha256`) are read in their
weakest plausible form, and `assumed` says so: their data sets come from their comparisons' names and sizes
(exact: every comparison names its inputs), their tolerances count as loosened unless their text is the
precision's default gate, and their checkpoint as unknown.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from vfpt_deploy.artifacts.compare import Tolerances
from vfpt_deploy.artifacts.files import file_sha256, read_json, regular_file
from vfpt_deploy.artifacts.schema import report_path
from vfpt_deploy.errors import InputError, UsageError

RANDOM_SET = "random N(0,1)"
MAX_REPORT_BYTES = 16 * 2**20  # a report is a few kB; a larger file is not read
GOLDEN_PREFIX = "golden: "  # comparisons of the artifact's own golden set (every report of it has the same)
# per limit: its name, the comparison, and whether a larger value is tighter (None: a switch, on is tighter)
_LIMITS = {"atol": ("max |diff|", "<=", False), "rtol": ("max rel diff", "<=", False),
           "min_cosine": ("min cosine", ">=", True), "min_agreement": ("top-1 agreement", ">=", True),
           "max_top1_drop": ("dataset top-1 drop", "<=", False), "topk_order": ("top-5 order", "kept", None),
           "gate_random": ("random inputs", "gated", None)}


@dataclass
class Strength:
    """data: data set -> inputs compared ('builtin digits-shifted val', 'folder imgs', 'random N(0,1)'; with
    several tasks 'task NAME: ...'). limits: the tolerances, None where the report did not record them.
    checkpoints: the checkpoint sha256s (one per task), None where not recorded. assumed: what was not
    recorded and was taken in its weakest form."""

    data: dict[str, int]
    limits: Tolerances | None
    checkpoints: tuple[str, ...] | None
    precision: str
    assumed: list[str] = field(default_factory=list)


def set_name(inputs: str) -> str:
    """A comparison's inputs ('builtin digits-shifted val: 397 images', 'task a: random N(0,1) x16') -> the
    data set's name without its count ('builtin digits-shifted val', 'task a: random N(0,1)')."""
    return re.sub(r"(: \d+ images| x\d+)$", "", str(inputs))


def data_record(what: str, samples: int, random: bool, task: str | None = None) -> dict:
    """One entry of a report's `data`: the set's name (with its task), inputs compared, random or images."""
    name = set_name(what)
    if task is not None and not name.startswith(f"task {task}: "):
        name = f"task {task}: {name}"
    return {"set": name, "samples": int(samples), "random": bool(random)}


def limits_of(precision: str, recorded) -> tuple[Tolerances | None, str | None]:
    """A report's tolerances from its `limits` dict (or, for an older report, its text when that is exactly
    the precision's default gate); (None, why) when unknown."""
    if isinstance(recorded, dict):
        names = {f.name for f in dataclasses.fields(Tolerances)}
        try:
            return Tolerances(**{k: v for k, v in recorded.items() if k in names}), None
        except (UsageError, TypeError):
            return None, "its recorded limits are not valid tolerances"
    return None, "it does not record its limits"


def strength_of(report: dict) -> Strength:
    """The strength of a report read from JSON (this version's, or an older one's weakest plausible form)."""
    precision = str(report.get("precision") or "fp32")
    assumed = []
    data: dict[str, int] = {}
    if isinstance(report.get("data"), list):
        entries = [d for d in report["data"] if isinstance(d, dict)]
    else:
        comparisons = report.get("comparisons") if isinstance(report.get("comparisons"), list) else []
        entries = [{"set": set_name(c.get("inputs", "")), "samples": c.get("samples")}
                   for c in comparisons if isinstance(c, dict)
                   and not str(c.get("inputs", "")).startswith(GOLDEN_PREFIX)]
    for d in entries:
        n = d.get("samples")
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            data[str(d.get("set"))] = data.get(str(d.get("set")), 0) + n
    limits, why = limits_of(precision, report.get("limits"))
    if limits is None:
        if report.get("tolerances") == Tolerances.for_precision(precision).describe():
            limits = Tolerances.for_precision(precision)  # an older report whose gate text is exactly the default's
        else:
            assumed.append(f"{why}: its tolerances are taken as loosened")
    ckpts = report.get("checkpoint_sha256")
    if isinstance(ckpts, list) and ckpts and all(isinstance(c, str) and c for c in ckpts):
        checkpoints = tuple(ckpts)
    else:
        checkpoints = None
        assumed.append("it does not record the checkpoint's sha256")
    return Strength(data, limits, checkpoints, precision, assumed)


def _fmt(name: str, value) -> str:
    words, op, larger = _LIMITS[name]
    if larger is None:
        return f"{words} {op}" if value else f"{words} not {'checked' if op == 'kept' else op}"
    if value is None:
        return f"{words} not gated"
    return f"{words} {op} {value:g}{'%' if name == 'min_agreement' else ''}"


def looser_limits(tol: Tolerances, than: Tolerances) -> list[str]:
    """The limits of `tol` looser than `than`'s, each as 'top-1 agreement >= 96% (vs >= 100%)'.
    Lower atol / rtol / max_top1_drop and higher min_cosine / min_agreement are tighter; an ungated limit
    (None) is looser than any value; topk_order and gate_random on are tighter than off."""
    out = []
    for name, (_, _, larger) in _LIMITS.items():
        a, b = getattr(tol, name), getattr(than, name)
        if larger is None:
            looser = bool(b) and not a
        else:
            looser = b is not None and (a is None or (a < b if larger else a > b))
        if looser:
            out.append(f"{_fmt(name, a)} (vs {_fmt(name, b).removeprefix(_LIMITS[name][0] + ' ')})")
    return out


def weaker_in(new: Strength, old: Strength) -> list[str]:
    """Why the report `new` is NOT at least as strong as `old` about the same artifact (empty: it is, and may
    replace it).

    Strength, explicitly:
      1. data: each data set (its identity: the built-in split, folder or files, per task; random N(0,1)
         inputs are one set per task) with the number of inputs compared. `new` must have every set of `old`
         with at least as many inputs (more sets, or more inputs, are stronger; another folder is not the same).
      2. tolerances: every limit the same or tighter (looser_limits). Limits an old report did not record
         count as the loosest plausible, so any recorded ones are at least as tight.
      3. checkpoint: the same checkpoint sha256s (an old report that did not record them: any).
    """
    why = []
    for name, n in old.data.items():
        have = new.data.get(name, 0)
        if have < n:
            why.append(f"it has {have} of the {n} inputs of {name}" if have else f"it lacks {name} ({n} inputs)")
    if new.limits is None and old.limits is not None:
        why.append("its tolerances are not recorded")
    elif new.limits is not None and old.limits is not None:
        why += [f"looser {s}" for s in looser_limits(new.limits, old.limits)]
    if old.checkpoints is not None and new.checkpoints != old.checkpoints:
        why.append("it was verified against another checkpoint")
    return why


def describe_data(s: Strength) -> str:
    """'397 images of builtin digits-shifted val + 16 random N(0,1) inputs' (random inputs only: said so)."""
    if not s.data:
        return "no inputs recorded"

    def say(name: str, n: int) -> str:  # 'task a: 397 images of builtin digits val'
        task, _, rest = name.partition(": ") if name.startswith("task ") else ("", "", name)
        return (f"{task}: " if task else "") + (f"{n} {rest} inputs" if rest == RANDOM_SET else f"{n} images of {rest}")

    real = [say(k, n) for k, n in s.data.items() if not k.endswith(RANDOM_SET)]
    rand = [say(k, n) for k, n in s.data.items() if k.endswith(RANDOM_SET)]
    return " + ".join(real + rand) + ("" if real else " only (no real images)")


def summary(report: dict) -> dict:
    """What a passing-or-not report says about its data and tolerances, for triton / inspect / serve:
    data (text), tolerances (text), loosened (the limits looser than the precision's default; None when
    unknown, which counts as loosened), assumed, and `line`: one line saying all that."""
    s = strength_of(report)
    default = Tolerances.for_precision(s.precision)
    loosened = looser_limits(s.limits, default) if s.limits is not None else None
    tol_text = str(report.get("tolerances") or "not recorded")
    if loosened is None:
        why = limits_of(s.precision, report.get("limits"))[1]
        tol = f"tolerances LOOSENED or unknown ({why}, and its text is not the {s.precision} default): {tol_text}"
    elif loosened:
        tol = f"tolerances LOOSENED from the {s.precision} default: {'; '.join(loosened)}"
    else:
        tol = f"the {s.precision} default tolerances" + ("" if s.limits == default else " or tighter")
    return {"data": describe_data(s), "tolerances": tol_text, "loosened": loosened, "assumed": s.assumed,
            "random_only": bool(s.data) and all(k.endswith(RANDOM_SET) for k in s.data),
            "line": f"on {describe_data(s)}; {tol}"}


def destination(path, report) -> Path:
    """Where `report` (a VerifyReport) goes when `path` is the report beside its artifact: `path`, or, when a
    passing report there about the same file is stronger (keep_existing), NAME.weaker.json beside it, with a
    note in the report saying so in one line. A failed report is left to VerifyReport.write (.failed.json)."""
    path = Path(path)
    if not report.passed or not path.exists():
        return path
    note = keep_existing(path, json.loads(report.to_json()))
    if note is None:
        return path
    weaker = path.with_name(path.name.removesuffix(".json") + ".weaker.json")
    report.notes.append(f"{note}; this one is {weaker.name}")
    return weaker


def keep_existing(path, new: dict) -> str | None:
    """One line when the passing report at `path`, about the same file as `new`, must stay because `new` is
    not at least as strong (weaker_in); None when `new` may replace it (nothing readable there, a failed report,
    or one about another file: those vouch for nothing about this one)."""
    try:
        path = Path(path)
        if path.stat().st_size > MAX_REPORT_BYTES:
            return None
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(old, dict) or old.get("passed") is not True:
        return None
    if old.get("artifact_sha256") != new.get("artifact_sha256"):  # about another file
        return None
    why = weaker_in(strength_of(new), strength_of(old))
    if not why:
        return None
    more = f" and {len(why) - 3} more" if len(why) > 3 else ""
    return (f"kept {path.name} (verified {summary(old)['data']}): this report is not as strong "
            f"({'; '.join(why[:3])}{more})")


def read_beside(artifact, sha256: str) -> tuple[str, dict | None, bool | None]:
    """The report beside `artifact` (NAME.verify.json): (state, its JSON or None, whether it records this
    sha256 (None: records none)). state: passed, failed, missing, stale (about another file), unhashed
    (written before reports recorded the file's sha256), unreadable."""
    rep = report_path(artifact)
    if not regular_file(rep):  # also when NAME.verify.json is a name too long to exist
        return "missing", None, None
    try:
        if rep.stat().st_size > MAX_REPORT_BYTES:
            raise InputError("too large")
        data = read_json(rep, "report", "run verify again")
    except (InputError, OSError):
        return "unreadable", None, None
    if not isinstance(data, dict):
        return "unreadable", None, None
    recorded = data.get("artifact_sha256")
    matches = recorded == sha256 if isinstance(recorded, str) and recorded else None
    passed = data.get("passed") is True
    state = "failed" if not passed else "unhashed" if matches is None else "passed" if matches else "stale"
    return state, data, matches


def serving_line(artifact, verify_cmd: str = "vfpt-deploy verify ARTIFACT --ckpt RUN.pt") -> str:
    """One line for `serve` as it opens an artifact: which data and tolerances its report beside it vouches
    with, LOOSENED where they are looser than the precision's default, or why there is no such report."""
    name = report_path(artifact).name
    state, data, _ = read_beside(artifact, file_sha256(artifact))
    if state in ("passed", "unhashed"):
        s = summary(data)
        head = "verified" if s["loosened"] == [] else "verified with LOOSENED tolerances"
        unhashed = "" if state == "passed" else ", but the report does not record the file's sha256"
        return f"{head} ({name}{unhashed}) {s['line']}"
    return {"missing": f"NOT verified: no {name} beside it (run '{verify_cmd}')",
            "failed": f"its verification FAILED ({name})",
            "stale": f"NOT verified: {name} is about another file (sha256 differs)",
            "unreadable": f"NOT verified: {name} is unreadable"}[state]
