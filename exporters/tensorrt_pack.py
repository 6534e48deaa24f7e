"""Backbone artifact (prompt packs, issue 22) -> TensorRT engine + sidecar, through exporters/tensorrt.py's steps.

The backbone ONNX takes `images` [batch, 3, H, W], `task` int64 [batch] and the per-task tables of
artifacts/pack.py TABLE_INPUTS, whose dimensions tasks, prompts (kv keys), slots (prompt tokens) and classes
are symbolic. TensorRT needs a range for every dynamic dimension in the optimization profile, so the
engine fixes them at build time (the ONNX does not):

  batch     BuildSettings' min/opt/max batch, as for every engine
  tasks     1..max_tasks (default 16, opt 8): the tables grow linearly in tasks, and 16 packs is what the
            issue's memory goal serves; at most the backbone's --max-tasks limit (256)
  prompts   0..the backbone's max prompts (default 512; opt min(100, max): VFPT's usual M is 10..100);
  slots     0 is legal: the runtime passes no kv rows when every loaded pack keeps its prompts as tokens
            (and no slots when none does)
  classes   1..the backbone's max classes (default 10000; opt min(100, max))

The ranges are recorded in the sidecar (profile.ranges and, per input, profile.tables) so a runtime refuses
a set of packs outside them in one line (artifacts/pack.py check_engine_ranges) instead of failing inside
TensorRT. Running such an engine (a PackSession over TensorRT) is not written yet: docs/tensorrt.md.
"""
from __future__ import annotations

from pathlib import Path

from vfpt_deploy.artifacts.pack import BACKBONE_KEY, TABLE_INPUTS, backbone_geometry
from vfpt_deploy.artifacts.schema import INPUT_NAME, TASK_INPUT, MAX_TASKS
from vfpt_deploy.errors import ArtifactError, UsageError

from .tensorrt import (BuildSettings, EngineResult, add_profile, attach_timing_cache, builder_config,
                       check_paths, check_trt_available, parse, precision_mode, profile_dict, serialize,
                       sidecar_dict, source_metadata, task_dtype, write_outputs)

DEFAULT_MAX_TASKS, DEFAULT_OPT_TASKS, DEFAULT_OPT_ROWS = 16, 8, 100
ENGINE_SIDECAR_VERSION = 3  # a backbone engine: no reader serves it yet, older ones refuse it in one line


def pack_ranges(geometry: dict, batches: tuple[int, int, int], max_tasks: int = DEFAULT_MAX_TASKS,
                opt_tasks: int | None = None) -> dict[str, list[int]]:
    """[min, opt, max] of every symbolic dimension of the backbone artifact, from its limits (checked)."""
    lim = geometry["limits"]
    top = min(lim["tasks"], MAX_TASKS)
    if isinstance(max_tasks, bool) or not isinstance(max_tasks, int) or not 1 <= max_tasks <= top:
        raise UsageError(f"--max-tasks must be an integer in 1..{top} (the backbone artifact's task limit), got "
                         f"{max_tasks!r}")
    opt = min(DEFAULT_OPT_TASKS, max_tasks) if opt_tasks is None else opt_tasks
    if isinstance(opt, bool) or not isinstance(opt, int) or not 1 <= opt <= max_tasks:
        raise UsageError(f"--opt-tasks must be an integer in 1..{max_tasks} (--max-tasks), got {opt!r}")
    rows = lambda lo, hi: [lo, max(lo, min(DEFAULT_OPT_ROWS, hi)), hi]  # noqa: E731
    return {"batch": list(batches), "tasks": [1, opt, max_tasks], "prompts": rows(0, lim["prompts"]),
            "slots": rows(0, lim["prompts"]), "classes": rows(1, lim["classes"])}


def table_profiles(geometry: dict, ranges: dict) -> dict[str, dict]:
    """Each table input's min/opt/max shape: symbolic dimensions from ranges, the others from the geometry."""
    out = {}
    for name, dims in TABLE_INPUTS.items():
        shapes = [[ranges[d][i] if d in ranges else geometry[d] for d in dims] for i in range(3)]
        out[name] = {"dims": list(dims), **dict(zip(("min", "opt", "max"), shapes))}
    return out


def build_backbone_engine(onnx_path: str | Path, engine_path: str | Path, settings: BuildSettings, *,
                          max_tasks: int = DEFAULT_MAX_TASKS, opt_tasks: int | None = None) -> EngineResult:
    """Build an engine of a backbone artifact (export --format backbone) with one profile over every dynamic
    input, and write it with its sidecar (sidecar version 3: profile.ranges, profile.tables)."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    settings.check()
    check_paths(onnx_path, engine_path, settings)
    meta, onnx_precision = source_metadata(onnx_path, None)
    if BACKBONE_KEY not in meta:
        raise ArtifactError(f"{onnx_path} is not a backbone artifact for prompt packs; build it with the ordinary "
                            "engine path (--format trt/trt-rtx), or export one with --format backbone")
    geometry = backbone_geometry(meta, str(onnx_path))
    ranges = pack_ranges(geometry, settings.profile_batches, max_tasks, opt_tasks)  # refused before any TensorRT work
    trt = check_trt_available(settings.flavor)
    mode = precision_mode(trt, settings.precision, onnx_precision, onnx_path.name)
    notes: list[str] = []
    parsed = parse(trt, onnx_path, mode == "strongly-typed", settings.verbose,
                   [INPUT_NAME, TASK_INPUT, *TABLE_INPUTS])
    task = task_dtype(trt, parsed.network)
    config, hardware = builder_config(trt, parsed, settings, mode, notes)
    tables = table_profiles(geometry, ranges)
    shapes = add_profile(parsed, config, settings, tasks=True, extra=tables)
    cache = attach_timing_cache(config, settings, notes)
    blob, build_seconds = serialize(trt, parsed, config, onnx_path.name)
    profile = {**profile_dict(shapes, task), "ranges": ranges, "tables": tables}
    sidecar = sidecar_dict(trt, settings, blob=blob, engine_path=engine_path, onnx_path=onnx_path, meta=meta,
                           profile=profile, mode=mode, hardware=hardware, seconds=(parsed.seconds, build_seconds))
    sidecar["version"] = ENGINE_SIDECAR_VERSION
    side = write_outputs(engine_path, blob, sidecar, config, cache, settings)
    return EngineResult(engine_path, side, sidecar, parsed.seconds, build_seconds, notes)
