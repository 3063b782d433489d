"""Stage kinds: what runs in a worker, one module per kind, each registering its `StageKind`.

Importing the package registers every kind (as `distill_core.methods` registers every method).
"""

from orchestrator.stages import dataset, distill, evaluate, external, ptm, search, weights  # noqa: F401 (registration)
from orchestrator.stages.base import KINDS, Stage, StageKind, register, stage_kind

__all__ = ["KINDS", "Stage", "StageKind", "register", "stage_kind"]
