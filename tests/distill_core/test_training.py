"""The one epoch loop (`train_epoch`): tiling is exact, augmentation is per batch and per sample."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill_core.augment import DSA_STRATEGY_NO_FLIP, SiameseAugment
from distill_core.networks import build_network
from distill_core.training import EpochStats, train_epoch


@pytest.fixture(scope="module")
def data(digits_real):
    idx = torch.cat([i[:5] for i in digits_real.class_index])  # 50 real images, 5 per class
    return digits_real.images[idx], digits_real.labels[idx]


def fresh(arch="convnet", seed=0):
    torch.manual_seed(seed)
    return build_network(arch, 1, 10, 28, width=8)


def sgd(model, lr=0.05):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)


def train(model, data, epochs, tile, augment=None, batch_size=20, seed=3):
    opt = sgd(model)
    g = torch.Generator().manual_seed(seed)
    return [train_epoch(model, opt, *data, batch_size, g, augment, tile) for _ in range(epochs)]


@pytest.mark.parametrize("augment", [None, SiameseAugment(DSA_STRATEGY_NO_FLIP)], ids=["plain", "dsa"])
def test_tiled_epochs_equal_untiled_epochs(data, augment):
    whole_net = fresh()
    whole = train(whole_net, data, 2, None, augment)
    # 20-sample batches (and a last batch of 10): tile 7 leaves ragged tiles, 16 a ragged second tile
    for tile in (7, 16):
        tiled_net = fresh()
        tiled = train(tiled_net, data, 2, tile, augment)
        for (name, a), b in zip(tiled_net.state_dict().items(), whole_net.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
        for s, w in zip(tiled, whole):
            assert abs(s.loss - w.loss) < 1e-4 and s.acc == w.acc
    assert not torch.equal(whole_net.state_dict()["classifier.weight"], fresh().state_dict()["classifier.weight"])


def test_epoch_stats_are_the_mean_loss_and_accuracy_over_the_epoch(data):
    model = fresh()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every batch sees the same network
    stats = train_epoch(model, opt, *data, 16, torch.Generator().manual_seed(0), tile=5)
    assert isinstance(stats, EpochStats)
    with torch.no_grad():
        logits = model(data[0])
    assert stats.loss == pytest.approx(float(F.cross_entropy(logits, data[1])), rel=1e-5)
    assert stats.acc == pytest.approx(float((logits.argmax(1) == data[1]).float().mean()))


class Recording:
    """Wraps an augmentation: records every per_sample call's input, seed and output."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def per_sample(self, x, seed):
        out = self.inner.per_sample(x, seed)
        self.calls.append((x.detach().clone(), seed, out.detach().clone()))
        return out


def test_every_batch_is_augmented_and_the_model_sees_the_augmented_images(data):
    images, labels = data
    model = fresh()
    fed = []
    model.register_forward_pre_hook(lambda m, inp: fed.append(inp[0].detach().clone()))
    augment = Recording(SiameseAugment("crop"))
    g = torch.Generator().manual_seed(5)
    train_epoch(model, sgd(model), images, labels, 20, g, augment, tile=None)
    assert [len(x) for x, _, _ in augment.calls] == [20, 20, 10]
    torch.testing.assert_close(torch.cat(fed), torch.cat([out for _, _, out in augment.calls]), rtol=0, atol=0)
    # the batches are a fresh permutation drawn from the caller's generator, then one seed per batch
    replay = torch.Generator().manual_seed(5)
    perm = torch.randperm(len(labels), generator=replay)
    torch.testing.assert_close(torch.cat([x for x, _, _ in augment.calls]), images[perm], rtol=0, atol=0)
    seeds = [s for _, s, _ in augment.calls]
    assert seeds == [int(torch.randint(2**31 - 1, (1,), generator=replay)) for _ in range(3)]
    assert len(set(seeds)) == 3
    for x, _, out in augment.calls:
        assert not torch.equal(x, out)


def test_each_epoch_draws_a_new_permutation(data):
    images, labels = data
    model = fresh()
    fed = []
    model.register_forward_pre_hook(lambda m, inp: fed.append(inp[0].detach().clone()))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    g = torch.Generator().manual_seed(0)
    train_epoch(model, opt, images, labels, 50, g)
    train_epoch(model, opt, images, labels, 50, g)
    first, second = fed
    assert not torch.equal(first, second)
    key = lambda x: x.flatten(1).sum(1).sort().values  # noqa: E731  (same images, other order)
    torch.testing.assert_close(key(first), key(images))
    torch.testing.assert_close(key(second), key(images))


def test_a_custom_loss_fn_is_what_gets_differentiated(data):
    calls = []

    def half_ce(model, x, y):
        calls.append(len(y))
        logits = model(x)
        return 0.5 * F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum()

    a, b = fresh(), fresh()
    train_epoch(a, torch.optim.SGD(a.parameters(), lr=0.1), *data, 50, torch.Generator().manual_seed(0),
                tile=16, loss_fn=half_ce)
    train_epoch(b, torch.optim.SGD(b.parameters(), lr=0.05), *data, 50, torch.Generator().manual_seed(0))
    assert calls == [16, 16, 16, 2]  # the loss function sees the tiles
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6, msg=name)


def test_weighted_epochs_draw_samples_by_weight_and_never_a_zero_weight_one(data):
    """Debiased experts: an epoch of n draws with replacement, in proportion to the weights."""
    images, labels = data
    fed = []

    def spy(model, x, y):
        fed.append(y.clone())
        logits = model(x)
        return F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum()

    weights = (labels < 5).float() * 3.0 + (labels == 5).float()  # classes 6-9 never drawn; 0-4 three times 5's
    model = fresh()
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.0), images, labels, 50, g, loss_fn=spy,
                    weights=weights)
    seen = torch.cat(fed)
    assert len(seen) == 40 * len(labels)  # n draws per epoch
    counts = torch.bincount(seen, minlength=10).float()
    assert counts[6:].sum() == 0
    ratio = counts[:5].mean() / counts[5]
    assert 2.5 < float(ratio) < 3.6, counts  # 3x the weight, 3x the draws (2,000 draws)


def test_unweighted_epochs_are_the_permutation_path(data):
    a, b = fresh(), fresh()
    sa = train_epoch(a, sgd(a), *data, 20, torch.Generator().manual_seed(1))
    sb = train_epoch(b, sgd(b), *data, 20, torch.Generator().manual_seed(1), weights=None)
    assert sa == sb
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)
