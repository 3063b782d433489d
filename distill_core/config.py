"""The base of every config in distill_core: typed, frozen, strict.

A config is a point (one dataset variant, one distillation, one evaluation),
validated when it is built. Unknown fields are errors, NaN and infinity are
refused, and `Config(**cfg.model_dump())` gives back an equal config, which is
how the orchestrator stores a stage's config and rebuilds it in a worker.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    def to_dict(self) -> dict:
        """The JSON-ready dict a stage stores; `type(self)(**d)` rebuilds the config."""
        return self.model_dump(mode="json")
