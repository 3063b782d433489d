"""Image sources: what the library knows about each before loading it, and local-first loading."""

from __future__ import annotations

import pytest
import torch

from distill_core.data import SOURCES, DatasetUnavailable, load_source
from distill_core.data.sources import SourceInfo


def test_source_records():
    assert set(SOURCES) == {"digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "svhn"}
    for name, info in SOURCES.items():
        assert isinstance(info, SourceInfo) and info.name == name
    geometry = {name: (s.channels, s.image_size, s.num_classes) for name, s in SOURCES.items()}
    assert geometry == {"digits": (1, 28, 10), "mnist": (1, 28, 10), "fashion_mnist": (1, 28, 10),
                        "cifar10": (3, 32, 10), "cifar100": (3, 32, 100), "svhn": (3, 32, 10)}
    # upstream DSA drops flip for digits (MNIST, SVHN); DC's MNIST evaluation rule covers the MNIST-like
    assert {n for n, s in SOURCES.items() if s.digits} == {"digits", "mnist", "svhn"}
    assert {n for n, s in SOURCES.items() if s.mnist_like} == {"digits", "mnist"}
    assert {n for n, s in SOURCES.items() if s.grayscale} == {"digits", "mnist", "fashion_mnist"}


def test_digits_is_a_fixed_real_split_with_the_recorded_geometry(digits_source):
    info = SOURCES["digits"]
    src = digits_source
    assert (len(src.train_labels), len(src.test_labels)) == (1347, 450)
    assert src.train_images.dtype == torch.uint8 and src.train_labels.dtype == torch.int64
    assert src.train_images.shape[1:] == (info.channels, info.image_size, info.image_size)
    assert src.num_classes == info.num_classes
    per_class = torch.bincount(src.train_labels, minlength=10) + torch.bincount(src.test_labels, minlength=10)
    stratified = (torch.bincount(src.test_labels, minlength=10) - 0.25 * per_class).abs()
    assert float(stratified.max()) <= 1.0  # a stratified 75/25 split
    again = info.load(root=None, download=False)
    assert again.checksum() == src.checksum()  # the same on every call (and machine)
    assert load_source("digits").checksum() == src.checksum()


def test_checksum_covers_the_content(digits_source):
    src = digits_source
    changed = src.train_images.clone()
    changed[0, 0, 0, 0] ^= 1
    other = type(src)(src.name, changed, src.train_labels, src.test_images, src.test_labels, src.num_classes)
    assert other.checksum() != src.checksum()


def test_fashion_mnist_when_installed_has_the_recorded_geometry():
    info = SOURCES["fashion_mnist"]
    try:
        src = load_source("fashion_mnist", download=False)
    except DatasetUnavailable as exc:
        pytest.skip(f"Fashion-MNIST not installed: {exc}")
    assert src.train_images.shape == (60000, info.channels, info.image_size, info.image_size)
    assert src.test_images.shape == (10000, 1, 28, 28) and src.num_classes == 10


def test_unknown_and_missing_sources_raise_dataset_unavailable(tmp_path, monkeypatch):
    with pytest.raises(DatasetUnavailable, match="unknown source 'imagenet'"):
        load_source("imagenet")
    monkeypatch.setenv("HOME", str(tmp_path))  # no user cache
    monkeypatch.delenv("DDRAY_DATA", raising=False)
    with pytest.raises(DatasetUnavailable, match="cifar10") as info:
        load_source("cifar10", root=str(tmp_path / "nowhere"), download=False)
    assert str(tmp_path / "nowhere") in str(info.value)  # names every place it tried


def test_ddray_offline_turns_downloads_off(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("DDRAY_DATA", raising=False)
    monkeypatch.setenv("DDRAY_OFFLINE", "1")
    with pytest.raises(DatasetUnavailable, match="downloads are off"):
        load_source("svhn", root=str(tmp_path))
