"""The scheduler over a small hand-made graph, with an inline executor and a counting stage runner (no Ray).

The graph is a diamond's worth of stages, built as `plan` builds them (a key hashes kind, version, config and
inputs): one dataset, two distillations of it (a, b), one evaluation of each. The runner stands in for a
worker: it records an attempt and publishes the stage in the store as `finish_stage` does, so "complete in
the store" means what it means in a real study. The scheduler is constructed as `execution.submit` does.
"""

from __future__ import annotations

import os

import pytest

from orchestrator.execution import scheduler as scheduler_module
from orchestrator.execution.executors import InlineExecutor
from orchestrator.execution.scheduler import Scheduler
from orchestrator.plan.graph import StageGraph
from orchestrator.spec.models import ResourcesSpec
from orchestrator.stages.base import Stage
from orchestrator.storage.files import HOST, PLACE
from orchestrator.storage.leases import Leases, Owner
from orchestrator.storage.local import ArtifactStore
from orchestrator.storage.studies import StudyLog, load_record

STUDY = "sched-test"


def diamond() -> tuple[StageGraph, dict[str, str]]:
    """dataset -> distill a, distill b -> evaluate a, evaluate b; returns the graph and name -> key."""
    g = StageGraph()
    data = g.add(Stage("dataset", {"name": "d"}, {}, "data"))
    a = g.add(Stage("distill", {"name": "a"}, {"dataset": data.key}, "distill a"))
    b = g.add(Stage("distill", {"name": "b"}, {"dataset": data.key}, "distill b"))
    ea = g.add(Stage("evaluate", {"name": "ea"}, {"synthetic": a.key, "dataset": data.key}, "eval a"))
    eb = g.add(Stage("evaluate", {"name": "eb"}, {"synthetic": b.key, "dataset": data.key}, "eval b"))
    return g, {"data": data.key, "a": a.key, "b": b.key, "ea": ea.key, "eb": eb.key}


def publish(store: ArtifactStore, stage: Stage) -> dict:
    """What a finished stage leaves in the store: its files and manifest, written atomically."""
    result = {"key": stage.key, "kind": stage.kind, "label": stage.label, "metrics": {"value": 1.0}}
    store.write_stage(stage.kind, stage.key, {"result.json": repr(result).encode()}, {})
    return result


class Counting:
    """A stage runner that counts its calls per key, records an attempt, publishes the stage,
    and raises for the keys in `fail`."""

    def __init__(self, fail=()):
        self.calls: list[str] = []
        self.fail = set(fail)

    def __call__(self, stage, store_root, cpus, gpus, runtime):
        self.calls.append(stage.key)
        store = ArtifactStore(store_root)
        store.record_attempt(stage.key)
        if stage.key in self.fail:
            raise RuntimeError(f"boom in {stage.label}")
        return publish(store, stage)


def run_scheduler(store: ArtifactStore, graph: StageGraph, runner, owner: Owner | None = None, on_event=None):
    """Scheduler over `graph` as `submit_study` builds it: a StudyLog, this driver's Leases, an executor,
    and an on_executed that releases the lease (as tracking does once a run is logged)."""
    owner = owner or Owner.here()
    log = StudyLog(store, STUDY, owner)
    log.start({"name": STUDY}, {k: {"kind": s.kind, "label": s.label, "inputs": s.input_keys, "state": "pending"}
                                for k, s in graph.stages.items()})
    leases = Leases(store.root, owner)
    events: list[dict] = []
    executed: list[str] = []
    executor = InlineExecutor(str(store.root), {}, runner)

    def emit(event):
        events.append(event)
        if on_event is not None:
            on_event(event, scheduler)

    scheduler = Scheduler(graph, ResourcesSpec(), store, log, leases, executor, emit,
                          lambda key, result: (executed.append(key), leases.release(key)))
    state = scheduler.run()
    log.finish(state)
    return state, log, events, executed


def lease_files(store: ArtifactStore) -> list:
    return sorted((store.root / "leases").glob("*.json"))


@pytest.fixture(autouse=True)
def fast_poll(monkeypatch):
    """The scheduler polls blocked stages once a second; a tenth of that keeps the lease tests short."""
    monkeypatch.setattr(scheduler_module, "POLL_S", 0.1)


def test_stages_run_once_each_after_their_inputs(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    graph, k = diamond()
    runner = Counting()
    state, log, events, executed = run_scheduler(store, graph, runner)
    assert state == "succeeded"
    assert sorted(runner.calls) == sorted(graph.stages)  # each stage exactly once
    assert runner.calls[0] == k["data"]
    pos = {key: i for i, key in enumerate(runner.calls)}
    for key, stage in graph.stages.items():
        assert all(pos[i] < pos[key] for i in stage.input_keys), stage.label
    assert executed == runner.calls
    assert set(log.states.values()) == {"executed"}
    assert all(store.is_complete(s.kind, key, full=True) and store.attempts(key) == 1
               for key, s in graph.stages.items())
    # each stage went running -> executed, in that order, in the events
    for key in graph.stages:
        assert [e["state"] for e in events if e.get("key") == key] == ["running", "executed"]
    assert not lease_files(store)  # every lease released
    record = load_record(store, STUDY)  # the log on disk says the same
    assert {key: st["state"] for key, st in record["stages"].items()} == log.states


def test_a_stage_already_in_the_store_is_reused_not_run_again(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    graph, k = diamond()
    publish(store, graph.stages[k["data"]])  # another submit published it meanwhile
    runner = Counting()
    state, log, _, executed = run_scheduler(store, graph, runner)
    assert state == "succeeded"
    assert log.states[k["data"]] == "reused" and k["data"] not in runner.calls
    assert store.attempts(k["data"]) == 0
    assert sorted(runner.calls) == sorted(set(graph.stages) - {k["data"]})

    # a second submit of the same graph computes nothing: every stage is reused
    again = Counting()
    state, log, _, executed = run_scheduler(store, graph, again)
    assert state == "succeeded" and again.calls == [] and executed == []
    assert set(log.states.values()) == {"reused"}
    assert all(store.attempts(key) == (key != k["data"]) for key in graph.stages)  # one execution each, ever


def test_a_truncated_stored_stage_is_set_aside_and_rebuilt_not_reused(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    graph, k = diamond()
    path = publish(store, graph.stages[k["a"]]) and store.path("distill", k["a"], "result.json")
    path.write_bytes(path.read_bytes()[:5])  # truncated: the quick check (sizes) sees it
    runner = Counting()
    state, log, events, _ = run_scheduler(store, graph, runner)
    assert state == "succeeded" and runner.calls.count(k["a"]) == 1 and log.states[k["a"]] == "executed"
    assert store.is_complete("distill", k["a"], full=True)
    assert any("damaged" in e.get("message", "") for e in events if e["type"] == "warning")
    assert list((store.root / "quarantine").iterdir())  # the damaged copy is set aside, not deleted


def test_a_failing_stage_fails_and_only_its_dependents_are_skipped(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    graph, k = diamond()
    runner = Counting(fail={k["a"]})
    state, log, events, executed = run_scheduler(store, graph, runner)
    assert state == "failed"
    assert log.states == {k["data"]: "executed", k["a"]: "failed", k["b"]: "executed",
                          k["ea"]: "skipped", k["eb"]: "executed"}
    assert runner.calls.count(k["a"]) == 1 and k["ea"] not in runner.calls  # a skipped stage never runs
    assert k["a"] not in executed
    assert log.errors[k["a"]] == "RuntimeError: boom in distill a"
    assert log.errors[k["ea"]] == "input distill a failed"
    assert not store.exists("distill", k["a"])
    failed = next(e for e in events if e.get("key") == k["a"] and e["state"] == "failed")
    assert failed["attempts"] == 1
    assert not lease_files(store)  # the failed stage's lease is released too


def other_driver() -> Owner:
    """Another live driver (this process's pid on this host, so it counts as alive; another driver id)."""
    return Owner("other-driver", HOST, os.getpid())


def when_the_rest_is_done(graph, k, then):
    """An event hook: once every stage outside distill a's branch has executed, check that `a` waits on the
    other driver's lease without having run, then let the other driver `then(scheduler)`."""
    rest = set(graph.stages) - {k["a"], k["ea"]}
    seen: set[str] = set()

    def hook(event, scheduler):
        if event.get("type") == "stage" and event["state"] == "executed":
            seen.add(event["key"])
            if seen == rest:
                assert k["a"] in scheduler.blocked and scheduler.log.states[k["a"]] == "pending"
                assert scheduler.log.states[k["ea"]] == "pending"
                then(scheduler)
    return hook


def test_a_stage_leased_by_another_live_driver_is_not_run_and_is_reused_once_it_publishes(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    graph, k = diamond()
    theirs = Leases(store.root, other_driver())
    assert theirs.acquire(k["a"])
    released = []

    def they_finish(scheduler):
        publish(store, graph.stages[k["a"]])
        theirs.release(k["a"])
        released.append(True)

    runner = Counting()
    state, log, _, executed = run_scheduler(store, graph, runner, on_event=when_the_rest_is_done(graph, k, they_finish))
    assert k["a"] not in executed
    assert released, "the other driver never finished: the hook did not fire"
    assert state == "succeeded"
    assert k["a"] not in runner.calls and store.attempts(k["a"]) == 0  # computed once, by the other driver
    assert log.states[k["a"]] == "reused" and log.states[k["ea"]] == "executed"
    assert runner.calls.count(k["ea"]) == 1


def test_a_stage_whose_lease_falls_free_unpublished_is_computed_here(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    graph, k = diamond()
    theirs = Leases(store.root, other_driver())
    assert theirs.acquire(k["a"])
    runner = Counting()

    def they_give_up(scheduler):
        assert k["a"] not in runner.calls  # blocked: not run while the other driver holds it
        theirs.release(k["a"])

    state, log, _, _ = run_scheduler(store, graph, runner, on_event=when_the_rest_is_done(graph, k, they_give_up))
    assert state == "succeeded"
    assert runner.calls.count(k["a"]) == 1 and log.states[k["a"]] == "executed"
    assert runner.calls.index(k["a"]) < runner.calls.index(k["ea"])
    assert not lease_files(store)


def test_a_stage_whose_lease_is_held_by_a_dead_driver_is_taken_over(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    graph, k = diamond()
    dead = Owner("dead-driver", HOST, 2**22 + 12345, PLACE)  # no such process on this host
    assert not dead.alive()
    assert Leases(store.root, dead).acquire(k["a"])
    runner = Counting()
    state, log, _, _ = run_scheduler(store, graph, runner)
    assert state == "succeeded" and runner.calls.count(k["a"]) == 1 and log.states[k["a"]] == "executed"
