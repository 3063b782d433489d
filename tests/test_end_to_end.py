"""A tiny real study through a real local Ray into a temporary SQLite MLflow."""

import math

import pytest
import yaml

pytestmark = pytest.mark.slow

SPEC = """
version: 1
name: e2e
datasets:
  - {name: cdigits, source: digits, bias: colored, aligned_ratios: [0.1], severities: [1]}
ptm_pools:
  - {name: pool, dataset: cdigits, architectures: [{name: convnet, width: 16}], seeds: [0], epochs: 2}
distillation:
  methods: [dm]
  ipc: [2]
  iterations: 5
  arch: {name: convnet, width: 16}
  batch_real: 16
  guidance: [none, {kind: clom, pool: pool, alpha: 0.1}]
evaluation:
  architectures: [{name: convnet, width: 16}, mlp]
  repeats: 2
  epochs: 30
  checkpoints: 3
"""


@pytest.fixture(scope="session")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.shutdown()  # a Ray an earlier test left connected in this process is not this session's
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_study_end_to_end(ray_session, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from orchestrator.execution.submit import submit_study
    from orchestrator.reporting.results import study_results
    from orchestrator.spec.loading import parse_spec
    from orchestrator.storage.local import ArtifactStore
    from orchestrator.storage.studies import load_record

    monkeypatch.chdir(tmp_path)
    spec = parse_spec(yaml.safe_load(SPEC))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    events = []
    first = submit_study(spec, SPEC, store_root=str(tmp_path / "store"), tracking_uri=uri, on_event=events.append)

    # 1 dataset, 1 ptm, 2 distillations, 4 evaluations, + the random subset at IPC 2 and its 2 evaluations
    assert first.state == "succeeded", first.errors
    assert first.counts["total"] == 11 and first.counts["executed"] == 11 and first.counts["cached"] == 0
    assert {e["state"] for e in events if e["type"] == "stage"} >= {"running", "executed"}

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ddray/e2e")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == first.parent_run_id]
    assert len(parents) == 1 and parents[0].info.run_id == first.parent_run_id
    assert parents[0].data.tags["ddray.spec_hash"] == spec.spec_hash()
    assert "spec.yaml" in [a.path for a in client.list_artifacts(first.parent_run_id)]
    assert len(children) == 11
    distills = [r for r in children if r.data.tags["ddray.stage_kind"] == "distill"]
    assert all("synthetic_grid.png" in [a.path for a in client.list_artifacts(r.info.run_id)] for r in distills)
    (data_run,) = [r for r in children if r.data.tags["ddray.stage_kind"] == "dataset"]
    assert {"counts.csv", "dataset_grid.png"} <= {a.path for a in client.list_artifacts(data_run.info.run_id)}
    assert data_run.data.metrics["train_aligned_total"] + data_run.data.metrics["train_conflicting_total"] == 1347
    evals = [r for r in children if r.data.tags["ddray.stage_kind"] == "evaluate"]
    assert all("per_class_accuracy.json" in [a.path for a in client.list_artifacts(r.info.run_id)] for r in evals)
    assert all(r.data.params["arch"] in ("convnet", "mlp") for r in evals)

    # numbers: finite, and above chance (10 classes) on the unbiased (p = 0.1) variant
    rows = first.results
    assert len(rows) == 4
    for row in rows:
        assert row["n_repeats"] == 2
        for k in ("acc_mean", "acc_std", "acc_unbiased", "acc_aligned", "acc_conflicting"):
            assert math.isfinite(row[k]), (k, row)
        assert row["acc_mean"] > 0.3, row
        assert math.isfinite(row["acc_random"]) and row["ior"] == row["acc_mean"] - row["acc_random"]
    assert {r["guidance"] for r in rows} == {"none", "clom:pool:a0.1"}
    assert {r["eval_protocol"] for r in rows} == {"dsa:color_crop_cutout_scale_rotate/30ep"}

    # the same spec again: nothing executes, everything is cached, no duplicate child runs
    second = submit_study(spec, SPEC, store_root=str(tmp_path / "store"), tracking_uri=uri)
    assert second.state == "succeeded"
    assert second.counts["executed"] == 0 and second.counts["cached"] == 11
    assert second.study_id == first.study_id and second.parent_run_id == first.parent_run_id
    runs_after = client.search_runs([exp.experiment_id], max_results=1000)
    assert len(runs_after) == len(runs)
    assert second.results == rows

    record = load_record(ArtifactStore(tmp_path / "store"), first.study_id)
    assert record["state"] == "succeeded" and record["attempts"] == 2
    assert study_results(ArtifactStore(tmp_path / "store"), record) == rows


def test_failed_stage_skips_dependents_and_is_reported(ray_session, tmp_path, monkeypatch):
    """A stage that raises in its Ray worker fails alone; its dependents are skipped; the study says so."""
    from orchestrator.execution.submit import submit_study
    from orchestrator.spec.loading import parse_spec

    monkeypatch.chdir(tmp_path)
    data = yaml.safe_load(SPEC)
    data["name"] = "e2e-fail"
    data["ptm_pools"] = [{"name": "experts", "dataset": "cdigits", "recipe": "expert", "epochs": 2,
                          "architectures": [{"name": "convnet", "width": 16}]}]
    data["distillation"].update(methods=["dm", "mtt"], guidance=["none"], trajectories="experts",
                                options={"mtt": {"expert_epochs": 5}})  # more epochs than the experts have
    spec = parse_spec(data)
    out = submit_study(spec, yaml.safe_dump(data), store_root=str(tmp_path / "store"),
                       tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert out.state == "failed"
    # dataset, expert, dm + its 2 evaluations, the random subset + its 2 run; mtt fails; its 2 evaluations are skipped
    assert out.counts["failed"] == 1 and out.counts["skipped"] == 2 and out.counts["executed"] == 8
    failed = [v for v in out.errors.values() if not v.startswith("input ")]
    skipped = [v for v in out.errors.values() if v.startswith("input ")]
    assert failed == ["ValueError: no expert has checkpoints e and e + 5 with e < 20"] and len(skipped) == 2


MIXED = """
version: 1
name: e2e-methods
datasets:
  - {name: digits, source: digits, bias: none}
  - {name: fmnist, source: fashion_mnist, bias: none, max_per_class: 40, distill: false}
ptm_pools:
  - {name: experts, dataset: digits, recipe: expert, architectures: [{name: convnet, width: 8}], seeds: [0], epochs: 3}
  - {name: fashion, dataset: fmnist, architectures: [{name: convnet, width: 8}, mlp], seeds: [0], epochs: 2,
     checkpoint_epochs: [1, 2]}
distillation:
  methods: [dc, mtt, random]
  ipc: [1]
  iterations: 3
  arch: {name: convnet, width: 8}
  batch_real: 16
  trajectories: experts
  options: {mtt: {syn_steps: 2, expert_epochs: 1, max_start_epoch: 2, batch_syn: 10}}
  guidance: [none, {kind: cclom, pool: fashion, alpha: {convnet-width8: 1.0, mlp: 0.5}, real_batch: 64}]
evaluation:
  architectures: [{name: convnet, width: 8}]
  repeats: 1
  epochs: 5
  checkpoints: 1
"""


def test_methods_guidance_and_trajectories_are_one_grid_away(ray_session, tmp_path, monkeypatch):
    """DC, MTT (experts from a PTM pool) and a baseline, with and without cross-domain CCLoM."""
    from distill_core.data import DatasetUnavailable, load_source
    from orchestrator.execution.submit import submit_study
    from orchestrator.spec.loading import parse_spec

    try:
        load_source("fashion_mnist", download=False)  # CI installs Debian's dataset-fashion-mnist
    except DatasetUnavailable:
        pytest.skip("Fashion-MNIST is not installed locally")
    monkeypatch.chdir(tmp_path)
    spec = parse_spec(yaml.safe_load(MIXED))
    out = submit_study(spec, MIXED, store_root=str(tmp_path / "store"), tracking_uri=f"sqlite:///{tmp_path}/m.db")
    assert out.state == "succeeded", out.errors
    # datasets: digits + fmnist (pulled in by its pool); ptm: 1 expert + 2 fashion;
    # distill: dc x2 guidance, mtt x2, random x1 (baselines take no guidance); evaluations: each set once,
    # and the random subset once more under DC's protocol (its rows' acc_random)
    assert out.counts["total"] == 2 + 3 + 5 + 6
    combos = {(r["method"], r["guidance"]) for r in out.results}
    assert combos == {("dc", "none"), ("dc", "cclom:fashion:a{convnet-width8=1,mlp=0.5}"), ("mtt", "none"),
                      ("mtt", "cclom:fashion:a{convnet-width8=1,mlp=0.5}"), ("random", "none")}
    assert all(math.isfinite(r["acc_mean"]) and r["acc_mean"] > 0.1 for r in out.results)
