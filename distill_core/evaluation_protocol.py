"""What the evaluation engines share: the protocol's config, schedule, seeded networks, metrics and records.

`distill_core.evaluation` (one network at a time, the recipe) and
`distill_core.grouped` (the repeats folded into one grouped ConvNet, on CUDA)
train and test networks by the same protocol (described in
`distill_core.evaluation`); both build on this module, which imports neither:
- `EvalConfig`, and `EvalSets`, the normalised test and validation tensors;
- the schedule: `validation_epochs` (the check epochs), `decay_epoch` (the lr
  step), `training_lr`;
- `seeded_network`: repeat r's network, initialised from its own seed;
- metrics: `accuracy_of`, `metrics_from_predictions` (accuracy on the
  conflicting and unbiased test sets, aligned vs conflicting, per class);
- records: `network_result`, one network's record with both checkpoints,
  and `check_selection`, the config-vs-data check behind `selection`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field

from distill_core.config import Config
from distill_core.data.bias import aligned_mask
from distill_core.data.biased import NUM_ATTRIBUTES, BiasedDataset
from distill_core.networks import build_network
from distill_core.sets import SyntheticSet


class EvalConfig(Config):
    arch: str = "convnet"
    arch_options: dict[str, Any] = Field(default_factory=dict)
    epochs: int = Field(default=300, ge=1, le=100_000)
    lr: float | None = Field(default=None, gt=0, le=100)  # None: the set's learned lr, else 0.01
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0, le=1)
    batch_size: int = Field(default=256, ge=1, le=100_000)
    augment: str | None = None  # distill_core.augment name ("dsa:<strategy>", "dc:<strategy>") or None
    checkpoints: int = Field(default=10, ge=1, le=10_000)  # validation checks spread over training
    selection: Literal["last", "val"] = "last"  # the reported checkpoint: the final epoch (upstream) or best val
    repeats: int = Field(default=5, ge=1, le=1000)  # independently initialised networks
    seed: int = Field(default=0, ge=0, le=2**31 - 1)


@dataclass
class EvalSets:
    """Normalised evaluation tensors for one dataset variant, built once per stage."""

    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    unbiased: tuple[torch.Tensor, torch.Tensor]
    unbiased_aligned: torch.Tensor | None  # bool mask over the unbiased set
    num_classes: int

    @classmethod
    def from_dataset(cls, ds: BiasedDataset, device) -> "EvalSets":
        norm = ds.normalization

        def prep(x, y):
            return norm.apply(x).to(device), y.to(device)
        mask = aligned_mask(ds.unbiased_labels, ds.unbiased_attrs, NUM_ATTRIBUTES).to(device) if ds.has_bias else None
        return cls(prep(*ds.val_split()), prep(ds.test_images, ds.test_labels),
                   prep(ds.unbiased_images, ds.unbiased_labels), mask, ds.num_classes)


def check_selection(cfg: EvalConfig, sets: EvalSets) -> None:
    if cfg.selection == "val" and not len(sets.val[1]):
        raise ValueError("evaluation selection 'val' needs a validation split, and the dataset holds out none "
                         "(val_fraction 0)")


def validation_epochs(cfg: EvalConfig) -> set[int]:
    """`cfg.checkpoints` epochs spread over training, always including the last (epoch E)."""
    return {cfg.epochs} | {max(1, round(cfg.epochs * (i + 1) / cfg.checkpoints)) for i in range(cfg.checkpoints)}


def decay_epoch(cfg: EvalConfig) -> int:
    """Upstream's schedule: the lr drops x0.1 after epoch E//2 + 1 (of epochs 0..E)."""
    return cfg.epochs // 2 + 1


def training_lr(cfg: EvalConfig, syn: SyntheticSet) -> float:
    """The configured lr, else the synthetic set's learned one (MTT), else upstream's 0.01."""
    if cfg.lr is not None:
        return cfg.lr
    return syn.lr if syn.lr is not None else 0.01


def seeded_network(cfg: EvalConfig, repeat: int, channels: int, num_classes: int, size: int):
    """Repeat r's network: initialised from seed cfg.seed * 1000 + r (also its data-order seed)."""
    torch.manual_seed(cfg.seed * 1000 + repeat)
    return build_network(cfg.arch, channels, num_classes, size, **cfg.arch_options)


def snapshot(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def accuracy_of(pred, labels, mask=None) -> float:
    if mask is not None:
        pred, labels = pred[mask], labels[mask]
    return float((pred == labels).float().mean()) if len(labels) else math.nan


def metrics_from_predictions(pred_test: torch.Tensor, pred_unb: torch.Tensor, sets: EvalSets) -> dict:
    y_test, y_unb = sets.test[1], sets.unbiased[1]
    per_class = [accuracy_of(pred_test, y_test, y_test == c) for c in range(sets.num_classes)]
    m = sets.unbiased_aligned
    return {
        "acc": accuracy_of(pred_test, y_test),
        "acc_unbiased": accuracy_of(pred_unb, y_unb),
        "acc_aligned": accuracy_of(pred_unb, y_unb, m) if m is not None else math.nan,
        "acc_conflicting": accuracy_of(pred_unb, y_unb, ~m) if m is not None else math.nan,
        "per_class": per_class,
    }


def network_result(selection: str, last: dict, at_val: dict | None, curve: list) -> dict:
    """One network's record: the selected checkpoint's metrics at the top level, both checkpoints beside them.

    `last` and `at_val` are metrics dicts (`at_val` with `val_acc` and `epoch`; None without a validation split).
    """
    chosen = at_val if selection == "val" else last
    return {**chosen, "selection": selection, "val_acc": at_val["val_acc"] if at_val else None,
            "acc_last": last["acc"], "acc_val_selected": at_val["acc"] if at_val else None,
            "at_last": last, "at_val": at_val, "val_curve": curve}

