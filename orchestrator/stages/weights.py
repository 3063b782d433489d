"""The weights kind: one debiasing weight per real sample of a dataset variant (`distill_core.debias`).

A stage of its own so the weights are computed once per (variant, debias
entry) and shared, by key, by every distillation that uses them: every method,
IPC, guidance entry and seed of a study (and any other study with the same
variant and entry). Its inputs are the dataset variant and, where the kind
reads one, a PTM pool: the networks whose embedding kde estimates densities in
(`embedding: network`), or the LfF PTMs whose relative-difficulty scores lff
turns into weights (averaged over the pool's networks). The stored
`weights.pt` is aligned with `RealData.from_dataset(ds)`, the split every
distillation reads; the result carries how much weight the bias-conflicting
samples get (their share of the total against their share of the samples)
and a histogram split by aligned / conflicting, which the driver logs to
MLflow with the stage's run.
"""

from __future__ import annotations

import logging
import time

import torch

from distill_core.data.bias import aligned_mask
from distill_core.data.biased import NUM_ATTRIBUTES
from distill_core.debias import DebiasConfig, distillation_attributes, get_debias, weight_summary
from distill_core.methods import RealData
from distill_core.runtime import Runtime
from orchestrator.stages.base import Stage, StageKind, register
from orchestrator.stages.common import finish_stage, load_dataset, load_ptm_network
from orchestrator.stages.figures import png, pyplot
from orchestrator.storage.files import tensors_to_bytes
from orchestrator.storage.local import ArtifactStore

log = logging.getLogger("ddray.stage")


def run_weights(stage: Stage, store: ArtifactStore, runtime: Runtime) -> dict:
    started = time.time()
    cfg = stage.typed_config()
    kind = get_debias(cfg.kind)
    ds = load_dataset(store, stage.inputs["dataset"])
    real = RealData.from_dataset(ds, runtime.torch_device)
    attributes = distillation_attributes(ds) if ds.has_bias else None
    ptms = stage.inputs.get("ptms", [])
    scores = pool_scores(store, ptms, len(real.labels)) if kind.needs_scores else None
    embed = pool_embedding(store, ptms, real) if ptms and not kind.needs_scores else None
    weights = kind.compute(real.images, real.labels, real.num_classes, cfg.options, attributes=attributes,
                           embed=embed, scores=scores)
    if weights is None:
        weights = torch.ones(len(real.labels))
    weights = weights.float().cpu()
    metrics = weight_summary(weights, real.labels.cpu(), attributes)
    log.info("weights of %d samples: %s", len(weights), " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    files = {"weights.pt": tensors_to_bytes({"weights": weights}),
             "weights_histogram.png": histogram(weights, real.labels.cpu(), attributes, stage.label)}
    return finish_stage(store, stage, files, metrics, ["weights_histogram.png"], {}, started)


def pool_scores(store: ArtifactStore, ptms: list[str], n: int) -> torch.Tensor:
    """The mean over a pool's LfF PTMs of their per-sample scores (each trained on the same split)."""
    stacked = []
    for key in ptms:
        scores = store.read_tensors("ptm", key, "scores.pt")["scores"].float()
        if len(scores) != n:
            raise ValueError(f"PTM {key} scored {len(scores)} samples, the distillation split has {n}")
        stacked.append(scores)
    return torch.stack(stacked).mean(0)


def pool_embedding(store: ArtifactStore, ptms: list[str], real: RealData):
    """images -> the pool's final-checkpoint embeddings side by side (each network's penultimate features)."""
    models = [load_ptm_network(store, key, real).eval() for key in ptms]
    return lambda x: torch.cat([m.embed(x).flatten(1) for m in models], dim=1)


def histogram(weights: torch.Tensor, labels: torch.Tensor, attributes: torch.Tensor | None, title: str) -> bytes:
    """The weights' distribution, aligned and conflicting samples apart (log counts: conflicting ones are few)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    bins = torch.linspace(0, 1, 41).tolist()
    if attributes is None:
        ax.hist(weights.numpy(), bins=bins, label="all")
    else:
        aligned = aligned_mask(labels, attributes, NUM_ATTRIBUTES)
        ax.hist(weights[aligned].numpy(), bins=bins, alpha=0.6, label=f"aligned ({int(aligned.sum())})")
        ax.hist(weights[~aligned].numpy(), bins=bins, alpha=0.6, label=f"conflicting ({int((~aligned).sum())})")
    ax.set_yscale("log")
    ax.set_xlabel("weight (each class's largest = 1)")
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    return png(fig)


register(StageKind("weights", version=1, config=DebiasConfig, run=run_weights, resources="weights"))
