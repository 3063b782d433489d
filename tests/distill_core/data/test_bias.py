"""The LfF attribute assignment (distill_core.data.bias): exact counts per the protocol.

`assign_attributes` only counts, so it is checked on label vectors with
MNIST's and Fashion-MNIST's class sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill_core.data import assign_attributes, attribute_count_matrix, class_milestones
from distill_core.data.bias import aligned_mask, own_attribute, per_class_counts
from tests.distill_core.data.protocol import attribute_table, labels_with_counts, protocol_counts

RATIOS = (0.0, 0.1, 0.5, 0.8, 0.95, 1.0)
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_ALIGNED_TOTAL = {0.0: 0, 0.1: 5999, 0.5: 30000, 0.8: 47999, 0.95: 57000, 1.0: 60000}


@pytest.mark.parametrize("p", RATIOS)
def test_mnist_attribute_counts_follow_the_protocol(p):
    labels = labels_with_counts(MNIST_TRAIN_COUNTS)
    attrs = assign_attributes(labels, p, 10)
    table = attribute_table(labels, attrs)
    for c, n in enumerate(MNIST_TRAIN_COUNTS):
        np.testing.assert_array_equal(table[c], protocol_counts(n, c, p))
    assert int(np.trace(table)) == MNIST_ALIGNED_TOTAL[p]
    assert int(table.sum()) == 60000


@pytest.mark.parametrize("p", RATIOS)
def test_attributes_follow_dataset_order_within_a_class(p):
    labels = labels_with_counts(MNIST_TRAIN_COUNTS[:3] + [0] * 7, seed=1)
    attrs = assign_attributes(labels, p, 10)
    for c in range(3):  # attribute 0 first, then 1, ...: non-decreasing along the dataset
        a = attrs[labels == c]
        assert bool((a[1:] >= a[:-1]).all())


def test_6000_per_class_at_p095_gives_5700_aligned_300_conflicting():
    labels = labels_with_counts([6000] * 10)
    table = attribute_table(labels, assign_attributes(labels, 0.95, 10))
    assert np.diag(table).tolist() == [5700] * 10
    off = table[~np.eye(10, dtype=bool)].reshape(10, 9)
    assert off.sum(1).tolist() == [300] * 10
    assert set(off.ravel().tolist()) <= {33, 34}  # 300 / 9 spread by the milestone rounding


def test_invalid_ratio_is_rejected():
    with pytest.raises(ValueError):
        assign_attributes(torch.arange(10) % 10, 1.5, 10)


def test_count_matrix_rows_and_milestones():
    m = attribute_count_matrix(0.8, 10)
    np.testing.assert_allclose(m.sum(1), np.ones(10))
    np.testing.assert_allclose(np.diag(m), np.full(10, 0.8))
    assert class_milestones(100, m[0])[-1] == 100  # the milestones end at the class size


def test_more_classes_than_attributes_use_class_mod_attributes():
    """CIFAR-100 with 10 attributes: class c's aligned attribute is c mod 10."""
    m = attribute_count_matrix(0.5, 100, 10)
    assert m.shape == (100, 10)
    np.testing.assert_allclose(m.sum(1), np.ones(100))
    assert all(m[c, c % 10] == 0.5 for c in range(100))
    labels = labels_with_counts([50] * 100)
    attrs = assign_attributes(labels, 0.5, 100, 10)
    assert torch.equal(own_attribute(labels, 10), labels % 10)
    aligned, conflicting = per_class_counts(labels, attrs, 100, 10)
    assert aligned == [25] * 100 and conflicting == [25] * 100
    assert int(aligned_mask(labels, attrs, 10).sum()) == 2500
