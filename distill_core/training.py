"""The one epoch loop: PTM and expert training, evaluation networks, DC's inner loop.

Plain SGD passes over a tensor dataset held on the device: a fresh
permutation per epoch from the caller's generator, `batch_size` samples per
step, optional augmentation with parameters drawn per sample (upstream's
non-siamese `DiffAugment` / DC `augment` during network training), and the
step's forward/backward in cache-sized tiles where the runtime says so
(`distill_core.tiling`). Learning-rate schedules belong to the callers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from distill_core.tiling import LossFn, batch_backward, ce_sum


@dataclass
class EpochStats:
    loss: float  # mean training cross-entropy over the epoch's samples
    acc: float  # training accuracy over the epoch (on augmented images, if augmenting)


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
                batch_size: int, generator: torch.Generator, augment=None, tile: int | None = None,
                loss_fn=ce_sum, weights: torch.Tensor | None = None) -> EpochStats:
    """One pass over (images, labels); `loss_fn(model, x, y)` may be a compiled `ce_sum`. With `weights` (one
    per sample, `RealData.weights`) the epoch's n samples are drawn by weight with replacement instead of a
    permutation: weighted sampling, so a sample of weight w is seen w / mean(w) times per epoch on average."""
    n = len(labels)
    if weights is None:
        perm = torch.randperm(n, generator=generator).to(images.device)
    else:
        perm = torch.multinomial(weights.double().cpu(), n, replacement=True, generator=generator).to(images.device)
    step_loss: LossFn = lambda x, y: loss_fn(model, x, y)  # noqa: E731
    total, correct = 0.0, 0
    for i in range(0, n, batch_size):
        idx = perm[i:i + batch_size]
        x = images[idx]
        if augment is not None:
            x = augment.per_sample(x, int(torch.randint(2**31 - 1, (1,), generator=generator)))
        opt.zero_grad(set_to_none=True)
        loss, right = batch_backward(step_loss, x, labels[idx], tile)
        opt.step()
        total, correct = total + loss, correct + right
    return EpochStats(float(total) / max(1, n), float(correct) / max(1, n))
