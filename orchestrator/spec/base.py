"""The base of every spec model: unknown keys rejected, frozen, finite numbers only."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def as_list(value: Any) -> Any:
    """A scalar as a one-element list (grid axes accept either)."""
    return [value] if value is not None and not isinstance(value, list) else value
