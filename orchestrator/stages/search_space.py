"""A search stage's config and its space: what the graph builds and the trials apply (no Ray imports)."""

from __future__ import annotations

import json
import math
from typing import Any

from distill_core.methods import DistillConfig
from orchestrator.spec.search import SearchConfig
from orchestrator.storage.base import Store

METRIC = "val_acc"  # what trials report and the search maximises


def tune_space(space: dict[str, dict[str, Any]]) -> dict:
    """The spec's distributions as Tune's (randint's bounds are inclusive in the spec, Tune's high is not)."""
    from ray import tune  # Ray: imported where it is used (planning and `validate` start without it)

    build = {"choice": tune.choice, "grid": tune.grid_search, "uniform": lambda v: tune.uniform(*v),
             "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(v[0], v[1] + 1)}
    return {path: build[kind](value) for path, dist in space.items() for kind, value in dist.items()}


def trial_config(base: DistillConfig, sampled: dict[str, Any]) -> DistillConfig:
    """`base` with each sampled field (`lr_img`, `guidance.alpha`, `options.<method>.<option>`) replaced."""
    data = base.model_dump()
    for path, value in sampled.items():
        head, _, rest = path.partition(".")
        value = value.item() if hasattr(value, "item") else value  # numpy scalars from samplers
        if head == "options":
            data["options"][rest.partition(".")[2]] = value
        elif head == "guidance":
            data["guidance"][rest] = value
        else:
            data[head] = value
    return DistillConfig(**data)


def max_iterations(space: dict[str, dict[str, Any]], iterations: int) -> int:
    """The longest budget a trial may get: the largest `iterations` the space offers, else the setting's."""
    dist = space.get("iterations")
    return iterations if dist is None else int(max(next(iter(dist.values()))))


def trial_count(cfg: SearchConfig) -> int:
    """Trials Tune runs: `num_samples` times the points of every grid."""
    return cfg.num_samples * math.prod(len(v) for d in cfg.space.values() for k, v in d.items() if k == "grid")


def search_progress(store: Store, key: str) -> dict | None:
    """A running search's progress as its coordinator last wrote it (local stores; None elsewhere or before)."""
    path = store.search_progress_file(key)
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
