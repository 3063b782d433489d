"""The tensors methods work on: normalised real data and synthetic sets.

`Normalization` maps stored uint8 images to the space networks and synthetic
images live in: per-channel standardisation (the default), or ZCA whitening of
[0, 1] pixels as MTT uses on CIFAR (kornia's `zca_mean` with eps 0.1, upstream's
`ZCAWhitening(eps=0.1)`). It is fitted once on a dataset variant's distillation
split and stored with it, so distillation, PTMs and evaluation of that variant
all see the same space.

`RealData` is a normalised training split indexed per class for fast batched
sampling, optionally with one debiasing weight per sample (`distill_core.debias`;
each class's largest weight 1.0), which DM, DC and DSA use where they form real
statistics; None keeps every recipe on its unweighted path. `SyntheticSet` is what a method returns: images in the same space,
labels, and (MTT) a learned learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

ZCA_EPS = 0.1  # upstream MTT: kornia.enhance.ZCAWhitening(eps=0.1)


@dataclass
class Normalization:
    mean: list[float]
    std: list[float]
    # ZCA whitening of [0, 1] pixels (flattened): x_white = (x - zca_mean) @ zca_matrix; mean/std unused
    zca_mean: torch.Tensor | None = None
    zca_matrix: torch.Tensor | None = None
    zca_inverse: torch.Tensor | None = None

    @property
    def is_zca(self) -> bool:
        return self.zca_matrix is not None

    def apply(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = images_uint8.float() / 255.0
        if self.is_zca:
            flat = (x.flatten(1) - self.zca_mean.to(x.device)) @ self.zca_matrix.to(x.device)
            return flat.reshape(x.shape)
        m = torch.tensor(self.mean, device=x.device)[None, :, None, None]
        s = torch.tensor(self.std, device=x.device)[None, :, None, None]
        return (x - m) / s

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        """Back to [0, 1] pixels (for image grids)."""
        if self.is_zca:
            flat = x.flatten(1) @ self.zca_inverse.to(x.device) + self.zca_mean.to(x.device)
            return flat.reshape(x.shape).clamp(0, 1)
        m = torch.tensor(self.mean, device=x.device)[None, :, None, None]
        s = torch.tensor(self.std, device=x.device)[None, :, None, None]
        return (x * s + m).clamp(0, 1)

    @classmethod
    def fit(cls, images_uint8: torch.Tensor, zca: bool = False) -> "Normalization":
        x = images_uint8.float() / 255.0
        mean, std = x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
        if not zca:
            return cls(mean, std)
        from kornia.enhance import zca_mean

        matrix, centre, inverse = zca_mean(x.flatten(1), dim=0, eps=ZCA_EPS, return_inverse=True)
        return cls(mean, std, centre.squeeze(0), matrix, inverse)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        if not self.is_zca:
            return {}
        return {"zca_mean": self.zca_mean, "zca_matrix": self.zca_matrix, "zca_inverse": self.zca_inverse}

    def meta(self) -> dict:
        return {"mean": self.mean, "std": self.std, "zca": self.is_zca}

    @classmethod
    def from_stored(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "Normalization":
        if meta.get("zca"):
            return cls(meta["mean"], meta["std"], tensors["zca_mean"], tensors["zca_matrix"], tensors["zca_inverse"])
        return cls(meta["mean"], meta["std"])


@dataclass
class RealData:
    images: torch.Tensor  # float, normalised (N, C, H, W), on the compute device
    labels: torch.Tensor
    num_classes: int
    norm: Normalization
    class_index: list[torch.Tensor] = field(default_factory=list)
    weights: torch.Tensor | None = None  # per-sample debiasing weights (float, same device), or None: unweighted

    def __post_init__(self):
        if self.weights is not None:
            if self.weights.shape != self.labels.shape:
                raise ValueError(f"{len(self.weights)} weights for {len(self.labels)} real samples")
            if not bool(torch.isfinite(self.weights).all()) or bool((self.weights < 0).any()):
                raise ValueError("debiasing weights must be finite and non-negative")
            # indexed with the labels' picks, so they live where the labels do (float32, like the images)
            self.weights = self.weights.to(self.labels.device, torch.float32)
        if not self.class_index:
            self.class_index = [torch.nonzero(self.labels == c).squeeze(1) for c in range(self.num_classes)]

    @classmethod
    def from_dataset(cls, ds, device: torch.device | str = "cpu") -> "RealData":
        """The distillation split of a `BiasedDataset`, in the dataset's own normalisation."""
        x, y = ds.train_split()
        norm = ds.normalization
        return cls(norm.apply(x).to(device), y.to(device), ds.num_classes, norm)

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def _pick_per_class(self, n: int, generator: torch.Generator) -> torch.Tensor:
        picks = []
        for idx in self.class_index:
            k = min(n, len(idx))
            picks.append(idx[torch.randperm(len(idx), generator=generator)[:k].to(idx.device)])
        return torch.cat(picks)

    def sample_per_class(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n random images of every class (fewer if a class is smaller), in class-major order."""
        sel = self._pick_per_class(n, generator)
        return self.images[sel], self.labels[sel]

    def sample_per_class_weighted(self, n: int, generator: torch.Generator
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`sample_per_class` (same picks, same random stream) plus the picked samples' weights (None if unweighted)."""
        sel = self._pick_per_class(n, generator)
        return self.images[sel], self.labels[sel], None if self.weights is None else self.weights[sel]

    def sample_class(self, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        idx = self.class_index[c]
        return self.images[idx[torch.randperm(len(idx), generator=generator)[: min(n, len(idx))].to(idx.device)]]


@dataclass
class SyntheticSet:
    images: torch.Tensor  # normalised, like RealData.images
    labels: torch.Tensor
    norm: Normalization
    lr: float | None = None  # learned synthetic learning rate (MTT)
    history: list[dict] = field(default_factory=list)  # per-logged-iteration objective values

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"images": self.images.detach().cpu(), "labels": self.labels.cpu()}

    def meta(self) -> dict[str, Any]:
        return {**self.norm.meta(), "lr": self.lr}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict, norm: Normalization) -> "SyntheticSet":
        return cls(tensors["images"], tensors["labels"], norm, meta.get("lr"))


def external_set(tensors: dict, norm: Normalization, space: str, num_classes: int,
                 shape: tuple[int, int, int]) -> SyntheticSet:
    """A synthetic set saved by another codebase, checked against the dataset it is evaluated on.

    `tensors`: {"images": N x C x H x W floats, "labels": N class indices, optionally "lr": the set's
    learned learning rate (MTT)}. `space`: "pixels" (images in [0, 1]; normalised here with the
    dataset's own normalisation) or "normalized" (already in that normalisation, as upstream DC/MTT
    save their sets). Raises ValueError naming what does not fit.
    """
    missing = [k for k in ("images", "labels") if k not in tensors]
    if missing:
        raise ValueError(f"no '{missing[0]}' tensor (the file must hold images and labels)")
    images, labels = torch.as_tensor(tensors["images"]).float(), torch.as_tensor(tensors["labels"]).long().flatten()
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(shape):
        raise ValueError(f"images of shape {tuple(images.shape)}; the dataset's are N x {' x '.join(map(str, shape))}")
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels outside 0..{num_classes - 1}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or infinity")
    if space == "pixels":
        if images.min() < -1e-4 or images.max() > 1 + 1e-4:
            raise ValueError(f"pixel values in [{images.min():.3g}, {images.max():.3g}], not [0, 1] "
                             "(use --space normalized for normalised images)")
        images = norm.apply(images * 255.0)
    lr = tensors.get("lr")
    return SyntheticSet(images, labels, norm, float(lr) if lr is not None else None)
