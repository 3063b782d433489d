"""One line per spec problem, naming the field path: `distillation.ipc[1]: must be >= 1`.

Paths come from pydantic's own error locations, walked against the model
they were raised from: field names and list indices are kept, the tags
pydantic adds for union members and validator functions are dropped (they
are not fields of the model at that point). Cross-field checks that run after
validation produce `Problem`s with their path as a tuple, rendered the same way.
"""

from __future__ import annotations

import difflib
import reprlib
import types
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from orchestrator.errors import suggest

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    loc: Loc
    message: str

    def line(self) -> str:
        return f"{render(self.loc)}: {self.message}"


def render(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out or "spec"


def _members(t: Any) -> list[Any]:
    """The concrete types behind Annotated / Optional / Union annotations."""
    origin = typing.get_origin(t)
    if origin is typing.Annotated:
        return _members(typing.get_args(t)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(t) for m in _members(arg)]
    return [t]


def _step(t: Any, part: str | int) -> Any | None:
    """The annotation one location part below `t`, or None if `part` is not a field, index or key of it."""
    origin = typing.get_origin(t)
    if isinstance(part, int) and origin in (list, tuple):
        return typing.get_args(t)[0]
    if isinstance(part, str):
        if isinstance(t, type) and issubclass(t, BaseModel) and part in t.model_fields:
            return t.model_fields[part].annotation
        if origin is dict:
            return typing.get_args(t)[1]
    return None


def walk(loc: Loc, root: type[BaseModel]) -> tuple[Loc, list[Any]]:
    """(the loc without union/validator tags, the candidate annotations at its end)."""
    kept: list[str | int] = []
    candidates: list[Any] = [root]
    for part in loc:
        if part == "[key]":  # pydantic's marker for an error in a mapping's key (the key itself is kept)
            continue
        below = [b for t in candidates for m in _members(t) if (b := _step(m, part)) is not None]
        if below:
            kept.append(part)
            candidates = below
    return tuple(kept), candidates


def fields_of(candidates: list[Any]) -> list[str]:
    names: list[str] = []
    for t in candidates:
        for m in _members(t):
            if isinstance(m, type) and issubclass(m, BaseModel):
                names += [n for n in m.model_fields if n not in names]
    return names


_REPR = reprlib.Repr()  # keyword arguments arrive in Python 3.12


_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 40, 40


def short(value: Any) -> str:
    """A bounded repr: a YAML alias nest can be a billion elements deep, and must not be printed."""
    text = _REPR.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


MESSAGES = {
    "greater_than_equal": lambda e: f"must be >= {e['ctx']['ge']}",
    "greater_than": lambda e: f"must be > {e['ctx']['gt']}",
    "less_than_equal": lambda e: f"must be <= {e['ctx']['le']}",
    "less_than": lambda e: f"must be < {e['ctx']['lt']}",
    "missing": lambda e: "field required",
    "too_short": lambda e: "must not be empty",
    "too_long": lambda e: f"too many entries (at most {e['ctx']['max_length']})",
    "string_too_long": lambda e: f"too long (at most {e['ctx']['max_length']} characters)",
    "literal_error": lambda e: f"must be {e['ctx']['expected']}, got {short(e['input'])}",
    "string_pattern_mismatch": lambda e: "use letters, digits, '.', '_' and '-' only, starting with a letter or digit",
    "finite_number": lambda e: f"must be a finite number, got {short(e['input'])}",
    "value_error": lambda e: str(e["ctx"]["error"]) if e.get("ctx") else e["msg"],
}


# errors that only say "this union member did not match the input's type"
_MISMATCH = {"int_type", "int_parsing", "int_from_float", "float_type", "float_parsing", "bool_type",
             "bool_parsing", "string_type", "dict_type", "list_type", "model_type", "model_attributes_type",
             "literal_error", "none_required", "is_instance_of"}


def _message(err: dict) -> str:
    fn = MESSAGES.get(err["type"])
    if fn is not None:
        return fn(err)
    msg = err["msg"]
    return msg[0].lower() + msg[1:] if msg else err["type"]


def problems_from(exc: ValidationError, root: type[BaseModel], prefix: Loc = (), unknown: str = "key") -> list[Problem]:
    """One Problem per field that failed; of a union's per-member errors, the most telling one.

    `unknown` names what an unexpected key is ("key" in the spec, "option" in a method's options).
    """
    by_path: dict[Loc, list[dict]] = {}
    meant: set[Loc] = set()  # fields a misspelt key most likely meant: their "field required" is noise
    for err in exc.errors():
        if err["type"] == "extra_forbidden":
            parent, candidates = walk(err["loc"][:-1], root)
            key = str(err["loc"][-1])
            known = fields_of(candidates)
            close = difflib.get_close_matches(key, known, n=1)
            meant.update(prefix + parent + (c,) for c in close)
            hint = suggest(key, known) if known else ""
            by_path.setdefault(prefix + parent + (key,), []).append({**err, "type": "unknown_key", "hint": hint})
            continue
        path, _ = walk(err["loc"], root)
        by_path.setdefault(prefix + path, []).append(err)
    by_path = {p: errs for p, errs in by_path.items()
               if not (p in meant and all(e["type"] == "missing" for e in errs))}
    # a union member that did not match the input's type, where another member got further: drop it
    deeper = {p[:i] for p in by_path for i in range(len(p))}
    by_path = {p: errs for p, errs in by_path.items()
               if not (p in deeper and all(e["type"] in _MISMATCH for e in errs))}
    out = []
    for path, errs in by_path.items():
        telling = [e for e in errs if e["type"] not in _MISMATCH] or errs
        err = telling[0]
        if err["type"] == "unknown_key":
            out.append(Problem(path, f"unknown {unknown}{err['hint']}"))
        elif len(telling) > 1 and all(e["type"] in _MISMATCH for e in telling):
            out.append(Problem(path, f"invalid value {short(err['input'])}"))
        else:
            for line in _message(err).splitlines():
                out.append(Problem(path, line))
    return out
