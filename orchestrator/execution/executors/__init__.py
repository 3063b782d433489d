"""Executors: where stages run, one interface (`base.Executor`) and its implementations."""

from orchestrator.execution.executors.actors import ActorExecutor, StageActor
from orchestrator.execution.executors.base import Executor, Outcome, first_done, outcome_of, ray_resources
from orchestrator.execution.executors.inline import InlineExecutor
from orchestrator.execution.executors.tasks import RayExecutor

__all__ = ["ActorExecutor", "Executor", "InlineExecutor", "Outcome", "RayExecutor", "StageActor", "first_done",
           "outcome_of", "ray_resources"]
