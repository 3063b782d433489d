"""torch.compile as an optional lever for the CPU hot loops, with an eager fallback.

On this project's CPUs the hot loops lose much of their time to memory-bound
normalisation, activation and pooling passes between the convolutions;
torch.compile fuses those passes (benchmarks/methods.py measures each use).
Compiling costs 10-40 s per new input shape, so only long CPU runs compile
(`distill_core.runtime.Runtime.compile_for`), and if the compiler fails (no C++ toolchain, an
unsupported op) the function runs eagerly, which computes the same thing.
Fresh networks of one architecture reuse a compiled graph: nn.Module inputs
are traced by structure, their parameters passed as graph inputs.
"""

from __future__ import annotations

from typing import Callable

import torch


class MaybeCompiled:
    """`fn` through torch.compile when `enabled`, eager after any compiler failure."""

    def __init__(self, fn: Callable, enabled: bool, **compile_options):
        self.eager = fn
        self.fn = torch.compile(fn, **compile_options) if enabled else fn

    @property
    def compiled(self) -> bool:
        return self.fn is not self.eager

    def __call__(self, *args, **kwargs):
        if not self.compiled:
            return self.fn(*args, **kwargs)
        try:
            return self.fn(*args, **kwargs)
        except Exception:  # compiler unavailable or unsupported here: eager gives the same result
            self.fn = self.eager
            return self.fn(*args, **kwargs)
