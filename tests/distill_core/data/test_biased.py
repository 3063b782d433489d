"""Biased datasets (protocols.md section 1) on real data: test sets, splits, caps, normalisation.

Real images come from scikit-learn's digits (always installed) and Fashion-MNIST
(Debian's dataset-fashion-mnist; those tests skip when it is absent).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from distill_core.data import BiasedDataset, DatasetConfig, DatasetUnavailable, build_biased_dataset, load_source
from distill_core.sets import Normalization
from tests.distill_core.data.protocol import attribute_table, protocol_counts


@pytest.fixture(scope="module")
def fashion():
    try:
        return load_source("fashion_mnist", download=False)
    except DatasetUnavailable as exc:
        pytest.skip(f"Fashion-MNIST not installed: {exc}")


@pytest.fixture(scope="module")
def colored_digits(digits_source):
    return build_biased_dataset(digits_source, "colored", 0.8, 1, seed=0, val_fraction=0.1)


def test_fashion_mnist_p095_counts(fashion):
    ds = build_biased_dataset(fashion, "colored", 0.95, 1, seed=0)
    counts = ds.counts()
    assert counts["train_aligned"] == [5700] * 10
    assert counts["train_conflicting"] == [300] * 10
    assert counts["test_aligned"] == [0] * 10  # the test set is 100% bias-conflicting
    assert counts["unbiased_aligned"] == [100] * 10  # p = 0.1 of 1000 test images per class
    assert ds.train_images.dtype == torch.uint8 and ds.train_images.shape == (60000, 3, 28, 28)


# ------------------------------------------------------------------ test sets
def test_conflicting_test_set_has_no_aligned_sample(colored_digits):
    ds = colored_digits
    assert not bool((ds.test_attrs == ds.test_labels % 10).any())
    assert ds.counts()["test_aligned"] == [0] * 10
    assert torch.equal(ds.test_labels, ds.unbiased_labels)


def test_unbiased_test_set_is_uniform(colored_digits):
    ds = colored_digits
    table = attribute_table(ds.unbiased_labels, ds.unbiased_attrs)
    sizes = table.sum(1)
    for c in range(10):  # p = 0.1 = 1/K: every attribute gets n_c / 10, up to rounding
        assert set(table[c].tolist()) <= {sizes[c] // 10, -(-sizes[c] // 10)}
        np.testing.assert_array_equal(table[c], protocol_counts(sizes[c], c, 0.1))


# ------------------------------------------------------------------ determinism, splits, caps
def test_fixed_seed_gives_identical_bytes(digits_source):
    a = build_biased_dataset(digits_source, "colored", 0.95, 2, seed=7)
    b = build_biased_dataset(digits_source, "colored", 0.95, 2, seed=7)
    for name in a.TENSOR_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.normalization == b.normalization
    c = build_biased_dataset(digits_source, "colored", 0.95, 2, seed=8)
    assert not torch.equal(a.train_images, c.train_images)
    assert torch.equal(a.train_attrs, c.train_attrs)  # attributes depend on dataset order only


def test_val_index_is_stratified_and_disjoint(colored_digits):
    ds = colored_digits
    val = ds.val_index
    n = len(ds.train_labels)
    assert val.dtype == torch.int64 and len(val) > 0
    assert bool((val[1:] > val[:-1]).all())  # sorted, no duplicates
    assert 0 <= int(val.min()) and int(val.max()) < n
    train = ds.distill_index()
    assert len(train) + len(val) == n
    assert not bool(torch.isin(train, val).any())
    keys = ds.train_labels * 10 + ds.train_attrs
    for key in torch.unique(keys):
        group = int((keys == key).sum())
        assert int((keys[val] == key).sum()) == int(round(0.1 * group))
    x, y = ds.val_split()
    assert len(x) == len(y) == len(val)


def test_nothing_is_held_out_by_default(digits_source):
    """As upstream: distillation and PTMs see the whole training split unless a study asks for a split."""
    ds = build_biased_dataset(digits_source, "colored", 0.8, 1, seed=0)
    assert len(ds.val_index) == 0 and ds.meta["val_split"] is None
    assert torch.equal(ds.distill_index(), torch.arange(len(ds.train_labels)))
    assert DatasetConfig(source="digits").val_fraction == 0.0


def test_a_balanced_held_out_split_is_unbiased_and_training_keeps_its_ratio(digits_source):
    """`balanced`: held out by class before biasing, its attributes uniform (p = 1/K); the rest is biased at p
    with the protocol's exact counts, so only the held-out images differ from a biased split's."""
    ds = build_biased_dataset(digits_source, "colored", 0.9, 1, seed=0, val_fraction=0.2, val_split="balanced")
    assert ds.meta["val_split"] == "balanced"
    val, train = ds.val_index, ds.distill_index()
    assert len(train) + len(val) == len(ds.train_labels) and not bool(torch.isin(train, val).any())
    held = attribute_table(ds.train_labels[val], ds.train_attrs[val])
    rest = attribute_table(ds.train_labels[train], ds.train_attrs[train])
    for c in range(10):
        n_c = int((digits_source.train_labels == c).sum())
        assert held[c].sum() == round(0.2 * n_c)
        np.testing.assert_array_equal(held[c], protocol_counts(held[c].sum(), c, 0.1))  # uniform attributes
        np.testing.assert_array_equal(rest[c], protocol_counts(rest[c].sum(), c, 0.9))  # training: p = 0.9
    biased = build_biased_dataset(digits_source, "colored", 0.9, 1, seed=0, val_fraction=0.2)
    aligned = lambda d: float((d.train_attrs[d.val_index] == d.train_labels[d.val_index]).float().mean())  # noqa: E731
    assert aligned(biased) > 0.8 > 0.2 > aligned(ds)  # the biased split is as biased as training, balanced is not
    with pytest.raises(ValueError, match="val_split"):
        build_biased_dataset(digits_source, "colored", 0.9, 1, val_fraction=0.2, val_split="uniform")


def test_max_per_class(digits_source):
    digits = digits_source
    cap = 40
    ds = build_biased_dataset(digits, "colored", 0.8, 1, seed=0, max_per_class=cap, val_fraction=0.1)
    assert torch.bincount(ds.train_labels, minlength=10).tolist() == [cap] * 10
    table = attribute_table(ds.train_labels, ds.train_attrs)
    for c in range(10):
        np.testing.assert_array_equal(table[c], protocol_counts(cap, c, 0.8))
    assert ds.counts()["train_aligned"] == [32] * 10
    # the first `cap` images of each class, in dataset order, coloured
    for c in range(10):
        src = digits.train_images[digits.train_labels == c][:cap]
        got = ds.train_images[ds.train_labels == c].amax(1, keepdim=True)
        assert bool((got <= src).all())  # colour <= 1 times the grey digit
        assert bool((got[src >= 8] > 0).all()) and bool((got[src == 0] == 0).all())
    assert len(ds.test_labels) == len(digits.test_labels)  # test sets are never capped
    assert int(ds.val_index.max()) < 10 * cap


def test_no_bias_keeps_images(digits_source):
    ds = build_biased_dataset(digits_source, "none", 0.5, 1, seed=0)
    assert torch.equal(ds.train_images, digits_source.train_images)
    assert bool((ds.train_attrs == -1).all()) and not ds.has_bias
    with pytest.raises(ValueError):
        build_biased_dataset(digits_source, "painted", 0.5, 1)


# ------------------------------------------------------------------ normalisation and storage
def test_normalization_is_fitted_on_the_distillation_split(colored_digits):
    ds = colored_digits
    x, _ = ds.train_split()
    assert ds.normalization == Normalization.fit(x)
    assert ds.normalization != Normalization.fit(ds.train_images)  # validation images left out
    assert ds.meta["normalization"] == ds.normalization.meta()


def test_dataset_round_trips_through_tensors_and_json_meta(colored_digits):
    ds = colored_digits
    tensors = ds.to_tensors()
    assert set(tensors) == set(ds.TENSOR_FIELDS)  # per-channel normalisation needs no tensors
    again = BiasedDataset.from_tensors(tensors, json.loads(json.dumps(ds.meta)))
    assert again.normalization == ds.normalization
    assert (again.name, again.bias, again.num_classes) == (ds.name, ds.bias, ds.num_classes)
    for name in ds.TENSOR_FIELDS:
        assert torch.equal(getattr(again, name), getattr(ds, name)), name
    assert again.counts() == ds.counts()


def test_dataset_config_builds_the_same_variant(digits_source):
    cfg = DatasetConfig(source="digits", bias="colored", aligned_ratio=0.9, severity=3, seed=4, max_per_class=30)
    built = cfg.build(digits_source)
    direct = build_biased_dataset(digits_source, "colored", 0.9, 3, seed=4, max_per_class=30)
    for name in direct.TENSOR_FIELDS:
        assert torch.equal(getattr(built, name), getattr(direct, name)), name
    assert built.meta == direct.meta
    assert cfg.build(digits_source).normalization == direct.normalization
    assert DatasetConfig(**cfg.to_dict()) == cfg
    assert not DatasetConfig(source="digits").zca


@pytest.mark.parametrize("bad", [{"aligned_ratio": 1.5}, {"severity": 5}, {"bias": "painted"},
                                 {"val_fraction": 1.0}, {"max_per_class": 0}, {"zca_eps": 0.1}])
def test_dataset_config_rejects_bad_fields(bad):
    with pytest.raises(ValidationError):
        DatasetConfig(source="digits", **bad)
