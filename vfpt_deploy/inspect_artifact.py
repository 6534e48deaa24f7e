"""What an artifact holds, read without running it (Polygraphy's `inspect model`, for vfpt-deploy files).

  run.pt        task, classes, preprocessing, VFPT config, backbone identity, tuned/total parameters,
                provenance. Read with torch.load(weights_only=True) and checked like any load, but no
                backbone weights are needed: sizes come from a meta-device skeleton.
  .onnx         vfpt metadata, producer, opsets, inputs/outputs (symbolic dims by name), op histogram,
                initializers, external data files. The graph is read without its external weights.
  .engine/.plan the JSON sidecar (TensorRT flavour and version, GPU, profile, precision, build settings)
                and whether the engine file still has the sha256 the sidecar records. The engine is
                never deserialized (that needs its TensorRT and a GPU).

A multi-task ONNX or engine (metadata `tasks`) shows, instead of one class list, its tasks in index
order (name, classes, fold, prompt count M, source checkpoint), the `task` input that picks one per image,
and the logits width: the widest task's, padded with -inf past a task's own classes (the runtime trims).

Every kind also gets its file sha256 and what its verification report (NAME.verify.json) says about this
very file. The result is a plain dict of JSON values (strict: `files.dumps_json` prints it) and
`summary_rows` turns it into the rows a table shows.

Torch-free for ONNX and engines: torch is imported only to read a run.pt.
"""
from __future__ import annotations

import math
import os
from pathlib import Path, PurePosixPath

from vfpt_deploy.errors import ArtifactError, UsageError, VFPTError
from vfpt_deploy.artifacts import strength
from vfpt_deploy.artifacts.files import file_sha256, not_a_file, regular_file
from vfpt_deploy.text import printable as _printable
from vfpt_deploy.artifacts.pack import (BACKBONE_KEY, IDENTITY_KEY, PACK_SUFFIX, backbone_geometry, fits_line,
                                        read_pack)
from vfpt_deploy.artifacts.schema import (INPUT_NAME, ONNX_SUFFIXES, OUTPUT_NAME, TASK_INPUT, check_metadata, graph_facts,
                     graph_problems, is_engine,
                     load_onnx, op_histogram, output_classes, report_path, sidecar_path)

TASK = "classification"
MAX_DEPTH = 32  # nesting kept from values a file supplies; deeper parts are shown as text
_ONNX_DTYPES = {"FLOAT": "float32", "DOUBLE": "float64", "FLOAT16": "float16", "BFLOAT16": "bfloat16"}
PADDING = "-inf past a task's own classes; the runtime trims them"
SHOWN_CLASSES = 5  # class names per task in the table (--json has them all)


def inspect_artifact(path: str | os.PathLike, *, backbone_weights: str | None = None) -> dict:
    """Inspect a run.pt, an ONNX file or a TensorRT engine (chosen by suffix; a .pt/.pth or any zip file
    is read as a run.pt). backbone_weights: also check these weights against a run.pt's recorded hash."""
    path = Path(path)
    if not path.name or path.name in (".", ".."):
        raise UsageError(f"{str(path)!r} names no file; pass a run.pt, an .onnx or an .engine/.plan")
    if os.path.exists(path) and not regular_file(path) and not path.is_dir():  # a FIFO: never opened (it blocks)
        _existing(path, "file", "pass a run.pt, an .onnx, an .engine/.plan or a .pack.safetensors")
    if is_engine(path):
        return inspect_engine(path)
    if path.suffix.lower() in ONNX_SUFFIXES:
        return inspect_onnx(path)
    if path.suffix.lower() == PACK_SUFFIX:
        return inspect_pack(path)
    if path.suffix.lower() in (".pt", ".pth") or not regular_file(path) or _is_zip(path):
        return inspect_run(path, backbone_weights=backbone_weights)
    raise ArtifactError(f"{path}: not a file vfpt-deploy knows by its suffix; inspect reads a run.pt (.pt/.pth), "
                        "an ONNX model (.onnx), a TensorRT engine (.engine/.plan) or a prompt pack (.safetensors)")


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"  # torch.save's format


def _existing(path: Path, what: str, fix: str) -> None:
    if not regular_file(path):
        raise ArtifactError(f"{what} {path} {not_a_file(path, fix)}")


# -- values taken from files -------------------------------------------------------------------------
def plain(value, depth: int = 0):
    """A file-supplied value as plain JSON data: dicts (string keys), lists, strings, finite numbers,
    booleans, None. Anything else (a tensor in a crafted run.pt meta) becomes a short tag; nesting deeper
    than MAX_DEPTH becomes text, so printing never recurses without bound."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth >= MAX_DEPTH:
        return "<nested too deeply to show>"
    if isinstance(value, dict):
        return {str(k): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, depth + 1) for v in value]
    return f"<{type(value).__name__}>"


def _model_facts(meta: dict) -> dict:
    """The fields every kind shows the same way, from checked metadata. A multi-task artifact has `tasks`
    and `logits` instead of `num_classes` and `classes`."""
    pre = meta["preprocess"]
    pre = pre.to_dict() if hasattr(pre, "to_dict") else pre
    if "tasks" not in meta:
        return {"task": TASK, "num_classes": len(meta["classes"]), "classes": list(meta["classes"]), "preprocess": pre}
    tasks = [_task_facts(i, t) for i, t in enumerate(meta["tasks"])]
    width = output_classes(meta)
    return {"task": TASK, "tasks": tasks, "preprocess": pre,
            "task_input": {"name": TASK_INPUT, "dtype": "int64", "shape": ["batch"],
                           "meaning": "the task index of each image (tasks[i].index)"},
            "logits": {"name": OUTPUT_NAME, "width": width,
                       "widest_task": next(t["name"] for t in tasks if t["num_classes"] == width), "padding": PADDING}}


def _task_facts(index: int, task: dict) -> dict:
    """One task of a (checked: name, classes) multi-task artifact; the other fields are only shown."""
    cfg = _vfpt_config(task)
    prompts = task.get("num_prompts", cfg["num_prompts"] if cfg else None)
    return {"index": index, "name": task["name"], "num_classes": len(task["classes"]), "classes": list(task["classes"]),
            "fold": plain(task.get("fold")), "num_prompts": plain(prompts), "deep": cfg["deep"] if cfg else None,
            "checkpoint": plain(task.get("checkpoint")), "checkpoint_sha256": plain(task.get("checkpoint_sha256")),
            "config": cfg or plain(task.get("config"))}


_SHOWN_APART = ("classes", "preprocess", "tasks")  # metadata shown by _model_facts, not again in vfpt_metadata


def _shown_metadata(meta: dict) -> dict:
    """The vfpt metadata to show: a golden set as its summary (sets, size, reference machine), not its data."""
    from vfpt_deploy.artifacts.golden import KEY, summary

    return plain({k: (summary(meta) if k == KEY else v) for k, v in meta.items() if k not in _SHOWN_APART})


# -- verification reports ------------------------------------------------------------------------------
def verification(artifact: Path, sha256: str) -> dict:
    """What NAME.verify.json says, and whether it speaks about this very file (its artifact_sha256).
    state: passed, failed, missing, stale (about another file), unhashed (written before reports
    recorded the file's sha256), unreadable. data / loosened / covers: what it was verified on and with
    (artifacts/strength.py)."""
    state, data, matches = strength.read_beside(artifact, sha256)
    out = {"report": report_path(artifact).name, "state": state, "passed": False, "sha256_matches": matches}
    if data is None:
        return out
    covers = plain(strength.summary(data))
    return {**out, "passed": data.get("passed") is True,
            "tolerances": plain(data.get("tolerances")), "backend": plain(data.get("backend")),
            "data": covers["data"], "loosened": covers["loosened"], "assumed": covers["assumed"],
            "random_only": covers["random_only"], "covers": covers["line"]}


# -- ONNX ------------------------------------------------------------------------------------------------
def onnx_dtype(elem_type: int) -> str:
    """An ONNX tensor element type as a numpy-style name: FLOAT -> float32, FLOAT16 -> float16, INT64 -> int64."""
    from onnx import TensorProto

    try:
        name = TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"unknown({elem_type})"
    return _ONNX_DTYPES.get(name, name.lower())


def _value_info(vi) -> dict:
    """name, dtype and shape of a graph input/output; a symbolic dim by its name, an unknown one as '?'."""
    if vi.type.WhichOneof("value") != "tensor_type":
        return {"name": vi.name, "dtype": vi.type.WhichOneof("value") or "unknown", "shape": None}
    t = vi.type.tensor_type
    shape = None
    if t.HasField("shape"):
        shape = [d.dim_value if d.WhichOneof("value") == "dim_value" else d.dim_param or "?" for d in t.shape.dim]
    return {"name": vi.name, "dtype": onnx_dtype(t.elem_type), "shape": shape}


def external_locations(model, folder: Path) -> dict[str, dict]:
    """External-data files the initializers name, by location: tensors and bytes each holds. A location
    that leaves the model's folder (absolute, '..', or a link out of it) is refused."""
    from onnx import TensorProto

    files: dict[str, dict] = {}
    base = folder.resolve()
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in t.external_data}
        loc = entries.get("location", "")
        parts = PurePosixPath(loc.replace("\\", "/")).parts
        inside = (base / loc).resolve().is_relative_to(base) if loc else False
        if not loc or PurePosixPath(loc).is_absolute() or ".." in parts or os.path.isabs(loc) or not inside:
            raise ArtifactError(f"{folder}: tensor {t.name[:60]!r} keeps its data at {loc[:120]!r}, outside the "
                                "model's folder; refused (re-export the model)")
        f = files.setdefault(loc, {"file": loc, "tensors": 0, "bytes": 0})
        f["tensors"] += 1
        f["bytes"] += _tensor_bytes(t, entries)
    for loc, f in files.items():
        p = folder / loc
        f["present"] = p.is_file()
        f["size"] = p.stat().st_size if f["present"] else None
    return files


def _is_external(t) -> bool:
    from onnx import TensorProto

    return t.data_location == TensorProto.EXTERNAL


def _tensor_bytes(t, entries: dict | None = None) -> int:
    """A tensor's data size: its external 'length', its raw bytes, or shape x element size."""
    length = (entries or {}).get("length", "")
    if length.isdigit():
        return int(length)
    if t.raw_data:
        return len(t.raw_data)
    try:
        from onnx.helper import tensor_dtype_to_np_dtype

        itemsize = tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 0
    return max(0, math.prod(t.dims)) * itemsize


def onnx_metadata(meta: dict, inputs: list[dict], path: Path) -> dict | None:
    """The checked vfpt metadata of an ONNX file, or None when it carries none (made elsewhere).
    Metadata that is there but unusable is an ArtifactError, as the runtime would refuse it."""
    if not meta or BACKBONE_KEY in meta:  # a backbone artifact for prompt packs: its own row (_onnx_rows)
        return None
    images = [i for i in inputs if i["name"] == INPUT_NAME] if "tasks" in meta else inputs  # beside `task`
    shape = images[0]["shape"] if len(images) == 1 else None
    return check_metadata(meta, str(path), shape if shape and len(shape) == 4 else None)


def inspect_onnx(path: str | os.PathLike) -> dict:
    path = Path(path)
    _existing(path, "ONNX model", "pass an exported .onnx")
    model = load_onnx(path)
    g, facts = model.graph, graph_facts(model)
    init_names = {t.name for t in g.initializer}
    inputs = [_value_info(i) for i in g.input if i.name not in init_names]
    checked = onnx_metadata(facts.metadata, inputs, path)
    width = [o.type.tensor_type.shape.dim[-1].dim_value or None for o in g.output
             if o.name == OUTPUT_NAME and o.type.tensor_type.shape.dim]
    problems = graph_problems(facts, checked, [i["name"] for i in inputs], width[0] if width else None) \
        if checked else [f"metadata key {k!r} is given {n} times" for k, n in facts.duplicate_keys]
    ops = op_histogram(model)
    sha = file_sha256(path)
    out = {"kind": "onnx", "path": str(path), "bytes": path.stat().st_size, "sha256": sha,
           **(_model_facts(checked) if checked else {"task": None}),
           "vfpt_metadata": _shown_metadata(facts.metadata),
           "precision": {"metadata": checked["precision"] if checked else None, "graph": facts.precision},
           "producer": {"name": model.producer_name, "version": model.producer_version},
           "ir_version": model.ir_version,
           "opsets": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
           "inputs": inputs, "outputs": [_value_info(o) for o in g.output],
           "nodes": sum(ops.values()), "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
           "initializers": {"count": len(g.initializer),
                            "bytes": sum(_tensor_bytes(t) for t in g.initializer if not _is_external(t))},
           "external_data": list(external_locations(model, path.parent).values()),
           "verification": verification(path, sha),
           "problems": problems}  # metadata that contradicts the graph: the runtime refuses the file
    if BACKBONE_KEY in facts.metadata:
        out["pack_backbone"] = backbone_geometry(facts.metadata, str(path))
    if "tasks" in out:  # the runtime refuses a multi-task file whose graph lacks the `task` input
        out["task_input"]["in_graph"] = any(i["name"] == TASK_INPUT for i in inputs)
    return out


# -- prompt packs ---------------------------------------------------------------------------------------
def inspect_pack(path: str | os.PathLike) -> dict:
    """A prompt pack (artifacts/pack.py), read and checked as the runtime reads it."""
    from vfpt_deploy.artifacts.golden import summary

    path = Path(path)
    pack = read_pack(path)
    t, meta = pack.tables, pack.metadata
    sha = file_sha256(path)
    return {"kind": "pack", "path": str(path), "bytes": path.stat().st_size, "sha256": sha, "name": pack.name,
            "classes": pack.classes, "fold": t.fold, "num_prompts": meta.get("num_prompts"),
            "tables": {k: list(v.shape) for k, v in t.arrays().items()}, "table_bytes": t.nbytes,
            "preprocess": pack.preprocess.to_dict(), "backbone_artifact_sha256": meta["backbone_artifact_sha256"],
            "backbone": plain(meta.get("backbone")), "checkpoint_sha256": plain(meta.get("checkpoint_sha256")),
            "backbone_identity": plain(meta.get(IDENTITY_KEY)), "runs_on": fits_line(meta),
            "golden": summary(meta), "verification": verification(path, sha)}


def _pack_rows(info: dict) -> list[tuple[str, str]]:
    classes = info["classes"]
    shown = ", ".join(classes[:SHOWN_CLASSES]) + (" ..." if len(classes) > SHOWN_CLASSES else "")
    golden = info["golden"]
    return [("kind", "prompt pack (run it on its backbone artifact: predict B.onnx IMG --pack FILE)"),
            ("task", info["name"]), ("classes", f"{len(classes)}: {shown}"),
            ("fold / prompts", f"{info['fold']} / {info['num_prompts']}"),
            ("tables", "; ".join(f"{k} {v}" for k, v in info["tables"].items()) + f" ({_mib(info['table_bytes'])})"),
            ("backbone artifact sha256", info["backbone_artifact_sha256"]), ("runs on", info["runs_on"]),
            ("golden set", "none" if not golden else f"{len(golden['sets'])} sets, {golden['bytes']} bytes")]


# -- TensorRT engines -----------------------------------------------------------------------------------
def inspect_engine(path: str | os.PathLike) -> dict:
    """The engine's sidecar, checked as the runtime checks it, and the engine file's sha256 against it."""
    from vfpt_deploy.artifacts.schema import read_sidecar

    path = Path(path)
    side = read_sidecar(path)
    sha = file_sha256(path)
    meta = check_metadata(side["metadata"], str(sidecar_path(path)), side["profile"]["max"])
    src = side.get("onnx") if isinstance(side.get("onnx"), dict) else {}
    src_name = src.get("file") if isinstance(src.get("file"), str) else None
    src_path = path.parent / src_name if src_name and Path(src_name).name == src_name else None
    source = {"file": src_name, "sha256": plain(src.get("sha256")),
              "present": bool(src_path and src_path.is_file()),
              "sha256_matches": (file_sha256(src_path) == src.get("sha256")) if src_path and src_path.is_file() else None}
    return {"kind": "engine", "path": str(path), "bytes": path.stat().st_size, "sha256": sha,
            "sha256_matches_sidecar": sha == side["engine"]["sha256"], "sidecar": sidecar_path(path).name,
            **_model_facts(meta),
            "vfpt_metadata": _shown_metadata(side["metadata"]),
            "precision": meta["precision"], "tensorrt": plain(side["tensorrt"]), "gpu": plain(side.get("gpu")),
            "profile": plain(side["profile"]), "build": plain(side["build"]), "source_onnx": source,
            "tool_version": plain(side.get("tool_version")), "created": plain(side.get("created")),
            "verification": verification(path, sha), "problems": []}  # the sidecar's are refused (check_sidecar)


# -- run.pt ------------------------------------------------------------------------------------------------
def inspect_run(path: str | os.PathLike, *, backbone_weights: str | None = None) -> dict:
    """A run.pt, checked as a load checks it (every field and tensor), without its backbone weights:
    parameter counts come from a meta-device skeleton. backbone_weights: also load with these weights,
    which checks them against the recorded hash. A run.pt that carries its backbone is read torch-free
    (artifacts/run_reader.py: no torch, no timm, no model); anything else, or anything odd, takes this path."""
    if backbone_weights is None:
        from vfpt_deploy.artifacts.run_reader import read_run_facts

        fast = read_run_facts(path)
        if fast is not None:
            return _run_info(Path(path), fast)
    from vfpt_deploy.models.backbone import state_sha256
    from vfpt_deploy.artifacts.checkpoint import check_run, load_run, parse_run, read_run_dict

    path = Path(path)
    parts = parse_run(read_run_dict(path), path)
    skeleton = check_run(parts, path)
    tuned = sum(t.numel() for t in parts.tuned.values())
    frozen = sum(p.numel() for p in skeleton.parameters())
    checked = "weights not checked (pass --backbone FILE to check them against it)"
    if parts.state is not None:
        stored = state_sha256(parts.state)
        checked = ("matches the stored weights" if not parts.info.sha256 or stored == parts.info.sha256 else
                   f"DOES NOT match the stored weights ({stored[:12]}): the file was altered")
    elif backbone_weights is not None:
        load_run(path, backbone_weights=backbone_weights)  # refuses weights with another hash, in one line
        checked = f"matches {backbone_weights}"
    bb = parts.info
    return {"kind": "run", "path": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path),
            **_model_facts({"classes": parts.classes, "preprocess": parts.preprocess}),
            "image_size": list(parts.preprocess.size),
            "vfpt": {**parts.config.to_dict(), "num_fourier": parts.config.num_fourier},
            "backbone": {"name": bb.name, "kwargs": plain(bb.kwargs), "source": bb.source, "sha256": bb.sha256,
                         "included": parts.state is not None, "hash_check": checked},
            "parameters": {"tuned": tuned, "frozen": frozen, "total": tuned + frozen},
            "provenance": plain(parts.meta), "problems": []}  # a run.pt's are refused (check_run)


def _run_info(path: Path, facts: dict) -> dict:
    """inspect_run's answer from run_reader.read_run_facts (the torch-free read)."""
    bb, config, pre = facts["backbone"], facts["config"], facts["preprocess"]
    checked = ("matches the stored weights" if not bb["sha256"] or bb["stored_sha256"] == bb["sha256"] else
               f"DOES NOT match the stored weights ({bb['stored_sha256'][:12]}): the file was altered")
    return {"kind": "run", "path": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path),
            **_model_facts({"classes": facts["classes"], "preprocess": pre}),
            "image_size": list(pre.size),
            "vfpt": {**config.to_dict(), "num_fourier": config.num_fourier},
            "backbone": {"name": bb["name"], "kwargs": plain(bb["kwargs"]), "source": bb["source"],
                         "sha256": bb["sha256"], "included": True, "hash_check": checked},
            "parameters": {"tuned": facts["tuned"], "frozen": facts["frozen"], "total": facts["tuned"] + facts["frozen"]},
            "provenance": plain(facts["meta"]), "problems": []}


# -- rows for a table ----------------------------------------------------------------------------------------
def printable(v, limit: int = 300) -> str:
    """One cell: JSON for structures, printable characters only (a crafted name cannot move the cursor)."""
    return _printable(v, limit)


def _shape(t: dict) -> str:
    dims = "?" if t["shape"] is None else "[" + ", ".join(map(str, t["shape"])) + "]"
    return f"{t['dtype']} {dims}"


def prompts_text(cfg: dict) -> str:
    return (f"M={cfg['num_prompts']} {'deep' if cfg['deep'] else 'shallow'}, alpha={cfg['alpha']} "
            f"(m={cfg['num_fourier']} Fourier), location={cfg['location']}, project={cfg['project']}, "
            f"dropout={cfg['dropout']}")


def _vfpt_config(meta: dict) -> dict | None:
    """An artifact's recorded VFPT config with num_fourier, when it is a valid one."""
    from vfpt_deploy.models.config import VFPTConfig

    try:
        cfg = VFPTConfig.from_dict(meta.get("config"))
    except (VFPTError, TypeError):
        return None
    return {**cfg.to_dict(), "num_fourier": cfg.num_fourier}


def _common_rows(info: dict) -> list[tuple[str, str]]:
    p = info["preprocess"]
    pre = ("preprocess", f"resize {p['resize']}, crop {p['crop']}, mean {p['mean']}, std {p['std']}, {p['interpolation']}")
    if "tasks" in info:
        return _task_rows(info) + [pre]
    classes = info["classes"]
    shown = ", ".join(classes[:10]) + (" ..." if len(classes) > 10 else "")
    return [("task", f"{info['task']}, {info['num_classes']} classes"), ("classes", shown), pre]


def _task_rows(info: dict) -> list[tuple[str, str]]:
    """A multi-task artifact: one row per task, then what the `task` input and the padded logits mean."""
    tasks, logits = info["tasks"], info["logits"]
    rows = [("task", f"{info['task']}, {len(tasks)} task{'s' if len(tasks) != 1 else ''} on one backbone (predict --task NAME picks one)")]
    for t in tasks:
        names = ", ".join(t["classes"][:SHOWN_CLASSES]) + (", ..." if t["num_classes"] > SHOWN_CLASSES else "")
        m = "?" if t["num_prompts"] is None else printable(t["num_prompts"])
        depth = "" if t["deep"] is None else " deep" if t["deep"] else " shallow"
        sha = t["checkpoint_sha256"] if isinstance(t["checkpoint_sha256"], str) and t["checkpoint_sha256"] else "?"
        rows.append((f"task {t['index']}: {t['name']}",
                     f"{t['num_classes']} classes ({names}); fold {printable(t['fold'] or '?')}; M={m}{depth}; "
                     f"from {printable(t['checkpoint'] or '?')} (sha256 {printable(sha[:12])})"))
    index = ", ".join(f"{t['index']} = {t['name']}" for t in tasks)
    missing = info["task_input"].get("in_graph") is False
    rows += [("task input", f"{TASK_INPUT}: int64 [batch], the task of each image by index ({index})" + (
                 "; MISSING from the graph: the runtime refuses this file, re-export it" if missing else "")),
             ("logits", f"{logits['width']} wide, the widest task's ({logits['widest_task']}); {PADDING}")]
    return rows


def _verification_row(v: dict) -> tuple[str, str]:
    words = {"passed": "passed, and the report is about this very file (same sha256)",
             "failed": "FAILED (see the report)", "missing": "no report: run 'vfpt-deploy verify'",
             "stale": "the report is about another file (sha256 differs): verify again",
             "unhashed": "passed, but the report does not record the file's sha256: verify again",
             "unreadable": "the report is unreadable: verify again"}
    return "verification", f"{words[v['state']]} ({v['report']})" + (f"; {v['covers']}" if v.get("covers") else "")


def _artifact_rows(info: dict) -> list[tuple[str, str]]:
    meta = info["vfpt_metadata"]
    cfg = _vfpt_config(meta)
    bb = meta.get("backbone") if isinstance(meta.get("backbone"), dict) else {}
    multi = "tasks" in info  # prompts and source checkpoint are per task (the task rows)
    rows = [("fold", printable(meta.get("fold", "?")) + (" (each task's: see the task rows)" if multi else ""))]
    if cfg and not multi:
        rows.append(("prompts", prompts_text(cfg)))
    if bb:
        rows.append(("backbone", f"{printable(bb.get('name', '?'))} {printable(bb.get('kwargs', {}))}"))
    if not multi:
        rows.append(("source checkpoint", f"{printable(meta.get('checkpoint', '?'))} sha256 {printable(meta.get('checkpoint_sha256', '?'))}"))
    rows.append(("written by", f"vfpt-deploy {printable(meta.get('tool_version', '?'))}"))
    g = meta.get("golden")
    if isinstance(g, dict):
        rows.append(("golden set", f"{printable('; '.join(g.get('sets') or []), 300)} ({g.get('bytes', 0) / 1024:.0f} KiB; "
                     f"reference on {printable(g.get('reference_cpu'), 80)}, ISA {printable(' '.join(g.get('reference_isa') or []), 120)})"))
    else:
        rows.append(("golden set", "none (exported before golden sets; verify needs --ckpt)"))
    return rows


def _int8_rows(q) -> list[tuple[str, str]]:
    """An int8 artifact's quantization mode and integer-matmul form, and whether this CPU computes it as
    verified (runtime.hardware.int8_isa_note)."""
    from vfpt_deploy.runtime.hardware import int8_isa_note

    if not isinstance(q, dict):
        return []
    cpu = q.get("cpu") if isinstance(q.get("cpu"), dict) else {}
    form = (f"{printable(cpu.get('matmul', '?'))}; saturation-free on {printable(cpu.get('saturation_free_on', '?'))}"
            if cpu else "full-range int8 weights (written before the form was recorded)")
    rows = [("int8", f"{printable(q.get('mode', '?'))} ({printable(q.get('target', '?'))}): {form}")]
    note = int8_isa_note(q)
    return rows + ([("int8 on this CPU", note)] if note else [])


def _onnx_rows(info: dict) -> list[tuple[str, str]]:
    bb = info.get("pack_backbone")
    rows = [("kind", "ONNX model" + ("" if info["task"] else " without vfpt-deploy metadata (made elsewhere)"))]
    if bb:
        rows = [("kind", "backbone artifact for prompt packs (predict/verify it with --pack FILE)"),
                ("geometry", f"depth {bb['depth']} (kv layers {bb['kv_layers']}), {bb['heads']} heads x {bb['head_dim']}, "
                             f"dim {bb['dim']}, pool {bb['pool']}, images {bb['image_size']}"),
                ("pack limits", ", ".join(f"{k} {v}" for k, v in bb["limits"].items()))]
    rows += [(f"PROBLEM {i + 1}", f"{p}; predict, serve and verify refuse this file: re-export it")
             for i, p in enumerate(info["problems"])]
    if info["task"]:
        prec = info["precision"]
        rows += _common_rows(info) + _artifact_rows(info)
        rows.append(("precision", f"{prec['metadata']} (the graph computes in {prec['graph']})"))
        rows += _int8_rows(info["vfpt_metadata"].get("quantization"))
    ops = info["ops"]
    top = ", ".join(f"{printable(k, 60)} {v}" for k, v in list(ops.items())[:12])
    ext = info["external_data"]
    rows += [("producer", f"{printable(info['producer']['name'])} {printable(info['producer']['version'])}, IR {info['ir_version']}"),
             ("opsets", ", ".join(f"{printable(d, 60)} {v}" for d, v in info["opsets"].items())),
             *((f"input {printable(t['name'], 80)}", _shape(t)) for t in info["inputs"]),
             *((f"output {printable(t['name'], 80)}", _shape(t)) for t in info["outputs"]),
             ("ops", f"{info['nodes']} nodes, {len(ops)} types: {top}{' ...' if len(ops) > 12 else ''}"),
             ("initializers", f"{info['initializers']['count']} tensors, {_mib(info['initializers']['bytes'])} in the file"),
             ("external data", "none" if not ext else "; ".join(
                 f"{printable(f['file'], 80)} ({f['tensors']} tensors, {_mib(f['bytes'])}, "
                 f"{'present' if f['present'] else 'MISSING'})" for f in ext))]
    return rows


def _engine_rows(info: dict) -> list[tuple[str, str]]:
    trt, prof, build, src = info["tensorrt"], info["profile"], info["build"], info["source_onnx"]
    gpu = info["gpu"]
    src_state = ("not beside the engine" if not src["present"] else
                 "present, same sha256" if src["sha256_matches"] else "present, but its sha256 DIFFERS")
    return [("kind", f"TensorRT engine ({trt.get('flavor')}), described by {info['sidecar']}"),
            *_common_rows(info), *_artifact_rows(info),
            ("precision", f"{info['precision']} ({printable(build.get('precision_mode', '?'))})"),
            ("tensorrt", f"{printable(trt.get('module'))} {printable(trt.get('version'))}"),
            ("gpu", "none (built without a GPU)" if not gpu else f"{printable(gpu.get('name'))} (sm {printable(gpu.get('compute_capability'))})"),
            ("profile", f"{printable(prof.get('input'))}: min {prof['min']}, opt {prof['opt']}, max {prof['max']}"
                        + _task_profile(prof.get("task"))),
            ("build", ", ".join(f"{k}={printable(v, 60)}" for k, v in build.items())),
            ("engine sha256", "matches the sidecar" if info["sha256_matches_sidecar"]
             else "DOES NOT match the sidecar: the engine file was changed or replaced; rebuild it"),
            ("built from", f"{printable(src['file'])} ({src_state})")]


def _task_profile(task) -> str:
    """A multi-task engine's profile of its `task` input (recorded beside the images' one)."""
    if not isinstance(task, dict):
        return ""
    return f"; {printable(task.get('input', TASK_INPUT))}: " + ", ".join(f"{k} {printable(task.get(k))}" for k in ("min", "opt", "max"))


def _run_rows(info: dict) -> list[tuple[str, str]]:
    bb, n, prov = info["backbone"], info["parameters"], info["provenance"]
    train = prov.get("train") if isinstance(prov.get("train"), dict) else {}
    return [("kind", "run.pt (VFPT checkpoint)" + ("" if bb["included"] else ", prompts only (backbone weights not included)")),
            *_common_rows(info), ("image size", "x".join(map(str, info["image_size"]))),
            ("prompts", prompts_text(info["vfpt"])),
            ("backbone", f"{printable(bb['name'])} {printable(bb['kwargs'])}"), ("weights", printable(bb["source"])),
            ("backbone sha256", f"{bb['sha256'] or '?'} ({bb['hash_check']})"),
            ("parameters", f"tuned {n['tuned']:,} / total {n['total']:,} ({100.0 * n['tuned'] / max(n['total'], 1):.3f}%)"),
            ("training", printable(", ".join(f"{k}={v}" for k, v in train.items()) or "-")),
            ("written by", f"vfpt-deploy {printable(prov.get('tool_version', '?'))} at {printable(prov.get('created', '?'))}")]


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def summary_rows(info: dict) -> list[tuple[str, str]]:
    """(label, text) rows for a two-column table, printable text only."""
    rows = {"onnx": _onnx_rows, "engine": _engine_rows, "run": _run_rows, "pack": _pack_rows}[info["kind"]](info)
    rows += [("file", f"{_mib(info['bytes'])}, sha256 {info['sha256']}")]
    if "verification" in info:
        rows.append(_verification_row(info["verification"]))
    return [(k, printable(v, 2000)) for k, v in rows]
