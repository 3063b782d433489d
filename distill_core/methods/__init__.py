"""Distillation methods and their registry.

Importing this package registers the built-in methods (each module calls
`register` beside its recipe). `METHODS` maps the names specs use to their
`Method` records; `get_method(name).distill(...)` runs one.
"""

from __future__ import annotations

from distill_core.methods import baselines, dc, dm, mtt  # noqa: F401  (registers the built-in methods)
from distill_core.methods.base import DistillConfig
from distill_core.methods.registry import (METHODS, EvalProtocol, Method, Options, UnknownMethod, get_method,
                                           register, unregister)
from distill_core.sets import RealData, SyntheticSet

__all__ = ["METHODS", "DistillConfig", "EvalProtocol", "Method", "Options", "RealData", "SyntheticSet",
           "UnknownMethod", "get_method", "register", "unregister"]
