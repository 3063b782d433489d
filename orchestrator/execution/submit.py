"""Submitting a study: preflight, then run the stage graph, then report; and `sync`, `cancel`.

Read top to bottom: build the graph, check everything a user can get wrong
(tracking reachable, data present, every stage kind fits on one node) before
anything is written, mark stages already in the store as cached, start the
study's log and heartbeat, then hand the graph to the scheduler
(`orchestrator.execution.scheduler`) with an executor (Ray tasks, or inline in tests).
Tracking subscribes to the scheduler's transitions and logs from a background
thread; whatever it could not log, `sync_study` logs later. Every exit path
(success, failure, an exception, Ctrl-C, SIGTERM, `ddray study cancel`)
cancels what runs, releases the leases and leaves the log, the driver's
heartbeat and the parent run in a final state.
"""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from distill_core import __version__
from distill_core.data import DatasetUnavailable, load_source
from orchestrator.errors import UserError
from orchestrator.execution.executors import (
    ActorExecutor,
    Executor,
    InlineExecutor,
    RayExecutor,
)
from orchestrator.execution.ray_session import check_reachable, ensure_ray
from orchestrator.execution.scheduler import STOP, Scheduler, Terminated
from orchestrator.plan.graph import MAX_STAGES, StageGraph, build_stage_graph
from orchestrator.reporting.progress import tally
from orchestrator.reporting.results import (
    evaluation_results,
    study_findings,
    study_results,
)
from orchestrator.spec.models import StudySpec
from orchestrator.spec.paths import absolute_sqlite
from orchestrator.stages.base import KINDS
from orchestrator.storage.leases import DEFAULT_TTL_S, Leases, Owner
from orchestrator.storage.opener import open_leases, open_store
from orchestrator.storage.studies import DONE, HEARTBEAT_S, StudyLog, load_record
from orchestrator.tracking.secrets import redact_data
from orchestrator.tracking.session import NoTracking, TrackingSession, fully_tracked
from orchestrator.tracking.tracker import Tracker, check_uri, redact

EventFn = Callable[[dict], None]


@dataclass
class StudyOutcome:
    study_id: str
    state: str
    counts: dict
    parent_run_id: str | None
    results: list[dict] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)  # stages that took more than one execution
    tracking: dict = field(default_factory=dict)
    summaries: dict[str, list[dict]] = field(default_factory=dict)  # kind -> what its finished stages report
    findings: list[dict] = field(default_factory=list)  # the spec's claims tested on the results

    def summary(self) -> dict:
        c = self.counts
        out = {"study_id": self.study_id, "state": self.state,
               "stages": {"total": c["total"], "executed": c["executed"], "cached": c["cached"] + c["reused"],
                          "failed": c["failed"] + c["skipped"]},
               "retried": self.attempts, "not_logged": self.tracking.get("not_logged", 0)}
        out.update(self.summaries)  # e.g. "search": each search's trials and best
        if self.findings:
            out["findings"] = {v: sum(f["verdict"] == v for f in self.findings)
                               for v in ("holds", "contradicted", "inconclusive")}
        return out


def kind_summaries(store, graph: StageGraph, states: dict[str, str]) -> dict[str, list[dict]]:
    """What each finished stage of a kind with a summary reports (a search: its trials and best), by kind."""
    out: dict[str, list[dict]] = {}
    for stage in graph.stages.values():
        summarise = stage.record.summary
        if summarise is not None and states.get(stage.key) in DONE:
            result = store.read_json(stage.kind, stage.key, "result.json")
            out.setdefault(stage.kind, []).append({"stage": stage.label, "key": stage.key, **summarise(result)})
    return out


def check_resources(spec: StudySpec, graph: StageGraph) -> None:
    """Every stage kind's request fits on one alive node (cluster totals would let it wait forever)."""
    import ray  # Ray: imported where it is used (planning and `validate` start without it)

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    largest = {r: max((n.get(r, 0) for n in nodes), default=0) for r in ("CPU", "GPU", "memory")}
    held = {KINDS[kind].resources for kind, n in graph.counts().items() if n}
    held |= {field for kind, n in graph.counts().items() if n for field in KINDS[kind].holds}  # a search's trials
    for kind in sorted(held):
        want = getattr(spec.resources, kind)
        for field_name, resource, value in (("cpus", "CPU", want.cpus), ("gpus", "GPU", want.gpus),
                                            ("memory_gb", "memory", (want.memory_gb or 0) * 2**30)):
            if value > largest[resource]:
                shown = f"{value / 2**30:g} GiB" if resource == "memory" else f"{value:g}"
                have = f"{largest[resource] / 2**30:.1f} GiB" if resource == "memory" else f"{largest[resource]:g}"
                raise UserError(f"resources.{kind}.{field_name}: {shown} requested but the largest Ray node "
                                f"has {have}")


def check_data(spec: StudySpec, graph: StageGraph, cached: set[str]) -> None:
    """Every dataset that must be built resolves now (local-first, then download)."""
    needed = {s.coords["dataset"] for s in graph.of_kind("dataset") if s.key not in cached}
    for i, ds in enumerate(spec.datasets):
        if ds.name in needed:
            try:
                source = load_source(ds.source, root=ds.data_root)
            except DatasetUnavailable as exc:
                raise UserError(f"datasets[{i}].source: {exc}") from None
            if ds.num_classes is not None and source.num_classes != ds.num_classes:  # imagefolder's declaration
                raise UserError(f"datasets[{i}].num_classes: {ds.num_classes} declared but {ds.data_root} has "
                                f"{source.num_classes} class folders")


@contextmanager
def signals_as_interrupts():
    """SIGTERM raises `Terminated` and SIGINT KeyboardInterrupt in the main thread, and both are
    remembered (`STOP`), so either ends a study with every running stage cancelled and final states."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        STOP.set("SIGTERM" if signum == signal.SIGTERM else "SIGINT")
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    STOP.clear()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _checked_tracker(uri: str, experiment: str) -> Tracker:
    tracker = Tracker(uri, experiment)
    tracker.check()
    return tracker


class Background:
    """`fn()` in a thread; `result()` waits for it and re-raises what it raised."""

    def __init__(self, fn: Callable):
        self.value, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable) -> None:
        try:
            self.value = fn()
        except BaseException as exc:  # handed to the caller of result()
            self.error = exc

    def result(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.value


class Heartbeat:
    """Renews this driver's leases and heartbeat file every few seconds, from a thread no error ends.

    A renew that raises (a full disk, botocore's EndpointConnectionError, anything) is counted
    (`failures`: consecutive passes) and tried again at the next beat. Once the leases have gone
    unrenewed for longer than their TTL, `emit` gets one warning; every lease the book reports lost
    (`leases.lost()`: taken over, or not renewed within the TTL) is named in a warning once, and the
    scheduler does not log those stages as this driver's."""

    def __init__(self, log: StudyLog, leases: Leases, every: float = HEARTBEAT_S, emit: EventFn | None = None):
        self.log, self.leases, self.every = log, leases, every
        self.emit = emit or (lambda event: None)
        self.failures = 0  # consecutive renew passes that raised
        self.beats = 0
        self._last_ok = time.monotonic()
        self._warned_outage = False
        self._reported: set[str] = set()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="ddray-heartbeat", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.beat()

    def beat(self) -> None:
        started = time.monotonic()
        try:
            self.leases.renew()
            self.failures, self._last_ok, self._warned_outage = 0, started, False
        except Exception as exc:  # nothing may end this thread: the leases would expire while the driver computes
            self.failures += 1
            ttl = getattr(self.leases, "ttl", DEFAULT_TTL_S)
            if not self._warned_outage and started - self._last_ok > ttl:
                self._warned_outage = True
                self._warn(f"leases not renewed for {started - self._last_ok:.0f} s ({self.failures} failed "
                           f"attempts, last: {type(exc).__name__}: {str(exc)[:200]}); another driver may take "
                           f"over this driver's stages")
        try:
            self.log.heartbeat("running")
        except Exception:  # a full or flaky disk must not kill the driver; the next beat tries again
            pass
        try:
            lost = set(getattr(self.leases, "lost", lambda: [])()) - self._reported
        except Exception:
            lost = set()
        if lost:
            self._reported |= lost
            names = ", ".join(sorted(lost)[:5]) + (f" and {len(lost) - 5} more" if len(lost) > 5 else "")
            self._warn(f"lost the lease of {len(lost)} stage(s) ({names}): taken over or not renewed in time; "
                       f"this driver will not log them as its own")
        self.beats += 1

    def _warn(self, message: str) -> None:
        try:
            self.emit({"type": "warning", "message": message})
        except Exception:
            pass

    def __enter__(self) -> "Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join(timeout=2 * self.every)


@dataclass
class Preflight:
    """What the checks before a submit found: nothing is written before they pass."""

    cached: set[str]  # stages complete in the store
    tracked_parent: str | None  # the parent run, when every stage is stored and already in MLflow
    tracker: Tracker | None  # None: nothing to log (tracked_parent), or the checks did not open one
    runner: Executor
    damaged: list[str] = field(default_factory=list)  # stored leaves that failed their checksums


def preflight(spec: StudySpec, store, graph: StageGraph, uri: str, address: str | None, num_cpus: int | None,
              executor: Callable[[str, dict], Executor] | None) -> Preflight:
    """Tracking reachable, data present, every stage kind fits on one node; Ray started only if needed.

    A stage is cached when the store holds it complete by its files' sizes; the cached stages no other
    stage of the graph reads (leaves: evaluations) are verified by their full checksums too, since no
    worker will read them and find the damage: a damaged one is quarantined and rebuilt (not cached)."""
    check_uri(uri)
    if address:
        check_reachable(address)
    cached = {k for k, s in graph.stages.items() if store.is_complete(s.kind, k)}
    leaves = [k for k in cached if not graph.dependents(k)]
    with ThreadPoolExecutor(max_workers=8) as pool:  # an object store answers each read in a round trip
        whole = dict(zip(leaves, pool.map(lambda k: store.is_complete(graph.stages[k].kind, k, full=True), leaves)))
    damaged = sorted(k for k, ok in whole.items() if not ok)  # quarantined under their leases, once there are leases
    cached -= set(damaged)
    # nothing to compute and every run already in MLflow: neither Ray nor the tracking server is needed
    tracked_parent = fully_tracked(store, spec.study_id, redact(uri), spec.experiment_name, graph.stages) \
        if len(cached) == len(graph.stages) else None
    # the tracking check (importing MLflow, opening its DB) and the data check run beside Ray's start-up
    opening = None if tracked_parent is not None else Background(lambda: _checked_tracker(uri, spec.experiment_name))
    data = Background(lambda: check_data(spec, graph, cached))
    if executor is None and len(cached) == len(graph.stages):
        executor = InlineExecutor  # nothing to compute: no Ray is started (it never gets a stage)
    elif executor is None:
        ensure_ray(address, num_cpus)
        check_resources(spec, graph)
        executor = ActorExecutor if spec.resources.executor == "actors" else RayExecutor
    tracker = opening.result() if opening is not None else None
    data.result()
    return Preflight(cached, tracked_parent, tracker, executor(str(store.root), spec.runtime.model_dump(exclude={"device"})),
                     damaged)


def quarantine_damaged(store, graph: StageGraph, keys: list[str], leases: Leases) -> None:
    """Move each damaged leaf aside (kept for inspection; the scheduler computes it again), under its lease
    and verified again there: another driver may be rebuilding it right now."""
    for key in keys:
        if not leases.acquire(key):
            continue  # another live driver has it
        try:
            kind = graph.stages[key].kind
            if store.exists(kind, key) and not store.is_complete(kind, key, full=True):
                store.quarantine(kind, key)
        finally:
            leases.release(key)


def open_study(spec: StudySpec, spec_text: str, store, graph: StageGraph, uri: str, pre: Preflight, log: StudyLog,
               leases: Leases, emit: EventFn):
    """The parent run, the study log's first record, the start event; stored stages logged (tracking, parent)."""
    if pre.tracker is None:
        tracking, parent = NoTracking(pre.tracked_parent), pre.tracked_parent
    else:
        tracking = TrackingSession(pre.tracker, store, spec.study_id, leases, emit)
        parent = tracking.open(spec.name, spec.spec_hash(), spec_text, __version__)
    dump = redact_data(spec.model_dump(mode="json"))  # every URI and secret-named value in the spec, not only its own
    dump["tracking"]["uri"] = redact(uri)
    stages = {k: {"kind": s.kind, "label": s.label, "coords": s.coords, "inputs": s.input_keys,
                  "state": "cached" if k in pre.cached else "pending"} for k, s in graph.stages.items()}
    owner = log.owner
    log.start({"name": spec.name, "spec_hash": spec.spec_hash(), "spec": dump,
               "tracking_uri": redact(uri), "experiment": spec.experiment_name,
               "parent_run_id": parent, "store_root": redact(str(store.root)), "ddray_version": __version__,
               "driver": {"host": owner.host, "pid": owner.pid, "id": owner.driver}}, stages)
    # counts, not the stages: the event's size does not grow with the study (stage events name their stage)
    emit({"type": "start", "study_id": spec.study_id, "parent_run_id": parent, "counts": tally(stages.values()),
          "store": redact(str(store.root)), "tracking_uri": redact(uri)})
    tracking.log_stored({k: graph.stages[k].kind for k in pre.cached})
    return tracking, parent


def run_stages(spec: StudySpec, store, graph: StageGraph, pre: Preflight, log: StudyLog, leases: Leases,
               tracking, emit: EventFn) -> str:
    """The scheduler over the graph, under the driver's heartbeat; failed stages reach tracking too."""
    def on_event(event: dict) -> None:
        if event["type"] == "stage" and event["state"] == "failed":
            s = graph.stages[event["key"]]
            tracking.failed(s.label, s.key, s.kind, event.get("error", ""))
        emit(event)

    scheduler = Scheduler(graph, spec.resources, store, log, leases, pre.runner, on_event, tracking.executed)
    with Heartbeat(log, leases, emit=emit):
        return scheduler.run()


def close_study(spec: StudySpec, store, graph: StageGraph, pre: Preflight, log: StudyLog, leases: Leases,
                tracking, parent: str | None, state: str, emit: EventFn) -> StudyOutcome:
    """Findings, the parent run closed, the log's final state, leases released; the outcome."""
    study_id = spec.study_id
    counts = log.counts()
    record = load_record(store, study_id)
    results = evaluation_results(store, record)  # read once, for the claims and the rows
    findings = study_findings(store, record, results) if spec.findings else []
    if findings and pre.tracker is not None and parent is not None:
        try:  # best-effort, as all tracking: the store holds what the findings are computed from
            pre.tracker.log_findings(parent, findings)
        except Exception as exc:
            emit({"type": "warning", "message": f"tracking: findings not logged ({type(exc).__name__}); "
                                                f"`ddray study report {study_id}` logs them again"})
    tracked = tracking.close(state, counts)
    if state == "succeeded" and not tracked["not_logged"]:
        tracking.remember_complete(graph.stages)
    log.finish(state)
    # a stage whose run was still being logged when the drain ran out keeps its lease until its TTL ends
    leases.release_all(keep=[tracked["in_flight"]] if tracked.get("in_flight") else ())
    if tracked["not_logged"]:
        emit({"type": "warning", "message": f"tracking: {tracked['not_logged']} run(s) not logged "
                                            f"({'; '.join(tracked['errors']) or 'server unreachable'}); "
                                            f"run `ddray study sync {study_id}`"})
    attempts = {graph.stages[k].label: n for k, n in ((k, store.attempts(k)) for k, st in log.states.items()
                                                       if st == "executed") if n > 1}
    return StudyOutcome(study_id, state, counts, parent, study_results(store, record, results),
                        dict(log.errors), attempts, tracked, kind_summaries(store, graph, log.states), findings)


def submit_study(spec: StudySpec, spec_text: str, *, store_root: str | None = None,
                 tracking_uri: str | None = None, address: str | None = None, num_cpus: int | None = None,
                 on_event: EventFn | None = None, max_stages: int | None = MAX_STAGES,
                 executor: Callable[[str, dict], Executor] | None = None,
                 graph: StageGraph | None = None) -> StudyOutcome:
    """Run every stage of `spec` (or of `graph`, built from it) not already in the store;
    `executor(store_root, runtime)` defaults to Ray."""
    emit = on_event or (lambda event: None)
    store = open_store(store_root or spec.store.root)
    graph = graph or build_stage_graph(spec, max_stages)
    uri = absolute_sqlite(tracking_uri or spec.tracking.uri, Path.cwd())  # recorded absolute: reached from anywhere
    pre = preflight(spec, store, graph, uri, address, num_cpus, executor)
    store.clean_temp()

    owner = Owner.here()
    leases = open_leases(store, owner)
    quarantine_damaged(store, graph, pre.damaged, leases)
    log = StudyLog(store, spec.study_id, owner)
    with signals_as_interrupts():
        try:
            tracking, parent = open_study(spec, spec_text, store, graph, uri, pre, log, leases, emit)
            state = run_stages(spec, store, graph, pre, log, leases, tracking, emit)
        except BaseException:  # Ctrl-C, SIGTERM, a bug: stop what runs, leave the study in a final state
            pre.runner.cancel()
            log.finish("failed")
            leases.release_all()
            raise
        outcome = close_study(spec, store, graph, pre, log, leases, tracking, parent, state, emit)
    emit({"type": "end", **outcome.summary()})
    return outcome
