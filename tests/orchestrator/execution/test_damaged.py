"""Damaged data is rebuilt, never fatal: a finished leaf (an evaluation, which no stage reads) whose stored
result no longer matches its checksum is verified by the next submit, set aside and rebuilt, and
`results` on the damaged store says which stages are damaged in one line."""

from __future__ import annotations

import pytest

from orchestrator.errors import UserError
from orchestrator.execution.executors import InlineExecutor
from orchestrator.execution.submit import submit_study
from orchestrator.plan.graph import build_stage_graph
from orchestrator.reporting.results import evaluation_results, study_results
from orchestrator.spec.loading import parse_spec
from orchestrator.storage.local import ArtifactStore
from orchestrator.storage.studies import load_record

SMALL = {  # dataset -> the random subset -> one evaluation: three stages, seconds on a CPU
    "version": 1,
    "name": "damaged",
    "datasets": [{"name": "d", "source": "digits", "bias": "colored", "aligned_ratios": [0.5]}],
    "distillation": {"methods": ["random"], "ipc": [1], "arch": {"name": "convnet", "width": 8}},
    "evaluation": {"architectures": [{"name": "convnet", "width": 8}], "repeats": 1, "epochs": 2, "checkpoints": 1},
}


def flip_one_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the checksum tells
    path.write_bytes(bytes(data))


def damaged_study(tmp_path):
    """A finished study whose evaluation's result.json has one byte flipped: (spec, store, that stage,
    the first outcome, submit's keyword arguments)."""
    spec = parse_spec(SMALL)
    kwargs = {"store_root": str(tmp_path / "store"), "tracking_uri": f"sqlite:///{tmp_path}/m.db",
              "executor": InlineExecutor}
    first = submit_study(spec, "spec", **kwargs)
    assert first.state == "succeeded", first.errors
    store = ArtifactStore(tmp_path / "store")
    [leaf] = build_stage_graph(spec).of_kind("evaluate")
    flip_one_byte(store.path("evaluate", leaf.key, "result.json"))
    assert store.is_complete("evaluate", leaf.key)  # by sizes it still looks cached
    assert not store.is_complete("evaluate", leaf.key, full=True)
    return spec, store, leaf, first, kwargs


def test_a_damaged_leaf_is_named_in_one_line_by_results_not_an_internal_error(tmp_path):
    spec, store, leaf, _, _ = damaged_study(tmp_path)
    record = load_record(store, spec.study_id)
    with pytest.raises(UserError) as exc:
        study_results(store, record)
    assert len(exc.value.lines) == 1
    line = exc.value.lines[0]
    assert leaf.label in line and "damaged" in line and "resubmit" in line and spec.study_id in line
    with pytest.raises(UserError):  # the report's and the claims' reading too
        evaluation_results(store, record)


def test_a_damaged_finished_leaf_is_rebuilt_by_the_next_submit(tmp_path):
    spec, store, leaf, first, kwargs = damaged_study(tmp_path)
    graph = build_stage_graph(spec)
    assert {k: store.attempts(k) for k in graph.stages} == dict.fromkeys(graph.stages, 1)
    second = submit_study(spec, "spec", **kwargs)
    assert second.state == "succeeded", second.errors
    # only the damaged leaf ran again; its inputs were read from the store
    assert {k: store.attempts(k) for k in graph.stages} == {**dict.fromkeys(graph.stages, 1), leaf.key: 2}
    assert second.counts["executed"] == 1 and second.counts["cached"] == len(graph.stages) - 1
    assert store.is_complete("evaluate", leaf.key, full=True)
    assert len(list((tmp_path / "store" / "quarantine").iterdir())) == 1  # the damaged copy, kept aside
    assert [r["method"] for r in second.results] == [r["method"] for r in first.results]
    assert study_results(store, load_record(store, spec.study_id)) == second.results  # results work again
    third = submit_study(spec, "spec", **kwargs)  # nothing damaged: nothing runs
    assert third.counts["cached"] == len(graph.stages) and store.attempts(leaf.key) == 2


def test_a_damaged_leaf_is_set_aside_only_under_its_lease(tmp_path):
    """Another live driver holds the damaged leaf's lease (it is rebuilding it): the resubmit's check
    leaves it alone; once the lease is free, the check sets it aside (and the scheduler rebuilds it)."""
    import os

    from orchestrator.execution.submit import quarantine_damaged
    from orchestrator.storage.leases import Leases, Owner

    spec, store, leaf, _, _ = damaged_study(tmp_path)
    graph = build_stage_graph(spec)
    other = Leases(store.root, Owner("other-driver", "elsewhere", os.getpid(), "elsewhere.0000000000"))
    assert other.acquire(leaf.key)
    mine = Leases(store.root, Owner.here())
    quarantine_damaged(store, graph, [leaf.key], mine)
    assert store.exists("evaluate", leaf.key), "set aside a stage another driver holds"
    other.release(leaf.key)
    quarantine_damaged(store, graph, [leaf.key], mine)
    assert not store.exists("evaluate", leaf.key) and not mine.held
