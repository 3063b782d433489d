"""The scheduler without Ray: an inline executor, counted executions, real stages on tiny real data."""

from __future__ import annotations

import math
import time as clock

import pytest
import torch
from pydantic import Field

from distill_core.methods import Method, Options, register, unregister
from distill_core.methods.registry import dsa_protocol
from distill_core.sets import SyntheticSet
from orchestrator.execution.executors import InlineExecutor
from orchestrator.execution.scheduler import Scheduler
from orchestrator.execution.submit import submit_study
from orchestrator.plan.graph import build_stage_graph
from orchestrator.reporting.progress import StudyProgress
from orchestrator.spec.loading import parse_spec
from orchestrator.stages.worker import execute_stage
from orchestrator.storage.leases import Leases, Owner
from orchestrator.storage.local import ArtifactStore
from orchestrator.storage.studies import StudyLog, load_record

TINY = {
    "version": 1,
    "name": "inline",
    "datasets": [{"name": "d", "source": "digits", "bias": "colored", "aligned_ratios": [0.5]}],
    "ptm_pools": [{"name": "p", "dataset": "d", "architectures": [{"name": "convnet", "width": 8}], "epochs": 1}],
    "distillation": {"methods": ["dm", "random"], "ipc": [1], "iterations": 2, "batch_real": 8,
                     "arch": {"name": "convnet", "width": 8},
                     "guidance": ["none", {"kind": "clom", "pool": "p", "alpha": 0.1}]},
    "evaluation": {"architectures": [{"name": "convnet", "width": 8}], "repeats": 1, "epochs": 2, "checkpoints": 1},
}


def schedule(tmp_path, spec, run, cached=(), executor=None):
    """Run the whole graph through the scheduler with `run` standing in for stage execution (through
    `executor`, an InlineExecutor by default)."""
    graph = build_stage_graph(spec)
    store = ArtifactStore(tmp_path / "store")
    owner = Owner.here()
    log = StudyLog(store, spec.study_id, owner)
    log.start({"name": spec.name}, {k: {"kind": s.kind, "label": s.label, "inputs": s.input_keys,
                                        "state": "cached" if k in cached else "pending"}
                                    for k, s in graph.stages.items()})
    events, executed = [], []
    leases = Leases(store.root, owner)
    executor = executor or InlineExecutor(str(store.root), {}, run)
    scheduler = Scheduler(graph, spec.resources, store, log, leases, executor, events.append,
                          lambda key, result: (executed.append(key), leases.release(key)))
    state = scheduler.run()
    log.finish(state)
    return graph, log, executed, events, state


def test_stages_run_after_their_inputs_and_each_exactly_once(tmp_path):
    spec = parse_spec(TINY)
    order: list[str] = []

    def run(stage, root, cpus, gpus, runtime):
        order.append(stage.key)
        return {"key": stage.key, "metrics": {}}

    graph, log, executed, _, state = schedule(tmp_path, spec, run)
    assert state == "succeeded"
    assert sorted(order) == sorted(graph.stages)  # every stage, once
    position = {k: i for i, k in enumerate(order)}
    assert all(position[i] < position[k] for k, s in graph.stages.items() for i in s.input_keys)
    assert executed == order
    assert log.counts()["executed"] == len(graph.stages)
    assert not list((tmp_path / "store" / "leases").glob("*.json"))  # every lease released


def test_a_failed_stage_skips_only_its_dependents(tmp_path):
    spec = parse_spec(TINY)
    graph = build_stage_graph(spec)
    bad = graph.of_kind("ptm")[0].key

    def run(stage, root, cpus, gpus, runtime):
        if stage.key == bad:
            raise RuntimeError("boom")
        return {"key": stage.key}

    graph, log, executed, events, state = schedule(tmp_path, spec, run)
    assert state == "failed"
    states = log.states
    assert states[bad] == "failed" and bad not in executed
    guided = [s.key for s in graph.of_kind("distill") if s.config["guidance"] is not None]
    assert all(states[k] == "skipped" for k in guided)
    assert all(states[d] == "skipped" for k in guided for d in graph.dependents(k))
    assert sum(v == "executed" for v in states.values()) == len(graph.stages) - 1 - 2 * len(guided)
    assert log.errors[bad] == "RuntimeError: boom"
    record = load_record(ArtifactStore(tmp_path / "store"), spec.study_id)  # the same, read back from the log
    assert {k: v["state"] for k, v in record["stages"].items()} == states and record["state"] == "failed"


def test_cached_stages_are_not_run(tmp_path):
    spec = parse_spec(TINY)
    graph = build_stage_graph(spec)
    cached = {s.key for s in graph.of_kind("dataset")} | {s.key for s in graph.of_kind("ptm")}
    ran = []
    _, _, _, _, state = schedule(tmp_path, spec, lambda s, *a: ran.append(s.key) or {"key": s.key}, cached)
    assert state == "succeeded" and not (set(ran) & cached) and len(ran) == len(graph.stages) - len(cached)


# --- a method defined here, run through validate -> graph -> stage -----------------------------

class ShiftOptions(Options):
    shift: float = Field(default=0.0, ge=-10, le=10)


def distill_shifted(real, cfg, runtime=None, guidance=None, experts=None, progress=None) -> SyntheticSet:
    """The first IPC images of each class, shifted by `shift` (a method is one function and a record)."""
    opts: ShiftOptions = cfg.options
    index = torch.cat([idx[:cfg.ipc] for idx in real.class_index])
    syn = SyntheticSet(real.images[index] + opts.shift, real.labels[index], real.norm)
    for it in range(cfg.iterations):
        syn.history.append({"iteration": it, "loss_shift": float(opts.shift)})
    return syn


@pytest.fixture
def shifted_method():
    method = register(Method(name="shifted", distill=distill_shifted, iterations=3, lr_img=1.0, init="real",
                             augment=False, evaluation=dsa_protocol, options=ShiftOptions,
                             summary="test method"))
    try:
        yield method
    finally:
        unregister("shifted")


def test_a_registered_method_runs_through_validate_graph_and_stage(tmp_path, shifted_method):
    data = {**TINY, "ptm_pools": [], "distillation": {
        "methods": ["shifted"], "ipc": [2], "arch": {"name": "convnet", "width": 8},
        "options": {"shifted": {"shift": [0.0, 0.5]}}}}
    spec = parse_spec(data)
    graph = build_stage_graph(spec)
    distills = [s for s in graph.of_kind("distill") if s.coords["method"] == "shifted"]
    assert sorted(s.config["options"]["shift"] for s in distills) == [0.0, 0.5]
    assert all(s.config["iterations"] == 3 for s in distills)  # the record's default budget
    root = str(tmp_path / "store")
    for stage in graph.stages.values():
        result = execute_stage(stage, root, 1, 0, {})
        if stage.kind == "distill" and stage.coords["method"] == "shifted":
            assert result["metrics"]["final_loss_shift"] == stage.config["options"]["shift"]
        if stage.kind == "evaluate":
            assert 0.0 <= result["summary"]["acc_mean"] <= 1.0
    with pytest.raises(Exception, match="shift"):
        parse_spec({**data, "distillation": {**data["distillation"], "options": {"shifted": {"shift": 99}}}})


def test_submit_study_inline_end_to_end(tmp_path, monkeypatch):
    """Real stages on real digits through the scheduler, SQLite MLflow, no Ray; resubmit is all cached."""
    monkeypatch.chdir(tmp_path)
    spec = parse_spec(TINY)
    kwargs = dict(store_root=str(tmp_path / "store"), tracking_uri=f"sqlite:///{tmp_path}/m.db",
                  executor=InlineExecutor)
    events = []
    first = submit_study(spec, "spec", on_event=events.append, **kwargs)
    assert first.state == "succeeded", first.errors
    assert first.counts["executed"] == first.counts["total"] == 1 + 1 + 3 + 3
    # the start event holds counts per kind (its size does not grow with the study); stage events name
    # their stage, so a follower of the job log rebuilds the live view from events alone
    (start,) = [e for e in events if e["type"] == "start"]
    assert "stages" not in start and sum(sum(v.values()) for v in start["counts"].values()) == 8
    assert start["counts"]["evaluate"]["pending"] == 3
    progress = StudyProgress()
    for e in events:
        if e["type"] == "start":
            progress.start(e["counts"])
        elif e["type"] == "stage":
            assert {"kind", "label"} <= set(e)
            progress.stage(e["key"], e["state"], e.get("run_s"), e["kind"], e["label"])
    assert progress.state_counts() == first.counts and progress.finished() == 8
    rows = first.results
    assert {(r["method"], r["guidance"]) for r in rows} == {("dm", "none"), ("dm", "clom:p:a0.1"), ("random", "none")}
    assert all(math.isfinite(r["acc_mean"]) and r["n_distillations"] == 1 for r in rows)
    assert {r["eval_protocol"] for r in rows} == {"dsa:color_crop_cutout_scale_rotate/2ep"}
    second = submit_study(spec, "spec", **kwargs)
    assert second.counts["cached"] == second.counts["total"] and second.results == rows


class NodeMissing(InlineExecutor):
    """Holds evaluations back for `hold` seconds, as a cluster without a node for them would: nothing finishes."""

    def __init__(self, *args, hold: float):
        super().__init__(*args)
        self.until = None
        self.hold = hold

    def next_done(self, timeout):
        if self.queue and all(stage.kind == "evaluate" for stage, _ in self.queue):
            self.until = self.until or clock.time() + self.hold
            if clock.time() < self.until:
                clock.sleep(timeout)
                return None
        return super().next_done(timeout)

    def why_pending(self, resources):
        return "no node has 1 CPU free"


def test_a_stage_that_cannot_start_while_nothing_finishes_is_reported_and_a_moving_queue_is_not(tmp_path):
    spec = parse_spec({**TINY, "resources": {"evaluate": {"pending_warning_s": 0.5}}})

    def run(stage, root, cpus, gpus, runtime):
        if stage.kind == "evaluate":
            clock.sleep(0.3)  # a queue behind the study's own stages: each waits longer than 0.5 s in all
        return {"key": stage.key}

    def warnings(events):
        return [e["message"] for e in events if e["type"] == "warning"]

    stuck = NodeMissing(str(tmp_path / "a" / "store"), {}, run, hold=2.5)
    *_, events, state = schedule(tmp_path / "a", spec, run, executor=stuck)
    assert state == "succeeded"
    assert any("has waited" in w and "to start: no node has 1 CPU free" in w for w in warnings(events)), events
    *_, events, state = schedule(tmp_path / "b", spec, run)
    assert state == "succeeded" and not [w for w in warnings(events) if "has waited" in w], events


def test_ready_stages_start_longest_remaining_path_first(tmp_path):
    from orchestrator.execution.scheduler import heights

    spec = parse_spec(TINY)
    graph = build_stage_graph(spec)
    h = heights(graph)
    ptm = graph.of_kind("ptm")[0].key
    unguided = next(s.key for s in graph.of_kind("distill") if s.config["guidance"] is None)
    assert h[ptm] == 3 and h[unguided] == 2 and all(h[s.key] == 1 for s in graph.of_kind("evaluate"))
    order: list[str] = []
    schedule(tmp_path, spec, lambda stage, *a: order.append(stage.key) or {"key": stage.key})
    # the PTM (a guided distillation and its evaluation wait for it) starts before the unguided distillation
    assert order.index(ptm) < order.index(unguided)


def test_mlflow_runs_carry_curves_lineage_and_grouping_tags(tmp_path, monkeypatch):
    """Distillation loss by iteration, PTM training by epoch, evaluation val accuracy by checked epoch (with
    val selection, which holds a split out); each stage's stored inputs as MLflow datasets (digest = the
    stored sha256); coordinates as tags."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    data = {**TINY, "distillation": {**TINY["distillation"], "iterations": 12, "log_every": 5},
            "evaluation": {**TINY["evaluation"], "epochs": 4, "checkpoints": 2, "selection": "val"}}
    spec = parse_spec(data)
    uri = f"sqlite:///{tmp_path}/m.db"
    assert submit_study(spec, "spec", store_root=str(tmp_path / "store"), tracking_uri=uri,
                        executor=InlineExecutor).state == "succeeded"
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ddray/inline").experiment_id])
    by_kind = {}
    for r in runs:
        by_kind.setdefault(r.data.tags.get("ddray.stage_kind"), []).append(r)
    dm = next(r for r in by_kind["distill"] if r.data.tags["ddray.method"] == "dm")
    assert [m.step for m in client.get_metric_history(dm.info.run_id, "loss_dm")] == [0, 5, 10, 11]
    ptm = by_kind["ptm"][0]
    assert [m.step for m in client.get_metric_history(ptm.info.run_id, "train_loss")] == [0, 1]  # epochs 0..E
    ev = by_kind["evaluate"][0]
    assert sorted(m.step for m in client.get_metric_history(ev.info.run_id, "val_acc")) == [2, 4]
    store = ArtifactStore(tmp_path / "store")
    (dataset_key,) = store.stage_keys("dataset")
    digest = store.manifest("dataset", dataset_key)["files"]["dataset.pt"]["sha256"][:36]
    inputs = {i.dataset.digest: i for i in ev.inputs.dataset_inputs}
    assert digest in inputs and inputs[digest].dataset.name == "d[p=0.5,s=1]"
    assert {t.value for i in ev.inputs.dataset_inputs for t in i.tags} == {"dataset", "synthetic"}
    for tag in ("ddray.method", "ddray.ipc", "ddray.guidance", "ddray.dataset", "ddray.eval_arch"):
        assert tag in ev.data.tags
