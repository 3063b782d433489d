"""N ConvNets as one network with grouped convolutions, for training many at once.

The evaluation protocol trains several freshly initialised networks of one
architecture on the same small synthetic set. For the ConvNet family, N
networks fold exactly into one network whose convolutions have N groups:
channel block n of every layer belongs to network n. Instance, group, layer
and batch norm are per-channel or per-contiguous-group operations, ReLU and
pooling are elementwise or per-channel, and the linear heads become one
batched matmul, so the folded network computes the N networks' outputs
exactly (up to float summation order). SGD with momentum and weight decay is
elementwise, so one optimiser over the folded parameters is N independent
optimisers, and the summed loss gives every block its own network's gradient.

Unlike `torch.func.vmap` stacking, this keeps every operation a single dense
kernel (no per-op batching rules). Only the ConvNet family folds this way;
`can_fold` says whether a network does. `train_and_evaluate_folded` is the
evaluation protocol trained this way: the CUDA engine beside the recipe in
`distill_core.evaluation` (on CPU, grouped convolutions measured no faster
than one network at a time: benchmarks/methods.py), which picks it. Both
build on `distill_core.evaluation_protocol` (config, schedule, metrics,
records); this module does not import `distill_core.evaluation`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from distill_core.augment import make_augmentation
from distill_core.evaluation_protocol import (
    EvalConfig,
    EvalSets,
    accuracy_of,
    decay_epoch,
    metrics_from_predictions,
    network_result,
    seeded_network,
    snapshot,
    training_lr,
    validation_epochs,
)
from distill_core.networks import ConvNet
from distill_core.runtime import Runtime
from distill_core.sets import SyntheticSet
from distill_core.tiling import batch_backward


def can_fold(model: nn.Module) -> bool:
    return isinstance(model, ConvNet)


def _fold_norm(norms: list[nn.Module]) -> nn.Module:
    first = norms[0]
    n = len(norms)
    if isinstance(first, nn.Identity):
        return nn.Identity()
    if isinstance(first, nn.GroupNorm):
        out = nn.GroupNorm(first.num_groups * n, first.num_channels * n, eps=first.eps, affine=first.affine)
    elif isinstance(first, nn.BatchNorm2d):
        out = nn.BatchNorm2d(first.num_features * n, eps=first.eps, momentum=first.momentum)
        out.running_mean.copy_(torch.cat([m.running_mean for m in norms]))
        out.running_var.copy_(torch.cat([m.running_var for m in norms]))
    else:
        raise TypeError(f"cannot fold {type(first).__name__}")
    if getattr(first, "affine", False):
        out.weight.data.copy_(torch.cat([m.weight.data for m in norms]))
        out.bias.data.copy_(torch.cat([m.bias.data for m in norms]))
    return out


class FoldedConvNet(nn.Module):
    """forward: (B, N*C, H, W), network n's images in channel block n -> logits (B, N, K)."""

    def __init__(self, models: list[ConvNet]):
        super().__init__()
        self.n = n = len(models)
        layers: list[nn.Module] = []
        for parts in zip(*[m.features for m in models]):
            first = parts[0]
            if isinstance(first, nn.Conv2d):
                conv = nn.Conv2d(first.in_channels * n, first.out_channels * n, first.kernel_size,
                                 stride=first.stride, padding=first.padding, groups=n, bias=first.bias is not None)
                conv.weight.data.copy_(torch.cat([p.weight.data for p in parts]))
                if first.bias is not None:
                    conv.bias.data.copy_(torch.cat([p.bias.data for p in parts]))
                layers.append(conv)
            elif isinstance(first, (nn.GroupNorm, nn.BatchNorm2d, nn.Identity)):
                layers.append(_fold_norm(list(parts)))
            else:  # activations and pooling act per channel: shared as they are
                layers.append(first)
        self.features = nn.Sequential(*layers)
        heads = [m.classifier for m in models]
        self.head_weight = nn.Parameter(torch.stack([h.weight.data for h in heads]).clone())  # (N, K, D)
        self.head_bias = nn.Parameter(torch.stack([h.bias.data for h in heads]).clone())  # (N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        f = f.reshape(f.shape[0], self.n, -1)  # channel-major flatten, per network
        return torch.einsum("bnd,nkd->bnk", f, self.head_weight) + self.head_bias


def folded_loss(folded: FoldedConvNet, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over images and networks, and the correct count; labels (B, N).

    `batch_backward` divides by B, so each network gets its own mean-loss gradient.
    """
    logits = folded(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"), (logits.argmax(2) == y).sum()


@torch.no_grad()
def predict_folded(folded: FoldedConvNet, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(N_images, N_networks) predicted classes; every network sees the same images."""
    was_training = folded.training
    folded.eval()
    out = torch.cat([folded(images[i:i + batch_size].repeat(1, folded.n, 1, 1)).argmax(2)
                     for i in range(0, len(images), batch_size)])
    folded.train(was_training)
    return out


def train_and_evaluate_folded(syn: SyntheticSet, sets: EvalSets, cfg: EvalConfig, repeats: list[int],
                              runtime: Runtime) -> list[dict]:
    """`evaluation.train_and_evaluate` for several repeats at once, as one grouped network.

    Each network keeps its own initialisation, shuffling and augmentation
    stream (its own generator, consumed in the same order as the one-network
    loop), so the results equal the one-at-a-time loop up to float rounding.
    """
    device = syn.images.device
    shape = (syn.images.shape[1], sets.num_classes, syn.images.shape[-1])
    models = [seeded_network(cfg, r, *shape) for r in repeats]
    gens = [torch.Generator().manual_seed(cfg.seed * 1000 + r) for r in repeats]
    folded = FoldedConvNet(models).to(device)
    opt = torch.optim.SGD(folded.parameters(), lr=training_lr(cfg, syn), momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    augment = make_augmentation(cfg.augment)
    tile = runtime.tile_for(models[0])  # tiles of 16/N images measured slower than 16
    chunk = max(1, runtime.predict_batch_size() // len(repeats))  # the folded network is N networks wide
    images, labels = syn.images.detach(), syn.labels
    n = len(labels)
    has_val = len(sets.val[1]) > 0
    check_at = validation_epochs(cfg) if has_val else set()
    best: list[dict | None] = [None for _ in repeats]
    curves: list[list] = [[] for _ in repeats]
    snapshots: dict[int, dict] = {}  # epoch -> folded weights, while some network's best is that epoch

    folded.train()
    for epoch in range(cfg.epochs + 1):
        perms = [torch.randperm(n, generator=g).to(device) for g in gens]
        for i in range(0, n, cfg.batch_size):
            xs, ys = [], []
            for perm, g in zip(perms, gens):  # the same draws, in the same order, as train_epoch
                idx = perm[i:i + cfg.batch_size]
                x = images[idx]
                if augment is not None:
                    x = augment.per_sample(x, int(torch.randint(2**31 - 1, (1,), generator=g)))
                xs.append(x)
                ys.append(labels[idx])
            opt.zero_grad(set_to_none=True)
            batch_backward(lambda x, y: folded_loss(folded, x, y), torch.cat(xs, 1), torch.stack(ys, 1), tile)
            opt.step()
        if epoch == decay_epoch(cfg):
            for group in opt.param_groups:
                group["lr"] *= 0.1
        if epoch in check_at:
            val_pred = predict_folded(folded, sets.val[0], chunk)
            for j in range(len(repeats)):
                val_acc = accuracy_of(val_pred[:, j], sets.val[1])
                curves[j].append([epoch, val_acc])
                if best[j] is None or val_acc >= best[j]["val_acc"]:
                    best[j] = {"val_acc": val_acc, "epoch": epoch}
                    if epoch != cfg.epochs:  # the final weights are tested anyway
                        snapshots.setdefault(epoch, snapshot(folded))
            live = {b["epoch"] for b in best}
            snapshots = {e: state for e, state in snapshots.items() if e in live}

    def test_all() -> list[dict]:
        pred_test = predict_folded(folded, sets.test[0], chunk)
        pred_unb = predict_folded(folded, sets.unbiased[0], chunk)
        return [metrics_from_predictions(pred_test[:, j], pred_unb[:, j], sets) for j in range(len(repeats))]

    last = [{"epoch": cfg.epochs, **m} for m in test_all()]
    at_val: list[dict | None] = [None if b is None else {**last[j], **b} if b["epoch"] == cfg.epochs else None
                                 for j, b in enumerate(best)]
    for epoch, state in snapshots.items():  # test once per distinct earlier best checkpoint
        folded.load_state_dict(state)
        for j, m in enumerate(test_all()):
            if best[j] is not None and best[j]["epoch"] == epoch:
                at_val[j] = {**m, **best[j]}
    return [network_result(cfg.selection, last[j], at_val[j], curves[j]) for j in range(len(repeats))]
