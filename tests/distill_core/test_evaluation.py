"""The evaluation protocol: upstream's schedule, honest model selection, per-sample augmentation, exact tiles."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError

from distill_core import evaluation, evaluation_protocol
from distill_core.augment import DSA_STRATEGY, SiameseAugment
from distill_core.evaluation import (
    EvalConfig,
    EvalSets,
    evaluate_repeats,
    evaluate_synthetic,
    train_and_evaluate,
    training_lr,
    validation_epochs,
)
from distill_core.runtime import Runtime
from distill_core.sets import RealData, SyntheticSet
from tests.distill_core.helpers import real_init


@pytest.fixture(scope="module")
def dataset(digits_dataset):
    return digits_dataset


@pytest.fixture(scope="module")
def real(digits_real) -> RealData:
    return digits_real


def real_subset(real: RealData, per_class: int) -> SyntheticSet:
    idx = torch.cat([i[:per_class] for i in real.class_index])
    return SyntheticSet(real.images[idx], real.labels[idx], real.norm)




def test_easy_real_subset_reaches_high_accuracy(real, dataset):
    syn = real_subset(real, 20)
    cfg = EvalConfig(arch_options={"width": 32}, epochs=15, batch_size=32, checkpoints=3, repeats=1)
    results = evaluate_synthetic(syn, dataset, cfg)
    assert len(results) == 1
    r = results[0]
    assert r["acc"] > 0.8
    assert r["epoch"] == 15 and r["selection"] == "last" and r["acc"] == r["acc_last"]  # upstream: the final epoch
    assert r["at_val"]["epoch"] in {5, 10, 15} and 0.0 <= r["val_acc"] <= 1.0
    assert r["acc_val_selected"] == r["at_val"]["acc"]
    assert len(r["per_class"]) == 10


def test_learned_lr_is_used_when_no_lr_is_given(real, dataset):
    syn = real_subset(real, 2)

    def run(learned, lr):
        cfg = EvalConfig(arch_options={"width": 8}, epochs=3, checkpoints=1, lr=lr, repeats=1)
        with_lr = SyntheticSet(syn.images, syn.labels, syn.norm, lr=learned)
        return evaluate_synthetic(with_lr, dataset, cfg)[0]

    assert run(0.05, None) == run(None, 0.05)  # the learned lr stands in for cfg.lr, deterministically
    assert run(0.05, None)["acc"] != run(0.001, None)["acc"]
    assert training_lr(EvalConfig(), syn) == 0.01  # upstream's default without either
    assert training_lr(EvalConfig(lr=0.2), SyntheticSet(syn.images, syn.labels, syn.norm, lr=0.05)) == 0.2


def test_val_selection_reports_the_best_validation_checkpoint_and_last_the_final_weights(real, dataset,
                                                                                          monkeypatch):
    """Both checkpoints are tested: the snapshot taken at the best validation epoch, and the final weights;
    the top-level metrics are those of `selection`."""
    syn = real_subset(real, 4)
    cfg = EvalConfig(arch_options={"width": 8}, epochs=8, checkpoints=8, lr=0.5, selection="val")  # val wobbles
    sets = EvalSets.from_dataset(dataset, "cpu")
    seen = {}
    original = evaluation.snapshot

    def recording_snapshot(model):
        state = original(model)
        seen[len(seen)] = (copy.deepcopy(model), state)
        return state

    monkeypatch.setattr(evaluation, "snapshot", recording_snapshot)
    r = evaluation.train_and_evaluate(syn, sets, cfg, 0)
    assert r["epoch"] < cfg.epochs  # selection picked an earlier checkpoint than the final weights
    chosen_model, _ = seen[len(seen) - 1]  # the last snapshot taken is the best-validation one
    curve = r["val_curve"]
    assert r["at_val"] == {"val_acc": r["val_acc"], "epoch": r["epoch"], **evaluation.test_metrics(chosen_model, sets)}
    assert {k: r[k] for k in r["at_val"]} == r["at_val"] and r["acc_val_selected"] == r["acc"]
    assert [e for e, _ in curve] == sorted(evaluation.validation_epochs(cfg))  # every check, in order
    assert dict(curve)[r["epoch"]] == r["val_acc"] == max(acc for _, acc in curve)

    final = evaluation.fit(syn, cfg, 0, num_classes=dataset.num_classes)  # the same training, to its end
    assert r["at_last"] == {"epoch": cfg.epochs, **evaluation.test_metrics(final, sets)}
    assert r["acc_last"] == r["at_last"]["acc"] and r["at_last"]["epoch"] != r["at_val"]["epoch"]
    last = evaluation.train_and_evaluate(syn, sets, cfg.model_copy(update={"selection": "last"}), 0)
    assert {k: last[k] for k in r["at_last"]} == r["at_last"]  # `last` puts the final weights' metrics on top
    assert (last["acc_last"], last["acc_val_selected"]) == (r["acc_last"], r["acc_val_selected"])


def test_without_a_validation_split_only_the_last_epoch_is_reported(digits_source, real):
    from distill_core.data import build_biased_dataset

    whole = build_biased_dataset(digits_source, "none", 0.1, 1)  # upstream: nothing held out
    assert len(whole.val_index) == 0 and len(whole.train_split()[1]) == len(whole.train_labels)
    sets = EvalSets.from_dataset(whole, "cpu")
    syn = real_subset(real, 2)
    cfg = EvalConfig(arch_options={"width": 8}, epochs=3, checkpoints=3)
    r = train_and_evaluate(syn, sets, cfg, 0)
    assert r["epoch"] == 3 and r["acc"] == r["acc_last"]
    assert r["acc_val_selected"] is None and r["at_val"] is None and r["val_acc"] is None and r["val_curve"] == []
    with pytest.raises(ValueError, match="needs a validation split"):
        evaluate_repeats(syn, sets, cfg.model_copy(update={"selection": "val"}))


class LrRecorder:
    """Stands in for evaluation.train_epoch: records the optimiser's lr of every epoch, then trains."""

    def __init__(self, monkeypatch):
        self.lrs = []
        original = evaluation.train_epoch

        def recording(model, opt, *args, **kwargs):
            self.lrs.append(opt.param_groups[0]["lr"])
            return original(model, opt, *args, **kwargs)

        monkeypatch.setattr(evaluation, "train_epoch", recording)


@pytest.mark.parametrize("epochs", [6, 7])
def test_upstream_schedule_trains_epochs_0_to_e_and_decays_after_e_half_plus_one(real, dataset, epochs,
                                                                               monkeypatch):
    rec = LrRecorder(monkeypatch)
    cfg = EvalConfig(arch_options={"width": 8}, epochs=epochs, lr=0.02, checkpoints=2, repeats=1)
    train_and_evaluate(real_subset(real, 2), EvalSets.from_dataset(dataset, "cpu"), cfg, 0)
    decay_after = epochs // 2 + 1  # upstream: lr_schedule = [Epoch // 2 + 1], for ep in range(Epoch + 1)
    assert len(rec.lrs) == epochs + 1
    assert rec.lrs == pytest.approx([0.02] * (decay_after + 1) + [0.002] * (epochs - decay_after))


def test_validation_epochs_spread_over_training_and_include_the_last():
    assert validation_epochs(EvalConfig(epochs=15, checkpoints=3)) == {5, 10, 15}
    assert validation_epochs(EvalConfig(epochs=1000)) == set(range(100, 1001, 100))
    assert validation_epochs(EvalConfig(epochs=3, checkpoints=10)) == {1, 2, 3}


class Recording:
    """Wraps an augmentation: records every per_sample call's input and output."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def per_sample(self, x, seed):
        out = self.inner.per_sample(x, seed)
        self.calls.append((x.detach().clone(), out.detach().clone()))
        return out


def crop_shifts(x: torch.Tensor, out: torch.Tensor, reach: int) -> list[tuple[int, int]]:
    """For every image, the one (dy, dx) with out[y, x] = x[y + dy, x + dx] (zero outside the image)."""
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, [reach] * 4)
    shifts = []
    for i in range(len(x)):
        found = [(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)
                 if torch.equal(padded[i, :, reach + dy:reach + dy + h, reach + dx:reach + dx + w], out[i])]
        assert len(found) == 1, (i, found)
        shifts.append(found[0])
    return shifts


def test_evaluation_augmentation_draws_its_parameters_per_sample(colored, monkeypatch):
    _, real, sets = colored
    syn = real_init(real, 4)  # 40 images: two batches of 20 per epoch
    augments, fed = [], []
    make = evaluation.make_augmentation
    monkeypatch.setattr(evaluation, "make_augmentation", lambda name: augments.append(Recording(make(name)))
                        or augments[-1])
    build = evaluation_protocol.build_network  # seeded_network's, which fit calls

    def recording_build(*args, **kwargs):
        net = build(*args, **kwargs)
        net.register_forward_pre_hook(lambda m, inp: fed.append(inp[0].detach().clone()) if m.training else None)
        return net

    monkeypatch.setattr(evaluation_protocol, "build_network", recording_build)
    cfg = EvalConfig(arch_options={"width": 8}, epochs=1, batch_size=20, augment="dsa:crop", checkpoints=1)
    train_and_evaluate(syn, sets, cfg, 0, Runtime(tile=0))
    (aug,) = augments
    assert isinstance(aug.inner, SiameseAugment) and aug.inner.families == ["crop"]
    assert [len(x) for x, _ in aug.calls] == [20, 20, 20, 20]  # every batch of epochs 0 and 1
    torch.testing.assert_close(torch.cat(fed), torch.cat([out for _, out in aug.calls]), rtol=0, atol=0)
    for x, out in aug.calls:  # within a batch, the images get their own crops
        shifts = crop_shifts(x, out, reach=4)  # crop 0.125 of 28 pixels: shifts of up to 4
        assert len(set(shifts)) >= 10, shifts


def test_tiled_steps_equal_whole_batch_steps(colored):
    """Tiling a batch (summed gradients) trains the same network; BatchNorm networks are never tiled."""
    _, real, sets = colored
    syn = real_init(real, 5)
    cfg = EvalConfig(arch="convnet", arch_options={"width": 8}, epochs=6, checkpoints=3, augment=f"dsa:{DSA_STRATEGY}")
    whole = train_and_evaluate(syn, sets, cfg, 0, Runtime(tile=0))
    for tile in (7, 16):  # 7 leaves a ragged last tile of the 50-image batch
        tiled = train_and_evaluate(syn, sets, cfg, 0, Runtime(tile=tile))
        assert tiled["epoch"] == whole["epoch"]
        assert abs(tiled["acc"] - whole["acc"]) <= 1 / len(sets.test[1])
    # a BatchNorm network is never tiled, even when the runtime asks for tiles: the same numbers
    bn = EvalConfig(arch="convnet_bn", arch_options={"width": 8}, epochs=2, checkpoints=1)
    forced = train_and_evaluate(syn, sets, bn, 0, Runtime(tile=7))
    assert forced == train_and_evaluate(syn, sets, bn, 0, Runtime(tile=0))


def test_evaluation_sets_use_the_datasets_normalization(zca_dataset, colored):
    for ds in (zca_dataset, colored[0]):
        sets = EvalSets.from_dataset(ds, "cpu")
        assert torch.equal(sets.test[0], ds.normalization.apply(ds.test_images))
        assert torch.equal(sets.unbiased[0], ds.normalization.apply(ds.unbiased_images))
        assert torch.equal(sets.val[0], ds.normalization.apply(ds.val_split()[0]))
        assert sets.unbiased_aligned is not None and 0 < int(sets.unbiased_aligned.sum()) < len(sets.unbiased[1])


def test_evaluate_repeats_reports_every_network(colored):
    _, real, sets = colored
    syn = real_init(real, 2)
    cfg = EvalConfig(arch_options={"width": 8}, epochs=2, checkpoints=1, repeats=3)
    seen = []
    results = evaluate_repeats(syn, sets, cfg, Runtime(), progress=lambda r, res: seen.append((r, res)))
    assert len(results) == 3 and [r for r, _ in seen] == [0, 1, 2]
    assert [res for _, res in seen] == results
    assert results[0] == train_and_evaluate(syn, sets, cfg, 0)  # repeat r is train_and_evaluate(..., r)
    assert results[0]["acc"] != results[1]["acc"] or results[0]["val_acc"] != results[1]["val_acc"]
    for r in results:
        assert {"acc", "acc_unbiased", "acc_aligned", "acc_conflicting", "per_class", "val_acc", "epoch",
                "acc_last", "acc_val_selected", "selection"} <= set(r)


def test_eval_config_has_no_execution_settings():
    for knob in ({"tile": 0}, {"compile": True}, {"fold": True}, {"predict_batch": 32}, {"dsa": True}):
        with pytest.raises(ValidationError):
            EvalConfig(**knob)
    with pytest.raises(ValidationError):
        EvalConfig(lr=0.0)
    assert EvalConfig().augment is None and EvalConfig().repeats == 5 and EvalConfig().epochs == 300


@pytest.mark.slow
def test_compiled_training_steps_give_the_eager_result(real, dataset):
    syn = real_subset(real, 3)
    cfg = EvalConfig(arch_options={"width": 8}, epochs=3, checkpoints=1, repeats=1)
    eager = evaluate_synthetic(syn, dataset, cfg, Runtime(compile=False, tile=16))[0]
    compiled = evaluate_synthetic(syn, dataset, cfg, Runtime(compile=True, tile=16))[0]
    assert compiled["epoch"] == eager["epoch"]
    assert abs(compiled["acc"] - eager["acc"]) <= 2 / len(dataset.test_labels)


def test_proxy_accuracy_is_the_validation_accuracy_of_the_same_training(real, dataset):
    """A search's proxy: the evaluation recipe shortened, scored on the validation split only."""
    syn = real_subset(real, 5)
    cfg = EvalConfig(arch_options={"width": 8}, epochs=6, checkpoints=1, repeats=2)
    sets = EvalSets.from_dataset(dataset, "cpu")
    got = evaluation.proxy_accuracy(syn, sets.val, dataset.num_classes, cfg)
    accs = []
    for r in range(2):
        model = evaluation.fit(syn, cfg, r, num_classes=dataset.num_classes)
        accs.append(evaluation.accuracy_of(evaluation.predict(model, sets.val[0]), sets.val[1]))
    assert got == pytest.approx(sum(accs) / 2, abs=1e-7)
    # the network trained for the proxy is the one `train_and_evaluate` trains: same val accuracy at epoch E
    full = train_and_evaluate(syn, sets, cfg.model_copy(update={"repeats": 1}), 0)
    assert full["epoch"] == 6 and full["val_acc"] == pytest.approx(accs[0], abs=1e-7)
    assert syn.images.grad is None and not syn.images.requires_grad  # the live set is not touched
