"""Normalisation (per-channel and ZCA), real data and synthetic sets (distill_core.sets)."""

from __future__ import annotations

import json

import pytest
import torch
from kornia.enhance import ZCAWhitening

from distill_core.data import BiasedDataset, DatasetConfig, build_biased_dataset
from distill_core.sets import ZCA_EPS, Normalization, RealData, SyntheticSet


def pixels(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float() / 255.0


# --- per-channel standardisation ----------------------------------------------------------------

def test_per_channel_fit_standardises_each_channel(colored_dataset):
    x, _ = colored_dataset.train_split()
    norm = Normalization.fit(x)
    assert not norm.is_zca and norm.to_tensors() == {}
    z = norm.apply(x)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(3), rtol=0, atol=1e-4)
    torch.testing.assert_close(z.std(dim=(0, 2, 3)), torch.ones(3), rtol=0, atol=1e-4)
    torch.testing.assert_close(norm.invert(z), pixels(x), rtol=0, atol=1e-6)


def test_constant_channels_do_not_divide_by_zero():
    x = torch.zeros(4, 2, 3, 3, dtype=torch.uint8)
    x[:, 1] = torch.arange(4, dtype=torch.uint8)[:, None, None] * 50
    norm = Normalization.fit(x)
    assert norm.std[0] == pytest.approx(1e-3) and norm.std[1] > 0.1
    assert torch.isfinite(norm.apply(x)).all()


def test_per_channel_meta_round_trips():
    norm = Normalization([0.1, 0.2, 0.3], [0.5, 0.6, 0.7])
    again = Normalization.from_stored(json.loads(json.dumps(norm.meta())), norm.to_tensors())
    assert again == norm and norm.meta() == {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.6, 0.7], "zca": False}


# --- ZCA ----------------------------------------------------------------------------------------

def test_zca_equals_kornias_zca_whitening_with_eps_01(zca_dataset):
    """Real coloured digits: the fitted transform is upstream MTT's `ZCAWhitening(eps=0.1)` on [0, 1] pixels."""
    assert ZCA_EPS == 0.1
    x, _ = zca_dataset.train_split()
    norm = Normalization.fit(x, zca=True)
    assert norm.is_zca
    kornia = ZCAWhitening(eps=0.1, compute_inv=True).fit(pixels(x))
    torch.testing.assert_close(norm.apply(x), kornia(pixels(x)), rtol=1e-5, atol=1e-5)
    held_out = zca_dataset.test_images[:50]  # the fitted transform, applied to images it never saw
    torch.testing.assert_close(norm.apply(held_out), kornia(pixels(held_out)), rtol=1e-5, atol=1e-5)


def test_zca_whitens_the_training_split(zca_dataset):
    """cov(whitened) = U diag(l / (l + eps)) U^T for the eigen-decomposition U diag(l) U^T of cov(pixels)."""
    x, _ = zca_dataset.train_split()
    norm = zca_dataset.normalization
    white = norm.apply(x).flatten(1).double()
    raw = pixels(x).flatten(1).double()
    torch.testing.assert_close(white.mean(0), torch.zeros(white.shape[1], dtype=torch.float64), rtol=0, atol=1e-5)
    lam, u = torch.linalg.eigh(torch.cov(raw.T))
    lam = lam.clamp_min(0)
    expected = u @ torch.diag(lam / (lam + ZCA_EPS)) @ u.T
    cov = torch.cov(white.T)
    torch.testing.assert_close(cov, expected, rtol=0, atol=1e-5)
    # the strong directions of the raw pixels (eigenvalues >> eps) come out with about unit variance
    strong = lam > 10 * ZCA_EPS
    assert int(strong.sum()) >= 3
    whitened_var = torch.einsum("dk,de,ek->k", u[:, strong], cov, u[:, strong])
    assert float(whitened_var.min()) > 0.9 and float(whitened_var.max()) <= 1.0 + 1e-6
    assert float(lam.max()) > 5  # ...which the raw pixels were far from
    assert float(torch.linalg.eigvalsh(cov).max()) <= 1.0 + 1e-6


def test_zca_invert_returns_the_pixels(zca_dataset):
    norm = zca_dataset.normalization
    x = torch.cat([zca_dataset.train_images[:64], zca_dataset.test_images[:64]])
    torch.testing.assert_close(norm.invert(norm.apply(x)), pixels(x), rtol=0, atol=1e-4)


def test_a_zca_dataset_round_trips_through_its_tensors(zca_dataset):
    ds = zca_dataset
    assert ds.normalization.is_zca and ds.meta["normalization"]["zca"] is True
    tensors = {k: v.clone() for k, v in ds.to_tensors().items()}
    assert {"zca_mean", "zca_matrix", "zca_inverse"} <= set(tensors)
    again = BiasedDataset.from_tensors(tensors, json.loads(json.dumps(ds.meta)))  # meta is stored as JSON
    a, b = ds.normalization, again.normalization
    assert b.is_zca and a.mean == b.mean and a.std == b.std
    for name in ("zca_mean", "zca_matrix", "zca_inverse"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    x = ds.test_images[:32]
    assert torch.equal(a.apply(x), b.apply(x))
    for name in ds.TENSOR_FIELDS:
        assert torch.equal(getattr(ds, name), getattr(again, name)), name


def test_zca_is_fitted_on_the_distillation_split(zca_dataset, digits16_source):
    x, _ = zca_dataset.train_split()
    refit = Normalization.fit(x, zca=True)  # (fitted with another thread count: float rounding only)
    torch.testing.assert_close(zca_dataset.normalization.zca_matrix, refit.zca_matrix, rtol=0, atol=1e-5)
    torch.testing.assert_close(zca_dataset.normalization.zca_mean, refit.zca_mean, rtol=0, atol=1e-6)
    with_val = Normalization.fit(zca_dataset.train_images, zca=True)  # validation images included
    assert not torch.allclose(zca_dataset.normalization.zca_matrix, with_val.zca_matrix, rtol=0, atol=1e-3)
    plain = build_biased_dataset(digits16_source, "colored", 0.1, 1)
    assert not plain.normalization.is_zca
    from_config = DatasetConfig(source="digits16", bias="colored", aligned_ratio=0.1, zca=True).build(digits16_source)
    assert from_config.normalization.is_zca and from_config.meta["normalization"]["zca"]
    assert torch.equal(plain.train_images, zca_dataset.train_images)  # zca changes the space, not the data


@pytest.mark.parametrize("which", ["zca_dataset", "colored_dataset"])
def test_real_data_from_dataset_uses_the_datasets_normalization(which, request):
    ds = request.getfixturevalue(which)
    real = RealData.from_dataset(ds)
    x, y = ds.train_split()
    assert real.norm is ds.normalization
    assert torch.equal(real.images, ds.normalization.apply(x)) and torch.equal(real.labels, y)
    assert real.num_classes == 10 and real.shape == tuple(x.shape[1:])
    if which == "zca_dataset":  # not the per-channel space
        assert not torch.allclose(real.images, Normalization.fit(x).apply(x), atol=1e-2)


# --- RealData sampling and SyntheticSet ----------------------------------------------------------

def small_real() -> RealData:
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 0])
    images = torch.arange(len(labels), dtype=torch.float32)[:, None, None, None].expand(-1, 1, 2, 2).contiguous()
    return RealData(images, labels, 3, Normalization([0.0], [1.0]))


def test_real_data_indexes_classes_and_samples_class_major():
    real = small_real()
    assert [i.tolist() for i in real.class_index] == [[0, 2, 5, 6], [1, 4], [3]]
    x, y = real.sample_per_class(3, torch.Generator().manual_seed(0))
    assert y.tolist() == [0, 0, 0, 1, 1, 2]  # class-major, fewer for smaller classes
    picked = x[:, 0, 0, 0].long()
    assert torch.equal(real.labels[picked], y) and len(set(picked[:3].tolist())) == 3  # without replacement
    one = real.sample_class(0, 10, torch.Generator().manual_seed(1))
    assert sorted(one[:, 0, 0, 0].long().tolist()) == [0, 2, 5, 6]


def test_synthetic_set_round_trips_through_tensors_and_meta():
    norm = Normalization([0.5], [0.25])
    syn = SyntheticSet(torch.randn(4, 1, 2, 2, requires_grad=True), torch.tensor([0, 0, 1, 1]), norm, lr=0.02)
    tensors = syn.to_tensors()
    assert not tensors["images"].requires_grad
    meta = json.loads(json.dumps(syn.meta()))
    assert meta == {"mean": [0.5], "std": [0.25], "zca": False, "lr": 0.02}
    again = SyntheticSet.from_tensors(tensors, meta, Normalization.from_stored(meta, tensors))
    assert torch.equal(again.images, syn.images.detach()) and torch.equal(again.labels, syn.labels)
    assert again.lr == 0.02 and again.norm == norm
    assert SyntheticSet.from_tensors(tensors, {**meta, "lr": None}, norm).lr is None
