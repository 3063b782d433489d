"""Each stage runner on a tiny real study (scikit-learn's digits, coloured): dataset -> distill (DM) ->
evaluate, run in this process through the worker entry point, one after another as a scheduler would.
What is checked is what the driver relies on: result.json's fields, finite metrics, every listed artifact
stored, a manifest whose checksums verify, one attempt per execution."""

from __future__ import annotations

import json
import math

import pytest
import torch

from orchestrator.plan.graph import build_stage_graph
from orchestrator.spec.loading import parse_spec
from orchestrator.stages.common import RESULT, load_dataset, load_synthetic
from orchestrator.stages.worker import execute_stage
from orchestrator.storage.files import CorruptArtifact
from orchestrator.storage.local import ArtifactStore

TINY = {
    "version": 1,
    "name": "runners",
    "datasets": [{"name": "d", "source": "digits", "bias": "colored", "aligned_ratios": [0.5]}],
    "distillation": {"methods": ["dm"], "ipc": [2], "iterations": 3, "batch_real": 8,
                     "arch": {"name": "convnet", "width": 8}},
    "evaluation": {"architectures": [{"name": "convnet", "width": 8}], "repeats": 1, "epochs": 2,
                   "checkpoints": 1, "random_baseline": False},
}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The graph and its stages run in order, each once: (store, {kind: (stage, returned result)})."""
    graph = build_stage_graph(parse_spec(TINY))
    counts = graph.counts()
    assert (counts["dataset"], counts["distill"], counts["evaluate"]) == (1, 1, 1) and sum(counts.values()) == 3
    root = str(tmp_path_factory.mktemp("runners") / "store")
    threads = torch.get_num_threads()
    try:
        done = {s.kind: (s, execute_stage(s, root, 1, 0, {})) for s in graph.stages.values()}
    finally:
        torch.set_num_threads(threads)  # execute_stage sets the process's threads from the task's CPUs
    return ArtifactStore(root), done


def stored_result(store, stage) -> dict:
    return store.read_json(stage.kind, stage.key, RESULT)  # checksummed on read


@pytest.mark.parametrize("kind", ["dataset", "distill", "evaluate"])
def test_each_stage_is_stored_whole_with_its_result(study, kind):
    store, done = study
    stage, returned = done[kind]
    result = stored_result(store, stage)
    # what the worker hands the driver is what the store holds (compared as JSON: a summary may hold NaN)
    assert json.dumps(result, sort_keys=True) == json.dumps(returned, sort_keys=True, default=float)
    assert (result["key"], result["kind"], result["label"]) == (stage.key, kind, stage.label)
    assert result["config"] == stage.config and result["inputs"] == stage.inputs and result["coords"] == stage.coords
    assert result["metrics"] and all(isinstance(v, float) and math.isfinite(v) for v in result["metrics"].values())
    assert result["metrics"]["wall_seconds"] > 0
    assert result["run"]["device"] == "cpu" and result["run"]["cpus"] == 1 and result["run"]["attempt"]
    manifest = store.manifest(kind, stage.key)
    assert set(result["artifacts"]) | {RESULT} <= set(manifest["files"])  # every artifact it lists is stored
    for name in result["artifacts"]:
        assert store.path(kind, stage.key, name).stat().st_size == manifest["files"][name]["bytes"] > 0
    assert store.verify(kind, stage.key, full=True) == [] and store.is_complete(kind, stage.key, full=True)
    assert store.attempts(stage.key) == 1
    assert stage.key in store.stage_keys(kind)


def test_the_dataset_stage_counts_the_real_split(study):
    store, done = study
    stage, result = done["dataset"]
    m = result["metrics"]
    assert m["train_aligned_total"] + m["train_conflicting_total"] == 1347  # digits' training split
    assert m["val_size"] == 0.0  # no held-out split unless a stage reads one
    assert result["dataset_meta"]["source_checksum"]
    counts = store.read_json("dataset", stage.key, "counts.json")
    assert sum(counts["train_aligned"]) == m["train_aligned_total"]
    assert store.read_bytes("dataset", stage.key, "dataset_grid.png")[:4] == b"\x89PNG"
    tensors = store.read_tensors("dataset", stage.key, "dataset.pt")
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())


def test_the_distill_stage_stores_ipc_images_per_class_and_its_history(study):
    store, done = study
    stage, result = done["distill"]
    data_stage, _ = done["dataset"]
    assert result["metrics"]["n_images"] == 2 * 10  # ipc x classes
    assert math.isfinite(result["metrics"]["final_loss_dm"])
    history = store.read_json("distill", stage.key, "history.json")
    assert [h["iteration"] for h in history][-1] == 2  # iterations 0..2 of 3, the last one logged
    syn = load_synthetic(store, stage.key, load_dataset(store, data_stage.key))
    assert syn.images.shape == (20, 3, 28, 28) and torch.isfinite(syn.images).all()
    assert torch.bincount(syn.labels, minlength=10).tolist() == [2] * 10
    assert store.read_bytes("distill", stage.key, "synthetic_grid.png")[:4] == b"\x89PNG"


def test_the_evaluate_stage_scores_the_set_on_the_test_split(study):
    store, done = study
    stage, result = done["evaluate"]
    distill, _ = done["distill"]
    assert stage.inputs == {"synthetic": distill.key, "dataset": done["dataset"][0].key}
    summary = result["summary"]
    assert summary["n_repeats"] == 1 and len(summary["accs"]) == 1
    assert 0.0 <= summary["acc_mean"] <= 1.0 and summary["acc_std"] == 0.0  # one network
    assert result["metrics"]["acc_mean"] == summary["acc_mean"]
    for name in ("acc_aligned_mean", "acc_conflicting_mean"):  # coloured digits: both groups scored
        assert 0.0 <= result["metrics"][name] <= 1.0
    repeats = store.read_json("evaluate", stage.key, "repeats.json")
    assert len(repeats) == 1 and repeats[0]["acc"] == summary["accs"][0]
    per_class = store.read_json("evaluate", stage.key, "per_class_accuracy.json")
    assert per_class["class"] == list(range(10)) and all(0.0 <= a <= 1.0 for a in per_class["accuracy"])


def test_a_stage_whose_input_is_missing_fails_and_publishes_nothing(study, tmp_path):
    _, done = study
    stage, _ = done["evaluate"]
    empty = str(tmp_path / "empty-store")  # its inputs are not there
    with pytest.raises(CorruptArtifact, match=done["dataset"][0].key):
        execute_stage(stage, empty, 1, 0, {})
    store = ArtifactStore(empty)
    assert not store.exists("evaluate", stage.key) and store.attempts(stage.key) == 1
    (log,) = [text for _, text in store.stage_logs(stage.key)]
    assert "stage failed" in log  # the attempt's log holds the error
