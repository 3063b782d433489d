"""DM: distribution matching (Zhao & Bilen 2023).

Every iteration samples a fresh randomly initialised network and pulls the
mean embedding of each class's synthetic images towards the mean embedding of
a real batch of that class. Upstream loops over classes; here all classes go
through the network in one batch (per-class means come from a reshape and an
index_add), with class-wise siamese augmentation parameters, so the objective
is the same while the convolutions run on large batches.

Evaluation protocol (main_DM.py): DSA augmentation, 1000 epochs.

Deviations from upstream: with BatchNorm networks the batched forward shares
batch statistics across classes, unlike upstream's per-class forward (the
default ConvNet uses instance norm, where the two are identical); randomness
comes from one seeded generator. The real batch's embedding runs in chunks,
compiled on long CPU runs (`distill_core.methods.engines.RealEmbedder`).

Debiasing: when `real.weights` is set (`distill_core.debias`), each class's
real mean embedding is the weighted mean sum(w_i f_i) / sum(w_i) over the
sampled real batch; the synthetic means stay plain. With every weight exactly
1.0 this is bit-for-bit the unweighted mean (x * 1.0 and sums of ones are exact).
"""

from __future__ import annotations

import torch

from distill_core.augment import SiameseAugment
from distill_core.methods.base import DistillConfig, Guidance, ProgressFn, init_synthetic, log_iteration
from distill_core.methods.engines import RealEmbedder, embed_no_grad
from distill_core.methods.registry import Method, dsa_protocol, register
from distill_core.networks import build_network
from distill_core.runtime import DEFAULT_RUNTIME, Runtime
from distill_core.sets import RealData, SyntheticSet


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-class mean rows of `features`; with `weights`, sum(w_i f_i) / sum(w_i) (a class of weight 0 gives 0)."""
    if weights is not None:
        return weighted_class_means(features, labels, num_classes, weights)
    sums = torch.zeros(num_classes, features.shape[1], device=features.device, dtype=features.dtype)
    sums.index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(features.dtype)
    return sums / counts[:, None]


def weighted_class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                         weights: torch.Tensor) -> torch.Tensor:
    w = weights.to(features.dtype)
    sums = torch.zeros(num_classes, features.shape[1], device=features.device, dtype=features.dtype)
    sums.index_add_(0, labels, features * w[:, None])
    totals = torch.zeros(num_classes, device=features.device, dtype=features.dtype).index_add_(0, labels, w)
    # a total of 0 (empty class, or all weights 0) divides by 1 and gives 0, as the unweighted clamp_min(1) does;
    # not clamp_min(1) itself, since weighted totals below 1 are legitimate
    totals = torch.where(totals > 0, totals, torch.ones_like(totals))
    return sums / totals[:, None]


def dm_loss(net, x_real, y_real, x_syn, y_syn, num_classes: int, embed_real=embed_no_grad,
            w_real: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        mean_real = class_means(embed_real(net, x_real), y_real, num_classes, w_real)
    mean_syn = class_means(net.embed(x_syn), y_syn, num_classes)
    return ((mean_real - mean_syn) ** 2).sum()


def distill_dm(real: RealData, cfg: DistillConfig, runtime: Runtime = DEFAULT_RUNTIME,
               guidance: Guidance | None = None, experts=None, progress: ProgressFn | None = None) -> SyntheticSet:
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # network initialisations
    syn = init_synthetic(real, cfg, g)
    x_syn = syn.images.requires_grad_(True)
    opt = torch.optim.SGD([x_syn], lr=cfg.lr_img, momentum=0.5)
    augment = SiameseAugment(cfg.augment) if cfg.augment else None
    channels, size = real.shape[0], real.shape[-1]
    k = real.num_classes
    embed_real = RealEmbedder.from_runtime(runtime, cfg.iterations, k * cfg.batch_real)

    for it in range(cfg.iterations):
        net = build_network(cfg.arch, channels, k, size, **cfg.arch_options).to(real.device)
        net.train()
        net.requires_grad_(False)
        x_real, y_real, w_real = real.sample_per_class_weighted(cfg.batch_real, g)  # same picks as sample_per_class
        x_in = x_syn
        if augment is not None:
            seed = int(torch.randint(2**31 - 1, (1,), generator=g))
            x_real = augment(x_real, seed, y_real, k)
            x_in = augment(x_syn, seed, syn.labels, k)
        loss = dm_loss(net, x_real, y_real, x_in, syn.labels, k, embed_real, w_real)
        record = {"loss_dm": loss.item()}
        if guidance is not None:
            ptm_loss = guidance.loss(x_syn, syn.labels)
            loss = loss + ptm_loss
            record["loss_ptm"] = ptm_loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log_iteration(syn, it, cfg, record, progress)

    syn.images = x_syn.detach()
    return syn


register(Method(
    name="dm", distill=distill_dm, iterations=20000, lr_img=1.0, init="real", augment=True,
    evaluation=dsa_protocol, takes_weights=True, summary="distribution matching (Zhao & Bilen 2023)"))
