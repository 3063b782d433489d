"""DM: distribution matching (Zhao & Bilen 2023).

Every iteration samples a fresh randomly initialised network and pulls the
mean embedding of each class's synthetic images towards the mean embedding of
a real batch of that class. Upstream loops over classes; here all classes go
through the network in one batch (per-class means come from a reshape and an
index_add), with class-wise siamese augmentation parameters, so the objective
is the same while the convolutions run on large batches.

Note: with BatchNorm networks the batched forward shares batch statistics
across classes, unlike upstream's per-class forward. The default ConvNet uses
instance norm, where the two are identical.
"""

from __future__ import annotations

import torch

from distill_core.augment import SiameseAugment
from distill_core.compiled import MaybeCompiled, compile_wanted
from distill_core.methods.base import (DistillConfig, Guidance, ProgressFn, RealData, SyntheticSet, init_synthetic,
                                       log_iteration)
from distill_core.networks import build_network
from distill_core.tiling import samples_independent


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    sums = torch.zeros(num_classes, features.shape[1], device=features.device, dtype=features.dtype)
    sums.index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(features.dtype)
    return sums / counts[:, None]


def embed_no_grad(net, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net.embed(x)


class RealEmbedder:
    """The real-batch embedding in cache-sized chunks, optionally through torch.compile.

    CPU levers measured by benchmarks/methods.py (part c) on ConvNet-128 with
    2560 images: running the no-grad forward in chunks of CHUNK_CPU images
    keeps the norm/activation/pool passes in cache (about 2x), and
    torch.compile fuses them (about 2x); outputs agree to ~1e-5 relative.
    Chunks are only used for networks that treat samples independently (a
    BatchNorm network in train mode normalises over the whole batch). The
    first compiled call costs ~10-20 s, so "auto" compiles only CPU runs of at
    least COMPILE_MIN_ITERATIONS; cfg.extra["compile_embed"] = True/False
    forces it. channels_last was measured slower on CPU and is not used.
    """

    COMPILE_MIN_ITERATIONS = 1000
    CHUNK_CPU = 32

    def __init__(self, cfg: DistillConfig, device: torch.device):
        use = compile_wanted(cfg.extra.get("compile_embed", "auto"), device, cfg.iterations,
                             self.COMPILE_MIN_ITERATIONS)
        self.fn = MaybeCompiled(embed_no_grad, use, dynamic=False)  # fixed chunk shapes

    def __call__(self, net, x: torch.Tensor) -> torch.Tensor:
        chunk = self.CHUNK_CPU if x.device.type == "cpu" and samples_independent(net) else None
        if chunk is None or len(x) <= chunk:
            return self.fn(net, x)
        return torch.cat([self.fn(net, x[i:i + chunk]) for i in range(0, len(x), chunk)])


def dm_loss(net, x_real, y_real, x_syn, y_syn, num_classes: int, embed_real=embed_no_grad) -> torch.Tensor:
    with torch.no_grad():
        mean_real = class_means(embed_real(net, x_real), y_real, num_classes)
    mean_syn = class_means(net.embed(x_syn), y_syn, num_classes)
    return ((mean_real - mean_syn) ** 2).sum()


def distill_dm(real: RealData, cfg: DistillConfig, guidance: Guidance | None = None,
               progress: ProgressFn | None = None) -> SyntheticSet:
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # network initialisations
    syn = init_synthetic(real, cfg, g)
    x_syn = syn.images.requires_grad_(True)
    opt = torch.optim.SGD([x_syn], lr=cfg.lr_img, momentum=0.5)
    augment = SiameseAugment(cfg.dsa_strategy) if cfg.dsa else None
    channels, size = real.shape[0], real.shape[-1]
    k = real.num_classes
    embed_real = RealEmbedder(cfg, real.device)

    for it in range(cfg.iterations):
        net = build_network(cfg.arch, channels, k, size, **cfg.arch_options).to(real.device)
        net.train()
        net.requires_grad_(False)
        x_real, y_real = real.sample_per_class(cfg.batch_real, g)
        x_in = x_syn
        if augment is not None:
            seed = int(torch.randint(2**31 - 1, (1,), generator=g))
            x_real = augment(x_real, seed, y_real, k)
            x_in = augment(x_syn, seed, syn.labels, k)
        loss = dm_loss(net, x_real, y_real, x_in, syn.labels, k, embed_real)
        record = {"loss_dm": loss.item()}
        if guidance is not None:
            ptm_loss = guidance.loss(x_syn, syn.labels, g)
            loss = loss + ptm_loss
            record["loss_ptm"] = ptm_loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log_iteration(syn, it, cfg, record, progress)

    syn.images = x_syn.detach()
    return syn
