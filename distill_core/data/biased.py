"""`BiasedDataset`: a source biased by one attribute, with its test sets and splits.

One object holds everything a study needs from a dataset variant:
- train: the source's training split with attributes at aligned ratio p
  (counts exactly per the LfF formula, see `bias.py`);
- test_conflicting: the official test split at p = 0 (100% bias-conflicting);
- test_unbiased: the official test split at p = 0.1 (uniform attributes), which
  also gives accuracy on aligned vs conflicting samples;
- val_index: a held-out part of train (none by default, as upstream, which
  distils from and trains PTMs on the whole split), used only for model
  selection during evaluation and as a search's proxy, never for distillation.
  `val_split` says how it is drawn for biased data: `biased`, stratified by
  (class, attribute) so it is exactly as biased as training; or `balanced`,
  stratified by class with its attributes drawn uniformly (p = 1/K), the small
  unbiased validation set of the debiasing literature;
- normalization: fitted on the distillation split (train minus validation),
  per-channel standardisation or ZCA whitening (`DatasetConfig.zca`).
Images stay uint8 (lossless for both protocols, 1/4 of float32 storage).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field

from distill_core.config import Config
from distill_core.data.bias import assign_attributes, own_attribute, per_class_counts
from distill_core.data.colored import colorize
from distill_core.data.corruptions import corrupt_batch
from distill_core.data.sources import SourceData, adapt_source
from distill_core.sets import Normalization

NUM_ATTRIBUTES = 10  # ten colours (CMNIST-DD) or ten corruptions (CCIFAR10-DD)
UNBIASED_RATIO = 0.1  # p = 1/K is exactly uniform for K = 10 attributes
BUILDER_VERSION = 2  # bump when a builder's output changes, to invalidate caches


class DatasetConfig(Config):
    """One dataset variant: a source biased at one aligned ratio and severity."""

    source: str
    bias: Literal["colored", "corrupted", "none"] = "colored"
    aligned_ratio: float = Field(default=0.95, ge=0.0, le=1.0)
    severity: int = Field(default=1, ge=0, le=4)  # 0 only for bias "none"
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    max_per_class: int | None = Field(default=None, ge=1, le=10**7)
    val_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)  # 0: no held-out split (upstream)
    val_split: Literal["biased", "balanced"] = "biased"  # how a held-out split of biased data is drawn
    zca: bool = False  # ZCA-whiten (MTT's CIFAR setting) instead of per-channel standardisation
    # the source resized / converted before anything else (a PTM source of another shape); None: as it is
    image_size: int | None = Field(default=None, ge=1, le=4096)
    channels: Literal[1, 3] | None = None

    def build(self, source: SourceData) -> "BiasedDataset":
        source = adapt_source(source, self.channels, self.image_size)
        return build_biased_dataset(source, **self.model_dump(exclude={"source", "image_size", "channels"}))


BIAS_BUILDERS = {
    "colored": colorize,
    "corrupted": corrupt_batch,
}


@dataclass
class BiasedDataset:
    name: str
    bias: str  # colored | corrupted | none
    num_classes: int
    train_images: torch.Tensor
    train_labels: torch.Tensor
    train_attrs: torch.Tensor
    test_images: torch.Tensor  # bias-conflicting test set (p = 0)
    test_labels: torch.Tensor
    test_attrs: torch.Tensor
    unbiased_images: torch.Tensor  # unbiased test set (p = 0.1)
    unbiased_labels: torch.Tensor
    unbiased_attrs: torch.Tensor
    val_index: torch.Tensor  # indices into train held out for model selection
    normalization: Normalization
    meta: dict = field(default_factory=dict)

    TENSOR_FIELDS = (
        "train_images", "train_labels", "train_attrs", "test_images", "test_labels", "test_attrs",
        "unbiased_images", "unbiased_labels", "unbiased_attrs", "val_index",
    )

    @property
    def has_bias(self) -> bool:
        return self.bias != "none"

    def distill_index(self) -> torch.Tensor:
        """Training indices available to distillation and PTMs (train minus validation)."""
        return torch.nonzero(outside(len(self.train_labels), self.val_index)).squeeze(1)

    def train_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.distill_index()
        return self.train_images[idx], self.train_labels[idx]

    def val_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.train_images[self.val_index], self.train_labels[self.val_index]

    def counts(self) -> dict:
        """Per-class aligned / conflicting counts of train and both test sets."""
        out = {}
        for split, (lab, att) in {
            "train": (self.train_labels, self.train_attrs),
            "test": (self.test_labels, self.test_attrs),
            "unbiased": (self.unbiased_labels, self.unbiased_attrs),
        }.items():
            if self.has_bias:
                al, co = per_class_counts(lab, att, self.num_classes, NUM_ATTRIBUTES)
            else:
                al, co = torch.bincount(lab, minlength=self.num_classes).tolist(), [0] * self.num_classes
            out[f"{split}_aligned"], out[f"{split}_conflicting"] = al, co
        return out

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {**{k: getattr(self, k) for k in self.TENSOR_FIELDS}, **self.normalization.to_tensors()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "BiasedDataset":
        return cls(
            name=meta["name"], bias=meta["bias"], num_classes=meta["num_classes"],
            normalization=Normalization.from_stored(meta["normalization"], tensors),
            meta=meta, **{k: tensors[k] for k in cls.TENSOR_FIELDS},
        )


def outside(n: int, index: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the n positions not in `index`."""
    keep = torch.ones(n, dtype=torch.bool)
    keep[index] = False
    return keep


def _cap_per_class(images, labels, cap: int | None, num_classes: int):
    if cap is None:
        return images, labels
    keep = torch.cat([torch.nonzero(labels == c).squeeze(1)[:cap] for c in range(num_classes)])
    keep = keep.sort().values  # dataset order matters for attribute assignment
    return images[keep], labels[keep]


def stratified_holdout(labels, attrs, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """round(fraction * n) random samples of every (class, attribute) group."""
    if fraction <= 0:
        return torch.zeros(0, dtype=torch.int64)
    picks = []
    keys = labels * 1000 + attrs
    for key in torch.unique(keys):
        idx = torch.nonzero(keys == key).squeeze(1)
        n = int(round(fraction * len(idx)))
        if n:
            picks.append(idx[torch.randperm(len(idx), generator=generator)[:n]])
    return torch.cat(picks).sort().values if picks else torch.zeros(0, dtype=torch.int64)


def balanced_holdout(labels, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """round(fraction * n) random samples of every class, drawn before attributes are assigned."""
    return stratified_holdout(labels, torch.zeros_like(labels), fraction, generator)


def build_biased_dataset(
    source: SourceData,
    bias: str,
    aligned_ratio: float,
    severity: int,
    seed: int = 0,
    max_per_class: int | None = None,
    val_fraction: float = 0.0,
    zca: bool = False,
    val_split: str = "biased",
) -> BiasedDataset:
    """Build one dataset variant. Deterministic for (source, bias, p, severity, seed, held-out split)."""
    if val_split not in ("biased", "balanced"):
        raise ValueError(f"unknown val_split '{val_split}' (known: biased, balanced)")
    if bias != "none" and bias not in BIAS_BUILDERS:
        raise ValueError(f"unknown bias kind '{bias}' (known: none, {', '.join(BIAS_BUILDERS)})")
    g = torch.Generator().manual_seed(seed)
    k = source.num_classes
    tr_x, tr_y = _cap_per_class(source.train_images, source.train_labels, max_per_class, k)
    te_x, te_y = source.test_images, source.test_labels
    balanced = bias != "none" and val_split == "balanced" and val_fraction > 0
    if balanced:
        # held out by class before any attribute is assigned, moved to the end of train: the rest is biased
        # at p (counts exact per the LfF formula over what remains), the held-out images at p = 1/K
        held = balanced_holdout(tr_y, val_fraction, g)
        rest = torch.nonzero(outside(len(tr_y), held)).squeeze(1)
        order = torch.cat([rest, held])
        tr_x, tr_y, n_rest = tr_x[order], tr_y[order], len(rest)
    if bias == "none":
        te_a = te_y.new_full(te_y.shape, -1)  # no attribute
        tr_a = tr_y.new_full(tr_y.shape, -1)
        un_x, un_a = te_x, te_a
    else:
        build = BIAS_BUILDERS[bias]
        if balanced:
            tr_a = torch.cat([assign_attributes(tr_y[:n_rest], aligned_ratio, k, NUM_ATTRIBUTES),
                              assign_attributes(tr_y[n_rest:], UNBIASED_RATIO, k, NUM_ATTRIBUTES)])
        else:
            tr_a = assign_attributes(tr_y, aligned_ratio, k, NUM_ATTRIBUTES)
        te_a = assign_attributes(te_y, 0.0, k, NUM_ATTRIBUTES)
        un_a = assign_attributes(te_y, UNBIASED_RATIO, k, NUM_ATTRIBUTES)
        tr_x = build(tr_x, tr_a, severity, g)
        un_x = build(te_x, un_a, severity, g)
        te_x = build(te_x, te_a, severity, g)
    val_index = torch.arange(n_rest, len(tr_y)) if balanced else stratified_holdout(tr_y, tr_a, val_fraction, g)
    norm = Normalization.fit(tr_x[outside(len(tr_y), val_index)], zca=zca)
    meta = {
        "name": source.name, "bias": bias, "num_classes": k, "num_attributes": NUM_ATTRIBUTES,
        "aligned_ratio": aligned_ratio, "severity": severity, "seed": seed,
        "max_per_class": max_per_class, "val_fraction": val_fraction,
        "val_split": val_split if val_fraction > 0 else None,
        "builder_version": BUILDER_VERSION, "normalization": norm.meta(),
    }
    ds = BiasedDataset(
        name=source.name, bias=bias, num_classes=k,
        train_images=tr_x.contiguous(), train_labels=tr_y, train_attrs=tr_a,
        test_images=te_x.contiguous(), test_labels=te_y, test_attrs=te_a,
        unbiased_images=un_x.contiguous(), unbiased_labels=te_y, unbiased_attrs=un_a,
        val_index=val_index, normalization=norm, meta=meta,
    )
    ds.meta["counts"] = ds.counts()
    return ds


__all__ = ["BiasedDataset", "DatasetConfig", "balanced_holdout", "build_biased_dataset", "own_attribute",
           "stratified_holdout"]
