"""Evaluating a synthetic set made elsewhere exactly as a study evaluates its own.

`ddray evaluate --synthetic FILE.pt --spec SPEC` builds a small study from the
spec's datasets and evaluation block: the dataset variant(s), one `external`
stage that imports the file (its key hashes the file's sha256, so the same file
is imported once), the spec's evaluation architectures with the protocol of a
registered method (`--protocol`, default the spec's first method), and the
random real subset at the set's IPC under the same protocol, so the rows carry
`acc_random` and `ior` like any study's and `ddray study report` works on it.
"""

from __future__ import annotations

from pathlib import Path

from distill_core.methods import METHODS
from orchestrator.errors import UserError, first_line, suggest
from orchestrator.plan.graph import StageGraph, dataset_stage, evaluation_stages, random_baseline_stages
from orchestrator.spec.checks import geometry, num_classes
from orchestrator.spec.models import DatasetSpec, GuidanceSpec
from orchestrator.stages.base import Stage
from orchestrator.stages.external import ExternalConfig
from orchestrator.storage.files import sha256_file


def ipc_of(path: Path, ds: DatasetSpec | None = None) -> int:
    """Images per class of the file's set (the largest class count); with the target dataset, the set is
    checked against it here, before anything is built: labels in its classes, images of its shape."""
    import torch  # torch: only where a file is read

    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
        labels = torch.as_tensor(tensors["labels"]).long().flatten()
        images = torch.as_tensor(tensors["images"]) if "images" in tensors else None
    except Exception as exc:
        raise UserError(f"--synthetic: cannot read '{path}' as a torch file of tensors with labels "
                        f"({type(exc).__name__}: {first_line(exc, 120)})") from None
    if not len(labels):
        raise UserError(f"--synthetic: '{path}' holds no labels")
    if int(labels.min()) < 0:
        raise UserError(f"--synthetic: '{path}' has negative labels (classes are 0..K-1)")
    if ds is not None:
        classes, (channels, size) = num_classes(ds), geometry(ds)
        if int(labels.max()) >= classes:
            raise UserError(f"--synthetic: '{path}' has label {int(labels.max())}, but dataset '{ds.name}' has "
                            f"{classes} classes (0..{classes - 1})")
        want = (len(labels), channels, size, size)
        if images is None or tuple(images.shape) != want:
            shape = "no images" if images is None else "images of shape " + "x".join(map(str, images.shape))
            raise UserError(f"--synthetic: '{path}' has {shape}; dataset '{ds.name}' needs "
                            f"{'x'.join(map(str, want))} (one image per label)")
    return int(torch.bincount(labels).max())


def external_study(spec, synthetic: Path, dataset: str | None, protocol: str | None, space: str,
                   aligned_ratio: float | None = None, severity: int | None = None):
    """(spec of the evaluation study, its stage graph) for one external synthetic set, on every variant of
    the dataset or the one(s) `aligned_ratio` / `severity` pick."""

    if not synthetic.is_file():
        raise UserError(f"--synthetic: file not found: {synthetic}")
    names = [d.name for d in spec.datasets if d.distill]
    name = dataset or names[0]
    if name not in names:
        raise UserError(f"--dataset: '{name}' is not a distillation dataset of the spec{suggest(name, names)}")
    method = protocol or spec.distillation.methods[0]
    if method not in METHODS:
        raise UserError(f"--protocol: unknown method '{method}'{suggest(method, METHODS)}")
    sha = sha256_file(synthetic)
    ds = next(d for d in spec.datasets if d.name == name)
    ipc = ipc_of(synthetic, ds)
    label = synthetic.stem[:40]
    study = spec.model_copy(update={
        "name": f"{spec.name}-ext-{sha[:8]}", "datasets": [ds], "ptm_pools": [],
        "distillation": spec.distillation.model_copy(update={"methods": [method], "ipc": [ipc], "search": None,
                                                            "guidance": [GuidanceSpec()]})})
    variants = [(p, s) for p, s in ds.variants() if (aligned_ratio is None or p == aligned_ratio)
                and (severity is None or s == severity)]
    if not variants:
        raise UserError(f"--aligned-ratio/--severity: dataset '{name}' has no such variant "
                        f"(it has {', '.join(f'p={p:g} s={s}' for p, s in ds.variants())})")
    graph = StageGraph()
    for ratio, sev in variants:
        target = graph.add(dataset_stage(ds, ratio, sev, ds.holdout(study.needs_holdout)))
        config = ExternalConfig(sha256=sha, name=label, space=space, ipc=ipc)
        coords = {**target.coords, "method": f"external:{label}", "ipc": ipc, "guidance": "none",
                  "iterations": None, "lr_img": None, "options": None, "distill_seed": 0}
        imported = graph.add(Stage("external", config.to_dict(), {"dataset": target.key},
                                   f"{label} (external) on {target.label}", coords,
                                   runtime={"path": str(synthetic.resolve())}))
        for stage in evaluation_stages(study, METHODS[method], imported, target):
            graph.add(stage)
        random_baseline_stages(graph, study, target)
    return study, graph
