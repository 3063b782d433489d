"""Debiasing weights: the registry, the kde and groups kinds, and RealData's weighted sampling."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from pydantic import ValidationError

from distill_core.data.bias import aligned_mask
from distill_core.data.biased import NUM_ATTRIBUTES, build_biased_dataset
from distill_core.debias import DEBIAS_KINDS, UnknownDebias, distillation_attributes, get_debias
from distill_core.debias.kde import KDEOptions
from distill_core.networks import build_network
from distill_core.sets import RealData
from tests.distill_core.conftest import one_thread
from tests.distill_core.methods.helpers import WIDTH


@pytest.fixture(scope="module")
def biased(digits_source):
    """Coloured digits at aligned ratio 0.95: 5% bias-conflicting samples per class."""
    with one_thread():
        ds = build_biased_dataset(digits_source, "colored", 0.95, 1, val_fraction=0.1)
    return ds, RealData.from_dataset(ds), distillation_attributes(ds)


def two_clusters(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One class: 90 points in a tight cluster at the origin, 10 in another far away."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(90, 2, generator=g) * 0.1, torch.randn(10, 2, generator=g) * 0.1 + 5.0])
    return x, torch.zeros(100, dtype=torch.long)


# --- registry -------------------------------------------------------------------------------------

def test_builtin_kinds_are_registered():
    assert {"none", "kde", "groups"} <= set(DEBIAS_KINDS)
    assert get_debias("groups").needs_attributes and not get_debias("kde").needs_attributes
    assert get_debias("none").compute(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), 1) is None


def test_unknown_kind_is_one_line_with_a_suggestion():
    with pytest.raises(UnknownDebias) as err:
        get_debias("kdee")
    message = str(err.value)
    assert "\n" not in message and "unknown debias kind 'kdee'" in message and "did you mean 'kde'" in message


def test_options_are_validated_and_a_misspelt_option_is_refused_by_name():
    assert KDEOptions() == KDEOptions(bandwidth=0.5, temperature=1.0, embedding="pixels")
    x, y = two_clusters()
    with pytest.raises(ValidationError, match="bandwith"):
        get_debias("kde").compute(x, y, 1, {"bandwith": 0.3})
    for bad in ({"bandwidth": 0.0}, {"temperature": -1.0}, {"embedding": "clip"}, {"temperature": float("nan")}):
        with pytest.raises(ValidationError):
            KDEOptions(**bad)


# --- kde --------------------------------------------------------------------------------------------

def test_kde_weights_the_sparse_cluster_above_the_dense_one_and_scales_each_class_to_one():
    x, y = two_clusters()
    w = get_debias("kde").compute(x, y, 1)
    assert w.dtype == torch.float32 and w.shape == (100,)
    assert float(w[90:].min()) > float(w[:90].max())
    assert float(w.max()) == 1.0  # exactly
    # a second class, far from the first, is scaled on its own
    x2, y2 = torch.cat([x, x + 100.0]), torch.cat([y, y + 1])
    w2 = get_debias("kde").compute(x2, y2, 2)
    assert float(w2[:100].max()) == 1.0 and float(w2[100:].max()) == 1.0


def test_kde_temperature_flattens_the_weights():
    x, y = two_clusters()
    sharp = get_debias("kde").compute(x, y, 1, {"temperature": 1.0})
    flat = get_debias("kde").compute(x, y, 1, {"temperature": 4.0})
    assert float(flat.min()) > float(sharp.min())
    torch.testing.assert_close(flat, sharp.double().pow(0.25).float())  # w ** (1/T) up to the per-class scale


def test_kde_network_embedding_needs_an_embedding_function(digits_real):
    x, y = digits_real.images[:60], digits_real.labels[:60]
    with pytest.raises(ValueError, match="embedding function"):
        get_debias("kde").compute(x, y, 10, {"embedding": "network"})
    torch.manual_seed(0)
    net = build_network("convnet", 1, 10, 28, **WIDTH)
    w = get_debias("kde").compute(x, y, 10, {"embedding": "network"}, embed=net.embed)
    assert w.shape == (60,) and bool((w > 0).all()) and bool((w <= 1.0).all())


def test_kde_on_pixels_weights_bias_conflicting_digits_above_aligned_ones(biased):
    _, real, attrs = biased
    w = get_debias("kde").compute(real.images, real.labels, 10)
    aligned = aligned_mask(real.labels, attrs, NUM_ATTRIBUTES)
    assert 0.9 < float(aligned.float().mean()) < 1.0
    assert float(w[~aligned].mean()) > 3 * float(w[aligned].mean())


# --- groups -----------------------------------------------------------------------------------------

def test_groups_give_every_class_attribute_group_equal_total_weight(biased):
    _, real, attrs = biased
    w = get_debias("groups").compute(real.images, real.labels, 10, attributes=attrs)
    for c in range(10):
        in_c = real.labels == c
        assert float(w[in_c].max()) == 1.0
        totals = torch.stack([w[in_c & (attrs == a)].sum() for a in attrs[in_c].unique()])
        assert len(totals) > 1
        torch.testing.assert_close(totals, totals.new_full(totals.shape, float(totals[0])))


def test_groups_need_attributes():
    x, y = two_clusters()
    with pytest.raises(ValueError, match="attribute"):
        get_debias("groups").compute(x, y, 1)
    with pytest.raises(ValueError, match="attribute"):
        get_debias("groups").weights(x, y, 1, get_debias("groups").options())


def test_groups_with_one_attribute_per_class_are_uniform():
    x, y = two_clusters()
    w = get_debias("groups").compute(x, y, 1, attributes=torch.zeros(100, dtype=torch.long))
    assert torch.equal(w, torch.ones(100))


# --- RealData -----------------------------------------------------------------------------------------

def test_weighted_sampling_picks_what_sample_per_class_picks(digits_real):
    weights = torch.rand(len(digits_real.labels), generator=torch.Generator().manual_seed(0))
    weighted = dataclasses.replace(digits_real, weights=weights)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x, y = digits_real.sample_per_class(7, g1)
    xw, yw, w = weighted.sample_per_class_weighted(7, g2)
    assert torch.equal(x, xw) and torch.equal(y, yw)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))  # same stream afterwards
    sel = [int(torch.nonzero((digits_real.images == xi).flatten(1).all(1))[0]) for xi in x[:5]]
    assert torch.equal(w[:5], weights[sel])
    assert digits_real.sample_per_class_weighted(7, torch.Generator().manual_seed(3))[2] is None


def test_real_data_refuses_weights_of_the_wrong_length(digits_real):
    with pytest.raises(ValueError, match="weights for"):
        dataclasses.replace(digits_real, weights=torch.ones(3))
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="finite and non-negative"):
            dataclasses.replace(digits_real, weights=torch.full((len(digits_real.labels),), bad))
