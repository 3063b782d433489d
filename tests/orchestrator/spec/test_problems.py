"""Field paths come from pydantic's locations walked against the model, not from message text."""

from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.spec.problems import Problem, problems_from, render, short, walk


class Leaf(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = Field(default=1, ge=1)


class Root(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[Leaf] = []
    either: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"  # a union: pydantic adds member tags to its locations
    nested: dict[str, Leaf | str] = {}


def problems(data) -> list[str]:
    with pytest.raises(ValidationError) as exc:
        Root.model_validate(data)
    return [p.line() for p in problems_from(exc.value, Root)]


def test_render_joins_fields_and_indices():
    assert render(("a", 0, "b", "c", 3)) == "a[0].b.c[3]"
    assert render(()) == "spec"
    assert Problem(("x", 1), "bad").line() == "x[1]: bad"


def test_union_member_tags_are_dropped_and_the_telling_error_kept():
    assert problems({"either": -1}) == ["either: must be >= 0"]
    assert problems({"either": "x"}) == ["either: invalid value 'x'"]
    assert problems({"nested": {"k": {"size": 0}}}) == ["nested.k.size: must be >= 1"]
    assert problems({"items": [{}, {"size": 0}]}) == ["items[1].size: must be >= 1"]


def test_unknown_keys_get_a_hint_from_the_model_at_that_path():
    assert problems({"items": [{"sise": 2}]}) == ["items[0].sise: unknown key (did you mean 'size'?)"]
    assert problems({"itemz": []}) == ["itemz: unknown key (did you mean 'items'?)"]


def test_walk_keeps_fields_indices_and_mapping_keys():
    loc, _ = walk(("nested", "k", "function-after[x]", "Leaf", "size"), Root)
    assert loc == ("nested", "k", "size")


def test_short_bounds_huge_values():
    bomb = [1]
    for _ in range(30):
        bomb = [bomb] * 10
    assert len(short(bomb)) <= 60
