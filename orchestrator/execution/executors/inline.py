"""Stages one after another in this process (tests, debugging, a study with nothing to compute)."""

from __future__ import annotations

from collections import deque
from typing import Callable

from orchestrator.execution.executors.base import Outcome
from orchestrator.execution.ray_session import ensure_ray
from orchestrator.spec.models import StageResources
from orchestrator.stages.base import Stage
from orchestrator.stages.worker import execute_stage


class InlineExecutor:
    """Runs stages one after another in this process (tests, debugging): no Ray, no parallelism."""

    def __init__(self, store_root: str, runtime: dict, run: Callable[..., dict] = execute_stage):
        self.store_root, self.runtime, self.run = store_root, runtime, run
        self.queue: deque[tuple[Stage, StageResources]] = deque()

    def submit(self, stage: Stage, resources: StageResources) -> None:
        self.queue.append((stage, resources))

    def next_done(self, timeout: float) -> Outcome | None:
        if not self.queue:
            return None
        stage, res = self.queue.popleft()
        try:
            if stage.record.needs_ray:  # a search runs Tune, which needs a Ray (a local one here)
                ensure_ray(None, None)
            return stage.key, self.run(stage, self.store_root, res.cpus, res.gpus, self.runtime)
        except Exception as exc:  # the stage failed: the scheduler records it
            return stage.key, exc

    def running(self) -> int:
        return len(self.queue)

    def cancel(self, key: str | None = None) -> None:
        self.queue = deque(item for item in self.queue if key is not None and item[0].key != key)

    def why_pending(self, resources: StageResources) -> str:
        return "queued behind the stages before it (inline executor)"
