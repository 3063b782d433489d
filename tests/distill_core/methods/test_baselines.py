"""Coreset baselines: random, herding and whole subsets of the real training split."""

from __future__ import annotations

import pytest
import torch

from distill_core.methods import get_method
from distill_core.methods.baselines import herding
from distill_core.networks import build_network
from tests.distill_core.methods.helpers import WIDTH, config


@pytest.fixture(scope="module")
def real(digits_real):
    return digits_real


def test_random_and_whole_baselines(real):
    syn = get_method("random").distill(real, config("random", ipc=3))
    assert torch.bincount(syn.labels, minlength=10).tolist() == [3] * 10
    for img, lab in zip(syn.images, syn.labels):  # every image is a real image of its class
        assert (real.images[real.labels == lab] == img).flatten(1).all(1).any()
    assert syn.history == [] and syn.lr is None and syn.norm is real.norm
    other = get_method("random").distill(real, config("random", ipc=3, seed=1))
    assert not torch.equal(other.images, syn.images)  # the seed picks the subset
    whole = get_method("whole").distill(real, config("whole", ipc=1))
    assert len(whole.labels) == len(real.labels)
    assert torch.equal(whole.images, real.images) and whole.images is not real.images  # a copy


def test_herding_hand_example_and_per_class_selection(real):
    features = torch.tensor([[0.0, 0.0], [10.0, 0.0], [-10.0, 0.0], [1.0, 1.0]])
    # mean (0.25, 0.25): first the point nearest it, then the one that keeps the running mean closest
    assert herding(features, 1) == [0]
    assert herding(features, 2) == [0, 3]
    assert sorted(herding(features, 10)) == [0, 1, 2, 3]  # at most every sample, each once
    syn = get_method("herding").distill(real, config("herding", ipc=2))
    assert torch.bincount(syn.labels, minlength=10).tolist() == [2] * 10
    again = get_method("herding").distill(real, config("herding", ipc=2))
    assert torch.equal(syn.images, again.images)  # deterministic for a seed


def test_herding_uses_a_given_model(real):
    from distill_core.methods.baselines import distill_herding, embed_all

    torch.manual_seed(5)
    model = build_network("convnet", 1, 10, 28, **WIDTH)
    syn = distill_herding(real, config("herding", ipc=1), model=model.train())
    assert model.training  # its mode is restored
    model.eval()
    for c, idx in enumerate(real.class_index):
        first = idx[herding(embed_all(model, real.images[idx]), 1)[0]]
        assert torch.equal(syn.images[c], real.images[first])


def test_baselines_are_registered_as_non_optimising():
    for name in ("random", "herding", "whole"):
        m = get_method(name)
        assert not m.optimises_images and m.iterations == 0 and m.lr_img == 0.0 and not m.needs_experts
