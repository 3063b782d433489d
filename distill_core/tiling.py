"""Cache-sized tiles for CPU training steps.

On CPU the ConvNet family spends much of a step in memory-bound passes
(normalisation, activation, pooling) over activations far larger than the
caches; a batch of 100-256 images at width 128 streams them from DRAM. Running
the batch's forward/backward `tile` samples at a time and summing the
gradients computes the same step while those passes stay in cache
(benchmarks/methods.py measures it). DC's inner loop, the evaluation
protocol and PTM training use it. It is exact only for networks that treat
samples independently: BatchNorm in train mode mixes a batch, so those
networks are never tiled.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

TILE_CPU = 16  # measured best of 8/16/32/64 for ConvNet-64/128 steps on this project's CPUs

LossFn = Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]  # (x, y, reduction) -> loss


def batch_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
    """The training loss of one (tile of a) batch; module-level so torch.compile can cache it."""
    return F.cross_entropy(model(x), y, reduction=reduction)


def samples_independent(model: nn.Module) -> bool:
    """True unless a BatchNorm layer in train mode would mix the samples of a batch."""
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def default_tile(model: nn.Module, device: torch.device) -> int | None:
    """TILE_CPU for sample-independent networks on CPU, else None (whole batch)."""
    return TILE_CPU if device.type == "cpu" and samples_independent(model) else None


def batch_loss_backward(loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, tile: int | None) -> None:
    """Backward of the batch's mean loss, `tile` samples at a time (the summed gradients are the same)."""
    if tile is None or len(y) <= tile:
        loss_fn(x, y, "mean").backward()
        return
    for i in range(0, len(y), tile):
        (loss_fn(x[i:i + tile], y[i:i + tile], "sum") / len(y)).backward()
