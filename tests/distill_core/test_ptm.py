"""PTM and expert training (distill_core.ptm): the two recipes, checkpoints, and exact tiled steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

import distill_core.ptm as ptm
from distill_core.augment import DSA_STRATEGY_NO_FLIP, SiameseAugment
from distill_core.networks import build_network
from distill_core.ptm import PTMConfig, recipe, train_ptm
from distill_core.runtime import Runtime
from distill_core.sets import RealData

WIDTH = {"width": 8}


@pytest.fixture(scope="module")
def small_real(digits_real) -> RealData:
    """40 real digits (4 per class): a PTM epoch is two steps of 20."""
    idx = torch.cat([i[:4] for i in digits_real.class_index])
    return RealData(digits_real.images[idx], digits_real.labels[idx], 10, digits_real.norm)


def test_tiled_training_equals_whole_batch_training(digits_real):
    base = dict(arch_options=WIDTH, epochs=2, seed=0, batch_size=100)
    whole = train_ptm(digits_real, PTMConfig(**base), runtime=Runtime(tile=0))
    tiled = train_ptm(digits_real, PTMConfig(**base), runtime=Runtime(tile=16))  # 100 = 6 x 16 + 4: ragged
    assert sorted(whole.checkpoints) == sorted(tiled.checkpoints) == [0, 1, 2]
    for name, w in whole.checkpoints[2].items():
        torch.testing.assert_close(tiled.checkpoints[2][name], w, rtol=1e-4, atol=1e-5, msg=name)
    for a, b in zip(whole.history, tiled.history):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4 and a["train_acc"] == b["train_acc"]


# --- recipes ------------------------------------------------------------------------------------

def test_recipe_fields():
    assert recipe("ptm", 150, DSA_STRATEGY_NO_FLIP) == {
        "momentum": 0.9, "weight_decay": 0.005, "augment": None, "milestones": [50, 100]}
    assert recipe("ptm", 60, DSA_STRATEGY_NO_FLIP)["milestones"] == [50]  # upstream's epochs, not a fraction
    assert recipe("ptm", 8, DSA_STRATEGY_NO_FLIP)["milestones"] == []  # an early checkpoint: lr 0.01 throughout
    assert recipe("expert", 50, DSA_STRATEGY_NO_FLIP) == {
        "momentum": 0.0, "weight_decay": 0.0, "augment": f"dsa:{DSA_STRATEGY_NO_FLIP}", "milestones": []}
    with pytest.raises(ValueError, match="unknown PTM recipe"):
        recipe("buffer", 50, DSA_STRATEGY_NO_FLIP)
    PTMConfig(**recipe("expert", 50, DSA_STRATEGY_NO_FLIP), epochs=50)  # a recipe is valid PTMConfig fields


class EpochRecorder:
    """Stands in for ptm.train_epoch: records the optimiser's settings and the augmentation, then trains."""

    def __init__(self, monkeypatch):
        self.epochs = []
        real_train_epoch = ptm.train_epoch

        def recording(model, opt, images, labels, batch_size, generator, augment=None, tile=None, loss_fn=None,
                      weights=None):
            group = opt.param_groups[0]
            self.epochs.append({k: group[k] for k in ("lr", "momentum", "weight_decay")} | {"augment": augment,
                                                                                             "weighted": weights is not None})
            return real_train_epoch(model, opt, images, labels, batch_size, generator, augment, tile, loss_fn,
                                    weights=weights)

        monkeypatch.setattr(ptm, "train_epoch", recording)


def test_expert_recipe_trains_without_momentum_or_weight_decay_and_augments(small_real, monkeypatch):
    rec = EpochRecorder(monkeypatch)
    cfg = PTMConfig(**recipe("expert", 3, DSA_STRATEGY_NO_FLIP), arch_options=WIDTH, epochs=3, batch_size=20)
    train_ptm(small_real, cfg)
    assert len(rec.epochs) == 3
    for e in rec.epochs:
        assert (e["lr"], e["momentum"], e["weight_decay"]) == (0.01, 0.0, 0.0)  # constant lr
        assert isinstance(e["augment"], SiameseAugment)
        assert e["augment"].families == DSA_STRATEGY_NO_FLIP.split("_")


def test_expert_epoch_is_plain_sgd_on_per_sample_augmented_batches(small_real):
    """One expert epoch reproduced by hand: per batch, augment per sample, then p -= lr * grad(mean CE)."""
    cfg = PTMConfig(**recipe("expert", 1, "crop_scale"), arch_options=WIDTH, epochs=1, batch_size=20, lr=0.1)
    result = train_ptm(small_real, cfg, runtime=Runtime(tile=0))

    torch.manual_seed(cfg.seed)
    net = build_network("convnet", 1, 10, 28, **WIDTH)
    g = torch.Generator().manual_seed(cfg.seed)
    augment = SiameseAugment("crop_scale")
    perm = torch.randperm(len(small_real.labels), generator=g)
    for i in range(0, len(perm), cfg.batch_size):
        idx = perm[i:i + cfg.batch_size]
        x = augment.per_sample(small_real.images[idx], int(torch.randint(2**31 - 1, (1,), generator=g)))
        grads = torch.autograd.grad(F.cross_entropy(net(x), small_real.labels[idx]), list(net.parameters()))
        with torch.no_grad():
            for p, gr in zip(net.parameters(), grads):
                p -= cfg.lr * gr
    for name, value in net.state_dict().items():
        torch.testing.assert_close(result.checkpoints[1][name], value, rtol=1e-4, atol=1e-6, msg=name)
    # the paper-2 recipe (momentum, weight decay, no augmentation) gives a different network
    other = train_ptm(small_real, PTMConfig(**recipe("ptm", 1, "crop_scale"), arch_options=WIDTH, epochs=1,
                                            batch_size=20, lr=0.1), runtime=Runtime(tile=0))
    assert not torch.allclose(other.checkpoints[1]["classifier.weight"], result.checkpoints[1]["classifier.weight"])


def test_ptm_recipe_decays_the_lr_after_its_milestone_epochs(small_real, monkeypatch):
    rec = EpochRecorder(monkeypatch)
    cfg = PTMConfig(**{**recipe("ptm", 6, DSA_STRATEGY_NO_FLIP), "milestones": [2, 4]}, arch_options=WIDTH, epochs=6,
                    batch_size=40)
    train_ptm(small_real, cfg)
    lrs = [e["lr"] for e in rec.epochs]  # epochs 1..6; milestones 2 and 4
    assert lrs == pytest.approx([0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001])
    for e in rec.epochs:
        assert (e["momentum"], e["weight_decay"], e["augment"]) == (0.9, 0.005, None)


# --- checkpoints and history --------------------------------------------------------------------

def test_every_epoch_is_kept_by_default(small_real):
    val = (small_real.images[:10], small_real.labels[:10])
    result = train_ptm(small_real, PTMConfig(arch_options=WIDTH, epochs=3, batch_size=40), val=val)
    assert sorted(result.checkpoints) == [0, 1, 2, 3]  # 0 is the initialisation
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert all({"train_loss", "train_acc", "val_acc"} <= set(r) for r in result.history)
    torch.manual_seed(0)
    init = build_network("convnet", 1, 10, 28, **WIDTH).state_dict()
    for name, value in init.items():
        assert torch.equal(result.checkpoints[0][name], value), name
    assert not torch.equal(result.checkpoints[3]["classifier.weight"], init["classifier.weight"])
    assert result.checkpoints[3]["classifier.weight"].device == torch.device("cpu")


def test_only_keep_epochs_are_kept(small_real):
    kept = train_ptm(small_real, PTMConfig(arch_options=WIDTH, epochs=3, batch_size=40, keep_epochs=[0, 2]))
    assert sorted(kept.checkpoints) == [0, 2] and len(kept.history) == 3
    last = train_ptm(small_real, PTMConfig(arch_options=WIDTH, epochs=3, batch_size=40, keep_epochs=[3]))
    assert sorted(last.checkpoints) == [3]
    full = train_ptm(small_real, PTMConfig(arch_options=WIDTH, epochs=3, batch_size=40))
    for name, value in full.checkpoints[2].items():  # keeping fewer does not change the training
        assert torch.equal(kept.checkpoints[2][name], value), name


def test_ptm_config_is_strict():
    with pytest.raises(ValidationError):
        PTMConfig(tile=16)  # execution settings live in the Runtime
    with pytest.raises(ValidationError):
        PTMConfig(momentum=1.0)
    with pytest.raises(ValidationError):
        PTMConfig(augment=None, recipe="ptm")
