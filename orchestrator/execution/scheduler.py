"""Running a stage graph: leases, an executor, timeouts, cancellation, bounded cost per stage.

Readiness is counted, not rescanned: each stage keeps the number of its inputs
not yet done, and a finished stage decrements its dependents' counts. Ready
stages start longest-remaining-path first (a stage's height: the most stages on
any path from it to the end), so the critical path (e.g. PTMs that a guided
distillation and its evaluations wait for) is never queued behind leaves. A
ready stage is taken from the store if another submit has published it
meanwhile (`reused`, checked again once the lease is acquired), else computed
under its lease, else (another live driver holds the lease) it waits, and is
polled once a second until it appears in the store or the lease falls free.
A stage whose lease this driver lost while it ran (taken over, or not renewed
within the TTL) and cannot take back is not reported as executed (its result
is not logged as this driver's): it counts as reused, with a warning. Its worker
could not publish it either once another driver took the lease: the stage
carries its lease's fencing token, which the store checks just before the
publishing rename (`leases.FenceRejected`). Every
transition goes to the `StudyLog` (one appended line) and to the subscribers
(live view, tracking).

A stage whose input turns out damaged when read (`CorruptArtifact` from the
worker) has that input verified in full, quarantined and rebuilt once, and
is then run again. Worker and node deaths are retried by Ray itself
(`resources.<kind>.retries`); the store records one attempt file per
execution, so the attempts are counted, not guessed.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import replace
from typing import Callable

from orchestrator.execution.executors import Executor
from orchestrator.plan.graph import StageGraph
from orchestrator.spec.models import ResourcesSpec, StageResources
from orchestrator.stages.base import Stage
from orchestrator.storage.files import CorruptArtifact
from orchestrator.storage.leases import FenceRejected, Leases
from orchestrator.storage.local import ArtifactStore
from orchestrator.storage.studies import DONE, StudyLog

EventFn = Callable[[dict], None]


POLL_S = 1.0


class Terminated(KeyboardInterrupt):
    """SIGTERM: handled like Ctrl-C (cancel running stages, final states), exit code 143."""


class StopSignal:
    """The signal (SIGINT or SIGTERM) that asked this driver to stop, set by its handler.

    The handler also raises, but a library call (Ray's waits among them) may
    swallow a KeyboardInterrupt: the scheduler checks this flag every loop too.
    """

    def __init__(self):
        self.received: str | None = None

    def set(self, name: str) -> None:
        self.received = name

    def clear(self) -> None:
        self.received = None


STOP = StopSignal()


def task_error(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:500]


def fenced_out(exc: BaseException) -> bool:
    """The stage's publish was refused: its lease had passed to another driver (`leases.FenceRejected`)."""
    return isinstance(getattr(exc, "cause", None) or exc, FenceRejected)


def corrupt_input(exc: BaseException) -> CorruptArtifact | None:
    cause = getattr(exc, "cause", None) or exc
    return cause if isinstance(cause, CorruptArtifact) else None


def heights(graph: StageGraph) -> dict[str, int]:
    """Each stage's height: 1 + the tallest of its dependents (a sink has height 1); one reverse pass."""
    height: dict[str, int] = {}
    for key in reversed(list(graph.stages)):  # the graph is in topological order
        height[key] = 1 + max((height[d] for d in graph.dependents(key)), default=0)
    return height


class Scheduler:
    def __init__(self, graph: StageGraph, resources: ResourcesSpec, store: ArtifactStore, log: StudyLog,
                 leases: Leases, executor: Executor, emit: EventFn, on_executed: Callable[[str, dict], None]):
        self.graph, self.resources, self.store, self.log = graph, resources, store, log
        self.leases, self.executor, self.emit, self.on_executed = leases, executor, emit, on_executed
        self.waiting = {k: sum(log.states[i] not in DONE for i in s.input_keys) for k, s in graph.stages.items()}
        self.height = heights(graph)
        self.order = {k: i for i, k in enumerate(graph.stages)}  # ties: the graph's order
        self.ready: list[tuple[int, int, str]] = []
        for k in graph.stages:
            if log.states[k] == "pending" and self.waiting[k] == 0:
                self._ready(k)
        self.blocked: set[str] = set()  # leased by another live driver
        self.started: dict[str, float] = {}  # running stages: when submitted (timeouts, pending warnings)
        self.progress_at = time.time()  # when a stage last finished: a queue that moves is no cause to warn
        self.submitted: dict[str, float] = {}  # for each stage's queue time
        self.warned: set[str] = set()
        self.timed_out: set[str] = set()
        self.rebuilt: set[str] = set()
        self.progress: dict[str, dict] = {}  # running searches: trials as last reported

    # --- transitions --------------------------------------------------------------------------

    def _set(self, key: str, state: str, error: str | None = None, **extra) -> None:
        self.log.set(key, state, error, **{k: v for k, v in extra.items() if k != "result"})
        stage = self.graph.stages[key]  # kind and label: a follower knows the stage from its events alone
        self.emit({"type": "stage", "key": key, "kind": stage.kind, "label": stage.label, "state": state,
                   **({"error": error} if error else {}), **extra})

    def _ready(self, key: str) -> None:
        heapq.heappush(self.ready, (-self.height[key], self.order[key], key))

    def _done(self, key: str) -> None:
        for dep in self.graph.dependents(key):
            self.waiting[dep] -= 1
            if self.waiting[dep] == 0 and self.log.states[dep] == "pending":
                self._ready(dep)

    def _reused(self, key: str, **extra) -> None:
        """Another driver's result stands for this stage: its dependents may start."""
        self.blocked.discard(key)
        self._set(key, "reused", **extra)
        self._done(key)

    def _skip_dependents(self, key: str) -> None:
        stack = [key]
        while stack:
            k = stack.pop()
            for dep in self.graph.dependents(k):
                if self.log.states[dep] == "pending":
                    self._set(dep, "skipped", f"input {self.graph.stages[k].label} failed")
                    stack.append(dep)

    def _start(self, key: str) -> None:
        """Reuse it from the store, compute it under its lease, or wait for the driver that holds it."""
        stage = self.graph.stages[key]
        if self.store.is_complete(stage.kind, key):
            self._reused(key)
            return
        if not self.leases.acquire(key):
            self.blocked.add(key)
            return
        if self.store.is_complete(stage.kind, key):  # another driver published it between the check and acquire
            self.leases.release(key)
            self._reused(key)
            return
        self.blocked.discard(key)
        if self.store.exists(stage.kind, key) and not self.store.is_complete(stage.kind, key, full=True):
            self.store.quarantine(stage.kind, key)  # verified twice, under the lease: damaged
            self.emit({"type": "warning", "message": f"stored stage {stage.label} was damaged; rebuilding"})
        # the worker publishes only while the lease carries this token (a driver that lost it cannot publish)
        self.executor.submit(replace(stage, fence=self.leases.token(key)), self._resources(stage))
        self.started[key] = self.submitted[key] = time.time()
        self._set(key, "running")

    def _finished(self, key: str, result) -> None:
        stage = self.graph.stages[key]
        self.started.pop(key, None)
        self.progress_at = time.time()
        attempts = self.store.attempts(key)
        submitted = self.submitted.pop(key, None)
        if not isinstance(result, BaseException):
            if not self._still_ours(key):
                self.emit({"type": "warning", "message": f"{stage.label}: this driver lost its lease while the stage "
                                                         f"ran (taken over, or not renewed in time); its result is "
                                                         f"not logged as this driver's"})
                self._reused(key, attempts=attempts)
                return
            run, metrics = result.get("run", {}), result.setdefault("metrics", {})
            if submitted is not None and run.get("started"):
                metrics["queue_seconds"] = max(0.0, run["started"] - submitted)
            self._set(key, "executed", attempts=attempts, result=result, node=run.get("node"), host=run.get("host"),
                      run_s=metrics.get("wall_seconds"), queue_s=metrics.get("queue_seconds"))
            self.on_executed(key, result)  # tracking; it releases the lease once the run is logged
            self._done(key)
            return
        self.leases.release(key)  # deletes it only if it is still this driver's
        if fenced_out(result):  # not published: it is the new holder's now, or ours again once that one is gone
            self.emit({"type": "warning", "message": f"{stage.label}: this driver lost its lease while the stage "
                                                     f"ran (taken over by another driver); its result was not "
                                                     f"published, the stage waits for the new holder"})
            self._set(key, "pending")
            self._start(key)
            return
        bad = corrupt_input(result)
        if bad is not None and bad.key != key and bad.key not in self.rebuilt and bad.key in self.graph.stages:
            self._rebuild(key, bad)
            return
        message = f"timed out after {self._resources(stage).timeout_s:g} s" \
            if key in self.timed_out else task_error(result)
        self._set(key, "failed", message, attempts=attempts)
        self._skip_dependents(key)

    def _still_ours(self, key: str) -> bool:
        """The stage's lease is still this driver's (re-read: owner and fencing token), or can be had
        again because nobody took it (a lease lost to a store outage); False when unsure."""
        try:
            return self.leases.still_held(key) or self.leases.acquire(key)
        except Exception:  # the store is unreachable: do not claim a stage this driver may no longer own
            return False

    def _rebuild(self, key: str, bad: CorruptArtifact) -> None:
        """An input failed its checksum when read: verify it in full, set it aside, rebuild it, run `key` again."""
        self.rebuilt.add(bad.key)
        source = self.graph.stages[bad.key]
        self.emit({"type": "warning", "message": f"stored stage {source.label} failed its checksum; rebuilding it"})
        if self.leases.acquire(bad.key) and self.store.verify(source.kind, bad.key, full=True):
            self.store.quarantine(source.kind, bad.key)
        self.leases.release(bad.key)
        self._set(key, "pending")
        self._set(bad.key, "pending")
        self.waiting[key] += 1
        for dep in self.graph.dependents(bad.key):  # its other dependents wait for it again too
            if dep != key and self.log.states[dep] == "pending":
                self.waiting[dep] += 1
        self._ready(bad.key)

    # --- the loop ---------------------------------------------------------------------------

    def _poll(self) -> str | None:
        """Once a second: stages leased elsewhere, timeouts, stages waiting for a node, cancellation."""
        for key in list(self.blocked):
            self._start(key)
        now = time.time()
        for key, t0 in list(self.started.items()):
            res = self._resources(self.graph.stages[key])
            if res.timeout_s and now - t0 > res.timeout_s and key not in self.timed_out:
                self.timed_out.add(key)
                self.executor.cancel(key)
            # waiting behind the study's own stages while they finish is a queue, not a missing node
            stalled = now - max(t0, self.progress_at) > res.pending_warning_s
            if key not in self.warned and stalled and not self.store.attempts(key):
                self.warned.add(key)
                self.emit({"type": "warning", "message": f"{self.graph.stages[key].label} has waited {now - t0:.0f} s "
                                                         f"to start: {self.executor.why_pending(res)}"})
            if self.graph.stages[key].record.progress is not None:
                self._report_progress(key)
        return "cancelled" if self.log.cancel_requested() else None

    def _resources(self, stage: Stage) -> StageResources:
        return getattr(self.resources, stage.record.resources)

    def _report_progress(self, key: str) -> None:
        """A running stage's progress (a search's trials), for the live view (only when it changed)."""
        stage = self.graph.stages[key]
        progress = stage.record.progress(self.store, key)
        if progress is not None and progress != self.progress.get(key):
            self.progress[key] = progress
            self.emit({"type": "progress", "key": key, "kind": stage.kind, **progress})

    def run(self) -> str:
        last_poll = time.time()
        try:
            while True:
                while self.ready:
                    self._start(heapq.heappop(self.ready)[2])
                if not self.executor.running() and not self.blocked:
                    break
                if self.executor.running():
                    finished = self.executor.next_done(timeout=0.2)
                    if finished is not None:
                        self._finished(*finished)
                else:  # only stages leased by another driver: wait for the next poll (not spin on next_done)
                    time.sleep(max(0.0, min(0.2, POLL_S - (time.time() - last_poll))))
                if STOP.received:
                    raise Terminated() if STOP.received == "SIGTERM" else KeyboardInterrupt()
                if time.time() - last_poll >= POLL_S:
                    last_poll = time.time()
                    if self._poll() == "cancelled":
                        self._stop()
                        return "cancelled"
        except KeyboardInterrupt as exc:
            self._stop()
            return "terminated" if isinstance(exc, Terminated) or STOP.received == "SIGTERM" else "interrupted"
        states = self.log.states.values()
        return "failed" if any(s in ("failed", "skipped") for s in states) else "succeeded"

    def _stop(self) -> None:
        self.executor.cancel()
        for key, state in list(self.log.states.items()):
            if state == "running":
                self._set(key, "pending")
