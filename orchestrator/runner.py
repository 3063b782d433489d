"""Submitting a study: preflight, then run the stage graph on Ray.

Read top to bottom: build the graph, check everything a user can get wrong
(tracking reachable, data present, the cluster big enough) before anything is
written, mark stages already in the store as cached, then keep submitting
every stage whose inputs are ready to an executor (Ray tasks with their
declared resources, or inline in tests), logging each finished stage to
MLflow from this driver. Readiness is counted, not rescanned: each stage keeps
the number of its inputs not yet done, and a finished stage decrements its
dependents' counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from distill_core import __version__
from distill_core.data import DatasetUnavailable, load_source
from orchestrator.errors import UserError
from orchestrator.executors import Executor, RayExecutor, ensure_ray
from orchestrator.graph import StageGraph, build_stage_graph
from orchestrator.spec import StudySpec
from orchestrator.store import ArtifactStore
from orchestrator.studies import StudyRecord, open_record, study_results
from orchestrator.tracking import Tracker

EventFn = Callable[[dict], None]


@dataclass
class StudyOutcome:
    study_id: str
    state: str
    counts: dict
    parent_run_id: str
    results: list[dict] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict:
        c = self.counts
        return {"study_id": self.study_id, "state": self.state,
                "stages": {"total": c["total"], "executed": c["executed"], "cached": c["cached"],
                           "failed": c["failed"] + c["skipped"]}}


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a dead address: ray.init would otherwise retry for minutes."""
    import socket

    target = address.split("://", 1)[-1]
    if address == "auto" or ":" not in target:
        return
    host, port = target.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise UserError(f"ray: cannot reach cluster '{address}' ({exc.__class__.__name__}: {exc})") from None


def check_resources(spec: StudySpec, graph: StageGraph) -> None:
    import ray

    have = ray.cluster_resources()
    for kind in ("dataset", "ptm", "distill", "evaluate"):
        if not graph.of_kind(kind):
            continue
        want = getattr(spec.resources, kind)
        if want.cpus > have.get("CPU", 0):
            raise UserError(f"resources.{kind}.cpus: {want.cpus:g} requested but the Ray cluster has {have.get('CPU', 0):g}")
        if want.gpus > have.get("GPU", 0):
            raise UserError(f"resources.{kind}.gpus: {want.gpus:g} requested but the Ray cluster has {have.get('GPU', 0):g}")


def check_data(spec: StudySpec, graph: StageGraph, cached: set[str]) -> None:
    """Every dataset that must be built resolves now (local-first, then download)."""
    by_name = {d.name: d for d in spec.datasets}
    needed = {s.coords["dataset"] for s in graph.of_kind("dataset") if s.key not in cached}
    for i, ds in enumerate(spec.datasets):
        if ds.name in needed:
            try:
                load_source(ds.source, root=by_name[ds.name].data_root)
            except DatasetUnavailable as exc:
                raise UserError(f"datasets[{i}].source: {exc}") from None


def submit_study(spec: StudySpec, spec_text: str, *, store_root: str | None = None,
                 tracking_uri: str | None = None, address: str | None = None, num_cpus: int | None = None,
                 on_event: EventFn | None = None,
                 executor: Callable[[str, dict], Executor] | None = None) -> StudyOutcome:
    """Run every stage of `spec` not already in the store; `executor(store_root, runtime)` defaults to Ray."""
    emit = on_event or (lambda event: None)
    store = ArtifactStore(store_root or spec.store.root)
    graph = build_stage_graph(spec)
    tracker = Tracker(tracking_uri or spec.tracking.uri, spec.experiment_name)

    # --- preflight: nothing is written before these pass -----------------------------------------
    if address:
        check_reachable(address)
    tracker.check()
    cached = {k for k, s in graph.stages.items() if store.is_complete(s.kind, k)}
    for k, s in graph.stages.items():  # damaged stages are moved aside and rebuilt
        if k not in cached and store.manifest(s.kind, k) is not None:
            store.quarantine(s.kind, k)
            emit({"type": "warning", "message": f"stored stage {s.label} was damaged; rebuilding"})
    check_data(spec, graph, cached)
    if executor is None:
        ensure_ray(address, num_cpus)
        check_resources(spec, graph)
        executor = RayExecutor

    # --- study record and parent run ----------------------------------------------------------------
    study_id = spec.study_id
    tracker.ensure_experiment()
    parent = tracker.start_parent(study_id, spec.name, spec.spec_hash(), spec_text, __version__)
    logged = tracker.child_runs(parent)
    stages = {k: {"kind": s.kind, "label": s.label, "coords": s.coords, "inputs": s.inputs,
                  "state": "cached" if k in cached else "pending"} for k, s in graph.stages.items()}
    record = open_record(store, study_id, {
        "name": spec.name, "spec_hash": spec.spec_hash(), "spec": spec.model_dump(mode="json"),
        "tracking_uri": tracker.uri, "experiment": spec.experiment_name, "parent_run_id": parent,
        "store_root": str(store.root), "ddray_version": __version__}, stages)
    emit({"type": "start", "study_id": study_id, "parent_run_id": parent, "stages": record.data["stages"]})
    for k in cached:
        if k not in logged:
            s = graph.stages[k]
            tracker.log_stage(parent, study_id, store.read_json(s.kind, k, "result.json"),
                              store.stage_dir(s.kind, k), cached=True)
        emit({"type": "stage", "key": k, "state": "cached"})

    # --- run ------------------------------------------------------------------------------------
    runtime = spec.runtime.model_dump(exclude={"device"})
    state = run_graph(spec, graph, store, record, tracker, parent, logged, emit,
                      executor(str(store.root), runtime))
    record.data["state"] = state
    record.save()
    tracker.finish_parent(parent, state, record.counts())
    errors = {k: v["error"] for k, v in record.data["stages"].items() if v.get("error")}
    outcome = StudyOutcome(study_id, state, record.counts(), parent, study_results(store, record.data), errors)
    emit({"type": "end", **outcome.summary()})
    return outcome


def run_graph(spec: StudySpec, graph: StageGraph, store: ArtifactStore, record: StudyRecord, tracker: Tracker,
              parent: str, logged: dict[str, str], emit: EventFn, executor: Executor) -> str:
    states = {k: v["state"] for k, v in record.data["stages"].items()}
    done = ("executed", "cached")
    waiting = {k: sum(states[i] not in done for i in s.input_keys) for k, s in graph.stages.items()}

    def submit(key: str) -> None:
        stage = graph.stages[key]
        executor.submit(stage, getattr(spec.resources, stage.kind))
        states[key] = "running"
        record.set_stage(key, "running")
        emit({"type": "stage", "key": key, "state": "running"})

    def skip_dependents(key: str) -> None:
        for dep in graph.dependents(key):
            if states[dep] == "pending":
                states[dep] = "skipped"
                record.set_stage(dep, "skipped", f"input {graph.stages[key].label} failed")
                emit({"type": "stage", "key": dep, "state": "skipped"})
                skip_dependents(dep)

    try:
        for key in graph.stages:
            if states[key] == "pending" and waiting[key] == 0:
                submit(key)
        while executor.running():
            finished = executor.next_done(timeout=1.0)
            if finished is None:
                continue
            key, result = finished
            stage = graph.stages[key]
            if isinstance(result, BaseException):  # the stage raised: record it, skip what depends on it
                message = _task_error(result)
                states[key] = "failed"
                record.set_stage(key, "failed", message)
                tracker.log_failure(parent, record.data["study_id"], stage, message)
                emit({"type": "stage", "key": key, "state": "failed", "error": message})
                skip_dependents(key)
                continue
            if key not in logged:
                tracker.log_stage(parent, record.data["study_id"], result, store.stage_dir(stage.kind, key), False)
            states[key] = "executed"
            record.set_stage(key, "executed")
            emit({"type": "stage", "key": key, "state": "executed", "metrics": result.get("metrics", {})})
            for dep in graph.dependents(key):
                waiting[dep] -= 1
                if waiting[dep] == 0 and states[dep] == "pending":
                    submit(dep)
    except KeyboardInterrupt:
        executor.cancel()
        for key, state in states.items():
            if state == "running":
                record.set_stage(key, "pending")
        return "interrupted"
    return "failed" if any(s in ("failed", "skipped") for s in states.values()) else "succeeded"


def _task_error(exc: Exception) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:500]


