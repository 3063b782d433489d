"""The debiasing registry: how real samples are weighted before their statistics are formed.

A kind registers one `DebiasKind` record next to its weighting: a typed options
model (a `distill_core.methods.Options`: frozen, extra="forbid"), the weighting
function, whether it needs attribute (bias) labels or per-sample scores, and a
summary. Adding a
kind is one module in `distill_core/debias/` that calls `register`, plus its
import in `distill_core/debias/__init__.py` (mirroring the method registry).

Every weighting has one signature:

    weights(images, labels, num_classes, options, attributes=None, embed=None, scores=None) -> Tensor | None

`images` are the real training images (normalised, as in `RealData`),
`labels` their classes, `attributes` their bias attributes (the distillation
split's slice of `BiasedDataset.train_attrs`; see `distillation_attributes`),
`embed` an optional function images -> (N, D) features, `scores` an optional
float tensor of one score per sample (the final LfF relative difficulty of an
LfF-trained PTM, `PTMResult.scores`; kinds with `needs_scores`). The result is one
float32 weight per sample, each class scaled so that its largest weight is
exactly 1.0 (so uniform weights are exactly 1.0 and the weighted recipes then
compute bit-for-bit what the unweighted ones do), or None for "no weights"
(the recipes' unweighted path).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field

from distill_core.config import Config
from distill_core.data.bias import aligned_mask
from distill_core.data.biased import NUM_ATTRIBUTES
from distill_core.methods.registry import Options
from distill_core.registry import Registry

WeightsFn = Callable[..., "torch.Tensor | None"]


@dataclass(frozen=True)
class DebiasKind:
    name: str
    options: type[Options]
    weights: WeightsFn
    needs_attributes: bool = False  # True: an "oracle" kind, needs the bias attribute of every sample
    needs_scores: bool = False  # True: needs a score per sample from an LfF-trained PTM (PTMResult.scores)
    summary: str = ""

    def __post_init__(self):
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"debias kind name '{self.name}': use lowercase letters, digits and '_'")
        if not issubclass(self.options, Options):
            raise TypeError(f"debias kind '{self.name}': options must subclass distill_core.methods.Options")

    def compute(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, options: dict | Options | None = None,
                attributes: torch.Tensor | None = None, embed=None,
                scores: torch.Tensor | None = None) -> torch.Tensor | None:
        """The kind's weights with its options validated here (a dict, an options model or None for defaults)."""
        opts = options if isinstance(options, self.options) else self.options(**(options or {}))
        if self.needs_attributes and attributes is None:
            raise ValueError(f"debias kind '{self.name}' needs the attribute (bias) label of every real sample")
        if self.needs_scores and scores is None:
            raise ValueError(f"debias kind '{self.name}' needs a score per real sample from an LfF-trained PTM")
        return self.weights(images, labels, num_classes, opts, attributes=attributes, embed=embed, scores=scores)


class DebiasConfig(Config):
    """One weighting: a kind of the registry and its options as given (a dict: the kind's model checks it
    when the weights are computed, so a stored config is what the study wrote)."""

    kind: str
    options: dict[str, Any] = Field(default_factory=dict)


class UnknownDebias(ValueError):
    pass


DEBIAS_KINDS: Registry = Registry("debias kind", UnknownDebias)


def register(kind: DebiasKind) -> DebiasKind:
    """Add a kind to the registry (names are unique)."""
    return DEBIAS_KINDS.add(kind)


def unregister(name: str) -> None:
    DEBIAS_KINDS.remove(name)


def get_debias(name: str) -> DebiasKind:
    return DEBIAS_KINDS.named(name)


def distillation_attributes(ds) -> torch.Tensor:
    """The attributes of a `BiasedDataset`'s distillation split, aligned with `RealData.from_dataset(ds)`."""
    return ds.train_attrs[ds.distill_index()]


def scale_per_class(weights: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Each class's weights divided by that class's largest, so its largest is exactly 1.0 (x / x == 1 in IEEE)."""
    out = weights.clone()
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).squeeze(1)
        if len(idx):
            out[idx] = weights[idx] / weights[idx].max()
    return out.float()


def weight_summary(weights: torch.Tensor, labels: torch.Tensor, attributes: torch.Tensor | None) -> dict:
    """Mean weight, and on biased data the conflicting samples' share of weight against their share of samples
    (equal: no reweighting; higher: the weights favour conflicting samples)."""
    out = {"weight_mean": float(weights.mean()), "weight_min": float(weights.min())}
    if attributes is None:
        return out
    aligned = aligned_mask(labels, attributes, NUM_ATTRIBUTES)
    conflicting = ~aligned
    out["conflicting_fraction"] = float(conflicting.float().mean())
    out["conflicting_weight_share"] = float(weights[conflicting].sum() / weights.sum()) if weights.sum() > 0 else 0.0
    if aligned.any():
        out["weight_mean_aligned"] = float(weights[aligned].mean())
    if conflicting.any():
        out["weight_mean_conflicting"] = float(weights[conflicting].mean())
    return out
