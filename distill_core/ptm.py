"""Training a pre-trained model (PTM) with a checkpoint every epoch.

Recipe from paper 2: SGD lr 0.01, momentum 0.9, weight decay 0.005, batch 256,
lr x0.1 at 1/3 and 2/3 of training (epochs 50 and 100 of 150), no
augmentation, normalised data. The per-epoch checkpoints double as MTT's
expert trajectories.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from distill_core.methods.base import RealData
from distill_core.networks import build_network
from distill_core.tiling import default_tile


@dataclass
class PTMConfig:
    arch: str = "convnet"
    arch_options: dict = field(default_factory=dict)
    seed: int = 0
    epochs: int = 150
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.005
    batch_size: int = 256
    keep_epochs: list[int] | None = None  # None keeps every epoch (needed for MTT)
    tile: int | None = None  # samples per forward/backward; None: distill_core.tiling's default; 0: whole batch


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
              progress=None) -> PTMResult:
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    channels, size = real.shape[0], real.shape[-1]
    model = build_network(cfg.arch, channels, real.num_classes, size, **cfg.arch_options).to(real.device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=[max(1, cfg.epochs // 3), max(1, 2 * cfg.epochs // 3)], gamma=0.1)
    keep = set(cfg.keep_epochs) if cfg.keep_epochs is not None else None

    def snapshot():
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    checkpoints = {0: snapshot()} if keep is None or 0 in keep else {}
    history = []
    n = len(real.labels)
    tile = default_tile(model, real.device) if cfg.tile is None else (cfg.tile or None)  # cache-sized on CPU
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        perm = torch.randperm(n, generator=g).to(real.device)
        total_loss, correct = 0.0, 0
        for i in range(0, n, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            x, y = real.images[idx], real.labels[idx]
            opt.zero_grad(set_to_none=True)
            step = tile or len(idx)
            for j in range(0, len(idx), step):  # summed tile gradients = the batch gradient
                logits = model(x[j:j + step])
                yt = y[j:j + step]
                loss = F.cross_entropy(logits, yt, reduction="sum")
                (loss / len(idx)).backward()
                total_loss += loss.item()
                correct += int((logits.argmax(1) == yt).sum())
            opt.step()
        sched.step()
        record = {"epoch": epoch, "train_loss": total_loss / n, "train_acc": correct / n}
        if val is not None:
            record["val_acc"] = accuracy(model, *val)
        history.append(record)
        if keep is None or epoch in keep:
            checkpoints[epoch] = snapshot()
        if progress is not None:
            progress(epoch, record)
    return PTMResult(checkpoints, history)
