"""The external kind: a synthetic set made elsewhere, imported by its content hash (`ddray evaluate`)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from pydantic import Field

from distill_core.config import Config
from distill_core.methods import DistillConfig
from distill_core.runtime import Runtime
from distill_core.sets import external_set
from orchestrator.spec.base import bounded
from orchestrator.stages.base import Stage, StageKind, register
from orchestrator.stages.common import (
    finish_stage,
    json_bytes,
    load_dataset,
    png_bytes,
    synthetic_grid,
)
from orchestrator.storage.files import sha256_file, tensors_to_bytes
from orchestrator.storage.local import ArtifactStore


class ExternalConfig(Config):
    """An imported synthetic set: the file's content hash, and how its images are stored."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    name: str
    space: str = Field(pattern=r"^(pixels|normalized)$")
    ipc: bounded(DistillConfig, "ipc")


def run_external(stage: Stage, store: ArtifactStore, runtime: Runtime) -> dict:
    """Import a synthetic set saved by another codebase (checked against the dataset it will be evaluated on)."""
    started = time.time()
    cfg = stage.typed_config()
    path = Path(stage.runtime["path"])
    if sha256_file(path) != cfg.sha256:
        raise ValueError(f"{path} changed since it was submitted (sha256 differs)")
    ds = load_dataset(store, stage.inputs["dataset"])
    shape = tuple(ds.train_images.shape[1:])
    syn = external_set(torch.load(path, map_location="cpu", weights_only=True), ds.normalization, cfg.space,
                       ds.num_classes, shape)
    files = {"synthetic.pt": tensors_to_bytes(syn.to_tensors()), "history.json": json_bytes([]),
             "synthetic_grid.png": png_bytes(synthetic_grid(syn, cfg.ipc))}
    metrics = {"n_images": len(syn.labels), **({"synthetic_lr": syn.lr} if syn.lr is not None else {})}
    return finish_stage(store, stage, files, metrics, ["synthetic_grid.png"], {"synthetic_meta": syn.meta(),
                        "source_file": str(path)}, started)


register(StageKind("external", version=1, config=ExternalConfig, run=run_external, resources="external"))
