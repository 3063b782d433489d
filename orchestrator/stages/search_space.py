"""A search stage's config and its space: what the graph builds and the trials apply (no Ray imports)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from distill_core.config import Config
from distill_core.evaluation import EvalConfig
from distill_core.methods import DistillConfig
from orchestrator.spec.search import SEARCH_ALGORITHMS

METRIC = "val_acc"  # what trials report and the search maximises


class SearchConfig(Config):
    distill: DistillConfig  # the setting searched around; sampled fields replace its values
    space: dict[str, dict[str, Any]]  # field -> {distribution: value}, as in the spec (only fields that apply)
    num_samples: int = Field(ge=1)
    scheduler: Literal["fifo", "asha"] = "fifo"
    grace_period: int = Field(ge=1)  # ASHA: iterations before a trial may be stopped
    reduction_factor: float = Field(default=3.0, gt=1)
    algorithm: Literal[SEARCH_ALGORITHMS] = SEARCH_ALGORITHMS[0]
    seed: int = Field(default=0, ge=0)
    max_concurrent: int | None = None  # changes what adaptive searchers propose, so it is part of the key
    every: int = Field(ge=1)  # iterations between proxy reports
    proxy: EvalConfig


def tune_space(space: dict[str, dict[str, Any]]) -> dict:
    """The spec's distributions as Tune's (randint's bounds are inclusive in the spec, Tune's high is not)."""
    from ray import tune

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


PROGRESS = "ddray-progress.json"  # beside Tune's experiment state: trials done, stopped, best so far


def progress_path(store_root: Path, key: str) -> Path:
    return Path(store_root) / "searches" / key / PROGRESS


def search_progress(store, key: str) -> dict | None:
    """A running search's progress as its coordinator last wrote it (local stores; None elsewhere or before)."""
    if not isinstance(store.root, Path):
        return None
    try:
        return json.loads(progress_path(store.root, key).read_text())
    except (OSError, ValueError):
        return None
