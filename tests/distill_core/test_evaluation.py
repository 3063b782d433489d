"""The evaluation protocol and the stacked (vmapped) trainer."""

from __future__ import annotations

import copy

import pytest
import torch

from distill_core import stacked
from distill_core.data import build_biased_dataset, load_source
from distill_core.evaluation import (EvalConfig, EvalSets, evaluate_synthetic, step_tile, train_and_evaluate,
                                     train_and_evaluate_folded)
from distill_core.methods.base import DistillConfig, RealData, SyntheticSet, init_synthetic
from distill_core.networks import build_network


@pytest.fixture(scope="module")
def dataset():
    return build_biased_dataset(load_source("digits"), "none", 0.1, 1)


@pytest.fixture(scope="module")
def real(dataset) -> RealData:
    return RealData.from_dataset(dataset)


def real_subset(real: RealData, per_class: int) -> SyntheticSet:
    idx = torch.cat([i[:per_class] for i in real.class_index])
    return SyntheticSet(real.images[idx], real.labels[idx], real.norm)


def test_easy_real_subset_reaches_high_accuracy(real, dataset):
    syn = real_subset(real, 20)
    cfg = EvalConfig(arch_options={"width": 32}, epochs=15, batch_size=32, checkpoints=3)
    results = evaluate_synthetic(syn, dataset, cfg, repeats=1)
    r = results[0]
    assert r["acc"] > 0.8
    assert r["epoch"] in {5, 10, 15} and 0.0 <= r["val_acc"] <= 1.0
    assert len(r["per_class"]) == 10


def test_learned_lr_is_used_when_no_lr_is_given(real, dataset):
    syn = real_subset(real, 2)

    def run(learned, lr):
        cfg = EvalConfig(arch_options={"width": 8}, epochs=3, checkpoints=1, lr=lr)
        with_lr = SyntheticSet(syn.images, syn.labels, syn.norm, lr=learned)
        return evaluate_synthetic(with_lr, dataset, cfg, repeats=1)[0]

    assert run(0.05, None) == run(None, 0.05)  # the learned lr stands in for cfg.lr, deterministically
    assert run(0.05, None)["acc"] != run(0.001, None)["acc"]


@pytest.mark.parametrize("arch,dsa", [("convnet", False), ("convnet", True), ("convnet_bn", False)])
def test_stacked_training_equals_one_at_a_time(real, arch, dsa):
    syn = real_subset(real, 3)
    cfg = EvalConfig(arch=arch, arch_options={"width": 8}, epochs=4, batch_size=16, dsa=dsa)
    factory = stacked.architecture_factory(cfg, 1, 10, 28)
    seeds = stacked.default_seeds(cfg, 3)
    models = stacked.build_models(factory, seeds)
    copies = [copy.deepcopy(m) for m in models]
    together = stacked.train_stacked(models, syn.images, syn.labels, cfg, seeds=seeds)
    alone = [stacked.train_one(m, syn.images, syn.labels, cfg, s) for m, s in zip(copies, seeds)]
    for a, b in zip(together, alone):
        for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(ta, tb, rtol=1e-4, atol=1e-5, msg=name)
    # a factory gives the same networks as building them by hand
    again = stacked.train_stacked(factory, syn.images, syn.labels, cfg, seeds=seeds)
    torch.testing.assert_close(again[0].state_dict(), together[0].state_dict())


def test_stacked_predictions_match_each_network(real):
    models = stacked.build_models(lambda: build_network("convnet", 1, 10, 28, width=8), [0, 1])
    batch = stacked.StackedModels(models)
    x = real.images[:40]
    pred = batch.predict(x, batch_size=16)
    with torch.no_grad():
        for m, model in enumerate(models):
            assert torch.equal(pred[m], model.eval()(x).argmax(1))


@pytest.fixture(scope="module")
def colored():
    """Colored digits, as (dataset, real data, evaluation sets normalised like real)."""
    ds = build_biased_dataset(load_source("digits"), "colored", 0.1, 1)
    real = RealData.from_dataset(ds)
    return ds, real, EvalSets.from_dataset(ds, real.norm, "cpu")


def real_init(real: RealData, ipc: int) -> SyntheticSet:
    return init_synthetic(real, DistillConfig(ipc=ipc, iterations=0, lr_img=0.0), torch.Generator().manual_seed(0))


def test_folded_evaluation_equals_one_at_a_time(colored):
    """Training repeats as one grouped network gives the one-network loop's numbers."""
    torch.set_num_threads(1)
    _, real, sets = colored
    syn = real_init(real, 3)
    for dsa, norm in ((False, "instancenorm"), (True, "batchnorm")):
        cfg = EvalConfig(arch="convnet", arch_options={"width": 8, "norm": norm}, epochs=6, dsa=dsa, checkpoints=3)
        one = [train_and_evaluate(syn, sets, cfg, r) for r in range(3)]
        folded = train_and_evaluate_folded(syn, sets, cfg, [0, 1, 2])
        for a, b in zip(one, folded):
            assert a["epoch"] == b["epoch"]
            assert abs(a["acc"] - b["acc"]) <= 1 / len(sets.test[1])
            assert abs(a["val_acc"] - b["val_acc"]) <= 1 / len(sets.val[1])


def test_tiled_steps_equal_whole_batch_steps(colored):
    """Tiling a batch (summed gradients) trains the same network; BatchNorm networks are never tiled."""
    torch.set_num_threads(1)
    _, real, sets = colored
    syn = real_init(real, 5)
    base = dict(arch="convnet", arch_options={"width": 8}, epochs=6, checkpoints=3, dsa=True)
    whole = train_and_evaluate(syn, sets, EvalConfig(**base, tile=0), 0)
    for tile in (7, 16):  # 7 leaves a ragged last tile of the 50-image batch
        tiled = train_and_evaluate(syn, sets, EvalConfig(**base, tile=tile), 0)
        assert tiled["epoch"] == whole["epoch"]
        assert abs(tiled["acc"] - whole["acc"]) <= 1 / len(sets.test[1])
    folded = train_and_evaluate_folded(syn, sets, EvalConfig(**base, tile=7), [0, 1])
    assert folded[0]["epoch"] == whole["epoch"] and abs(folded[0]["acc"] - whole["acc"]) <= 1 / len(sets.test[1])

    cpu = torch.device("cpu")
    assert step_tile(EvalConfig(), build_network("convnet", 1, 10, 28, width=8), cpu) == 16
    assert step_tile(EvalConfig(), build_network("convnet_bn", 1, 10, 28, width=8), cpu) is None
    assert step_tile(EvalConfig(tile=0), build_network("convnet", 1, 10, 28, width=8), cpu) is None
    assert step_tile(EvalConfig(), build_network("convnet", 1, 10, 28, width=8), torch.device("cuda")) is None


def test_reported_metrics_are_those_of_the_best_validation_checkpoint(real, dataset):
    """Test metrics come from the snapshot taken at the selected epoch, not the last weights."""
    from distill_core import evaluation

    syn = real_subset(real, 4)
    cfg = EvalConfig(arch_options={"width": 8}, epochs=8, checkpoints=8, lr=1.0)  # a high lr: val wobbles
    sets = evaluation.EvalSets.from_dataset(dataset, syn.norm, "cpu")
    seen = {}
    original = evaluation.snapshot

    def recording_snapshot(model):
        state = original(model)
        seen[len(seen)] = (copy.deepcopy(model), state)
        return state

    evaluation.snapshot = recording_snapshot
    try:
        r = evaluation.train_and_evaluate(syn, sets, cfg, 0)
    finally:
        evaluation.snapshot = original
    assert r["epoch"] < cfg.epochs  # selection picked an earlier checkpoint than the final weights
    chosen_model, _ = seen[len(seen) - 1]  # the last snapshot taken is the best-validation one
    assert r == {"val_acc": r["val_acc"], "epoch": r["epoch"], **evaluation.test_metrics(chosen_model, sets)}


def test_compiled_training_steps_give_the_eager_result(real, dataset):
    syn = real_subset(real, 3)
    base = dict(arch_options={"width": 8}, epochs=3, checkpoints=1, tile=16)
    eager = evaluate_synthetic(syn, dataset, EvalConfig(**base, compile=False), repeats=1)[0]
    compiled = evaluate_synthetic(syn, dataset, EvalConfig(**base, compile=True), repeats=1)[0]
    assert compiled["epoch"] == eager["epoch"]
    assert abs(compiled["acc"] - eager["acc"]) <= 2 / len(dataset.test_labels)
