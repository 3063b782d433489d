"""The base of every config: typed, frozen, strict, and rebuilt from its stored dict."""

from __future__ import annotations

import math

import pytest
from pydantic import Field, ValidationError

from distill_core.config import Config


class Point(Config):
    x: float = Field(default=0.0, ge=-10, le=10)
    tags: list[str] = Field(default_factory=list)
    mode: str | None = None


def test_unknown_fields_nan_and_infinity_are_refused():
    with pytest.raises(ValidationError):
        Point(y=1)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValidationError):
            Point(x=bad)
    with pytest.raises(ValidationError):
        Point(x=11)


def test_configs_are_frozen_and_compared_by_value():
    p = Point(x=1.5, mode="a")
    with pytest.raises(ValidationError):
        p.x = 2.0
    assert p == Point(x=1.5, mode="a") and p != Point(x=1.5)


def test_to_dict_is_json_ready_and_rebuilds_an_equal_config():
    p = Point(x=2, tags=["a", "b"])
    d = p.to_dict()
    assert d == {"x": 2.0, "tags": ["a", "b"], "mode": None}
    assert Point(**d) == p
