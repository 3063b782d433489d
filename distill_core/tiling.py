"""Cache-sized tiles for CPU training steps.

On CPU the ConvNet family spends much of a step in memory-bound passes
(normalisation, activation, pooling) over activations far larger than the
caches; a batch of 100-256 images at width 128 streams them from DRAM. Running
the batch's forward/backward `tile` samples at a time and summing the
gradients computes the same step while those passes stay in cache
(benchmarks/methods.py measures it). Every training loop (`distill_core.training`)
and DC's real-side matching use it. It is exact only for networks that treat
samples independently: BatchNorm in train mode mixes a batch, so those
networks are never tiled.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

TILE_CPU = 16  # measured best of 8/16/32/64 for ConvNet-64/128 steps on this project's CPUs

# (x, y) -> (summed cross-entropy, number of correct predictions)
LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def ce_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of (a tile of) a batch and its correct count; module-level so torch.compile caches it."""
    logits = model(x)
    return F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum()


def samples_independent(model: nn.Module) -> bool:
    """True unless a BatchNorm layer in train mode would mix the samples of a batch."""
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def default_tile(model: nn.Module, device: torch.device) -> int | None:
    """TILE_CPU for sample-independent networks on CPU, else None (whole batch)."""
    return TILE_CPU if device.type == "cpu" and samples_independent(model) else None


def batch_backward(loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor,
                   tile: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of the batch's mean loss, `tile` samples at a time (the summed gradients are the same).

    Returns the batch's summed loss and correct count, detached (no device sync).
    """
    n = len(y)
    step = tile if tile and tile < n else n
    total, correct = x.new_zeros(()), torch.zeros((), dtype=torch.long, device=x.device)
    for i in range(0, n, step):
        loss, right = loss_fn(x[i:i + step], y[i:i + step])
        (loss / n).backward()
        total, correct = total + loss.detach(), correct + right
    return total, correct
