"""Real image sources, resolved local-first.

Every source returns uint8 images (N, C, H, W) with int64 labels for its
official train and test splits. Resolution order for the files: an explicit
root (the spec's `data_root`), `$DDRAY_DATA`, the user cache
(`~/.cache/ddray/data`), known system paths (Debian's `dataset-fashion-mnist`),
and only then a torchvision download. When nothing is found and the download
fails, `DatasetUnavailable` names the dataset and every place that was tried.
Nothing is ever synthesised in place of a missing dataset.
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


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


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

    spec = {
        "mnist": (tvd.MNIST, "MNIST", 10),
        "fashion_mnist": (tvd.FashionMNIST, "FashionMNIST", 10),
        "cifar10": (tvd.CIFAR10, "cifar-10-batches-py", 10),
        "cifar100": (tvd.CIFAR100, "cifar-100-python", 100),
        "svhn": (tvd.SVHN, "svhn", 10),
    }[name]
    cls, folder, num_classes = spec
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


@dataclass(frozen=True)
class SourceInfo:
    """What the rest of the library needs to know about a source before loading it."""

    name: str
    load: Callable[..., SourceData]
    channels: int
    image_size: int
    num_classes: int
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
)}


def downloads_allowed() -> bool:
    """`DDRAY_OFFLINE=1` turns torchvision downloads off: local files or a clear error."""
    return os.environ.get("DDRAY_OFFLINE", "").lower() not in ("1", "true", "yes")


def load_source(name: str, root: str | None = None, download: bool | None = None) -> SourceData:
    download = downloads_allowed() if download is None else download
    if name not in SOURCES:
        raise DatasetUnavailable(f"unknown source '{name}' (known: {', '.join(sorted(SOURCES))})")
    return SOURCES[name].load(root=root, download=download)
