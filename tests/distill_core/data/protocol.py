"""Test helpers: the attribute counts of protocols.md, written out independently of distill_core.data.bias."""

from __future__ import annotations

import numpy as np
import torch


def protocol_counts(class_size: int, c: int, p: float, k: int = 10) -> np.ndarray:
    """Attribute counts of class c, written out from protocols.md (independent of bias.py)."""
    row = np.full(k, (1.0 - p) / (k - 1))
    row[c] = p
    milestones = np.round(class_size * np.cumsum(row))
    return np.diff(np.concatenate([[0.0], milestones])).astype(int)


def labels_with_counts(counts, seed=0) -> torch.Tensor:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def attribute_table(labels, attrs, k=10) -> np.ndarray:
    """(class, attribute) count matrix."""
    return torch.bincount(labels * k + attrs, minlength=k * k).view(k, k).numpy()
