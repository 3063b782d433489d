"""One Ray task per stage, with the resources its kind declares; Ray retries dead workers and nodes."""

from __future__ import annotations

from orchestrator.execution.executors.base import Outcome, first_done, outcome_of, ray_resources
from orchestrator.spec.models import RETRYABLE, StageResources
from orchestrator.stages.base import Stage
from orchestrator.stages.worker import execute_stage


class RayExecutor:
    """One Ray task per stage with the resources its kind declares; Ray retries dead workers and nodes."""

    def __init__(self, store_root: str, runtime: dict):
        import ray  # Ray: imported where it is used (planning and `validate` start without it)


        self.ray, self.retryable = ray, RETRYABLE
        self.store_root, self.runtime = store_root, runtime
        self.remote = ray.remote(execute_stage)
        self.refs: dict = {}  # ObjectRef -> stage key

    def submit(self, stage: Stage, resources: StageResources) -> None:
        retry_on = [self.retryable[name] for name in resources.retry_on] or False
        options = dict(ray_resources(resources), name=stage.label[:120], max_retries=resources.retries,
                       retry_exceptions=retry_on)
        ref = self.remote.options(**options).remote(stage, self.store_root, resources.cpus, resources.gpus,
                                                    self.runtime)
        self.refs[ref] = stage.key

    def next_done(self, timeout: float) -> Outcome | None:
        ref = first_done(self.refs, timeout)
        if ref is None:
            return None
        return self.refs.pop(ref), outcome_of(ref)

    def running(self) -> int:
        return len(self.refs)

    def cancel(self, key: str | None = None) -> None:
        if key is None:
            # Everything (Ctrl-C, SIGTERM, `study cancel`): end this driver's Ray job, which stops every task it
            # started. Force-cancelling each running task instead races its completion inside Ray core and can
            # abort the driver (seen in CI; ray-project/ray#54260, #54738).
            self.refs.clear()
            self.ray.shutdown()
            return
        for ref, k in list(self.refs.items()):
            if k == key:  # one stage past its timeout
                self.ray.cancel(ref, force=True)

    def why_pending(self, resources: StageResources) -> str:
        import ray  # Ray: imported where it is used (planning and `validate` start without it)

        free = ray.available_resources()
        return (f"it needs {resources.cpus:g} CPU / {resources.gpus:g} GPU on one node; the cluster has "
                f"{free.get('CPU', 0):g} CPU / {free.get('GPU', 0):g} GPU free")
