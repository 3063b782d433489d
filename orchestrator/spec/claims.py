"""Claims a study makes about its own results (`findings:` in the spec): what a claim is and which
evaluations it selects. Evaluating them (the bootstrap, the verdicts) is `orchestrator.reporting.findings`.
"""

from __future__ import annotations

import fnmatch
import json
import math
from typing import Any, Literal

from pydantic import Field, model_validator

from orchestrator.errors import suggest
from orchestrator.spec.base import Strict

# per-network metrics an evaluation stage keeps (accuracies as fractions; gap = aligned - conflicting)
METRICS = ("acc", "acc_last", "acc_val_selected", "acc_unbiased", "acc_aligned", "acc_conflicting", "gap")


# the coordinates a claim may name (an evaluation stage's grid coordinates)
COORDINATES = ("dataset", "source", "aligned_ratio", "severity", "method", "ipc", "iterations", "lr_img",
               "guidance", "debias", "options", "eval_arch", "eval_protocol", "selection", "val_split")


Expect = Literal["greater", "less", "not_less", "increasing", "decreasing"]


Filter = dict[str, Any]


class ClaimSpec(Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)
    statement: str = Field(min_length=1, max_length=500)
    metric: Literal[METRICS] = "acc"
    a: Filter | None = None  # compare: the first group's coordinates
    b: Filter | None = None  # compare: the second group's
    best_of: str | None = None  # compare: group a's best level of this coordinate
    trend: str | None = None  # trend: the ordered coordinate
    expect: Expect
    margin: float = Field(default=1.0, ge=0, le=100)  # points; `not_less` only
    where: Filter = Field(default_factory=dict)  # which evaluations the claim reads
    per: list[str] = Field(default_factory=list, max_length=8)  # one finding per level combination

    @model_validator(mode="after")
    def one_shape(self) -> "ClaimSpec":
        compare = self.a is not None or self.b is not None
        if compare == (self.trend is not None):
            raise ValueError("a claim is either a comparison (a and b) or a trend (trend: COORD)")
        if compare and (self.a is None or self.b is None):
            raise ValueError("a comparison needs both groups, a and b")
        if compare and self.expect not in ("greater", "less", "not_less"):
            raise ValueError(f"expect: a comparison expects greater, less or not_less, not '{self.expect}'")
        if not compare and self.expect not in ("increasing", "decreasing"):
            raise ValueError(f"expect: a trend expects increasing or decreasing, not '{self.expect}'")
        for where, names in (("a", self.a or {}), ("b", self.b or {}), ("where", self.where),
                             ("per", self.per), ("trend", [self.trend] if self.trend else []),
                             ("best_of", [self.best_of] if self.best_of else [])):
            for name in names:
                if name not in COORDINATES:
                    raise ValueError(f"{where}: unknown coordinate '{name}'{suggest(name, COORDINATES)}")
        return self

    @property
    def contrasted(self) -> set[str]:
        """Coordinates the claim varies between its groups (never part of a cell)."""
        return {*(self.a or {}), *(self.b or {}), *([self.trend] if self.trend else []),
                *([self.best_of] if self.best_of else [])}


def matches(coords: dict, flt: Filter) -> bool:
    return all(_value_matches(coords.get(k), v) for k, v in flt.items())


def _value_matches(have: Any, want: Any) -> bool:
    if isinstance(want, list):
        return any(_value_matches(have, w) for w in want)
    if isinstance(want, str) and isinstance(have, str):
        return fnmatch.fnmatchcase(have, want)
    if isinstance(want, (int, float)) and isinstance(have, (int, float)) and not isinstance(want, bool):
        return math.isclose(float(have), float(want), rel_tol=0, abs_tol=1e-12)
    return have == want


def unmatched_filters(claim: ClaimSpec, coords: list[dict]) -> list[str]:
    """Problems of a claim whose groups select no evaluation of the study (a misspelt label, say)."""
    problems = []
    scoped = [c for c in coords if matches(c, claim.where)]
    if coords and not scoped:
        problems.append(f"where: matches no evaluation of the study{_known_values(claim.where, coords)}")
        return problems
    for side in ("a", "b"):
        flt = getattr(claim, side)
        if flt is not None and not any(matches(c, flt) for c in scoped):
            problems.append(f"{side}: matches no evaluation of the study{_known_values(flt, scoped)}")
    return problems


def _known_values(flt: Filter, coords: list[dict]) -> str:
    for name, want in flt.items():
        have = sorted({json.dumps(c.get(name), default=str) for c in coords})
        if not any(_value_matches(c.get(name), want) for c in coords):
            return f" ({name} {json.dumps(want, default=str)}; the study has {', '.join(have[:8])})"
    return ""


def safe_name(finding_id: str) -> str:
    """A finding's id as a file or MLflow metric name (`per` ids hold brackets and '=')."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in finding_id).strip("_")
