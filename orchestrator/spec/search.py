"""The `distillation.search` block: a Ray Tune search over distillation fields and typed method options.

    search:
      space:                                  # dotted field -> one distribution
        lr_img: {loguniform: [0.001, 100.0]}
        guidance.alpha: {choice: [0.01, 0.1, 1.0]}
        options.mtt.syn_steps: {randint: [10, 40]}    # inclusive bounds
      num_samples: 6
      scheduler: asha        # fifo | asha
      algorithm: optuna      # random | optuna
      max_concurrent: 2
      proxy: {every: 100, epochs: 100}

A field applies to the distillation settings it exists in: `options.<method>.*`
to that method's settings, `guidance.*` to guided ones; a setting no field
applies to (a coreset baseline, an unguided setting searching only alpha) is a
plain distillation stage. Values are checked here against the same typed
models the stages use, so a bad bound is one line naming its path.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from distill_core.config import Config
from distill_core.evaluation import EvalConfig
from distill_core.methods import METHODS, DistillConfig
from orchestrator.spec.base import Strict, bounded, same

# Distillation fields a search may vary (ipc and the method are study axes: they change what is produced).
SHARED_FIELDS = ("iterations", "lr_img", "lr_net", "batch_real", "init")


GUIDANCE_FIELDS = ("alpha", "real_batch")


DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")


MAX_TRIALS = 100_000  # trials in one search: num_samples x the points of every grid


SEARCH_ALGORITHMS = ("random", "optuna")  # Tune's random/grid search and Optuna's TPE (not distillation methods)


class Domain(Strict):
    """One distribution: exactly one of the keys. Bounds are [low, high] (randint: both inclusive)."""

    choice: list[Any] | None = Field(default=None, min_length=1, max_length=1000)
    grid: list[Any] | None = Field(default=None, min_length=1, max_length=1000)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def one_distribution(self) -> "Domain":
        given = [k for k in DISTRIBUTIONS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)}")
        low_high = self.uniform or self.loguniform
        if low_high is not None and not low_high[0] < low_high[1]:
            raise ValueError(f"empty range [{low_high[0]:g}, {low_high[1]:g}] (low must be below high)")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform needs positive bounds, got low {self.loguniform[0]:g}")
        if self.randint is not None and self.randint[0] > self.randint[1]:
            raise ValueError(f"empty range [{self.randint[0]}, {self.randint[1]}] (low must not exceed high)")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DISTRIBUTIONS if getattr(self, k) is not None)

    @property
    def value(self) -> Any:
        return getattr(self, self.kind)

    def extremes(self) -> list[Any]:
        """Values that stand for the whole domain when checking it against a field's type and bounds
        (a continuous range adds a fractional point inside it: an integer field needs randint)."""
        values = list(self.value)
        if self.uniform is not None or self.loguniform is not None:
            low, high = values
            inside = low * (high / low) ** 0.37 if self.loguniform is not None else low + 0.37 * (high - low)
            values.append(inside if inside != round(inside) else inside + 1e-3)
        return values


class ProxySpec(Strict):
    """The short evaluation a trial reports: networks trained on the current synthetic set, scored on the
    validation split held out from training (never a test set)."""

    every: int | None = Field(default=None, ge=1, le=10_000_000)  # iterations between reports; None: 4 reports
    epochs: bounded(EvalConfig, "epochs") = 100  # the proxy's own budget, an evaluation's field
    repeats: bounded(EvalConfig, "repeats") = 1
    augmentation: Literal["none", "auto"] = "none"  # auto: the method's evaluation augmentation (slower)


class SearchConfig(Config):
    """A search stage's config: the setting searched around, the space, and how Tune searches it."""

    distill: DistillConfig  # the setting searched around; sampled fields replace its values
    space: dict[str, dict[str, Any]]  # field -> {distribution: value}, as in the spec (only fields that apply)
    num_samples: int = Field(default=8, ge=1, le=10_000)  # trials (x the points of any grid)
    scheduler: Literal["fifo", "asha"] = "fifo"
    grace_period: int = Field(ge=1, le=10_000_000)  # ASHA: iterations before a trial may be stopped
    reduction_factor: float = Field(default=3.0, gt=1, le=100)
    algorithm: Literal[SEARCH_ALGORITHMS] = SEARCH_ALGORITHMS[0]
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    # None: as many as fit; changes what adaptive searchers propose, so it is part of the key
    max_concurrent: int | None = Field(default=None, ge=1, le=10_000)
    every: int = Field(ge=1, le=10_000_000)  # iterations between proxy reports
    proxy: EvalConfig


class SearchSpec(Strict):
    space: dict[str, Domain] = Field(min_length=1, max_length=100)
    num_samples: same(SearchConfig, "num_samples")
    scheduler: same(SearchConfig, "scheduler")
    grace_period: bounded(SearchConfig, "grace_period") | None = None  # ASHA, in iterations; None: proxy.every
    reduction_factor: same(SearchConfig, "reduction_factor")
    algorithm: same(SearchConfig, "algorithm")
    seed: same(SearchConfig, "seed")
    metric: Literal["val_acc"] = "val_acc"
    max_concurrent: same(SearchConfig, "max_concurrent")
    max_failures: int = Field(default=2, ge=0, le=100)  # a failing trial is retried, the others are kept
    proxy: ProxySpec = ProxySpec()

    @model_validator(mode="after")
    def trials_bounded(self) -> "SearchSpec":
        grids = [len(d.grid) for d in self.space.values() if d.grid is not None]
        trials = self.num_samples * math.prod(grids)
        if trials > MAX_TRIALS:
            raise ValueError(f"num_samples: {self.num_samples:,} x {' x '.join(map(str, grids))} grid points = "
                             f"{trials:,} trials per search; at most {MAX_TRIALS:,}")
        return self


def applies(path: str, method: str, guided: bool) -> bool:
    """Whether a space field exists in a distillation setting of `method` (guided or not)."""
    head, _, rest = path.partition(".")
    if head == "options":
        return rest.partition(".")[0] == method
    if head == "guidance":
        return guided
    return METHODS[method].optimises_images
