"""DM (distribution matching) on tiny real data."""

from __future__ import annotations

import pytest
import torch

from distill_core.augment import DSA_STRATEGY_NO_FLIP
from distill_core.methods import get_method
from distill_core.methods.base import init_synthetic
from distill_core.methods.dm import class_means, distill_dm, dm_loss
from distill_core.networks import build_network
from tests.distill_core.methods.helpers import WIDTH, config, fixed_nets


@pytest.fixture(scope="module")
def real(digits_real):
    return digits_real


def test_class_means_by_hand():
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0]])
    labels = torch.tensor([0, 0, 2])
    torch.testing.assert_close(class_means(features, labels, 3), torch.tensor([[2.0, 3.0], [0.0, 0.0], [10.0, 0.0]]))


def test_dm_loss_is_the_squared_distance_of_per_class_mean_embeddings(real):
    torch.manual_seed(0)
    net = build_network("convnet", 1, 10, 28, **WIDTH)
    x_real, y_real = real.sample_per_class(8, torch.Generator().manual_seed(0))
    x_syn, y_syn = real.sample_per_class(2, torch.Generator().manual_seed(1))
    loss = dm_loss(net, x_real, y_real, x_syn, y_syn, 10)
    expected = sum(((net.embed(x_real[y_real == c]).mean(0) - net.embed(x_syn[y_syn == c]).mean(0)) ** 2).sum()
                   for c in range(10))
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


def test_dm_lowers_its_objective(real):
    cfg = config("dm", iterations=20, lr_img=1.0)
    init = init_synthetic(real, cfg, torch.Generator().manual_seed(cfg.seed))
    syn = get_method("dm").distill(real, cfg)
    x_real, y_real = real.sample_per_class(32, torch.Generator().manual_seed(1))

    def objective(images):
        return sum(float(dm_loss(net, x_real, y_real, images, syn.labels, 10).detach()) for net in fixed_nets(real))

    assert objective(syn.images) < objective(init.images)
    assert len(syn.history) == 20 and "loss_dm" in syn.history[0] and syn.lr is None


def test_dm_with_dsa_runs_and_uses_the_augmentation(real):
    cfg = config("dm", iterations=3, lr_img=1.0, augment=DSA_STRATEGY_NO_FLIP)
    with_aug = distill_dm(real, cfg)
    without = distill_dm(real, config("dm", iterations=3, lr_img=1.0))
    assert torch.isfinite(with_aug.images).all()
    assert not torch.allclose(with_aug.images, without.images)
    assert torch.equal(distill_dm(real, cfg).images, with_aug.images)  # deterministic for a seed


# --- debiasing weights (RealData.weights) -------------------------------------------------------------

def _weighted(real, weights):
    import dataclasses
    return dataclasses.replace(real, weights=weights)


def test_weighted_class_means_by_hand_and_zero_weight_drops_a_sample():
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0], [7.0, -1.0]])
    labels = torch.tensor([0, 0, 2, 2])
    w = torch.tensor([1.0, 0.5, 1.0, 0.0])
    expected = torch.tensor([[(1.0 + 1.5) / 1.5, (2.0 + 2.0) / 1.5], [0.0, 0.0], [10.0, 0.0]])
    torch.testing.assert_close(class_means(features, labels, 3, w), expected)
    # weight 0 on the last sample: exactly the mean without it
    assert torch.equal(class_means(features, labels, 3, torch.tensor([1.0, 1.0, 1.0, 0.0])),
                       class_means(features[:3], labels[:3], 3))
    assert torch.equal(class_means(features, labels, 3, torch.zeros(4)), torch.zeros(3, 2))  # no weight: 0, no NaN


def test_class_means_with_weights_one_equal_the_plain_means_exactly(real):
    torch.manual_seed(0)
    net = build_network("convnet", 1, 10, 28, **WIDTH)
    x, y = real.sample_per_class(16, torch.Generator().manual_seed(0))
    f = net.embed(x).detach()
    assert torch.equal(class_means(f, y, 10, torch.ones(len(y))), class_means(f, y, 10))


@pytest.mark.parametrize("augment", [None, DSA_STRATEGY_NO_FLIP])
def test_dm_with_all_weights_one_is_bit_for_bit_unweighted_dm(real, augment):
    cfg = config("dm", iterations=3, lr_img=1.0, augment=augment)
    plain = distill_dm(real, cfg)
    ones = distill_dm(_weighted(real, torch.ones(len(real.labels))), cfg)
    assert torch.equal(plain.images, ones.images)
    assert plain.history == ones.history


def test_dm_with_non_uniform_weights_changes_the_result(real):
    cfg = config("dm", iterations=3, lr_img=1.0)
    w = torch.rand(len(real.labels), generator=torch.Generator().manual_seed(0))
    plain, weighted = distill_dm(real, cfg), distill_dm(_weighted(real, w), cfg)
    assert not torch.allclose(plain.images, weighted.images)
