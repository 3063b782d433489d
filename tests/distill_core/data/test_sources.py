"""Image sources: what the library knows about each before loading it, and local-first loading."""

from __future__ import annotations

import re

import pytest
import torch

from distill_core.data import SOURCES, DatasetConfig, DatasetUnavailable, SourceData, load_source
from distill_core.data.sources import SourceInfo, adapt_source, load_imagefolder


def test_source_records():
    assert set(SOURCES) == {"digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "imagefolder"}
    for name, info in SOURCES.items():
        assert isinstance(info, SourceInfo) and info.name == name
    geometry = {name: (s.channels, s.image_size, s.num_classes) for name, s in SOURCES.items()}
    assert geometry == {"digits": (1, 28, 10), "mnist": (1, 28, 10), "fashion_mnist": (1, 28, 10),
                        "cifar10": (3, 32, 10), "cifar100": (3, 32, 100), "svhn": (3, 32, 10),
                        "imagefolder": (3, None, None)}  # a folder's size and classes: declared in the spec
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


# --- adapting a source to another shape ----------------------------------------------------------

def _source(train: torch.Tensor, test: torch.Tensor, k: int = 2) -> SourceData:
    return SourceData("t", train, torch.arange(len(train)) % k, test, torch.arange(len(test)) % k, k)


def test_adapt_source_replicates_grey_into_rgb_and_takes_the_luma_of_rgb():
    grey = torch.randint(0, 256, (4, 1, 6, 6), dtype=torch.uint8)
    rgb = adapt_source(_source(grey, grey[:2]), channels=3)
    assert rgb.train_images.shape == (4, 3, 6, 6) and rgb.test_images.shape == (2, 3, 6, 6)
    assert all(torch.equal(rgb.train_images[:, c], grey[:, 0]) for c in range(3))
    assert torch.equal(rgb.train_labels, torch.arange(4) % 2) and rgb.num_classes == 2
    back = adapt_source(rgb, channels=1)
    assert torch.equal(back.train_images, grey)  # the luma of a grey pixel is that grey
    pixel = torch.tensor([200, 100, 50], dtype=torch.uint8).view(1, 3, 1, 1)
    luma = adapt_source(_source(pixel, pixel), channels=1).train_images
    assert luma.shape == (1, 1, 1, 1) and int(luma) == round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)  # ITU-R 601


def test_adapt_source_resizes_both_splits_bilinearly_and_antialiased_when_shrinking(digits_source):
    up = adapt_source(digits_source, channels=3, image_size=32)  # MNIST-like 1x28x28 -> CIFAR's 3x32x32
    assert up.train_images.shape == (len(digits_source.train_labels), 3, 32, 32)
    assert up.test_images.shape == (len(digits_source.test_labels), 3, 32, 32) and up.train_images.dtype == torch.uint8
    assert torch.equal(up.train_labels, digits_source.train_labels) and up.num_classes == 10
    flat = torch.full((1, 1, 28, 28), 77, dtype=torch.uint8)
    assert torch.equal(adapt_source(_source(flat, flat), image_size=32).train_images, torch.full((1, 1, 32, 32), 77,
                                                                                                   dtype=torch.uint8))
    checker = ((torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2 * 255).to(torch.uint8).view(1, 1, 64, 64)
    small = adapt_source(_source(checker, checker), image_size=16).train_images
    assert small.shape == (1, 1, 16, 16) and (small.int() - 128).abs().max() <= 1  # averaged, not aliased
    assert adapt_source(digits_source) is digits_source  # nothing asked: the same data
    assert adapt_source(digits_source, channels=1, image_size=28) is digits_source
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        adapt_source(digits_source, channels=2)


def test_a_dataset_config_adapts_its_source_before_building(digits_source):
    cfg = DatasetConfig(source="digits", bias="none", aligned_ratio=1.0, severity=0, image_size=32, channels=3)
    ds = cfg.build(digits_source)
    assert ds.train_images.shape[1:] == (3, 32, 32) and ds.test_images.shape[1:] == (3, 32, 32)
    assert DatasetConfig(**cfg.to_dict()) == cfg
    plain = DatasetConfig(source="digits", bias="none", aligned_ratio=1.0, severity=0).build(digits_source)
    assert plain.train_images.shape[1:] == (1, 28, 28)


# --- a local ImageFolder root ------------------------------------------------------------------------

COLOURS = {"cat": (250, 10, 10), "dog": (10, 250, 10), "fox": (10, 10, 250)}


def _image_folder(root, test_split="val", sizes=((40, 30), (20, 20)), grey=False):
    """A tiny ImageFolder tree of real PNG/JPEG files: one solid colour per class, images of several sizes."""
    from PIL import Image

    for split, classes in (("train", COLOURS), (test_split, ["cat", "fox"])):  # the test split lacks dog
        for c in classes:
            folder = root / split / c / ("images" if c == "fox" else "")  # nested, as Tiny-ImageNet's train/
            folder.mkdir(parents=True, exist_ok=True)
            for i, size in enumerate(sizes):
                img = Image.new("RGB", size, COLOURS[c])
                (img.convert("L") if grey else img).save(folder / f"{i}.png")
            (folder / "notes.txt").write_text("not an image")
    return root


def test_imagefolder_reads_train_and_val_class_folders(tmp_path):
    root = _image_folder(tmp_path / "tiny")
    src = load_imagefolder(root)
    assert src.num_classes == 3  # train's class folders, sorted: cat 0, dog 1, fox 2
    assert src.train_images.shape == (6, 3, 20, 20) and src.train_images.dtype == torch.uint8  # smallest square side
    assert src.train_labels.tolist() == [0, 0, 1, 1, 2, 2] and src.test_labels.tolist() == [0, 0, 2, 2]
    for image, label in zip(src.train_images, src.train_labels):
        colour = COLOURS[["cat", "dog", "fox"][int(label)]]
        assert (image.int() - torch.tensor(colour).view(3, 1, 1)).abs().max() <= 1  # RGB kept, centre crop
    again = load_source("imagefolder", root=str(root))
    assert again.checksum() == src.checksum() and load_imagefolder(root, image_size=8).train_images.shape[-1] == 8


def test_imagefolder_reads_grey_images_as_rgb_and_falls_back_to_a_test_split(tmp_path):
    src = load_imagefolder(_image_folder(tmp_path / "grey", test_split="test", grey=True))
    assert src.train_images.shape == (6, 3, 20, 20) and len(src.test_labels) == 4
    assert torch.equal(src.train_images[:, 0], src.train_images[:, 1])
    adapted = adapt_source(src, channels=1, image_size=32)  # what a spec's channels / image_size do next
    assert adapted.train_images.shape == (6, 1, 32, 32)


def test_imagefolder_names_the_path_of_whatever_is_missing(tmp_path):
    with pytest.raises(DatasetUnavailable, match=re.escape("set datasets[].data_root")):
        load_source("imagefolder")
    with pytest.raises(DatasetUnavailable, match=re.escape(f"no training split at {tmp_path / 'nowhere' / 'train'}")):
        load_imagefolder(tmp_path / "nowhere")
    root = _image_folder(tmp_path / "a")
    (root / "val").rename(root / "elsewhere")
    with pytest.raises(DatasetUnavailable, match=re.escape(f"no test split at {root / 'val'} or {root / 'test'}")):
        load_imagefolder(root)
    (root / "elsewhere").rename(root / "val")
    (root / "val" / "wolf").mkdir()
    with pytest.raises(DatasetUnavailable, match=re.escape(f"{root / 'val'} has class folder(s) wolf")):
        load_imagefolder(root)
    (root / "val" / "wolf").rmdir()
    (root / "train" / "owl").mkdir()
    with pytest.raises(DatasetUnavailable, match=re.escape(f"no images in {root / 'train' / 'owl'}")):
        load_imagefolder(root)
