"""The evaluation kind: networks trained from scratch on one synthetic set and tested (test, aligned,
conflicting, unbiased), summarised over repeats.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from distill_core.evaluation import EvalConfig, evaluate_synthetic
from distill_core.runtime import Runtime
from orchestrator.stages.base import Stage, StageKind, register
from orchestrator.stages.common import (
    finish_stage,
    json_bytes,
    load_dataset,
    load_synthetic,
)
from orchestrator.storage.local import ArtifactStore

log = logging.getLogger("ddray.stage")


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


register(StageKind("evaluate", version=4, config=EvalConfig, run=run_evaluate, resources="evaluate"))
