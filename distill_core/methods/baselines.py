"""Coreset baselines: a random subset, a herding subset, and the whole training split.

- "random": IPC real images per class drawn uniformly without replacement
  (all of a class that has fewer), as the DC paper's random-selection baseline.
- "herding": per class, greedy herding (Welling 2009; the iCaRL/DC coreset
  form) on the penultimate embeddings (`net.embed`) of a network: repeatedly
  add the sample that brings the mean of the selected embeddings closest to
  the class mean. The network is a randomly initialised `cfg.arch` seeded with
  `cfg.seed`, or the `model` passed in (e.g. a trained PTM). Embeddings are
  used raw, not L2-normalised.
- "whole": the whole distillation training split (validation held out), the
  upper-bound reference; IPC is ignored.

No optimisation happens, so `guidance` is ignored and `history` stays empty.
They are evaluated with the DSA protocol (DSA augmentation, 1000 epochs), the
one DSA, DM and MTT sets get, so a method's improvement over the random
subset compares like with like (DD-Ranking's point).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from distill_core.methods.base import DistillConfig
from distill_core.methods.registry import Method, dsa_protocol, register
from distill_core.networks import build_network
from distill_core.runtime import DEFAULT_RUNTIME, Runtime
from distill_core.sets import RealData, SyntheticSet


def _subset(real: RealData, index: torch.Tensor) -> SyntheticSet:
    return SyntheticSet(real.images[index].clone(), real.labels[index].clone(), real.norm)


def distill_random(real: RealData, cfg: DistillConfig, runtime: Runtime = DEFAULT_RUNTIME, guidance=None,
                   experts=None, progress=None) -> SyntheticSet:
    g = torch.Generator().manual_seed(cfg.seed)
    picks = [idx[torch.randperm(len(idx), generator=g)[:cfg.ipc].to(idx.device)] for idx in real.class_index]
    return _subset(real, torch.cat(picks))


@torch.no_grad()
def embed_all(net: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    return torch.cat([net.embed(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def herding(features: torch.Tensor, k: int) -> list[int]:
    """Indices (into features) of k samples chosen greedily to match the mean feature."""
    mu = features.mean(0)
    total = torch.zeros_like(mu)
    chosen: list[int] = []
    available = torch.ones(len(features), dtype=torch.bool, device=features.device)
    for step in range(1, min(k, len(features)) + 1):
        distance = ((mu - (total + features) / step) ** 2).sum(1)
        distance[~available] = float("inf")
        best = int(distance.argmin())
        chosen.append(best)
        available[best] = False
        total += features[best]
    return chosen


def distill_herding(real: RealData, cfg: DistillConfig, runtime: Runtime = DEFAULT_RUNTIME, guidance=None,
                    experts=None, progress=None, model: nn.Module | None = None) -> SyntheticSet:
    if model is None:
        torch.manual_seed(cfg.seed)
        model = build_network(cfg.arch, real.shape[0], real.num_classes, real.shape[-1], **cfg.arch_options)
    model = model.to(real.device)
    was_training = model.training
    model.eval()
    picks = []
    for idx in real.class_index:
        features = embed_all(model, real.images[idx])
        picks.append(idx[torch.tensor(herding(features, cfg.ipc), device=idx.device)])
    model.train(was_training)
    return _subset(real, torch.cat(picks))


def distill_whole(real: RealData, cfg: DistillConfig, runtime: Runtime = DEFAULT_RUNTIME, guidance=None,
                  experts=None, progress=None) -> SyntheticSet:
    return _subset(real, torch.arange(len(real.labels), device=real.device))


def _baseline(name: str, fn, summary: str, reference: str | None = None) -> Method:
    return register(Method(name=name, distill=fn, iterations=0, lr_img=0.0, init="real", augment=False,
                           evaluation=dsa_protocol, optimises_images=False, reference=reference, summary=summary))


_baseline("random", distill_random, "a random real subset of IPC images per class", "random_subset")
_baseline("herding", distill_herding, "herding coreset on a network's embeddings (Welling 2009)")
_baseline("whole", distill_whole, "the whole training split (upper-bound reference)", "whole_dataset")
