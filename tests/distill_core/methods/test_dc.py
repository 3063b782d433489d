"""DC and DSA (gradient matching) on tiny real data: upstream's loops, exact engines, a falling objective."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from distill_core.augment import DSA_STRATEGY_NO_FLIP, SiameseAugment
from distill_core.methods import get_method
from distill_core.methods.base import init_synthetic
from distill_core.methods.dc import DCOptions, default_loops, freeze_batchnorm, gradient_matching
from distill_core.methods.engines import matching_loss, sample_real_batch, synthetic_batch
from distill_core.networks import build_network
from distill_core.runtime import Runtime
from tests.distill_core.methods.helpers import WIDTH, config, fixed_nets


@pytest.fixture(scope="module")
def real(digits_real):
    return digits_real


def test_loops_follow_upstream_table():
    assert default_loops(1) == (1, 1)
    assert default_loops(10) == (10, 50)
    assert default_loops(20) == (20, 25)
    assert default_loops(50) == (50, 10)
    assert default_loops(5) == (1, 1)  # nearest documented IPC
    assert default_loops(15) == (10, 50)  # ties go to the smaller IPC
    assert default_loops(100) == (50, 10)


def test_dc_options_are_typed_and_bounded():
    assert DCOptions() == DCOptions(outer_loop=None, inner_loop=None, batch_train=256)
    assert DCOptions(inner_loop=0).inner_loop == 0  # 0 inner epochs is allowed
    for bad in ({"outer_loop": 0}, {"inner_loop": -1}, {"batch_train": 0}, {"matching": "loop"}):
        with pytest.raises(ValidationError):
            DCOptions(**bad)


def test_unknown_dc_option_fails_the_run(real):
    with pytest.raises(ValidationError):
        gradient_matching(real, config(iterations=1, options={"outer_loops": 2}))


def test_freeze_batchnorm_sets_statistics_from_real_images_and_fixes_them(real):
    torch.manual_seed(0)
    net = build_network("convnet_bn", 1, 10, 28, **WIDTH)
    bn = net.features[1]
    built = bn.running_mean.clone()  # (building the network ran one forward on zeros)
    freeze_batchnorm(net, real, torch.Generator().manual_seed(0))
    assert not bn.training and net.training  # BN layers frozen, the rest trains
    assert not torch.allclose(bn.running_mean, built)
    stats = bn.running_mean.clone()
    net(real.images[:20])
    assert torch.equal(bn.running_mean, stats)
    plain = build_network("convnet", 1, 10, 28, **WIDTH)
    freeze_batchnorm(plain, real, torch.Generator().manual_seed(0))  # nothing to freeze
    assert plain.training


@pytest.mark.parametrize("mode", ["batched", "tiled"])
def test_dc_run_equals_per_class_loop(real, mode):
    options = {"outer_loop": 2, "inner_loop": 1}
    cfg = config(ipc=2, iterations=2, init="noise", options=options)
    a = gradient_matching(real, cfg, runtime=Runtime(matching=mode))
    b = gradient_matching(real, cfg, runtime=Runtime(matching="loop"))
    torch.testing.assert_close(a.images, b.images, rtol=1e-4, atol=1e-5)


def test_dsa_run_with_tiled_inner_loop_equals_untiled(real):
    """The inner loop (per-sample augmentation) runs in tiles on CPU: the same run as whole batches.

    (Two inner epochs or more amplify float32 rounding through the cosine distance to ~1e-4 within
    a few steps -- in float64 the runs agree to 1e-15 -- so this run keeps one epoch per phase.)
    """
    cfg = config("dsa", ipc=2, iterations=2, augment=DSA_STRATEGY_NO_FLIP,
                 options={"outer_loop": 3, "inner_loop": 1, "batch_train": 8})
    a = gradient_matching(real, cfg, runtime=Runtime(tile=3))
    b = gradient_matching(real, cfg, runtime=Runtime(tile=0, matching="loop"))
    torch.testing.assert_close(a.images, b.images, rtol=1e-4, atol=1e-5)
    assert not torch.equal(a.images, gradient_matching(real, config("dsa", ipc=2, iterations=2,
                                                                    options=cfg.options)).images)  # augment matters


def matching_objective(real, images, labels, augment=None) -> float:
    """DC's loss on fixed networks and a fixed real batch (and a fixed augmentation)."""
    g = torch.Generator().manual_seed(99)
    total = 0.0
    for net in fixed_nets(real):
        real_batch = sample_real_batch(real, 32, g)
        syn_batch = synthetic_batch(images, labels, real.num_classes)
        if augment is not None:
            real_batch = real_batch.with_images(augment(real_batch.images, 5, real_batch.labels, real.num_classes))
            syn_batch = syn_batch.with_images(augment(images, 5, labels, real.num_classes))
        total += float(matching_loss(net, real_batch, syn_batch).detach())
    return total


@pytest.mark.parametrize("method", ["dc", "dsa"])
def test_gradient_matching_lowers_its_objective(real, method):
    dsa = method == "dsa"
    cfg = config(method, iterations=10, init="real" if dsa else "noise", lr_img=0.1 if dsa else 1.0,
                 augment=DSA_STRATEGY_NO_FLIP if dsa else None)
    init = init_synthetic(real, cfg, torch.Generator().manual_seed(cfg.seed))
    syn = get_method(method).distill(real, cfg)
    augment = SiameseAugment(DSA_STRATEGY_NO_FLIP) if dsa else None
    before = matching_objective(real, init.images, init.labels, augment)
    after = matching_objective(real, syn.images, syn.labels, augment)
    assert after < before
    assert len(syn.history) == cfg.iterations and "loss_gm" in syn.history[0]
    assert syn.images.shape == (10, 1, 28, 28) and not syn.images.requires_grad


def test_progress_sees_every_logged_iteration(real):
    seen = []
    cfg = config(iterations=5, log_every=2, options={"outer_loop": 1})
    syn = gradient_matching(real, cfg, progress=lambda it, rec, _: seen.append((it, rec)))
    assert [it for it, _ in seen] == [0, 2, 4] == [r["iteration"] for r in syn.history]
    assert all("loss_gm" in rec and "loss_ptm" not in rec for _, rec in seen)


# --- debiasing weights (RealData.weights) -------------------------------------------------------------

def _weighted(real, weights):
    import dataclasses
    return dataclasses.replace(real, weights=weights)


def test_weighted_real_batch_normalises_each_class_and_keeps_the_picks(real):
    w = torch.rand(len(real.labels), generator=torch.Generator().manual_seed(0))
    plain = sample_real_batch(real, 16, torch.Generator().manual_seed(1))
    batch = sample_real_batch(_weighted(real, w), 16, torch.Generator().manual_seed(1))
    assert torch.equal(plain.images, batch.images) and plain.counts == batch.counts
    assert batch.reweighted and not plain.reweighted
    per_class = batch.weights.view(10, -1).sum(1)
    torch.testing.assert_close(per_class, torch.ones(10))
    ones = sample_real_batch(_weighted(real, torch.ones(len(real.labels))), 16, torch.Generator().manual_seed(1))
    assert torch.equal(ones.weights, plain.weights)  # exactly 1/n_c


@pytest.mark.parametrize("method,mode", [("dc", "batched"), ("dc", "tiled"), ("dc", "loop"), ("dsa", "tiled"),
                                         ("dsa", "loop")])
def test_gradient_matching_with_all_weights_one_is_bit_for_bit_unweighted(real, method, mode):
    augment = DSA_STRATEGY_NO_FLIP if method == "dsa" else None
    cfg = config(ipc=2, iterations=2, init="noise", augment=augment, options={"outer_loop": 2, "inner_loop": 1})
    plain = gradient_matching(real, cfg, runtime=Runtime(matching=mode))
    ones = gradient_matching(_weighted(real, torch.ones(len(real.labels))), cfg, runtime=Runtime(matching=mode))
    assert torch.equal(plain.images, ones.images)
    assert plain.history == ones.history


def test_weighted_matching_modes_agree_and_weights_change_the_loss(real):
    torch.manual_seed(0)
    net = build_network("convnet", 1, 10, 28, **WIDTH)
    w = torch.rand(len(real.labels), generator=torch.Generator().manual_seed(0))
    real_batch = sample_real_batch(_weighted(real, w), 12, torch.Generator().manual_seed(0))
    plain_batch = sample_real_batch(real, 12, torch.Generator().manual_seed(0))
    syn = init_synthetic(real, config(ipc=2, init="real"), torch.Generator().manual_seed(1))
    syn_batch = synthetic_batch(syn.images, syn.labels, 10)
    losses = {mode: matching_loss(net, real_batch, syn_batch, mode) for mode in ("batched", "tiled", "loop")}
    torch.testing.assert_close(losses["batched"], losses["loop"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses["tiled"], losses["loop"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(losses["loop"], matching_loss(net, plain_batch, syn_batch, "loop"))


def test_gradient_matching_with_non_uniform_weights_changes_the_result(real):
    cfg = config(ipc=1, iterations=2, init="noise", options={"outer_loop": 1, "inner_loop": 0})
    w = torch.rand(len(real.labels), generator=torch.Generator().manual_seed(0))
    plain, weighted = gradient_matching(real, cfg), gradient_matching(_weighted(real, w), cfg)
    assert not torch.allclose(plain.images, weighted.images)
