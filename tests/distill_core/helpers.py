"""Shared helpers of the evaluation tests."""

import torch

from distill_core.methods.base import DistillConfig, init_synthetic
from distill_core.sets import RealData, SyntheticSet


def real_init(real: RealData, ipc: int) -> SyntheticSet:
    """IPC real images per class, as a method with init real starts from."""
    cfg = DistillConfig(method="random", ipc=ipc, iterations=0, lr_img=0.0)
    return init_synthetic(real, cfg, torch.Generator().manual_seed(0))
