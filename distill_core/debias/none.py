"""`none`: no weights; the recipes take their unweighted path (every existing result unchanged)."""

from __future__ import annotations

from distill_core.debias.registry import DebiasKind, register
from distill_core.methods.registry import Options


def no_weights(images, labels, num_classes, options, attributes=None, embed=None, scores=None):
    return None


register(DebiasKind(name="none", options=Options, weights=no_weights, summary="no reweighting"))
