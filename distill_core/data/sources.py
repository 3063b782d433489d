"""Real image sources, resolved local-first.

Every source returns uint8 images (N, C, H, W) with int64 labels for its
official train and test splits. Resolution order for the files: an explicit
root (the spec's `data_root`), `$DDRAY_DATA`, the user cache
(`~/.cache/ddray/data`), known system paths (Debian's `dataset-fashion-mnist`),
and only then a torchvision download. When nothing is found and the download
fails, `DatasetUnavailable` names the dataset and every place that was tried.
Nothing is ever synthesised in place of a missing dataset.

`imagefolder` is a local torchvision-ImageFolder-style root (Tiny-ImageNet,
ImageNette, ...), whose size and classes the spec declares (`load_imagefolder`).
`adapt_source` resizes a source and converts its channels, so that PTMs trained
on it take another dataset's image shape (MNIST 1x28x28 -> 3x32x32 PTMs guiding
CIFAR-10).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F


class DatasetUnavailable(RuntimeError):
    """A dataset could not be found locally nor downloaded."""


@dataclass(frozen=True)
class SourceData:
    name: str
    train_images: torch.Tensor  # uint8 (N, C, H, W)
    train_labels: torch.Tensor  # int64 (N,)
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int

    def checksum(self) -> str:
        """Content hash of all four tensors: the source part of a dataset's cache key."""
        h = hashlib.sha256(self.name.encode())
        for t in (self.train_images, self.train_labels, self.test_images, self.test_labels):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()


SYSTEM_PATHS = {
    # Debian's package `dataset-fashion-mnist` ships the original gzipped IDX files.
    "fashion_mnist": [Path("/usr/share/datasets/fashion-mnist")],
    "mnist": [Path("/usr/share/datasets/mnist")],
}


def candidate_roots(root: str | os.PathLike | None = None) -> list[Path]:
    roots: list[Path] = []
    if root:
        roots.append(Path(root).expanduser())
    if os.environ.get("DDRAY_DATA"):
        roots.append(Path(os.environ["DDRAY_DATA"]).expanduser())
    roots.append(Path.home() / ".cache" / "ddray" / "data")
    return roots


def _writable_root(roots: list[Path]) -> Path:
    for r in roots:
        try:
            r.mkdir(parents=True, exist_ok=True)
            if os.access(r, os.W_OK):
                return r
        except OSError:
            continue
    raise DatasetUnavailable(f"no writable data directory among {[str(r) for r in roots]}")


def _resize(images: torch.Tensor, size: int, antialias: bool = False) -> torch.Tensor:
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
    return x.round().clamp(0, 255).to(torch.uint8)


LUMA_601 = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights (PIL's convert("L"))
_CHUNK = 4096  # images converted at a time (float32 intermediates stay small)


def _adapt_images(images: torch.Tensor, channels: int | None, size: int | None) -> torch.Tensor:
    out = []
    for x in images.split(_CHUNK):
        if channels is not None and channels != x.shape[1]:
            if channels == 3 and x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)  # grey -> RGB: the grey value in every channel
            elif channels == 1 and x.shape[1] == 3:
                weights = torch.tensor(LUMA_601).view(1, 3, 1, 1)
                x = (x.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
            else:
                raise ValueError(f"cannot convert {x.shape[1]}-channel images to {channels} channels")
        if size is not None and (x.shape[-2], x.shape[-1]) != (size, size):
            x = _resize(x, size, antialias=True)  # antialiased when shrinking (bilinear when growing)
        out.append(x.contiguous())
    return torch.cat(out) if out else images


def adapt_source(data: SourceData, channels: int | None = None, image_size: int | None = None) -> SourceData:
    """`data` with square images of side `image_size` and `channels` channels (None: as they are).

    For a PTM source of another shape than the distillation target (MNIST
    1x28x28 PTMs guiding 3x32x32 CIFAR-10): bilinear resize, antialiased when
    shrinking; grey -> RGB replicates the grey channel, RGB -> grey is the
    ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B). Images stay uint8; both
    splits are converted alike. Unchanged data is returned as it is.
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    shape = data.train_images.shape[1:]
    if (channels in (None, shape[0])) and (image_size is None or tuple(shape[1:]) == (image_size, image_size)):
        return data
    return SourceData(data.name, _adapt_images(data.train_images, channels, image_size), data.train_labels,
                      _adapt_images(data.test_images, channels, image_size), data.test_labels, data.num_classes)


def load_digits() -> SourceData:
    """scikit-learn's real 8x8 handwritten digits (1797 images), resized to 28x28.

    There is no official split: a stratified 75/25 split with a fixed seed
    gives 1347 train and 450 test images, the same on every machine.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) * (255.0 / 16.0)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(idx, test_size=0.25, random_state=0, stratify=bunch.target)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    images = _resize(images, 28)
    return SourceData(
        "digits",
        images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], 10,
    )


def _unpack_system_idx(name: str, folder: str, roots: list[Path]) -> Path | None:
    """Unpack Debian's gzipped IDX files into `<root>/<folder>/raw/` for torchvision.

    The gzip checksums differ from torchvision's download list, so we never call
    its download path on them; the unpacked IDX files are the real data.
    """
    files = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    for sys_dir in SYSTEM_PATHS.get(name, []):
        if all((sys_dir / f"{f}.gz").exists() or (sys_dir / f).exists() for f in files):
            root = _writable_root(roots)
            raw = root / folder / "raw"
            raw.mkdir(parents=True, exist_ok=True)
            for f in files:
                if (raw / f).exists():
                    continue
                tmp = raw / f"{f}.tmp-{os.getpid()}"
                if (sys_dir / f).exists():
                    shutil.copyfile(sys_dir / f, tmp)
                else:
                    with gzip.open(sys_dir / f"{f}.gz", "rb") as src, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                os.replace(tmp, raw / f)
            return root
    return None


def _to_nchw_uint8(data) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(data))
    if t.ndim == 3:  # (N, H, W) grayscale
        t = t.unsqueeze(1)
    elif t.shape[-1] in (1, 3) and t.shape[1] not in (1, 3):  # (N, H, W, C)
        t = t.permute(0, 3, 1, 2)
    return t.contiguous().to(torch.uint8)


def _torchvision_source(name: str, root: str | None, download: bool) -> SourceData:
    import torchvision.datasets as tvd

    cls, num_classes = {"mnist": (tvd.MNIST, 10), "fashion_mnist": (tvd.FashionMNIST, 10),
                        "cifar10": (tvd.CIFAR10, 10), "cifar100": (tvd.CIFAR100, 100), "svhn": (tvd.SVHN, 10)}[name]
    folder = TORCHVISION_FOLDERS[name]
    roots = candidate_roots(root)

    def open_split(r: Path, train: bool, dl: bool):
        if cls is tvd.SVHN:
            return cls(str(r / "svhn"), split="train" if train else "test", download=dl)
        return cls(str(r), train=train, download=dl)

    tried: list[str] = []
    found = None
    for r in roots:
        try:
            found = (open_split(r, True, False), open_split(r, False, False))
            break
        except (RuntimeError, FileNotFoundError, OSError):
            tried.append(str(r))
    if found is None and name in SYSTEM_PATHS:
        unpacked = _unpack_system_idx(name, folder, roots)
        tried.extend(str(p) for p in SYSTEM_PATHS[name])
        if unpacked is not None:
            found = (open_split(unpacked, True, False), open_split(unpacked, False, False))
    if found is None and download:
        target = _writable_root(roots)
        try:
            found = (open_split(target, True, True), open_split(target, False, True))
        except Exception as exc:  # network errors come in many types
            raise DatasetUnavailable(
                f"dataset '{name}' not found locally (tried {', '.join(tried)}) and the download "
                f"failed ({type(exc).__name__}); place it under $DDRAY_DATA or set datasets[].data_root"
            ) from None
    if found is None:
        raise DatasetUnavailable(
            f"dataset '{name}' not found locally (tried {', '.join(tried)}) and downloads are off (DDRAY_OFFLINE)"
        )
    train, test = found
    if cls is tvd.SVHN:
        tr_x, tr_y, te_x, te_y = train.data, train.labels, test.data, test.labels
    else:
        tr_x, tr_y, te_x, te_y = train.data, train.targets, test.data, test.targets
    return SourceData(
        name,
        _to_nchw_uint8(tr_x), torch.as_tensor(np.asarray(tr_y), dtype=torch.int64),
        _to_nchw_uint8(te_x), torch.as_tensor(np.asarray(te_y), dtype=torch.int64),
        num_classes,
    )


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


def _class_folders(split: Path) -> list[str]:
    return sorted(d.name for d in split.iterdir() if d.is_dir() and not d.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        files += [Path(dirpath) / f for f in sorted(filenames)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return files


def _folder_split(split: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """(image, label) pairs of one split, labels by the train split's sorted class names."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in _class_folders(split) if c not in index]
    if unknown:
        raise DatasetUnavailable(f"imagefolder: {split} has class folder(s) {', '.join(unknown[:5])} that "
                                 f"{split.parent / 'train'} does not have")
    items = [(f, index[c]) for c in _class_folders(split) for f in _image_files(split / c)]
    if not items:
        raise DatasetUnavailable(f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {split}/<class>/")
    return items


def _centre_square(img):
    w, h = img.size
    s = min(w, h)
    return img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))


def _read_images(items: list[tuple[Path, int]], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    images = torch.empty((len(items), 3, size, size), dtype=torch.uint8)
    for i, (path, _) in enumerate(items):
        with Image.open(path) as img:
            square = _centre_square(img.convert("RGB"))
            if square.size != (size, size):
                square = square.resize((size, size), Image.BILINEAR)  # PIL's bilinear is antialiased when shrinking
            images[i] = torch.from_numpy(np.asarray(square, dtype=np.uint8).copy()).permute(2, 0, 1)
    return images, torch.tensor([label for _, label in items], dtype=torch.int64)


def load_imagefolder(root: str | os.PathLike | None, image_size: int | None = None) -> SourceData:
    """A local root laid out as torchvision's ImageFolder, one folder per split:

        <root>/train/<class>/**/<image>     the training split (its sorted class folders are the classes)
        <root>/val/<class>/**/<image>       the test split (or <root>/test/<class>/... when there is no val/)

    e.g. ImageNette (train/, val/) or Tiny-ImageNet once its val/images/ are sorted into val/<wnid>/ by
    val_annotations.txt. Images are read as RGB, centre-cropped to a square, and resized to `image_size`
    (None: the smallest square side in the folder, so a folder of one size is read as it is); the spec's
    declared `image_size` / `channels` are applied after loading (`adapt_source`). The classes are the
    train split's class folders (`num_classes` = their count); the test split may lack some of them.
    A missing root, split or image names the path in `DatasetUnavailable`. Never downloaded.
    """
    if not root:
        raise DatasetUnavailable("source 'imagefolder' reads a local folder: set datasets[].data_root to a root "
                                 "with train/ and val/ (or test/) class folders")
    base = Path(root).expanduser()
    train = base / "train"
    if not train.is_dir():
        raise DatasetUnavailable(f"imagefolder: no training split at {train} (expected {base}/train/<class>/)")
    test = next((base / s for s in ("val", "test") if (base / s).is_dir()), None)
    if test is None:
        raise DatasetUnavailable(f"imagefolder: no test split at {base / 'val'} or {base / 'test'}")
    classes = _class_folders(train)
    if not classes:
        raise DatasetUnavailable(f"imagefolder: no class folders in {train}")
    train_items, test_items = _folder_split(train, classes), _folder_split(test, classes)
    empty = sorted(set(classes) - {classes[label] for _, label in train_items})
    if empty:
        raise DatasetUnavailable(f"imagefolder: no images in {train / empty[0]}" +
                                 (f" (nor in {len(empty) - 1} more class folders)" if len(empty) > 1 else ""))
    if image_size is None:
        from PIL import Image

        sides = []
        for path, _ in train_items + test_items:
            with Image.open(path) as img:  # reads the header only
                sides.append(min(img.size))
        image_size = min(sides)
    tr_x, tr_y = _read_images(train_items, image_size)
    te_x, te_y = _read_images(test_items, image_size)
    return SourceData("imagefolder", tr_x, tr_y, te_x, te_y, len(classes))


@dataclass(frozen=True)
class SourceInfo:
    """What the rest of the library needs to know about a source before loading it."""

    name: str
    load: Callable[..., SourceData]
    channels: int
    image_size: int | None  # None: declared by the spec (imagefolder: datasets[].image_size)
    num_classes: int | None  # None: declared by the spec (imagefolder: datasets[].num_classes)
    # digits change meaning when mirrored: upstream DSA drops `flip` for MNIST and SVHN
    digits: bool = False
    # upstream DC evaluates MNIST sets with its crop/scale/rotate augmentation (utils.get_daparam)
    mnist_like: bool = False

    @property
    def grayscale(self) -> bool:
        return self.channels == 1


def _torchvision(name: str) -> Callable[..., SourceData]:
    return lambda root=None, download=True: _torchvision_source(name, root, download)


SOURCES: dict[str, SourceInfo] = {s.name: s for s in (
    SourceInfo("digits", lambda root=None, download=True: load_digits(), 1, 28, 10, digits=True, mnist_like=True),
    SourceInfo("mnist", _torchvision("mnist"), 1, 28, 10, digits=True, mnist_like=True),
    SourceInfo("fashion_mnist", _torchvision("fashion_mnist"), 1, 28, 10),
    SourceInfo("cifar10", _torchvision("cifar10"), 3, 32, 10),
    SourceInfo("cifar100", _torchvision("cifar100"), 3, 32, 100),
    SourceInfo("svhn", _torchvision("svhn"), 3, 32, 10, digits=True),
    # a local ImageFolder root (datasets[].data_root) of any size and classes, both declared in the spec
    SourceInfo("imagefolder", lambda root=None, download=True: load_imagefolder(root), 3, None, None),
)}


def downloads_allowed() -> bool:
    """`DDRAY_OFFLINE=1` turns torchvision downloads off: local files or a clear error."""
    return os.environ.get("DDRAY_OFFLINE", "").lower() not in ("1", "true", "yes")


TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "cifar-10-batches-py",
                       "cifar100": "cifar-100-python", "svhn": "svhn"}  # what torchvision keeps under a root


def stored_locally(name: str, root: str | None = None) -> bool:
    """Whether a source's files are on this machine (reading nothing): a torchvision folder under one of the
    candidate roots or a system copy; digits ship with scikit-learn; an imagefolder is its own root."""
    if name not in TORCHVISION_FOLDERS:
        return name == "digits" or (root is not None and Path(root).expanduser().is_dir())
    return any((r / TORCHVISION_FOLDERS[name]).is_dir() for r in candidate_roots(root)) or \
        any(p.is_dir() for p in SYSTEM_PATHS.get(name, []))


def load_source(name: str, root: str | None = None, download: bool | None = None) -> SourceData:
    download = downloads_allowed() if download is None else download
    if name not in SOURCES:
        raise DatasetUnavailable(f"unknown source '{name}' (known: {', '.join(sorted(SOURCES))})")
    return SOURCES[name].load(root=root, download=download)
