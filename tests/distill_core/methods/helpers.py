"""Shared pieces of the method tests: a small config and fixed networks."""

from __future__ import annotations

import torch
import torch.nn as nn

from distill_core.methods.base import DistillConfig
from distill_core.networks import build_network
from distill_core.sets import RealData

WIDTH = {"width": 16}


def config(method: str = "dc", **kw) -> DistillConfig:
    base = dict(method=method, ipc=1, iterations=5, lr_img=0.1, arch_options=WIDTH, batch_real=16, seed=0,
                log_every=1)
    base.update(kw)
    return DistillConfig(**base)


def fixed_nets(real: RealData, count: int = 3, arch: str = "convnet") -> list[nn.Module]:
    torch.manual_seed(123)
    return [build_network(arch, 1, real.num_classes, 28, **WIDTH) for _ in range(count)]
