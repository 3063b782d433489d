"""The base of every spec model (unknown keys rejected, frozen, finite numbers only), and how a spec field
takes its type, bounds, default and doc from the `distill_core` config that owns it.

A science field is declared once, in the config its stage carries (`DistillConfig.lr_net`,
`EvalConfig.repeats`, ...). The spec refers to it:

    lr_net: same(DistillConfig, "lr_net")           # the field itself: type, bounds, default
    ipc: Grid(bounded(DistillConfig, "ipc"))        # a grid axis of the field's type and bounds
    epochs: bounded(EvalConfig, "epochs") | None    # unset: the method's protocol decides

and the plan passes every `same` field on unchanged with `shared(block, Config)`, so no
code copies fields one by one and the bounds cannot drift apart.
"""

from __future__ import annotations

from copy import copy
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def as_list(value: Any) -> Any:
    """A scalar as a one-element list (grid axes accept either)."""
    return [value] if value is not None and not isinstance(value, list) else value


@dataclass(frozen=True)
class Owner:
    """Marks a spec field as the field `name` of `config` (what `shared` passes through)."""

    config: type
    name: str


def bounded(config: type[BaseModel], name: str) -> Any:
    """The type and bounds of `config.name`, without its default (a grid item, an optional override)."""
    info = config.model_fields[name]
    return Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation


def same(config: type[BaseModel], name: str) -> Any:
    """`config.name` itself: its type, bounds, default and description, passed to `config` unchanged."""
    info = config.model_fields[name]
    return Annotated[info.annotation, copy(info), Owner(config, name)]


def shared(block: BaseModel, config: type[BaseModel]) -> dict[str, Any]:
    """The values of `block`'s fields that are `config`'s own (declared with `same(config, ...)`)."""
    out = {}
    for field_name, info in type(block).model_fields.items():
        owner = next((m for m in info.metadata if isinstance(m, Owner)), None)
        if owner is not None and owner.config is config:
            out[owner.name] = getattr(block, field_name)
    return out
