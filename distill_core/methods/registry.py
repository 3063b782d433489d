"""The method registry: the one place that knows what each method is.

A method registers one `Method` record next to its recipe: the function, its
upstream defaults (iterations, image learning rate, initialisation, whether it
distils with siamese augmentation), its evaluation protocol, a typed options
model, and what it needs (expert trajectories) or does not do (optimise
images). The orchestrator reads only these records, so adding a method is one
new module in `distill_core/methods/` that calls `register`, plus its import
in `distill_core/methods/__init__.py`.

Every method function has one signature:

    fn(real, cfg, runtime=DEFAULT_RUNTIME, guidance=None, experts=None, progress=None) -> SyntheticSet

`cfg.options` is the method's own options model, built and validated with the
config (`DistillConfig` looks the model up here by the method's name), so a
recipe reads `cfg.options.<field>` and never validates options itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Literal

from distill_core.augment import DSA_STRATEGY, DSA_STRATEGY_NO_FLIP, make_augmentation
from distill_core.config import Config
from distill_core.data.sources import SourceInfo
from distill_core.registry import Registry
from distill_core.sets import SyntheticSet

MethodFn = Callable[..., SyntheticSet]


class Options(Config):
    """A method's typed options; the base has none. Subclass it with defaulted, bounded fields."""


@dataclass(frozen=True)
class EvalProtocol:
    """How a method's synthetic sets are evaluated upstream: augmentation (see `make_augmentation`) and epochs."""

    augment: str | None
    epochs: int

    @property
    def label(self) -> str:
        return f"{self.augment or 'none'}/{self.epochs}ep"


ProtocolFn = Callable[[SourceInfo, str], EvalProtocol]  # (target source, evaluation architecture) -> protocol


def dsa_strategy(source: SourceInfo) -> str:
    """Upstream's DSA strategy for a source: no flip for digits (MNIST, SVHN)."""
    return DSA_STRATEGY_NO_FLIP if source.digits else DSA_STRATEGY


def dsa_protocol(source: SourceInfo, arch: str) -> EvalProtocol:
    """DSA, DM and MTT (main.py with --dsa, main_DM.py, distill.py): DSA augmentation, 1000 epochs."""
    return EvalProtocol(f"dsa:{dsa_strategy(source)}", 1000)


def evaluation_augment(setting: str, protocol: EvalProtocol, source: SourceInfo) -> str | None:
    """An evaluation augmentation setting resolved for one target.

    "auto" is the method's protocol, "none" none, "dsa" DSA with the source's
    strategy, "dc" DC's crop/scale/rotate; anything else must be a full name
    ("dsa:<strategy>", "dc:<strategy>"). Raises ValueError for a bad name.
    """
    resolved = {"auto": protocol.augment, "none": None, "dsa": f"dsa:{dsa_strategy(source)}",
                "dc": "dc:crop_scale_rotate"}.get(setting, setting)
    make_augmentation(resolved)
    return resolved


@dataclass(frozen=True)
class Method:
    name: str
    distill: MethodFn
    iterations: int  # upstream default budget
    lr_img: float  # upstream default image learning rate (0 for methods that do not optimise images)
    init: Literal["real", "noise"]
    augment: bool  # distils with differentiable siamese augmentation (strategy from the source)
    evaluation: ProtocolFn
    options: type[Options] = Options
    needs_experts: bool = False  # takes expert trajectories (a PTM pool with recipe "expert")
    optimises_images: bool = True  # False for coreset baselines: no iterations, no lr, no guidance
    # forms its real statistics with per-sample debiasing weights (`RealData.weights`, distill_core.debias):
    # a study may cross it with `distillation.debias` kinds other than none
    takes_weights: bool = False
    # "random_subset": every study evaluates this method's set at each IPC as the baseline others are scored
    # against (DD-Ranking's improvement over random); "whole_dataset": the upper-bound reference row
    reference: Literal["random_subset", "whole_dataset"] | None = None
    summary: str = ""

    def __post_init__(self):
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"method name '{self.name}': use lowercase letters, digits and '_'")
        if self.optimises_images and (self.iterations < 1 or self.lr_img <= 0):
            raise ValueError(f"method '{self.name}' optimises images: give default iterations >= 1 and lr_img > 0")
        if not issubclass(self.options, Options):
            raise TypeError(f"method '{self.name}': options must subclass distill_core.methods.Options")

    def protocol(self, source: SourceInfo, arch: str) -> EvalProtocol:
        return self.evaluation(source, arch)


class UnknownMethod(ValueError):
    pass


METHODS: Registry = Registry("method", UnknownMethod)


def register(method: Method) -> Method:
    """Add a method to the registry (names are unique)."""
    return METHODS.add(method)


def unregister(name: str) -> None:
    METHODS.remove(name)


def get_method(name: str) -> Method:
    return METHODS.named(name)


def reference_method(role: str) -> Method | None:
    """The registered method playing a reference role ("random_subset", "whole_dataset"), if any."""
    return next((m for m in METHODS.values() if m.reference == role), None)
