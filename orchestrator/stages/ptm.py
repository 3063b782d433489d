"""The PTM kind: one pre-trained model (architecture x seed) trained on a dataset variant, keeping the
checkpoints its pool asks for (PTM guidance, or MTT's expert trajectories).
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("ddray.stage")


from distill_core.methods import RealData
from distill_core.networks import build_network
from distill_core.ptm import PTMConfig, accuracy, train_ptm
from distill_core.runtime import Runtime
from orchestrator.stages.base import Stage, StageKind, register
from orchestrator.stages.common import finish_stage, format_record, json_bytes, load_dataset, with_stored_weights
from orchestrator.storage.files import tensors_to_bytes
from orchestrator.storage.local import ArtifactStore


def run_ptm(stage: Stage, store: ArtifactStore, runtime: Runtime) -> dict:
    started = time.time()
    cfg = stage.typed_config()
    ds = load_dataset(store, stage.inputs["dataset"])
    real = RealData.from_dataset(ds, runtime.torch_device)
    real = with_stored_weights(store, stage, real)  # a pool trained on reweighted data: epochs drawn by weight
    val_x, val_y = ds.val_split()
    val = (real.norm.apply(val_x).to(real.device), val_y.to(real.device)) if len(val_y) else None
    result = train_ptm(real, cfg, val=val, runtime=runtime,
                       progress=lambda epoch, r: log.info("epoch %d/%d %s", epoch, cfg.epochs, format_record(r)))
    flat = {f"{epoch}/{name}": t for epoch, sd in result.checkpoints.items() for name, t in sd.items()}
    last = result.history[-1]
    files = {"checkpoints.pt": tensors_to_bytes(flat), "history.json": json_bytes(result.history)}
    if result.scores is not None:  # LfF's relative difficulty per sample of the split (debias kind lff)
        files["scores.pt"] = tensors_to_bytes({"scores": result.scores.float().cpu()})
    metrics = {k: last[k] for k in ("train_acc", "val_acc", "train_loss") if k in last}
    # how good a teacher it is: its last kept checkpoint's accuracy on the test set (bias-conflicting if biased)
    final = build_network(cfg.arch, real.shape[0], real.num_classes, real.shape[-1], **cfg.arch_options)
    final.load_state_dict(result.checkpoints[max(result.checkpoints)])
    metrics["test_acc"] = accuracy(final.to(real.device), real.norm.apply(ds.test_images).to(real.device),
                                   ds.test_labels.to(real.device))
    log.info("test accuracy %.4f (epoch %d)", metrics["test_acc"], max(result.checkpoints))
    return finish_stage(store, stage, files, metrics,
                   ["history.json"], {"epochs": sorted(result.checkpoints)}, started)


register(StageKind("ptm", version=3, config=PTMConfig, run=run_ptm, resources="ptm"))
