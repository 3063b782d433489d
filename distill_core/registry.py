"""Named records, one registry per kind of thing (`methods.METHODS`, `debias.DEBIAS_KINDS`).

A registry is a dict from name to record with three rules: a name is registered once (registering the
same record again is a no-op), removing an absent name is a no-op, and looking up an unknown name raises
the registry's own error in one line naming it, the nearest known name and every known one.
"""

from __future__ import annotations

import difflib


class Registry(dict):
    def __init__(self, noun: str, error: type[Exception]):
        super().__init__()
        self.noun, self.error = noun, error

    def add(self, record):
        """Add `record` under `record.name` (names are unique)."""
        if record.name in self and self[record.name] is not record:
            raise ValueError(f"{self.noun} '{record.name}' is already registered")
        self[record.name] = record
        return record

    def remove(self, name: str) -> None:
        self.pop(name, None)

    def named(self, name: str):
        """The record called `name`, else the registry's error with a "did you mean"."""
        if name not in self:
            near = difflib.get_close_matches(name, self, n=1)
            hint = f"did you mean '{near[0]}'? " if near else ""
            raise self.error(f"unknown {self.noun} '{name}' ({hint}known: {', '.join(sorted(self))})")
        return self[name]
