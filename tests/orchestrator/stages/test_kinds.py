"""A stage kind defined here (a config type, a runner, a record) runs through the graph, the scheduler
and the real worker entry point (`execute_stage` -> `stage.record.run`), as a kind module's would.

`toy` sums: each stage's `total` is its own `value` plus the `total` of its input (read from the store,
checksummed), so the result proves the input was read from what the first stage published.
"""

from __future__ import annotations

import time

import pytest
from pydantic import Field

from distill_core.config import Config
from orchestrator.errors import UserError
from orchestrator.execution.executors import InlineExecutor
from orchestrator.execution.scheduler import Scheduler
from orchestrator.plan.graph import StageGraph
from orchestrator.spec.models import ResourcesSpec, StageResources
from orchestrator.stages.base import KINDS, Stage, StageKind, register, stage_kind
from orchestrator.stages.common import RESULT, finish_stage, json_bytes
from orchestrator.stages.worker import execute_stage
from orchestrator.storage.leases import Leases, Owner
from orchestrator.storage.local import ArtifactStore
from orchestrator.storage.studies import StudyLog


class ToyConfig(Config):
    value: int = Field(ge=0, le=1000)
    note: str = ""


def run_toy(stage: Stage, store: ArtifactStore, runtime) -> dict:
    started = time.time()
    cfg = stage.typed_config()  # the worker rebuilds the kind's typed config from the stored dict
    assert isinstance(cfg, ToyConfig)
    below = stage.inputs.get("previous")
    total = cfg.value + (store.read_json("toy", below, RESULT)["metrics"]["total"] if below else 0)
    files = {"toy.json": json_bytes({"value": cfg.value, "total": total, "device": runtime.device})}
    return finish_stage(store, stage, files, {"total": total}, ["toy.json"], {"note": cfg.note}, started)


def toy_record(version: int = 1) -> StageKind:
    return StageKind("toy", version=version, config=ToyConfig, run=run_toy, resources="dataset")


@pytest.fixture
def toy():
    """`toy` registered for one test, and gone afterwards whatever the test did to KINDS['toy']."""
    assert "toy" not in KINDS
    try:
        yield register(toy_record())
    finally:
        KINDS.pop("toy", None)


def toy_graph(first_value: int = 2) -> tuple[StageGraph, Stage, Stage]:
    g = StageGraph()
    first = g.add(Stage("toy", ToyConfig(value=first_value).to_dict(), {}, "toy one"))
    second = g.add(Stage("toy", ToyConfig(value=5, note="top").to_dict(), {"previous": first.key}, "toy two"))
    return g, first, second


class Recording(InlineExecutor):
    """An inline executor that keeps the resources each stage was submitted with."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.given: dict[str, StageResources] = {}

    def submit(self, stage, resources):
        self.given[stage.key] = resources
        super().submit(stage, resources)


def schedule(store: ArtifactStore, graph: StageGraph, resources, executor: InlineExecutor) -> tuple[str, StudyLog]:
    owner = Owner.here()
    log = StudyLog(store, "toy-study", owner)
    log.start({"name": "toy"}, {k: {"kind": s.kind, "label": s.label, "inputs": s.input_keys, "state": "pending"}
                                for k, s in graph.stages.items()})
    leases = Leases(store.root, owner)
    scheduler = Scheduler(graph, resources, store, log, leases, executor, lambda e: None,
                          lambda key, result: leases.release(key))
    state = scheduler.run()
    log.finish(state)
    return state, log


def test_a_registered_kind_runs_through_the_scheduler_and_the_worker(tmp_path, toy):
    graph, first, second = toy_graph()
    assert graph.counts()["toy"] == 2 and graph.dependents(first.key) == [second.key]
    store = ArtifactStore(tmp_path / "store")
    calls: list[str] = []

    def counted(stage, *args):
        calls.append(stage.key)
        return execute_stage(stage, *args)  # the real worker entry point: attempt, log, stage.record.run

    state, log = schedule(store, graph, ResourcesSpec(), InlineExecutor(str(store.root), {}, counted))
    assert state == "succeeded", log.errors
    assert calls == [first.key, second.key] and set(log.states.values()) == {"executed"}
    for stage in (first, second):
        assert store.attempts(stage.key) == 1  # executed once each
        assert store.is_complete("toy", stage.key, full=True)
        assert store.manifest("toy", stage.key)["meta"] == {"note": stage.config["note"]}
    top = store.read_json("toy", second.key, RESULT)
    assert top["metrics"]["total"] == 7  # 5 + the first stage's 2, read back from the store
    assert top["inputs"] == {"previous": first.key} and top["kind"] == "toy" and top["artifacts"] == ["toy.json"]
    assert store.read_json("toy", second.key, "toy.json") == {"value": 5, "total": 7, "device": "cpu"}
    assert [p.name for p in (store.root / "stages").iterdir()] == ["toy"]  # its own directory, by kind name

    # resubmitted: both are in the store, nothing runs again
    calls.clear()
    state, log = schedule(store, graph, ResourcesSpec(), InlineExecutor(str(store.root), {}, counted))
    assert state == "succeeded" and calls == [] and set(log.states.values()) == {"reused"}


def test_a_kind_is_given_the_resources_its_record_names(tmp_path, toy):
    graph, first, second = toy_graph()
    store = ArtifactStore(tmp_path / "store")
    # toy's record says resources="dataset": ResourcesSpec has no `toy` field, and needs none
    resources = ResourcesSpec(dataset=StageResources(cpus=2))
    executor = Recording(str(store.root), {})
    state, _ = schedule(store, graph, resources, executor)
    assert state == "succeeded"
    assert executor.given[first.key].cpus == 2 and executor.given[second.key].cpus == 2


def test_the_worker_runs_a_kind_through_its_record(tmp_path, toy):
    _, first, _ = toy_graph(first_value=3)
    root = str(tmp_path / "store")
    result = execute_stage(first, root, 1, 0, {})
    store = ArtifactStore(root)
    assert result["metrics"]["total"] == 3 and result["key"] == first.key
    assert store.read_json("toy", first.key, RESULT)["metrics"]["total"] == 3
    assert store.attempts(first.key) == 1
    bad = Stage("toy", {"value": -1}, {}, "toy bad")  # the key hashes any dict; the worker checks the config
    with pytest.raises(Exception, match="value"):
        execute_stage(bad, root, 1, 0, {})
    assert not store.exists("toy", bad.key) and store.attempts(bad.key) == 1  # tried once, nothing published


def test_the_key_names_the_kind_and_changes_with_version_config_and_inputs(toy):
    _, first, second = toy_graph()
    assert first.key.startswith("toy-") and Stage.kind_of(first.key) == "toy"
    _, first2, second2 = toy_graph()
    assert (first2.key, second2.key) == (first.key, second.key)  # stable
    _, other_first, other_second = toy_graph(first_value=4)
    assert other_first.key != first.key and other_second.key != second.key  # upstream change rekeys downstream
    assert other_second.config == second.config
    # runtime and label are never part of a key
    assert Stage("toy", first.config, {}, "another label", runtime={"x": 1}).key == first.key

    KINDS["toy"] = toy_record(version=2)  # the kind's code changed what it produces (the fixture removes it)
    _, bumped_first, bumped_second = toy_graph()
    assert bumped_first.key != first.key and bumped_second.key != second.key
    assert bumped_first.config == first.config


def test_registering_a_kind_twice(toy):
    assert register(toy_record()) is not None and KINDS["toy"] == toy_record()  # the same record again: fine
    with pytest.raises(ValueError, match="stage kind 'toy' is registered twice"):
        register(toy_record(version=2))
    with pytest.raises(ValueError, match="registered twice"):
        register(StageKind("toy", version=1, config=ToyConfig, run=run_toy, resources="evaluate"))
    assert KINDS["toy"] == toy_record()  # the first record stays


def test_a_kind_name_with_a_dash_is_refused():
    with pytest.raises(ValueError, match="has no '-'"):
        register(StageKind("to-y", version=1, config=ToyConfig, run=run_toy, resources="dataset"))
    assert "to-y" not in KINDS


def test_an_unknown_kind_is_a_user_error_with_a_suggestion():
    with pytest.raises(UserError, match=r"stage kind 'datset' is not registered \(did you mean 'dataset'\?\)"):
        stage_kind("datset")
    with pytest.raises(UserError, match="is not registered"):
        Stage("datset", {}, {})  # a stage of an unknown kind cannot even be keyed
    assert {"dataset", "ptm", "distill", "search", "external", "evaluate"} <= set(KINDS)
