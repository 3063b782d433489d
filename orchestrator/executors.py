"""Where stages run, behind one interface (as hydra keeps its launchers).

An executor takes a stage with its resources and hands back finished stages
one at a time: `submit` starts (or queues) a stage, `next_done` waits up to
`timeout` seconds for one to finish and returns (key, result) or (key,
exception), `cancel` stops whatever is running. The scheduler in
`orchestrator.runner` never touches Ray itself, so it is unit-tested with
`InlineExecutor`, which runs each stage in this process when asked for the
next finished one.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from typing import Callable, Protocol

from orchestrator.graph import Stage
from orchestrator.spec import StageResources
from orchestrator.stages import execute_stage

Outcome = tuple[str, "dict | BaseException"]  # (stage key, result dict or the exception it raised)


class Executor(Protocol):
    def submit(self, stage: Stage, resources: StageResources) -> None: ...

    def next_done(self, timeout: float) -> Outcome | None: ...

    def running(self) -> int: ...

    def cancel(self, key: str | None = None) -> None:
        """Stop one stage (its outcome then arrives as an exception), or every stage."""

    def why_pending(self, resources: StageResources) -> str: ...


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
            return stage.key, self.run(stage, self.store_root, res.cpus, res.gpus, self.runtime)
        except Exception as exc:  # the stage failed: the scheduler records it
            return stage.key, exc

    def running(self) -> int:
        return len(self.queue)

    def cancel(self, key: str | None = None) -> None:
        self.queue = deque(item for item in self.queue if key is not None and item[0].key != key)

    def why_pending(self, resources: StageResources) -> str:
        return "queued behind the stages before it (inline executor)"


class RayExecutor:
    """One Ray task per stage with the resources its kind declares; Ray retries dead workers and nodes."""

    def __init__(self, store_root: str, runtime: dict):
        import ray

        from orchestrator.spec import RETRYABLE

        self.ray, self.retryable = ray, RETRYABLE
        self.store_root, self.runtime = store_root, runtime
        self.remote = ray.remote(execute_stage)
        self.refs: dict = {}  # ObjectRef -> stage key

    def submit(self, stage: Stage, resources: StageResources) -> None:
        retry_on = [self.retryable[name] for name in resources.retry_on] or False
        options = dict(num_cpus=resources.cpus, num_gpus=resources.gpus, name=stage.label[:120],
                       max_retries=resources.retries, retry_exceptions=retry_on)
        if resources.memory_gb:
            options["memory"] = int(resources.memory_gb * 2**30)
        ref = self.remote.options(**options).remote(stage, self.store_root, resources.cpus, resources.gpus,
                                                    self.runtime)
        self.refs[ref] = stage.key

    def next_done(self, timeout: float) -> Outcome | None:
        if not self.refs:
            return None
        done, _ = self.ray.wait(list(self.refs), num_returns=1, timeout=timeout)
        if not done:
            return None
        key = self.refs.pop(done[0])
        try:
            return key, self.ray.get(done[0])
        except Exception as exc:  # the task raised (RayTaskError wraps the cause)
            return key, exc

    def running(self) -> int:
        return len(self.refs)

    def cancel(self, key: str | None = None) -> None:
        for ref, k in list(self.refs.items()):
            if key is None or k == key:
                self.ray.cancel(ref, force=True)
        if key is None:
            self.refs.clear()

    def why_pending(self, resources: StageResources) -> str:
        free = self.ray.available_resources()
        return (f"it needs {resources.cpus:g} CPU / {resources.gpus:g} GPU on one node; the cluster has "
                f"{free.get('CPU', 0):g} CPU / {free.get('GPU', 0):g} GPU free")


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2/v1 CPU quota (containers)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = None
    try:
        text = open("/sys/fs/cgroup/cpu.max").read().split()
        if text[0] != "max":
            quota = int(text[0]) / int(text[1])
    except (OSError, IndexError, ValueError):
        try:
            q = int(open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read())
            p = int(open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read())
            quota = q / p if q > 0 and p > 0 else None
        except (OSError, ValueError):
            pass
    return max(1, min(n, int(quota))) if quota else max(1, n)


def ensure_ray(address: str | None, num_cpus: int | None) -> None:
    import ray

    from orchestrator.errors import UserError

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    try:
        if address:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus or available_cpus(), include_dashboard=False,
                     logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or "a local Ray"
        raise UserError(f"ray: cannot connect to cluster '{where}' ({str(exc).splitlines()[0][:160]})") from None
    logging.getLogger("ray").setLevel(logging.WARNING)  # quiet start-up, then Ray's warnings reach the user
