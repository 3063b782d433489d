"""Pre-trained-model (PTM) guidance for any distillation method (paper 2).

Total loss: L = L_base(S) + alpha * L_PTM(S). Each call samples ONE
architecture uniformly from the pool, then ONE of its checkpoints (seed x
epoch) uniformly; PTMs are frozen.

- CLoM (PTM trained on the target data): L_PTM = CE(f(x_syn), y_syn), mean
  over the synthetic set, no augmentation.
- CCLoM (PTM from any source domain, same input shape): draw B real images
  with replacement, take L2-normalised penultimate features F, and
      D = 1 - F(x_syn) F(x_real)^T,  M_ij = [y_syn_i == y_real_j],
      L_PTM = sum(M * D) / sum(D).

`alpha` is one value or a mapping architecture -> value; a mapping must give
every architecture of the pool a value (or a `default`), never a silent 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from distill_core.config import Config
from distill_core.networks import Classifier
from distill_core.sets import RealData

Weight = Annotated[float, Field(ge=0, le=1e9)]
Alpha = Weight | dict[str, Weight]  # one weight, or one per pool architecture (`default` for the rest)


class GuidanceConfig(Config):
    """One PTM-guidance setting: which loss, its weight, which checkpoints, CCLoM's real batch."""

    kind: Literal["clom", "cclom"]
    alpha: Alpha = 1.0
    # which kept checkpoints to sample; None = the final one
    checkpoint_epochs: list[Annotated[int, Field(ge=0, le=100_000)]] | None = Field(default=None, max_length=100_000)
    real_batch: int = Field(default=8196, ge=1, le=1_000_000)  # CCLoM's B (paper 2's README value)


def missing_alpha(alpha: Alpha, archs) -> list[str]:
    """Architectures of a pool that an alpha mapping gives no weight (empty for a scalar or with `default`)."""
    if not isinstance(alpha, dict) or "default" in alpha:
        return []
    return sorted(a for a in archs if a not in alpha)


@dataclass
class PTMPool:
    """Frozen checkpoints grouped by architecture: {arch: [model, ...]}."""

    members: dict[str, list[Classifier]] = field(default_factory=dict)

    def add(self, arch: str, model: Classifier) -> None:
        model.eval()
        model.requires_grad_(False)
        self.members.setdefault(arch, []).append(model)

    def __len__(self) -> int:
        return sum(len(v) for v in self.members.values())

    def sample(self, generator: torch.Generator) -> tuple[str, Classifier]:
        archs = sorted(self.members)
        arch = archs[int(torch.randint(len(archs), (1,), generator=generator))]
        models = self.members[arch]
        return arch, models[int(torch.randint(len(models), (1,), generator=generator))]

    def to(self, device) -> "PTMPool":
        for models in self.members.values():
            for m in models:
                m.to(device)
        return self


def clom_loss(model: Classifier, x_syn: torch.Tensor, y_syn: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x_syn), y_syn)


def cclom_loss(model: Classifier, x_syn, y_syn, x_real, y_real) -> torch.Tensor:
    f_syn = F.normalize(model.embed(x_syn), dim=1)
    with torch.no_grad():
        f_real = F.normalize(model.embed(x_real), dim=1)
    distance = 1.0 - f_syn @ f_real.T  # (N_syn, B)
    mask = (y_syn[:, None] == y_real[None, :]).to(distance.dtype)
    return (mask * distance).sum() / distance.sum()


@dataclass
class PTMGuidance:
    config: GuidanceConfig
    pool: PTMPool
    real: RealData | None = None  # CCLoM's real images (target domain)
    # PTM and CCLoM-batch draws come from their own stream, so a guided distillation sees the same real
    # batches and augmentations as its unguided twin of the same seed (upstream shares one RNG; ours pairs runs)
    seed: int = 0

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.seed)
        if self.config.kind == "cclom" and self.real is None:
            raise ValueError("CCLoM needs the real training data")
        if not len(self.pool):
            raise ValueError("PTM guidance needs at least one checkpoint in the pool")
        missing = missing_alpha(self.config.alpha, self.pool.members)
        if missing:
            raise ValueError(f"alpha gives no weight to pool architecture(s) {', '.join(missing)} (add them or 'default')")

    def alpha_for(self, arch: str) -> float:
        alpha = self.config.alpha
        if isinstance(alpha, dict):
            return float(alpha.get(arch, alpha.get("default")))
        return float(alpha)

    def loss(self, x_syn: torch.Tensor, y_syn: torch.Tensor) -> torch.Tensor:
        generator = self.generator
        arch, model = self.pool.sample(generator)
        if self.config.kind == "clom":
            term = clom_loss(model, x_syn, y_syn)
        else:
            assert self.real is not None
            batch = self.config.real_batch
            idx = torch.randint(len(self.real.labels), (batch,), generator=generator).to(self.real.device)
            term = cclom_loss(model, x_syn, y_syn, self.real.images[idx], self.real.labels[idx])
        return self.alpha_for(arch) * term
