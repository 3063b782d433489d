"""The distillation kind: one method run on one dataset variant (with its PTM guidance or expert
trajectories), the synthetic set and its history stored.
"""

from __future__ import annotations

import logging
import math
import time

log = logging.getLogger("ddray.stage")


from distill_core.methods import DistillConfig, RealData, get_method
from distill_core.runtime import Runtime
from orchestrator.stages.base import Stage, StageKind, register
from orchestrator.stages.common import (
    build_guidance,
    finish_stage,
    format_record,
    json_bytes,
    load_checkpoints,
    load_dataset,
    png_bytes,
    synthetic_grid,
    with_stored_weights,
)
from orchestrator.storage.files import tensors_to_bytes
from orchestrator.storage.local import ArtifactStore


def run_distill(stage: Stage, store: ArtifactStore, runtime: Runtime) -> dict:
    started = time.time()
    cfg = stage.typed_config()
    ds = load_dataset(store, stage.inputs["dataset"])
    real = RealData.from_dataset(ds, runtime.torch_device)
    real = with_stored_weights(store, stage, real)  # debiasing weights: where the recipe forms real statistics
    experts = [load_checkpoints(store, k) for k in stage.inputs.get("experts", [])]
    syn = get_method(cfg.method).distill(
        real, cfg, runtime, guidance=build_guidance(store, stage, real, cfg.guidance, cfg.seed), experts=experts or None,
        progress=lambda it, r, _: log.info("iteration %d/%d %s", it + 1, cfg.iterations, format_record(r)))
    history = syn.history
    metrics = {"n_images": len(syn.labels)}
    if history:
        for k, v in history[-1].items():
            if k != "iteration" and isinstance(v, (int, float)) and math.isfinite(v):
                metrics[f"final_{k}"] = v
    if syn.lr is not None:
        metrics["synthetic_lr"] = syn.lr
    files = {"synthetic.pt": tensors_to_bytes(syn.to_tensors()), "history.json": json_bytes(history),
             "synthetic_grid.png": png_bytes(synthetic_grid(syn, cfg.ipc))}
    return finish_stage(store, stage, files, metrics, ["synthetic_grid.png", "history.json"],
                   {"synthetic_meta": syn.meta()}, started)


register(StageKind("distill", version=2, config=DistillConfig, run=run_distill, resources="distill"))
