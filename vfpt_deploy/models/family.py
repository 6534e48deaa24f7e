"""What a backbone family is, in one place: the rest of the package asks a family instead of testing for a
ViT or a Swin (docs/model.md, "Adding a family").

A family is a folder (models/vit/, models/swin/) and one registration line in models/families.py. Its
torch-free part -- a name, the reference checkpoint layouts `import --arch` takes, which timm names it
claims, and its sizes checks (FamilySizes, in its torch-free sizes.py) -- is read by the CLI and the
torch-free run.pt reader without PyTorch; everything else (FamilyParts) is imported on first use.
Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class BackboneInfo:
    """Where a frozen backbone comes from: timm name + keyword arguments, and its weights."""

    name: str
    kwargs: dict = field(default_factory=dict)
    source: str = "random"  # "random", "pretrained", a file path, or how the tool made it
    sha256: str = ""  # state_sha256 of the backbone tensors

    def to_dict(self, included: bool) -> dict:
        return {"name": self.name, "kwargs": dict(self.kwargs), "source": self.source,
                "sha256": self.sha256, "included": included}


@dataclass
class Imported:
    """A reference checkpoint as a VFPT model (eval mode), where its backbone comes from, and the
    reference tensors that were not used."""

    model: Any
    backbone: BackboneInfo
    arch: str
    unused: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FamilySizes:
    """A family's size checks, torch-free (its sizes.py): they read plain values and tensors' .shape and
    .ndim only, so they run on torch tensors and on the NumPy arrays of artifacts/run_reader.py alike.

    check_kwargs      (kwargs) -> None: bound the timm options that size it, before anything is built
    check_stored      (kwargs, config, tuned, backbone_state or None) -> None: a run.pt's recorded sizes
                      against its tensors, before any skeleton is built (raises VFPTError)
    expected          (name, kwargs, config, num_classes) -> ({name: shape} of the backbone_state,
                      {name: shape} of the tuned tensors, (height, width) of its images) that the skeleton
                      would have, or None where it cannot tell without timm; None (the default): never
                      tells, so the torch-free run.pt reader leaves the family's runs to the torch path
    """

    check_kwargs: Callable[[dict], None]
    check_stored: Callable[..., None]
    expected: Callable[..., "tuple[dict, dict, tuple[int, int]] | None"] | None = None


@dataclass(frozen=True)
class FamilyParts:
    """A family's torch side: everything the pipeline asks a family, from a timm name to a folded model.

    backbone_type     the timm class of its backbones (a backbone of this class belongs to the family)
    check_backbone    (backbone, name) -> None: refuse, in one line, a built backbone VFPT cannot prompt
    read_weights      (skeleton, path) -> state dict or None: read a weights file, refusing another depth
    load_weights      (backbone, path, state) -> None: load a weights file (its own layouts) strictly
    model             the prompted model class: model(backbone, num_classes, config)
    check_config      (config) -> None: refuse VFPT settings the family does not have
    tuned_shapes      (config, skeleton, num_classes) -> {name: shape} of the tensors that train
    fold              (model, mode, dtype) -> the folded model (modes: models/folds.py)
    kv_refusal        (model) -> why the kv fold is not exact for it, or None
    import_state_dict (sd, *, arch, alpha, location, heads, source, create_backbone) -> Imported
    multitask         whether its runs export into one multi-task artifact (folding/multitask.py)
    """

    backbone_type: type
    check_backbone: Callable[..., None]
    read_weights: Callable[..., Any]
    load_weights: Callable[..., None]
    model: type
    check_config: Callable[[Any], None]
    tuned_shapes: Callable[..., dict]
    fold: Callable[..., Any]
    kv_refusal: Callable[[Any], "str | None"]
    import_state_dict: Callable[..., Imported]
    multitask: bool = False


@dataclass(frozen=True)
class Family:
    """One backbone family, registered once in models/families.py.

    name         a short name ("vit", "swin")
    archs        the reference checkpoint layouts `vfpt-deploy import --arch` takes for it
    claims_name  (timm name) -> bool, before anything is built; None for the default family, which
                 takes every name (and backbone) no other family claims
    parts        () -> FamilyParts, imported on first use (PyTorch and timm)
    sizes        () -> FamilySizes, imported on first use (torch-free: its sizes.py)
    """

    name: str
    archs: tuple[str, ...]
    claims_name: Callable[[str], bool] | None
    parts: Callable[[], FamilyParts]
    sizes: Callable[[], FamilySizes]
