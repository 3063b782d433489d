"""The weights kind: computed once per (variant, debias entry), shared by key, read by the distillations."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from pydantic import Field

from distill_core.debias import DebiasKind, scale_per_class
from distill_core.debias import register as register_debias
from distill_core.debias import unregister as unregister_debias
from distill_core.methods import Options
from orchestrator.execution.executors import InlineExecutor
from orchestrator.execution.submit import submit_study
from orchestrator.plan.graph import build_stage_graph
from orchestrator.spec.loading import parse_spec
from orchestrator.stages import KINDS
from orchestrator.stages.worker import execute_stage
from orchestrator.storage.local import ArtifactStore

WIDTH8 = {"name": "convnet", "width": 8}
DEBIASED = {
    "version": 1,
    "name": "debiased",
    "datasets": [{"name": "d", "source": "digits", "bias": "colored", "aligned_ratios": [0.9], "max_per_class": 60}],
    "ptm_pools": [{"name": "lffp", "dataset": "d", "architectures": [WIDTH8], "recipe": "lff", "epochs": 8,
                   "lr": 0.05, "batch_size": 32}],  # long enough for the bias model to learn the colour
    "distillation": {"methods": ["dm", "dc"], "ipc": [1, 2], "iterations": 2, "batch_real": 8, "arch": WIDTH8,
                     "options": {"dc": {"outer_loop": 1, "inner_loop": 1}},
                     "debias": ["none", "kde", "groups", {"kind": "lff", "pool": "lffp"}]},
    "evaluation": {"architectures": [WIDTH8], "repeats": 1, "epochs": 2, "checkpoints": 1, "random_baseline": False},
}


@pytest.fixture
def counted(monkeypatch):
    """Every stage kind's runner wrapped to count its executions by key."""
    runs: dict[str, int] = {}
    for name, kind in list(KINDS.items()):
        def run(stage, store, runtime, inner=kind.run):
            runs[stage.key] = runs.get(stage.key, 0) + 1
            return inner(stage, store, runtime)
        monkeypatch.setitem(KINDS, name, dataclasses.replace(kind, run=run))
    return runs


def test_weights_are_computed_once_and_shared_by_every_distillation_that_reads_them(tmp_path, monkeypatch, counted):
    monkeypatch.chdir(tmp_path)
    spec = parse_spec(DEBIASED)
    graph = build_stage_graph(spec)
    kwargs = dict(store_root=str(tmp_path / "store"), tracking_uri=f"sqlite:///{tmp_path}/m.db",
                  executor=InlineExecutor)
    first = submit_study(spec, "spec", **kwargs)
    assert first.state == "succeeded", first.errors
    weights = graph.of_kind("weights")
    assert len(weights) == 3  # kde, groups, lff on the one variant
    assert all(counted[w.key] == 1 for w in weights) and set(counted) == set(graph.stages)
    assert all(n == 1 for n in counted.values())
    for w in weights:  # each read by both methods at both IPCs
        assert len([s for s in graph.of_kind("distill") if s.inputs.get("weights") == w.key]) == 4

    store = ArtifactStore(tmp_path / "store")
    n = len(store.read_tensors("dataset", graph.of_kind("dataset")[0].key, "dataset.pt")["val_index"])
    for w in weights:
        result = store.read_json("weights", w.key, "result.json")
        stored = store.read_tensors("weights", w.key, "weights.pt")["weights"]
        assert stored.dtype == torch.float32 and bool((stored > 0).all()) and float(stored.max()) == 1.0
        m = result["metrics"]
        assert 0 < m["conflicting_fraction"] < 0.2  # aligned ratio 0.9 (per-class rounding)
        # every kind here gives the conflicting samples more than their share of the weight
        assert m["conflicting_weight_share"] > m["conflicting_fraction"], (w.config["kind"], m)
        assert "weights_histogram.png" in result["artifacts"]
    assert n == 0  # no held-out split: the weights cover the whole train split

    rows = first.results
    assert {(r["method"], r["debias"], r["debias_oracle"]) for r in rows} == {
        (m, d, d == "groups") for m in ("dm", "dc") for d in ("none", "kde", "groups", "lff:lffp")}
    assert all(math.isfinite(r["acc_mean"]) for r in rows)

    # one FINISHED MLflow run per weights stage, with the histogram and the conflicting share
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    experiment = client.get_experiment_by_name("ddray/debiased").experiment_id
    runs = client.search_runs([experiment], "tags.`ddray.stage_kind` = 'weights'")
    assert sorted(r.data.tags["ddray.stage_key"] for r in runs) == sorted(w.key for w in weights)
    for r in runs:
        assert r.info.status == "FINISHED" and "conflicting_weight_share" in r.data.metrics
        assert "weights_histogram.png" in {a.path for a in client.list_artifacts(r.info.run_id)}

    counted.clear()
    second = submit_study(spec, "spec", **kwargs)  # all stored: nothing runs again
    assert second.counts["cached"] == second.counts["total"] and counted == {}


def test_a_weighted_distillation_reads_its_weights_and_an_unweighted_one_is_unchanged(tmp_path, monkeypatch):
    """The unweighted distillation's key and stored set are those of a study without a debias axis."""
    monkeypatch.chdir(tmp_path)
    plain = {**DEBIASED, "ptm_pools": [], "distillation": {**DEBIASED["distillation"], "methods": ["dm"], "ipc": [1],
                                                            "options": {}, "debias": ["none"]}}
    weighted = {**plain, "distillation": {**plain["distillation"], "debias": ["none", "groups"]}}
    a, b = build_stage_graph(parse_spec(plain)), build_stage_graph(parse_spec(weighted))
    (none_a,) = a.of_kind("distill")
    none_b, groups_b = sorted(b.of_kind("distill"), key=lambda s: "weights" in s.inputs)
    assert none_a.key == none_b.key and "weights" in groups_b.inputs
    kwargs = dict(store_root=str(tmp_path / "store"), tracking_uri=f"sqlite:///{tmp_path}/m.db",
                  executor=InlineExecutor)
    assert submit_study(parse_spec(weighted), "spec", **kwargs).state == "succeeded"
    store = ArtifactStore(tmp_path / "store")
    sets = {s.key: store.read_tensors("distill", s.key, "synthetic.pt")["images"] for s in (none_b, groups_b)}
    assert not torch.equal(sets[none_b.key], sets[groups_b.key])  # the weights moved the real means


def test_a_pool_trained_on_reweighted_data_shares_the_distillations_weights_stage(tmp_path, monkeypatch, counted):
    monkeypatch.chdir(tmp_path)
    data = {**DEBIASED,
            "ptm_pools": [{"name": "fair", "dataset": "d", "architectures": [WIDTH8], "epochs": 2, "debias": "groups"}],
            "distillation": {**DEBIASED["distillation"], "methods": ["dm"], "ipc": [1], "options": {},
                             "debias": ["none", "groups"],
                             "guidance": ["none", {"kind": "clom", "pool": "fair", "alpha": 0.1}]}}
    spec = parse_spec(data)
    graph = build_stage_graph(spec)
    (weights,) = graph.of_kind("weights")
    (ptm,) = graph.of_kind("ptm")
    assert ptm.inputs["weights"] == weights.key
    result = submit_study(spec, "spec", store_root=str(tmp_path / "store"), tracking_uri=f"sqlite:///{tmp_path}/m.db",
                          executor=InlineExecutor)
    assert result.state == "succeeded", result.errors
    assert counted[weights.key] == 1 and all(n == 1 for n in counted.values())
    assert len([s for s in graph.of_kind("distill") if s.inputs.get("weights") == weights.key]) == 2


# --- a debias kind defined here, run through validate -> graph -> stage ------------------------

class HalfOptions(Options):
    factor: float = Field(default=0.5, gt=0, le=1)


def halve_one_sample(images, labels, num_classes, options, attributes=None, embed=None, scores=None):
    """Class 1's first sample weighs `factor`, every other sample 1.0 (a kind is one function and a record)."""
    w = torch.ones(len(labels))
    w[torch.nonzero(labels == 1)[0]] = options.factor
    return scale_per_class(w, labels, num_classes)


@pytest.fixture
def half_kind():
    kind = register_debias(DebiasKind(name="half", options=HalfOptions, weights=halve_one_sample, summary="test"))
    try:
        yield kind
    finally:
        unregister_debias("half")


def test_a_registered_debias_kind_runs_through_validate_graph_and_stage(tmp_path, half_kind):
    data = {**DEBIASED, "ptm_pools": [], "distillation": {**DEBIASED["distillation"], "methods": ["dm"], "ipc": [1],
                                                            "options": {}, "debias": [{"kind": "half", "factor": 0.25}]}}
    spec = parse_spec(data)
    graph = build_stage_graph(spec)
    (weights,) = graph.of_kind("weights")
    assert weights.config == {"kind": "half", "options": {"factor": 0.25}}
    root = str(tmp_path / "store")
    for stage in graph.stages.values():
        execute_stage(stage, root, 1, 0, {})
    stored = ArtifactStore(root).read_tensors("weights", weights.key, "weights.pt")["weights"]
    assert sorted(set(stored.tolist())) == [0.25, 1.0] and int((stored == 0.25).sum()) == 1
    with pytest.raises(Exception, match="factor"):  # its options are typed by its own model
        parse_spec({**data, "distillation": {**data["distillation"], "debias": [{"kind": "half", "factor": 2}]}})
