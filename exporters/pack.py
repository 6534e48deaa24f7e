"""Prompt packs, the export side: the backbone artifact (a run's frozen ViT, its per-task tables as graph
inputs: folding/packs.py) and a run's pack file (artifacts/pack.py). The pipeline (pipeline.py) verifies both
through onnxruntime before they are put in place.
"""
from __future__ import annotations

import os
from pathlib import Path

from vfpt_deploy import __version__
from vfpt_deploy.artifacts.checkpoint import Run
from vfpt_deploy.artifacts.pack import (BACKBONE_KEY, DEFAULT_LIMITS, IDENTITY_KEY, PackTables, backbone_geometry,
                                        computation_identity, write_pack)
from vfpt_deploy.errors import UsageError

from .onnx import DEFAULT_OPSET, ExportResult, add_metadata, export_module, run_metadata


def backbone_identity(run: Run) -> dict:
    return {"name": run.backbone.name, "kwargs": run.backbone.kwargs, "source": run.backbone.source,
            "sha256": run.backbone.sha256}


def export_backbone(run: Run, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                    limits: dict | None = None) -> ExportResult:
    """The run's frozen backbone as a backbone artifact: inputs images, task and the TABLE_INPUTS; its
    geometry and the pack limits in the metadata (vfpt.pack_backbone)."""
    from vfpt_deploy.folding.packs import PackBackbone, check_packable

    check_packable(run)
    limits = {**DEFAULT_LIMITS, **(limits or {})}
    module = PackBackbone(run.model.eval())
    meta = {"backbone": backbone_identity(run), "preprocess": run.preprocess.to_dict(),
            BACKBONE_KEY: {**module.geometry, "limits": limits}}
    result = export_module(module, path, image_size=run.model.img_size, opset=opset, metadata=meta)
    # What a pack's numbers depend on (artifacts/pack.py, computation_identity): recorded after the export, as
    # it covers the written graph; the limits are left out, so a re-export with other limits keeps it.
    graph = graph_sha256(path)
    add_metadata(path, {BACKBONE_KEY: {**meta[BACKBONE_KEY], "identity": computation_identity(
        backbone_identity(run), module.geometry, opset, graph)}})
    result.size_bytes = Path(path).stat().st_size
    return result


def graph_sha256(path: str | os.PathLike) -> str:
    """sha256 of an ONNX file's graph alone (nodes, weights, inputs and outputs), without its metadata: the
    limits a backbone artifact records are metadata (the table dimensions are symbolic), so they do not change it."""
    import hashlib

    import onnx

    return hashlib.sha256(onnx.load(str(path)).graph.SerializeToString(deterministic=True)).hexdigest()


def check_same_backbone(run: Run, meta: dict, source: str) -> dict:
    """The backbone artifact's geometry, after checking that it holds this run's frozen backbone (name,
    keyword arguments, weights sha256): one line otherwise."""
    from vfpt_deploy.folding.packs import check_packable, geometry

    check_packable(run)
    g = backbone_geometry(meta, source)
    recorded = meta.get("backbone") if isinstance(meta.get("backbone"), dict) else {}
    mine = backbone_identity(run)
    for key, what in (("name", "backbone model"), ("kwargs", "backbone keyword arguments"), ("sha256", "backbone weights")):
        if recorded.get(key) != mine[key]:
            shown = (lambda v: str(v)[:12]) if key == "sha256" else (lambda v: str(v)[:60])
            raise UsageError(f"{source} holds another {what} ({shown(recorded.get(key))}) than the run "
                             f"({shown(mine[key])}); export a backbone artifact from this run with --format backbone, "
                             "or pack a run trained on that backbone")
    if {k: g[k] for k in geometry(run.model)} != geometry(run.model):
        raise UsageError(f"{source} is shaped for another model (pooling or sizes differ from the run's); export a "
                         "backbone artifact from this run with --format backbone")
    return g


def pack_metadata(run: Run, name: str, tables: PackTables, backbone_sha256: str,
                  identity: dict | None = None) -> dict:
    """What a pack records besides its tables (artifacts/pack.py's module docstring); `identity`: the backbone
    artifact's computation identity (its vfpt.pack_backbone.identity), which the pack then fits by."""
    own = run_metadata(run)
    return {"name": name, "classes": own["classes"], "preprocess": own["preprocess"], "config": own["config"],
            "num_prompts": run.config.num_prompts, "backbone": own["backbone"],
            "backbone_artifact_sha256": backbone_sha256, "checkpoint_sha256": own["checkpoint_sha256"],
            "checkpoint": own["checkpoint"], "tool_version": __version__, "precision": "fp32",
            **({IDENTITY_KEY: identity} if identity is not None else {})}


def write_run_pack(run: Run, path: Path, tables: PackTables, name: str, backbone_sha256: str,
                   extra: dict | None = None, identity: dict | None = None) -> int:
    """Write the pack file (the caller stages and verifies it); returns its size in bytes."""
    write_pack(path, tables, {**pack_metadata(run, name, tables, backbone_sha256, identity), **(extra or {})})
    return Path(path).stat().st_size
