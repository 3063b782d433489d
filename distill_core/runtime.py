"""How a computation runs, as opposed to what it computes.

Every setting here changes speed or memory and never the numbers (beyond float
summation order): the device, cache-sized tiles for CPU training steps, the
gradient-matching engine, torch.compile for hot loops, MTT's memory-bounded
gradient, evaluation networks trained together. So a `Runtime` is never part
of a stage key: changing it reuses stored results. Recipes ask the runtime for
these decisions and stay readable; the engines live in their own modules
(`distill_core.methods.engines`, `distill_core.tiling`, `distill_core.grouped`),
each with an equivalence test against the plain form.

One compile rule for every hot loop: torch.compile costs 10-40 s per new input
shape and then runs a cache-sized tile 1.5-2x faster on CPU
(benchmarks/methods.py), so "auto" compiles a CPU run that will call the
compiled function at least `COMPILE_MIN_CALLS` times (a call = one tile or chunk
of at most 32 samples; at ConvNet-128 a call takes 10-50 ms, so 5000 calls repay
the compilation). On CUDA the kernels are not memory-bound in the same way and
nothing is compiled unless asked.
"""

from __future__ import annotations

from typing import Annotated, Callable, Literal

import torch
import torch.nn as nn
from pydantic import Field

from distill_core.compiled import MaybeCompiled
from distill_core.config import Config
from distill_core.tiling import default_tile, samples_independent

COMPILE_MIN_CALLS = 5000
PREDICT_BATCH_CPU = 32  # measured 1.9x faster than 256-1024 for ConvNet-128 on 1 core (cache-resident)
PREDICT_BATCH_CUDA = 1024

MATCHING_MODES = ("batched", "tiled", "loop")


class Runtime(Config):
    """Execution settings; the defaults pick the fastest measured form for the device."""


    device: str = "cpu"
    # torch.compile the hot loops: true, false, or auto (long CPU runs, see COMPILE_MIN_CALLS)
    compile: bool | Literal["auto"] = "auto"
    # samples per forward/backward inside a training batch (gradients summed); 0 = never tile
    tile: Annotated[int, Field(ge=0, le=4096)] | Literal["auto"] = "auto"
    # DC/DSA gradient matching: batched (all classes in one batch), tiled, or loop (upstream's form)
    matching: Literal["auto", "batched", "tiled", "loop"] = "auto"
    matching_tile: int = Field(default=16, ge=1, le=4096)
    # MTT: the exact gradient with one unrolled step's graph alive at a time (memory independent of syn_steps)
    memory_bounded: bool = False
    # evaluation: train the repeats of a ConvNet as one grouped network (auto: on CUDA)
    fold: bool | Literal["auto"] = "auto"
    predict_batch: Annotated[int, Field(ge=1, le=65536)] | Literal["auto"] = "auto"

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def on_cpu(self) -> bool:
        return self.torch_device.type == "cpu"

    def compile_for(self, calls: int) -> bool:
        """Whether to compile a function that this run will call `calls` times."""
        if self.compile == "auto":
            return self.on_cpu and calls >= COMPILE_MIN_CALLS
        return bool(self.compile)

    def compiled(self, fn: Callable, calls: int) -> MaybeCompiled:
        """`fn`, compiled when `compile_for(calls)`; fixed shapes (every tile has one of two sizes)."""
        return MaybeCompiled(fn, self.compile_for(calls), dynamic=False)

    def tile_for(self, model: nn.Module) -> int | None:
        """Tile size for `model`'s training steps, or None for the whole batch (always for BatchNorm nets)."""
        if self.tile == "auto":
            return default_tile(model, self.torch_device)
        return self.tile if self.tile and samples_independent(model) else None

    def matching_mode(self) -> str:
        """The measured fastest engine: one batch on CUDA, cache-sized tiles on CPU."""
        if self.matching == "auto":
            return "tiled" if self.on_cpu else "batched"
        return self.matching

    def predict_batch_size(self) -> int:
        if self.predict_batch == "auto":
            return PREDICT_BATCH_CPU if self.on_cpu else PREDICT_BATCH_CUDA
        return int(self.predict_batch)

    def fold_repeats(self) -> bool:
        """Train evaluation repeats as one grouped network: measured to pay on CUDA only."""
        if self.fold == "auto":
            return not self.on_cpu
        return bool(self.fold)


DEFAULT_RUNTIME = Runtime()
