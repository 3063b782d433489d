"""Bias-aware weighting of real samples and its registry.

Importing this package registers the built-in kinds (each module calls
`register` beside its weighting): `none`, `kde` (Cui et al. 2024) and `groups`
(FairDD). `get_debias(name).compute(images, labels, num_classes, options, ...)`
gives the per-sample weights a `RealData` carries (`RealData.weights`), which
DM, DC and DSA use where they form real statistics (MTT does not yet).
"""

from __future__ import annotations

from distill_core.debias import groups, kde, none  # noqa: F401  (registers the built-in kinds)
from distill_core.debias.registry import (DEBIAS_KINDS, DebiasKind, UnknownDebias, distillation_attributes,
                                          get_debias, register, scale_per_class, unregister)

__all__ = ["DEBIAS_KINDS", "DebiasKind", "UnknownDebias", "distillation_attributes", "get_debias", "register",
           "scale_per_class", "unregister"]
