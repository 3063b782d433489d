"""Training a pre-trained model (PTM) or an MTT expert, with checkpoints per epoch.

Two recipes (`recipe(name, ...)` gives a PTMConfig's training fields):
- "ptm" (paper 2, DDInterpreter `train_original_models.py`): SGD lr 0.01,
  momentum 0.9, weight decay 0.005, batch 256, lr x0.1 after epochs 50 and 100
  (absolute, as upstream: a shorter run is upstream's early checkpoint, at the
  constant lr 0.01, not a compressed schedule), no augmentation, normalised data.
- "expert" (MTT's buffer.py): SGD lr 0.01 with no momentum and no weight
  decay, a constant lr, batch 256, DSA augmentation with parameters per
  sample, 50 epochs upstream; every epoch's checkpoint is an MTT trajectory.
Epoch 0 (the initialisation) is kept as a checkpoint too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from distill_core.augment import make_augmentation
from distill_core.config import Config
from distill_core.networks import build_network
from distill_core.runtime import DEFAULT_RUNTIME, Runtime
from distill_core.sets import RealData
from distill_core.tiling import ce_sum
from distill_core.training import train_epoch

RecipeName = Literal["ptm", "expert"]
PTM_MILESTONES = (50, 100)  # paper 2's lr drops (epochs), whatever the run's length


class PTMConfig(Config):
    arch: str = "convnet"
    arch_options: dict[str, Any] = Field(default_factory=dict)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    epochs: int = Field(default=150, ge=1, le=100_000)
    lr: float = Field(default=0.01, gt=0, le=100)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.005, ge=0, le=1)
    batch_size: int = Field(default=256, ge=1, le=100_000)
    milestones: list[int] = Field(default_factory=list)  # lr x0.1 after each of these epochs
    augment: str | None = None  # per-sample augmentation while training (distill_core.augment names)
    # the epochs whose checkpoints are kept; None keeps every epoch (needed for MTT)
    keep_epochs: list[Annotated[int, Field(ge=0, le=100_000)]] | None = Field(default=None, max_length=100_000)


def recipe(name: RecipeName, epochs: int, dsa_strategy: str) -> dict:
    """The training fields of a named recipe for a run of `epochs` epochs."""
    if name == "ptm":
        return {"momentum": 0.9, "weight_decay": 0.005, "augment": None,
                "milestones": [m for m in PTM_MILESTONES if m < epochs]}
    if name == "expert":
        return {"momentum": 0.0, "weight_decay": 0.0, "augment": f"dsa:{dsa_strategy}", "milestones": []}
    raise ValueError(f"unknown PTM recipe '{name}' (ptm | expert)")


@dataclass
class PTMResult:
    checkpoints: dict[int, dict[str, torch.Tensor]]  # epoch -> state_dict (epoch 0 = initialisation)
    history: list[dict]


@torch.no_grad()
def accuracy(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch_size):
        correct += int((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
    model.train()
    return correct / max(1, len(labels))


def train_ptm(real: RealData, cfg: PTMConfig, val: tuple[torch.Tensor, torch.Tensor] | None = None,
              runtime: Runtime = DEFAULT_RUNTIME, progress=None) -> PTMResult:
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    channels, size = real.shape[0], real.shape[-1]
    model = build_network(cfg.arch, channels, real.num_classes, size, **cfg.arch_options).to(real.device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    augment = make_augmentation(cfg.augment)
    tile = runtime.tile_for(model)
    keep = set(cfg.keep_epochs) if cfg.keep_epochs is not None else None

    def snapshot():
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    checkpoints = {0: snapshot()} if keep is None or 0 in keep else {}
    history = []
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        stats = train_epoch(model, opt, real.images, real.labels, cfg.batch_size, g, augment, tile, ce_sum)
        if epoch in cfg.milestones:
            for group in opt.param_groups:
                group["lr"] *= 0.1
        record = {"epoch": epoch, "train_loss": stats.loss, "train_acc": stats.acc}
        if val is not None:
            record["val_acc"] = accuracy(model, *val)
        history.append(record)
        if keep is None or epoch in keep:
            checkpoints[epoch] = snapshot()
        if progress is not None:
            progress(epoch, record)
    return PTMResult(checkpoints, history)
