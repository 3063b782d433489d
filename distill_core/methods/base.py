"""What every distillation method takes: one config, the real data, a runtime.

`DistillConfig` is one distillation: the hyperparameters every method shares,
the method's own typed options (`options`: the model its registry record names,
built when the config is) and the PTM guidance setting. The recipes read it top to bottom; how
the hot loops run comes from a separate `Runtime` (distill_core.runtime).
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Protocol

import torch
from pydantic import Field, SerializeAsAny, field_serializer, model_validator

from distill_core.config import Config
from distill_core.guidance import GuidanceConfig
from distill_core.methods.registry import METHODS, Options
from distill_core.sets import RealData, SyntheticSet


class DistillConfig(Config):
    method: str
    ipc: int = Field(ge=1, le=100_000)
    iterations: int = Field(ge=0, le=10_000_000)
    lr_img: float = Field(ge=0, le=1e9)
    arch: str = "convnet"
    arch_options: dict[str, Any] = Field(default_factory=dict)
    lr_net: float = Field(default=0.01, gt=0, le=100)
    batch_real: int = Field(default=256, ge=1, le=100_000)
    init: Literal["real", "noise"] = "real"
    augment: str | None = None  # DSA strategy of the siamese augmentation during distillation; None: none
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    log_every: int = Field(default=10, ge=1, le=10**7)  # history: every n-th iteration
    # the method's own options as its registry model (`Method.options`), validated here once: a recipe
    # reads `cfg.options.syn_steps`; built from a dict (a stage's stored config) by the method's name
    options: SerializeAsAny[Options] = Field(default_factory=Options)
    guidance: GuidanceConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _typed_options(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("options", {}), dict) and data.get("method") in METHODS:
            data = {**data, "options": METHODS[data["method"]].options(**data.get("options", {}))}
        return data

    @field_serializer("options")
    def _options_set(self, options: Options) -> dict:
        # only the options that were set, so a stored config (and its stage key) is what the study wrote
        return options.model_dump(mode="json", exclude_unset=True)


# progress(iteration, record, syn): called at every logged iteration with the live synthetic set (its
# images are the tensor being optimised: copy what you keep; a search evaluates it to report a proxy score)
ProgressFn = Callable[[int, dict, SyntheticSet], None]


class Guidance(Protocol):
    """A PTM term added to a method's loss (see distill_core.guidance)."""

    def loss(self, x_syn: torch.Tensor, y_syn: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...


def log_iteration(syn: SyntheticSet, it: int, cfg: DistillConfig, record: dict,
                  progress: ProgressFn | None) -> None:
    """Keep every `log_every`-th iteration's objective values (and the last) in the history."""
    if it % cfg.log_every == 0 or it == cfg.iterations - 1:
        syn.history.append({**record, "iteration": it})
        if progress is not None:
            progress(it, syn.history[-1], syn)


def init_synthetic(real: RealData, cfg: DistillConfig, generator: torch.Generator) -> SyntheticSet:
    """IPC images per class, class-major: real samples (init real) or Gaussian noise in normalised space."""
    labels = torch.arange(real.num_classes, device=real.device).repeat_interleave(cfg.ipc)
    if cfg.init == "real":
        images = torch.cat([
            _take_with_replacement(real.sample_class(c, cfg.ipc, generator), cfg.ipc, generator)
            for c in range(real.num_classes)
        ])
    else:
        images = torch.randn((len(labels), *real.shape), generator=generator).to(real.device)
    return SyntheticSet(images.detach().clone(), labels, real.norm)


def _take_with_replacement(x: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    if len(x) >= n:
        return x[:n]
    extra = torch.randint(len(x), (n - len(x),), generator=generator).to(x.device)
    return torch.cat([x, x[extra]])
