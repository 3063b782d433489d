"""Learning from Failure (distill_core.debias.lff): the PTM objective, its config and recipe, and the `lff` kind."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from distill_core.augment import DSA_STRATEGY_NO_FLIP
from distill_core.data.bias import aligned_mask
from distill_core.data.biased import NUM_ATTRIBUTES, build_biased_dataset
from distill_core.debias import distillation_attributes, get_debias
from distill_core.debias.lff import gce_loss, lff_weights, train_lff
from distill_core.ptm import PTMConfig, recipe, train_ptm
from distill_core.sets import RealData
from tests.distill_core.conftest import one_thread

WIDTH = {"width": 8}
OLD_PTM_KEYS = {"arch", "arch_options", "seed", "epochs", "lr", "momentum", "weight_decay", "batch_size",
                "milestones", "augment", "keep_epochs"}


@pytest.fixture(scope="module")
def biased(digits_source):
    """Coloured digits at aligned ratio 0.9, 45 per class before the 10% validation split (410 samples)."""
    with one_thread():
        ds = build_biased_dataset(digits_source, "colored", 0.9, 1, max_per_class=45, val_fraction=0.1)
    real, attrs = RealData.from_dataset(ds), distillation_attributes(ds)
    return real, attrs


def lff_config(**kw) -> PTMConfig:
    # 8 epochs at lr 0.05: enough for the GCE model to take the colour (measured gap 0.15-0.2 over seeds 0-2)
    base = dict(**recipe("lff", 8, DSA_STRATEGY_NO_FLIP), arch_options=WIDTH, epochs=8, batch_size=32, lr=0.05,
                seed=0)
    base.update(kw)
    return PTMConfig(**base)


@pytest.fixture(scope="module")
def trained(biased):
    real, _ = biased
    with one_thread():
        return train_lff(real, lff_config())


# --- config and recipe ------------------------------------------------------------------------------

def test_default_ptm_dump_is_unchanged_and_both_objectives_round_trip():
    ce = PTMConfig()
    assert set(ce.to_dict()) == OLD_PTM_KEYS  # every existing PTM stage key is unchanged
    assert PTMConfig(**ce.to_dict()) == ce
    lff = PTMConfig(objective="lff", gce_q=0.5, ema_alpha=0.9)
    assert set(lff.to_dict()) == OLD_PTM_KEYS | {"objective", "gce_q", "ema_alpha"}
    assert PTMConfig(**lff.to_dict()) == lff
    with pytest.raises(ValidationError):
        PTMConfig(gce_q=0.5)  # LfF's fields with the "ce" objective would not round-trip
    for bad in ({"gce_q": 0.0}, {"gce_q": 1.5}, {"ema_alpha": 1.0}, {"ema_alpha": -0.1}):
        with pytest.raises(ValidationError):
            PTMConfig(objective="lff", **bad)
    with pytest.raises(ValidationError):
        PTMConfig(objective="gce")


def test_lff_recipe_is_the_ptm_recipe_with_the_lff_objective():
    assert recipe("lff", 150, DSA_STRATEGY_NO_FLIP) == {**recipe("ptm", 150, DSA_STRATEGY_NO_FLIP), "objective": "lff"}
    assert recipe("lff", 150, DSA_STRATEGY_NO_FLIP) == {
        "momentum": 0.9, "weight_decay": 0.005, "augment": None, "milestones": [50, 100], "objective": "lff"}
    assert PTMConfig(**recipe("lff", 8, DSA_STRATEGY_NO_FLIP), epochs=8).objective == "lff"


def test_gce_is_ce_times_q_times_p_to_the_q():
    logits, y = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    p = logits.softmax(1)[:, 0]
    torch.testing.assert_close(gce_loss(logits, y, 0.7), -p.log() * p ** 0.7 * 0.7)


# --- training ---------------------------------------------------------------------------------------

def test_train_lff_is_deterministic_and_train_ptm_dispatches_to_it(biased, trained):
    real, _ = biased
    small = lff_config(epochs=1, keep_epochs=[0, 1])
    a, b = train_lff(real, small), train_ptm(real, small)
    assert sorted(a.checkpoints) == sorted(b.checkpoints) == [0, 1]
    for e in a.checkpoints:
        for name, w in a.checkpoints[e].items():
            assert torch.equal(b.checkpoints[e][name], w), (e, name)
    assert torch.equal(a.scores, b.scores) and a.history == b.history
    # the first epoch of the 8-epoch run is the same computation
    assert a.history[0] == trained.history[0]


def test_train_lff_history_checkpoints_and_scores(biased, trained):
    real, _ = biased
    assert sorted(trained.checkpoints) == list(range(9))  # keep_epochs None: every epoch, epoch 0 included
    assert [r["epoch"] for r in trained.history] == list(range(1, 9))
    assert {"train_loss", "train_acc", "bias_train_acc"} <= set(trained.history[-1])
    s = trained.scores
    assert s.dtype == torch.float32 and s.shape == (len(real.labels),)
    assert bool((s >= 0).all()) and bool((s <= 1).all())


def test_bias_conflicting_samples_get_the_higher_relative_difficulty(biased, trained):
    real, attrs = biased
    aligned = aligned_mask(real.labels, attrs, NUM_ATTRIBUTES)
    assert 0.8 < float(aligned.float().mean()) < 1.0
    s = trained.scores
    assert float(s[~aligned].mean()) > float(s[aligned].mean()) + 0.05


def test_val_accuracy_and_progress_are_reported(biased):
    real, _ = biased
    seen = []
    result = train_lff(real, lff_config(epochs=1, keep_epochs=[1]), val=(real.images[:50], real.labels[:50]),
                       progress=lambda e, r: seen.append((e, r)))
    assert sorted(result.checkpoints) == [1]
    assert seen == [(1, result.history[0])] and 0.0 <= result.history[0]["val_acc"] <= 1.0


# --- the lff kind -----------------------------------------------------------------------------------

def test_lff_kind_needs_scores():
    kind = get_debias("lff")
    assert kind.needs_scores and not kind.needs_attributes and not get_debias("kde").needs_scores
    x, y = torch.zeros(4, 2), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="score") as err:
        kind.compute(x, y, 2)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="score"):
        lff_weights(x, y, 2, kind.options())
    with pytest.raises(ValueError, match="lff scores for 4 samples"):
        kind.compute(x, y, 2, scores=torch.ones(3))


def test_lff_weights_scale_each_class_to_exactly_one(biased, trained):
    real, _ = biased
    w = get_debias("lff").compute(real.images, real.labels, 10, scores=trained.scores)
    assert w.dtype == torch.float32 and w.shape == trained.scores.shape
    for c in range(10):
        assert float(w[real.labels == c].max()) == 1.0  # exactly
    torch.testing.assert_close(w, get_debias("lff").compute(real.images, real.labels, 10, scores=trained.scores))
