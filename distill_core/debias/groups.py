"""`groups`: every (class, attribute) group of a class carries the same total weight (FairDD as weights).

FairDD (Zhou et al., github zqhang/FairDD, main_DM.py with --FairDD) matches
the synthetic mean of a class to the real mean of every attribute group in the
real batch separately and sums the distances, so each group of the batch
counts equally however many samples it has. Here the same balance is given as
per-sample weights w_i = 1 / (G_c * n_g(i)) -- G_c the number of attribute
groups in class c, n_g the group's size in the whole distillation split -- then
scaled so the class's largest weight is 1.0 (the smallest group's samples get
1.0; every group's weights sum to the smallest group's size).

Deviations from upstream: group sizes are those of the whole split, not of each
sampled batch (a batch's weighted mean is the equal-group mean in expectation);
sum_g ||m_g - s||^2 equals G * ||mean_g m_g - s||^2 plus a constant, so
upstream's loss has G times ddray's gradient (a learning-rate factor); and the
weights also apply to DC/DSA's real-gradient loss, where upstream's main_DC.py
has its own per-group loop. Needs attribute labels (an "oracle").
"""

from __future__ import annotations

import torch

from distill_core.debias.registry import DebiasKind, register, scale_per_class
from distill_core.methods.registry import Options


def group_weights(images, labels, num_classes, options, attributes=None, embed=None, scores=None) -> torch.Tensor:
    if attributes is None:
        raise ValueError("debias kind 'groups' needs the attribute (bias) label of every real sample")
    labels, attributes = labels.cpu(), attributes.cpu().long()
    if attributes.shape != labels.shape:
        raise ValueError(f"{len(attributes)} attributes for {len(labels)} samples")
    raw = torch.zeros(len(labels), dtype=torch.float64)
    for c in range(num_classes):
        in_c = labels == c
        groups, inverse, sizes = torch.unique(attributes[in_c], return_inverse=True, return_counts=True)
        raw[in_c] = 1.0 / (len(groups) * sizes[inverse].double())
    return scale_per_class(raw, labels, num_classes)


register(DebiasKind(name="groups", options=Options, weights=group_weights, needs_attributes=True,
                    summary="equal total weight per (class, attribute) group (FairDD; needs attributes)"))
