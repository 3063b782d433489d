"""The dataset kind: one biased dataset variant built from its source (bias builder, held-out split), its
group counts and a preview grid.
"""

from __future__ import annotations

import time

import torch

from distill_core.data import BiasedDataset, load_source
from distill_core.data.bias import aligned_mask
from distill_core.data.biased import NUM_ATTRIBUTES, DatasetConfig
from distill_core.runtime import Runtime
from orchestrator.stages.base import Stage, StageKind, register
from orchestrator.stages.common import finish_stage, json_bytes, png_bytes
from orchestrator.storage.files import tensors_to_bytes
from orchestrator.storage.local import ArtifactStore


def dataset_grid(ds: BiasedDataset, per_group: int = 8) -> torch.Tensor:
    """One row per class: aligned samples first, then conflicting ones."""
    from torchvision.utils import make_grid  # torchvision: only where a grid is drawn


    tiles = []
    blank = torch.zeros_like(ds.train_images[0])
    aligned = aligned_mask(ds.train_labels, ds.train_attrs, NUM_ATTRIBUTES) if ds.has_bias else \
        torch.ones_like(ds.train_labels, dtype=torch.bool)
    for c in range(ds.num_classes):
        for want in (True, False):
            idx = torch.nonzero((ds.train_labels == c) & (aligned == want)).squeeze(1)[:per_group]
            picked = [ds.train_images[i] for i in idx] + [blank] * (per_group - len(idx))
            tiles.extend(picked)
    return make_grid(torch.stack(tiles).float() / 255.0, nrow=2 * per_group, padding=1)


def counts_csv(counts: dict) -> str:
    """The per-class aligned / conflicting table, readable in the MLflow UI."""
    cols = list(counts)
    rows = [",".join(["class", *cols])]
    rows += [",".join([str(c), *(str(counts[k][c]) for k in cols)]) for c in range(len(counts[cols[0]]))]
    rows.append(",".join(["total", *(str(sum(counts[k])) for k in cols)]))
    return "\n".join(rows) + "\n"


def run_dataset(stage: Stage, store: ArtifactStore, runtime: Runtime) -> dict:
    started = time.time()
    cfg = stage.typed_config()
    source = load_source(cfg.source, root=stage.runtime.get("data_root"))
    ds = cfg.build(source)
    counts = ds.counts()
    meta = {**ds.meta, "source_checksum": source.checksum()}
    files = {"dataset.pt": tensors_to_bytes(ds.to_tensors()), "counts.json": json_bytes(counts),
             "counts.csv": counts_csv(counts).encode(), "dataset_grid.png": png_bytes(dataset_grid(ds))}
    metrics = {f"{k}_total": sum(v) for k, v in counts.items()}
    metrics["val_size"] = len(ds.val_index)
    return finish_stage(store, stage, files, metrics, ["counts.csv", "counts.json", "dataset_grid.png"],
                   {"dataset_meta": meta}, started)


register(StageKind("dataset", version=4, config=DatasetConfig, run=run_dataset, resources="dataset"))
