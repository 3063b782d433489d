"""Train several evaluation networks at once: stacked parameters + torch.func.vmap.

The evaluation protocol trains many freshly initialised networks of one
architecture on the same small synthetic set (upstream: 20 per experiment).
`train_stacked` stacks their parameters (`torch.func.stack_module_state`) and
runs every SGD step for all of them in one vmapped forward/backward. Each
network keeps its own initialisation, its own shuffling generator and its own
augmentation seeds, so the result equals training them one at a time with
`train_one` (same seeds) up to float rounding; SGD with momentum and weight
decay is elementwise, so one optimiser over the stacked tensors is exactly M
independent optimisers.

Training semantics follow the evaluation protocol (SGD momentum 0.9, weight
decay 5e-4, batch 256, lr x0.1 from epoch E//2 + 1, augmentation with
parameters per sample when cfg.augment) without the validation checkpoints:
both functions return the networks after the last epoch. Benchmark-only code
(benchmarks/methods.py times it); the library's CUDA engine is
`distill_core.grouped`.

BatchNorm networks train in train mode with per-network running statistics
(the stacked buffers are updated inside vmap).

Where it pays: GPUs, where one network's small synthetic-set batches leave the
device idle between kernel launches. On CPU it is measured SLOWER than one
network at a time (benchmarks/methods.py, `evaluation_vmap_speedup` 0.58-0.65 for
4 x ConvNet-128 on this 2-core machine): functorch's batching rules turn the
GroupNorm backward into decomposed elementwise ops and stacked convolutions
into grouped ones, while a single network already keeps one core busy.
`distill_core.evaluation` trains one network at a time on CPU and the folded
grouped network (`distill_core.grouped`) on CUDA; this module is the
stacking form the benchmark compares against.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from distill_core.augment import make_augmentation
from distill_core.evaluation import EvalConfig
from distill_core.networks import build_network

ModelFactory = Callable[[], nn.Module]


def default_seeds(cfg: EvalConfig, num_models: int) -> list[int]:
    """The evaluation protocol's per-repeat seeds."""
    return [cfg.seed * 1000 + r for r in range(num_models)]


def build_models(models_or_factory: Sequence[nn.Module] | ModelFactory, seeds: Sequence[int]) -> list[nn.Module]:
    """Models as given, or one per seed from the factory (torch seeded with that seed first)."""
    if callable(models_or_factory) and not isinstance(models_or_factory, nn.Module):
        models = []
        for s in seeds:
            torch.manual_seed(s)
            models.append(models_or_factory())
        return models
    models = list(models_or_factory)
    if len(models) != len(seeds):
        raise ValueError(f"{len(models)} models but {len(seeds)} seeds")
    return models


def architecture_factory(cfg: EvalConfig, channels: int, num_classes: int, image_size: int) -> ModelFactory:
    return lambda: build_network(cfg.arch, channels, num_classes, image_size, **cfg.arch_options)


def _lr_at(cfg: EvalConfig, lr: float, epoch: int) -> float:
    return lr * 0.1 if epoch >= cfg.epochs // 2 + 1 else lr


def train_one(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: EvalConfig,
              seed: int, lr: float = 0.01) -> nn.Module:
    """The reference: one network, its own generator, the evaluation protocol's schedule."""
    g = torch.Generator().manual_seed(seed)
    augment = make_augmentation(cfg.augment)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    n = len(labels)
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, lr, epoch)
        perm = torch.randperm(n, generator=g).to(images.device)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            x = images[idx]
            if augment is not None:
                x = augment.per_sample(x, int(torch.randint(2**31 - 1, (1,), generator=g)))
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model


class StackedModels:
    """M networks of one architecture as stacked tensors, run with vmap."""

    def __init__(self, models: Sequence[nn.Module]):
        self.params, self.buffers = stack_module_state(list(models))
        self.base = copy.deepcopy(models[0]).to("meta")  # structure only
        self.num_models = len(models)

    def _call(self, params, buffers, x):
        return functional_call(self.base, (params, buffers), (x,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (M, B, C, H, W), one batch per network -> logits (M, B, K)."""
        return vmap(self._call)(self.params, self.buffers, x)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Every network's predictions on the same images: (M, N)."""
        self.base.eval()
        call = vmap(self._call, in_dims=(0, 0, None))
        out = torch.cat([call(self.params, self.buffers, images[i:i + batch_size]).argmax(-1)
                         for i in range(0, len(images), batch_size)], dim=1)
        self.base.train()
        return out

    def unstack(self, models: Sequence[nn.Module]) -> list[nn.Module]:
        """Write the stacked weights back into `models` (same architecture) and return them."""
        for m, model in enumerate(models):
            state = {k: v[m].detach().clone() for k, v in {**self.params, **self.buffers}.items()}
            model.load_state_dict(state)
        return list(models)


def train_stacked(models_or_factory: Sequence[nn.Module] | ModelFactory, images: torch.Tensor,
                  labels: torch.Tensor, cfg: EvalConfig, seeds: Sequence[int] | None = None,
                  num_models: int | None = None, lr: float = 0.01) -> list[nn.Module]:
    """Train M networks at once; returns them trained (as `train_one` with the same seeds would).

    models_or_factory: a list of initialised networks, or a zero-argument
    factory called once per seed after `torch.manual_seed(seed)`.
    seeds: one per network (shuffling and augmentation); default
    `default_seeds(cfg, num_models or len(models))`.
    """
    if seeds is None:
        count = num_models if num_models is not None else len(models_or_factory)  # type: ignore[arg-type]
        seeds = default_seeds(cfg, count)
    models = build_models(models_or_factory, seeds)
    device = images.device
    stacked = StackedModels(models)
    stacked.base.train()
    params = list(stacked.params.values())
    opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    augment = make_augmentation(cfg.augment)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    n = len(labels)
    for epoch in range(1, cfg.epochs + 1):
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, lr, epoch)
        perms = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(device)  # (M, n)
        for i in range(0, n, cfg.batch_size):
            idx = perms[:, i:i + cfg.batch_size]
            x = images[idx]  # (M, B, C, H, W)
            if augment is not None:
                x = torch.stack([augment.per_sample(x[m], int(torch.randint(2**31 - 1, (1,), generator=g)))
                                 for m, g in enumerate(gens)])
            logits = stacked.forward(x)
            # sum of the per-network mean losses: network m's gradient is exactly its own
            loss = F.cross_entropy(logits.flatten(0, 1), labels[idx].flatten(), reduction="none")
            loss = loss.view(len(gens), -1).mean(1).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return stacked.unstack(models)
