"""What a stage is: its kind's record (`StageKind`, registered like methods are) and one stage of a graph.

A `StageKind` says everything the driver needs about a kind: its code version
(in every key of the kind), the typed config a stage carries, the function a
worker runs, which `resources` field its tasks hold (and which others they
hold while running, such as a search's trials), a progress hook polled while
it runs, and whether it drives Ray itself. The graph, scheduler, executors and
submit read records and name no kind; a new kind is one module in this package
that defines its runner and calls `register`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from distill_core.config import Config
from orchestrator.errors import UserError, suggest

if TYPE_CHECKING:
    from distill_core.runtime import Runtime
    from orchestrator.storage.base import Store


@dataclass(frozen=True)
class StageKind:
    name: str
    version: int  # bump when the kind's code changes what it produces: every key of the kind changes
    config: type[Config]
    run: Callable[["Stage", "Store", "Runtime"], dict]  # in the worker: compute, write the stage, return result.json
    resources: str  # the `resources` field (StageResources) a stage's task holds
    holds: tuple[str, ...] = ()  # further `resources` fields its work holds while it runs (a search's trials)
    progress: Callable[["Store", str], dict | None] | None = None  # polled while running, for the live view
    summary: Callable[[dict], dict] | None = None  # what a finished stage's result adds to the submit's summary
    needs_ray: bool = False  # drives Ray itself (Tune): an inline run starts a local Ray first


KINDS: dict[str, StageKind] = {}


def register(kind: StageKind) -> StageKind:
    if kind.name in KINDS and KINDS[kind.name] != kind:
        raise ValueError(f"stage kind '{kind.name}' is registered twice")
    if "-" in kind.name:
        raise ValueError(f"stage kind '{kind.name}': a key is '<kind>-<digest>', so a kind has no '-'")
    KINDS[kind.name] = kind
    return kind


def stage_kind(name: str) -> StageKind:
    if name not in KINDS:
        raise UserError(f"stage kind '{name}' is not registered{suggest(name, KINDS)}")
    return KINDS[name]


Inputs = dict[str, "str | list[str]"]  # role -> stage key(s), e.g. {"dataset": k, "ptms": [k1, k2]}


@dataclass
class Stage:
    kind: str
    config: dict  # its kind's config, as a dict (the key hashes it)
    inputs: Inputs = field(default_factory=dict)
    label: str = ""
    coords: dict = field(default_factory=dict)  # the grid coordinates, for results and MLflow tags
    runtime: dict = field(default_factory=dict)  # where its data lies; not in the key
    key: str = ""
    # the fencing token of the lease its computation runs under (set by the scheduler, not in the key): the
    # store publishes the stage only while the lease still carries it
    fence: int | None = field(default=None, compare=False)

    def __post_init__(self):
        payload = {"kind": self.kind, "version": stage_kind(self.kind).version, "config": self.config,
                   "inputs": self.inputs}
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        self.key = f"{self.kind}-{digest[:16]}"

    @staticmethod
    def kind_of(key: str) -> str:
        """The kind of the stage a key names (keys are `<kind>-<digest>`)."""
        return key.split("-", 1)[0]

    @property
    def input_keys(self) -> list[str]:
        keys: list[str] = []
        for value in self.inputs.values():
            keys += [value] if isinstance(value, str) else value
        return list(dict.fromkeys(keys))

    @property
    def record(self) -> StageKind:
        return stage_kind(self.kind)

    def typed_config(self):
        return self.record.config(**self.config)
