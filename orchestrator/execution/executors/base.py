"""Where stages run, behind one interface (as hydra keeps its launchers).

An executor takes a stage with its resources and hands back finished stages
one at a time: `submit` starts (or queues) a stage, `next_done` waits up to
`timeout` seconds for one to finish and returns (key, result) or (key,
exception), `cancel` stops whatever is running. The scheduler
(`execution/scheduler.py`) never touches Ray itself, so it is unit-tested with
`InlineExecutor`, which runs each stage in this process when asked for the
next finished one.
"""

from __future__ import annotations

from typing import Protocol

from orchestrator.spec.models import StageResources
from orchestrator.stages.base import Stage

Outcome = tuple[str, "dict | BaseException"]  # (stage key, result dict or the exception it raised)


class Executor(Protocol):
    def submit(self, stage: Stage, resources: StageResources) -> None: ...

    def next_done(self, timeout: float) -> Outcome | None: ...

    def running(self) -> int: ...

    def cancel(self, key: str | None = None) -> None:
        """Stop one stage (its outcome then arrives as an exception), or every stage."""

    def why_pending(self, resources: StageResources) -> str: ...


def first_done(refs: dict, timeout: float):
    """The first of `refs` to finish within `timeout` seconds, or None."""
    import ray  # Ray: imported where it is used (planning and `validate` start without it)

    if not refs:
        return None
    done, _ = ray.wait(list(refs), num_returns=1, timeout=timeout)
    return done[0] if done else None


def outcome_of(ref):
    """A finished ref's result, or the exception its stage raised (RayTaskError wraps the cause)."""
    import ray  # Ray: imported where it is used (planning and `validate` start without it)

    try:
        return ray.get(ref)
    except Exception as exc:
        return exc


def ray_resources(res: StageResources) -> dict:
    """A stage kind's request as Ray task/actor options."""
    options = dict(num_cpus=res.cpus, num_gpus=res.gpus, resources=res.custom or None)
    if res.memory_gb:
        options["memory"] = int(res.memory_gb * 2**30)
    return options
