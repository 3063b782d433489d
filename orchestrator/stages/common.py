"""What each stage kind does, run inside a Ray worker (or inline in tests).

Each `run_*` rebuilds its typed config (`stage.typed_config()`), reads its
named inputs from the artifact store by key, computes, and writes its outputs
(tensors, a `result.json` with params and metrics, PNGs) as one atomic stage
directory. The driver logs what is in `result.json` and
the listed artifacts to MLflow, so workers never talk to the tracking server.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time

import torch

from distill_core.data import BiasedDataset
from distill_core.guidance import GuidanceConfig, PTMGuidance, PTMPool
from distill_core.methods import RealData, SyntheticSet
from distill_core.networks import build_network
from orchestrator.stages.base import Stage
from orchestrator.storage.local import ArtifactStore

RESULT = "result.json"


CURRENT_RUN: dict = {}  # where and how the stage in this process runs (execute_stage sets it)


log = logging.getLogger("ddray.stage")


def png_bytes(grid: torch.Tensor) -> bytes:
    from PIL import Image  # PIL: only where a PNG is written

    arr = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def json_bytes(obj) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=float).encode()


def finish_stage(store: ArtifactStore, stage: Stage, files: dict[str, bytes], metrics: dict,
            artifacts: list[str], meta: dict | None = None, started: float = 0.0) -> dict:
    metrics = {k: float(v) for k, v in metrics.items() if v is not None}
    metrics["wall_seconds"] = time.time() - started
    result = {"key": stage.key, "kind": stage.kind, "label": stage.label, "config": stage.config,
              "coords": stage.coords, "inputs": stage.inputs, "metrics": metrics, "artifacts": artifacts,
              "run": dict(CURRENT_RUN),
              **(meta or {})}
    files[RESULT] = json_bytes(result)
    store.write_stage(stage.kind, stage.key, files, meta or {}, fence=stage.fence)
    return result


class WarmDatasets:
    """Datasets this process has read and verified, kept for the next stage (a warm actor's or a reused
    worker's): a dataset variant is read and checksummed once per process, not once per stage."""

    def __init__(self, size: int = 4):
        self.size, self.items = size, {}

    def get(self, store: ArtifactStore, key: str) -> BiasedDataset:
        name = (str(store.root), key)
        if name not in self.items:
            result = store.read_json("dataset", key, RESULT)
            self.items[name] = BiasedDataset.from_tensors(store.read_tensors("dataset", key, "dataset.pt"),
                                                          result["dataset_meta"])
            while len(self.items) > self.size:
                self.items.pop(next(iter(self.items)))
        return self.items[name]

    def keys(self) -> list[str]:
        return [key for _, key in self.items]


WARM = WarmDatasets()


def load_dataset(store: ArtifactStore, key: str) -> BiasedDataset:
    return WARM.get(store, key)


def load_checkpoints(store: ArtifactStore, key: str) -> dict[int, dict[str, torch.Tensor]]:
    flat = store.read_tensors("ptm", key, "checkpoints.pt")
    out: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in flat.items():
        epoch, param = name.split("/", 1)
        out.setdefault(int(epoch), {})[param] = t
    return out


def load_ptm_network(store: ArtifactStore, key: str, real: RealData, epoch: int | None = None,
                     checkpoints: dict | None = None) -> torch.nn.Module:
    """A stored PTM's network at `epoch` (None: its last kept checkpoint), built for `real`'s images, on its
    device; a cross-domain PTM keeps its own classes."""
    cfg = store.read_json("ptm", key, RESULT)["config"]
    checkpoints = checkpoints if checkpoints is not None else load_checkpoints(store, key)
    state = checkpoints[max(checkpoints) if epoch is None else epoch]
    model = build_network(cfg["arch"], real.shape[0], state["classifier.weight"].shape[0], real.shape[-1],
                          **cfg["arch_options"])
    model.load_state_dict(state)
    return model.to(real.device)


def with_stored_weights(store: ArtifactStore, stage: Stage, real: RealData) -> RealData:
    """`real` carrying the debiasing weights of the stage's `weights` input (a weights stage), if it has one."""
    if "weights" not in stage.inputs:
        return real
    weights = store.read_tensors("weights", stage.inputs["weights"], "weights.pt")["weights"]
    return dataclasses.replace(real, weights=weights)  # checked against the split, moved to its device


def build_guidance(store: ArtifactStore, stage: Stage, real: RealData, g: GuidanceConfig | None,
                   seed: int) -> PTMGuidance | None:
    """The frozen PTM pool a distillation samples from: the chosen checkpoints of every input PTM."""
    if g is None:
        return None
    pool = PTMPool()
    for key in stage.inputs["ptms"]:
        arch = store.read_json("ptm", key, RESULT)["coords"]["arch"]
        checkpoints = load_checkpoints(store, key)
        for epoch in g.checkpoint_epochs or [max(checkpoints)]:
            pool.add(arch, load_ptm_network(store, key, real, epoch, checkpoints))
    return PTMGuidance(g, pool, real=real if g.kind == "cclom" else None, seed=seed)


def synthetic_grid(syn: SyntheticSet, ipc: int) -> torch.Tensor:
    from torchvision.utils import make_grid  # torchvision: only where a grid is drawn

    images = syn.norm.invert(syn.images.detach().cpu())
    return make_grid(images, nrow=max(1, min(ipc, 20)) if ipc > 1 else 10, padding=1)


def load_synthetic(store: ArtifactStore, key: str, ds: BiasedDataset) -> SyntheticSet:
    """A stored synthetic set, in the normalisation of the dataset variant it was distilled from."""
    kind = Stage.kind_of(key)  # a distillation's or a search's (its best trial's set)
    meta = store.read_json(kind, key, RESULT)["synthetic_meta"]
    return SyntheticSet.from_tensors(store.read_tensors(kind, key, "synthetic.pt"), meta, ds.normalization)


def format_record(record: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                    if k not in ("iteration", "epoch"))
