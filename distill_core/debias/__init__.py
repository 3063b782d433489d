"""Bias-aware weighting of real samples and its registry.

Importing this package registers the built-in kinds (each module calls
`register` beside its weighting): `none`, `kde` (Cui et al. 2024), `groups`
(FairDD) and `lff` (Learning from Failure, Nam et al. 2020: weights from an
LfF-trained PTM's scores). `get_debias(name).compute(images, labels, num_classes, options, ...)`
gives the per-sample weights a `RealData` carries (`RealData.weights`), which
DM, DC and DSA use where they form real statistics, and PTM / expert training
uses to draw its epochs (`distill_core.training.train_epoch(..., weights=)`):
MTT's experts on reweighted data. A new kind is one module calling `register`
plus its import here.
"""

from __future__ import annotations

from distill_core.debias import groups, kde, lff, none  # noqa: F401  (registers the built-in kinds)
from distill_core.debias.registry import (DEBIAS_KINDS, DebiasConfig, DebiasKind, UnknownDebias,
                                          distillation_attributes, get_debias, register, scale_per_class,
                                          unregister, weight_summary)

__all__ = ["DEBIAS_KINDS", "DebiasConfig", "DebiasKind", "UnknownDebias", "distillation_attributes", "get_debias", "register",
           "scale_per_class", "unregister", "weight_summary"]
