"""Warm Ray actors per stage kind and resource shape, routed by the dataset they already hold."""

from __future__ import annotations

from collections import deque

from orchestrator.execution.executors.base import Outcome, first_done, outcome_of, ray_resources
from orchestrator.execution.executors.tasks import RayExecutor
from orchestrator.spec.models import StageResources
from orchestrator.stages.base import Stage
from orchestrator.stages.common import WARM
from orchestrator.stages.worker import execute_stage


class StageActor:
    """A long-lived worker for one stage kind: keeps what it loaded (verified datasets, compiled steps,
    the CUDA context) warm across the stages routed to it. Run as a Ray actor by `ActorExecutor`."""

    def run(self, stage: Stage, store_root: str, cpus: float, gpus: float, runtime: dict) -> dict:
        return execute_stage(stage, store_root, cpus, gpus, runtime)

    def warm(self) -> list[str]:

        return WARM.keys()


def _shape(res: StageResources) -> tuple:
    return (res.cpus, res.gpus, res.memory_gb or 0.0, tuple(sorted(res.custom.items())))


class ActorExecutor:
    """Stages run in warm actors, one per resource slot, shared by every stage kind of the same shape.

    Stage kinds that ask for the same resources share one pool of actors, as
    many as the cluster has slots of that shape; a stage goes to an idle actor
    that already holds its dataset (read and verified by an earlier stage),
    else to any idle one, else it queues. When another shape needs room, an
    idle actor is retired to free its resources, so pools never starve each
    other. A dead actor is restarted by Ray and its stage retried
    (`resources.<kind>.retries`), as tasks are. `resources.executor: actors`
    selects it; the task path (`RayExecutor`) stays the default.
    """

    def __init__(self, store_root: str, runtime: dict):
        import ray  # Ray: imported where it is used (planning and `validate` start without it)

        self.ray = ray
        self.store_root, self.runtime = store_root, runtime
        self.actor_class = ray.remote(StageActor)
        total = ray.cluster_resources()
        self.free = {"CPU": total.get("CPU", 0.0), "GPU": total.get("GPU", 0.0), "memory": total.get("memory", 0.0)}
        self.actors: dict = {}  # actor -> shape
        self.idle: dict = {}  # idle actor -> dataset keys it has loaded
        self.queue: deque[tuple[Stage, StageResources]] = deque()
        self.refs: dict = {}  # ObjectRef -> (stage key, actor, datasets it will hold)

    def _fits(self, res: StageResources) -> bool:
        return (res.cpus <= self.free["CPU"] + 1e-9 and res.gpus <= self.free["GPU"] + 1e-9
                and (res.memory_gb or 0) * 2**30 <= self.free["memory"] + 1)

    def _reserve(self, res: StageResources, sign: float) -> None:
        self.free["CPU"] -= sign * res.cpus
        self.free["GPU"] -= sign * res.gpus
        self.free["memory"] -= sign * (res.memory_gb or 0) * 2**30

    def _new_actor(self, res: StageResources):
        options = dict(ray_resources(res), max_restarts=res.retries, max_task_retries=res.retries)
        actor = self.actor_class.options(**options).remote()
        self.actors[actor] = (_shape(res), res)
        self._reserve(res, +1)
        return actor

    def _retire_idle_other_than(self, shape: tuple) -> bool:
        for actor in list(self.idle):
            if self.actors[actor][0] != shape:
                self.idle.pop(actor)
                _, res = self.actors.pop(actor)
                self._reserve(res, -1)
                self.ray.kill(actor, no_restart=True)
                return True
        return False

    def _actor_for(self, stage: Stage, res: StageResources):
        shape = _shape(res)
        free = [a for a in self.idle if self.actors[a][0] == shape]
        dataset = stage.inputs.get("dataset")
        warm = next((a for a in free if dataset in self.idle[a]), None)
        if warm is not None or free:
            return warm or free[0]
        while not self._fits(res):
            if not self._retire_idle_other_than(shape):
                return None  # every slot is busy: the stage waits for one
        actor = self._new_actor(res)
        self.idle[actor] = set()
        return actor

    def submit(self, stage: Stage, resources: StageResources) -> None:
        self.queue.append((stage, resources))
        self._dispatch()

    def _dispatch(self) -> None:
        waiting = deque()
        while self.queue:
            stage, res = self.queue.popleft()
            actor = self._actor_for(stage, res)
            if actor is None:
                waiting.append((stage, res))
                continue
            loaded = self.idle.pop(actor)
            dataset = stage.inputs.get("dataset")
            ref = actor.run.remote(stage, self.store_root, res.cpus, res.gpus, self.runtime)
            self.refs[ref] = (stage.key, actor, loaded | ({dataset} if dataset else set()))
        self.queue = waiting

    def next_done(self, timeout: float) -> Outcome | None:
        ref = first_done(self.refs, timeout)
        if ref is None:
            return None
        key, actor, loaded = self.refs.pop(ref)
        if actor in self.actors:
            self.idle[actor] = loaded
        outcome = outcome_of(ref)
        self._dispatch()
        return key, outcome

    def running(self) -> int:
        return len(self.refs) + len(self.queue)

    def cancel(self, key: str | None = None) -> None:
        self.queue = deque(item for item in self.queue if key is not None and item[0].key != key)
        for ref, (k, actor, _) in list(self.refs.items()):
            if key is None or k == key:
                self.ray.kill(actor, no_restart=key is None)  # an actor task cannot be force-cancelled
        if key is None:
            self.refs.clear()

    def why_pending(self, resources: StageResources) -> str:
        return RayExecutor.why_pending(self, resources)
