"""What each stage kind does, run inside a Ray worker (or inline in tests).

Each `run_*` rebuilds its typed config (`stage.typed_config()`), reads its
named inputs from the artifact store by key, computes, and writes its outputs
(tensors, a `result.json` with params and metrics, PNGs) as one atomic stage
directory. The driver logs what is in `result.json` and
the listed artifacts to MLflow, so workers never talk to the tracking server.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from distill_core.data import BiasedDataset, load_source
from distill_core.evaluation import evaluate_synthetic
from distill_core.guidance import GuidanceConfig, PTMGuidance, PTMPool
from distill_core.methods import RealData, SyntheticSet, get_method
from distill_core.networks import build_network
from distill_core.ptm import accuracy, train_ptm
from distill_core.runtime import Runtime
from distill_core.sets import external_set
from distill_core.utils import set_threads
from orchestrator.graph import Stage
from orchestrator.object_store import open_store
from orchestrator.store import ArtifactStore, sha256_file, tensors_to_bytes

RESULT = "result.json"
CURRENT_RUN: dict = {}  # where and how the stage in this process runs (execute_stage sets it)
log = logging.getLogger("ddray.stage")


def png_bytes(grid: torch.Tensor) -> bytes:
    from PIL import Image

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
    store.write_stage(stage.kind, stage.key, files, meta or {})
    return result


# --- dataset --------------------------------------------------------------------------------------

def dataset_grid(ds: BiasedDataset, per_group: int = 8) -> torch.Tensor:
    """One row per class: aligned samples first, then conflicting ones."""
    from torchvision.utils import make_grid

    from distill_core.data.bias import aligned_mask
    from distill_core.data.biased import NUM_ATTRIBUTES

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


# --- PTM pool member ----------------------------------------------------------------------------

def run_ptm(stage: Stage, store: ArtifactStore, runtime: Runtime) -> dict:
    started = time.time()
    cfg = stage.typed_config()
    ds = load_dataset(store, stage.inputs["dataset"])
    real = RealData.from_dataset(ds, runtime.torch_device)
    val_x, val_y = ds.val_split()
    val = (real.norm.apply(val_x).to(real.device), val_y.to(real.device)) if len(val_y) else None
    result = train_ptm(real, cfg, val=val, runtime=runtime,
                       progress=lambda epoch, r: log.info("epoch %d/%d %s", epoch, cfg.epochs, _fmt(r)))
    flat = {f"{epoch}/{name}": t for epoch, sd in result.checkpoints.items() for name, t in sd.items()}
    last = result.history[-1]
    files = {"checkpoints.pt": tensors_to_bytes(flat), "history.json": json_bytes(result.history)}
    metrics = {k: last[k] for k in ("train_acc", "val_acc", "train_loss") if k in last}
    # how good a teacher it is: its last kept checkpoint's accuracy on the test set (bias-conflicting if biased)
    final = build_network(cfg.arch, real.shape[0], real.num_classes, real.shape[-1], **cfg.arch_options)
    final.load_state_dict(result.checkpoints[max(result.checkpoints)])
    metrics["test_acc"] = accuracy(final.to(real.device), real.norm.apply(ds.test_images).to(real.device),
                                   ds.test_labels.to(real.device))
    log.info("test accuracy %.4f (epoch %d)", metrics["test_acc"], max(result.checkpoints))
    return finish_stage(store, stage, files, metrics,
                   ["history.json"], {"epochs": sorted(result.checkpoints)}, started)


def load_checkpoints(store: ArtifactStore, key: str) -> dict[int, dict[str, torch.Tensor]]:
    flat = store.read_tensors("ptm", key, "checkpoints.pt")
    out: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in flat.items():
        epoch, param = name.split("/", 1)
        out.setdefault(int(epoch), {})[param] = t
    return out


# --- distillation -------------------------------------------------------------------------------

def build_guidance(store: ArtifactStore, stage: Stage, real: RealData, g: GuidanceConfig | None,
                   seed: int) -> PTMGuidance | None:
    """The frozen PTM pool a distillation samples from: the chosen checkpoints of every input PTM."""
    if g is None:
        return None
    pool = PTMPool()
    for key in stage.inputs["ptms"]:
        ptm = store.read_json("ptm", key, RESULT)
        cfg = ptm["config"]
        checkpoints = load_checkpoints(store, key)
        for epoch in g.checkpoint_epochs or [max(checkpoints)]:
            ptm_classes = checkpoints[epoch]["classifier.weight"].shape[0]  # a cross-domain PTM has its own classes
            model = build_network(cfg["arch"], real.shape[0], ptm_classes, real.shape[-1], **cfg["arch_options"])
            model.load_state_dict(checkpoints[epoch])
            pool.add(ptm["coords"]["arch"], model.to(real.device))
    return PTMGuidance(g, pool, real=real if g.kind == "cclom" else None, seed=seed)


def synthetic_grid(syn: SyntheticSet, ipc: int) -> torch.Tensor:
    from torchvision.utils import make_grid

    images = syn.norm.invert(syn.images.detach().cpu())
    return make_grid(images, nrow=max(1, min(ipc, 20)) if ipc > 1 else 10, padding=1)


def run_distill(stage: Stage, store: ArtifactStore, runtime: Runtime) -> dict:
    started = time.time()
    cfg = stage.typed_config()
    ds = load_dataset(store, stage.inputs["dataset"])
    real = RealData.from_dataset(ds, runtime.torch_device)
    experts = [load_checkpoints(store, k) for k in stage.inputs.get("experts", [])]
    syn = get_method(cfg.method).distill(
        real, cfg, runtime, guidance=build_guidance(store, stage, real, cfg.guidance, cfg.seed), experts=experts or None,
        progress=lambda it, r, _: log.info("iteration %d/%d %s", it + 1, cfg.iterations, _fmt(r)))
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


def load_synthetic(store: ArtifactStore, key: str, ds: BiasedDataset) -> SyntheticSet:
    """A stored synthetic set, in the normalisation of the dataset variant it was distilled from."""
    kind = Stage.kind_of(key)  # a distillation's or a search's (its best trial's set)
    meta = store.read_json(kind, key, RESULT)["synthetic_meta"]
    return SyntheticSet.from_tensors(store.read_tensors(kind, key, "synthetic.pt"), meta, ds.normalization)


# --- evaluation ---------------------------------------------------------------------------------

NETWORK_METRICS = ("acc", "acc_last", "acc_val_selected", "acc_unbiased", "acc_aligned", "acc_conflicting")


def summarise(runs: list[dict]) -> dict:
    """Means over evaluation networks (and the accuracy's std); `accs` and `networks` keep every network's
    values (None where a network has none: no validation split, or no attribute)."""
    def finite(v) -> float | None:
        return float(v) if v is not None and math.isfinite(v) else None

    networks = {name: [finite(r.get(name)) for r in runs] for name in NETWORK_METRICS}

    def stat(name, fn):
        vals = np.array([v for v in networks[name] if v is not None], dtype=float)
        return float(fn(vals)) if len(vals) else math.nan
    out = {"acc_mean": stat("acc", np.mean), "acc_std": stat("acc", np.std), "n_repeats": len(runs),
           "accs": [float(r["acc"]) for r in runs], "networks": networks, "selection": runs[0]["selection"]}
    for name in ("acc_last", "acc_val_selected"):
        out[f"{name}_mean"], out[f"{name}_std"] = stat(name, np.mean), stat(name, np.std)
    for name in ("acc_unbiased", "acc_aligned", "acc_conflicting"):
        out[f"{name}_mean"] = stat(name, np.mean)
    vals = np.array([r["val_acc"] for r in runs if r.get("val_acc") is not None], dtype=float)
    out["val_acc_mean"] = float(vals.mean()) if len(vals) else math.nan
    return out


def run_evaluate(stage: Stage, store: ArtifactStore, runtime: Runtime) -> dict:
    started = time.time()
    cfg = stage.typed_config()
    ds = load_dataset(store, stage.inputs["dataset"])
    syn = load_synthetic(store, stage.inputs["synthetic"], ds)
    runs = evaluate_synthetic(syn, ds, cfg, runtime, progress=lambda r, res: log.info(
        "network %d/%d: acc %.4f at epoch %s (%s; last %.4f, val-selected %s)", r + 1, cfg.repeats, res["acc"],
        res["epoch"], cfg.selection, res["acc_last"],
        "-" if res["acc_val_selected"] is None else f"{res['acc_val_selected']:.4f}"))
    summary = summarise(runs)
    per_class = np.array([r["per_class"] for r in runs], dtype=float).mean(axis=0).tolist()
    files = {"repeats.json": json_bytes(runs), "per_class_accuracy.json": json_bytes(
        {"class": list(range(len(per_class))), "accuracy": per_class})}
    metrics = {k: v for k, v in summary.items() if isinstance(v, float) and math.isfinite(v)}
    metrics["n_repeats"] = summary["n_repeats"]
    return finish_stage(store, stage, files, metrics, ["per_class_accuracy.json", "repeats.json"],
                   {"summary": summary}, started)


def run_search(stage: Stage, store: ArtifactStore, runtime: Runtime) -> dict:
    from orchestrator.search import run_search  # Ray Tune, imported only where a search runs

    return run_search(stage, store, runtime)


RUNNERS: dict[str, Callable[[Stage, ArtifactStore, Runtime], dict]] = {
    "dataset": run_dataset, "ptm": run_ptm, "distill": run_distill, "search": run_search, "external": run_external,
    "evaluate": run_evaluate,
}


def _fmt(record: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                    if k not in ("iteration", "epoch"))


def _ray_node() -> str | None:
    if "ray" not in sys.modules:
        return None
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def execute_stage(stage: Stage, store_root: str, cpus: float, gpus: float, runtime: dict | None = None) -> dict:
    """Entry point of a stage task: threads and device from the task's resources, the study's runtime settings.

    Every execution leaves an attempt file in the store before it computes, so
    retries (a worker killed mid-stage) and duplicate work are counted; its log
    (progress lines, warnings, the error) goes beside it (`ddray study logs`).
    """
    set_threads(cpus)
    device = "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"
    store = open_store(store_root)
    attempt = store.record_attempt(stage.key)
    CURRENT_RUN.clear()
    CURRENT_RUN.update(host=socket.gethostname(), pid=os.getpid(), node=_ray_node(), started=time.time(),
                       attempt=Path(str(attempt)).stem, cpus=cpus, gpus=gpus, device=device)
    handler = logging.FileHandler(store.attempt_log(stage.key, attempt), delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    level, root.level = root.level, min(root.level, logging.INFO)
    log.info("%s %s on %s (%s, %g CPU, %g GPU)", stage.kind, stage.label, CURRENT_RUN["host"], device, cpus, gpus)
    try:
        with warnings_logged():
            return RUNNERS[stage.kind](stage, store, Runtime(**{**(runtime or {}), "device": device}))
    except BaseException:
        log.exception("stage failed")
        raise
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()
        store.publish_log(stage.key, attempt)


class warnings_logged:
    """Python warnings of a stage go to its log (logging.captureWarnings for the stage's duration)."""

    def __enter__(self):
        logging.captureWarnings(True)

    def __exit__(self, *exc):
        logging.captureWarnings(False)
