"""Distillation methods on tiny real data (scikit-learn digits, 28x28, small ConvNets)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from distill_core.augment import SiameseAugment
from distill_core.data import build_biased_dataset, load_source
from distill_core.methods import METHODS, get_method
from distill_core.methods import dc, mtt
from distill_core.methods.base import DistillConfig, RealData, init_synthetic
from distill_core.methods.baselines import herding
from distill_core.methods.dm import RealEmbedder, dm_loss, embed_no_grad
from distill_core.networks import build_network
from distill_core.ptm import PTMConfig, train_ptm

WIDTH = {"width": 16}


@pytest.fixture(scope="module")
def real() -> RealData:
    return RealData.from_dataset(build_biased_dataset(load_source("digits"), "none", 0.1, 1))


@pytest.fixture(scope="module")
def expert(real) -> dict:
    """A two-epoch expert trajectory {0, 1, 2: state_dict}, as train_ptm records it."""
    return train_ptm(real, PTMConfig(arch_options=WIDTH, epochs=2, seed=0)).checkpoints


def config(**kw) -> DistillConfig:
    base = dict(ipc=1, iterations=5, lr_img=0.1, arch_options=WIDTH, batch_real=16, seed=0, log_every=1)
    base.update(kw)
    return DistillConfig(**base)


def fixed_nets(real: RealData, count: int = 3, arch: str = "convnet") -> list[nn.Module]:
    torch.manual_seed(123)
    return [build_network(arch, 1, real.num_classes, 28, **WIDTH) for _ in range(count)]


def test_registry_names_every_method():
    assert {"dc", "dsa", "dm", "mtt", "random", "herding", "whole"} <= set(METHODS)
    assert get_method("dsa") is dc.distill_dsa


def test_loops_follow_upstream_table():
    assert dc.default_loops(1) == (1, 1)
    assert dc.default_loops(10) == (10, 50)
    assert dc.default_loops(50) == (50, 10)
    assert dc.default_loops(5) == (1, 1)  # nearest documented IPC
    assert dc.default_loops(100) == (50, 10)


# --- DC / DSA -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["convnet", "convnet_bn", "lenet", "mlp"])
def test_matching_modes_equal_per_class_loop(real, arch):
    k = real.num_classes
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = build_network(arch, 1, k, 28, **(WIDTH if arch.startswith("convnet") else {}))
    dc.freeze_batchnorm(net, real, g)
    real_batch = dc.sample_real_batch(real, 200, g)  # more than any class holds: uneven, padded blocks
    assert len(set(real_batch.counts)) > 1
    x_syn = torch.randn(3 * k, 1, 28, 28, generator=g).requires_grad_(True)
    y_syn = torch.arange(k).repeat_interleave(3)
    augment = SiameseAugment()
    real_batch = real_batch.with_images(augment(real_batch.images, 7, real_batch.labels, k))

    def loss_and_grad(mode, tile=dc.DEFAULT_TILE):
        syn_batch = dc.synthetic_batch(augment(x_syn, 7, y_syn, k), y_syn, k)
        loss = dc.matching_loss(net, real_batch, syn_batch, mode, tile)
        return loss, torch.autograd.grad(loss, x_syn)[0]

    loss_l, grad_l = loss_and_grad("loop")
    # tile 7 does not divide the class blocks: exercises padded tiles and skipped all-padding tiles
    for mode, tile in (("batched", 16), ("tiled", 16), ("tiled", 7), ("tiled", 1000)):
        loss, grad = loss_and_grad(mode, tile)
        torch.testing.assert_close(loss, loss_l, rtol=1e-5, atol=1e-5)
        assert float((grad - grad_l).norm() / grad_l.norm()) < 1e-4, (mode, tile)


def test_tiled_class_gradients_equal_whole_class_gradients(real):
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    net = build_network("convnet", 1, real.num_classes, 28, **WIDTH)
    params = dc.matched_parameters(net)
    batch = dc.sample_real_batch(real, 40, g)
    tiled = dc.tiled_class_gradients(net, batch, params, tile=6)
    whole = dc.looped_class_gradients(net, batch, params)
    for t, w in zip(tiled, whole):
        assert t.shape == (real.num_classes, *w.shape[1:])
        torch.testing.assert_close(t, w, rtol=1e-4, atol=1e-6)


def test_unknown_matching_mode_is_rejected():
    with pytest.raises(ValueError, match="unknown matching mode 'fast'"):
        dc.GradientMatcher("fast")


def test_grouped_conv_weight_grads_equal_per_class_calls():
    torch.manual_seed(0)
    for conv in (nn.Conv2d(3, 5, 3, stride=2, padding=3), nn.Conv2d(2, 4, 3, padding=1)):
        x = torch.randn(4 * 3, conv.in_channels, 11, 11)
        delta = torch.randn_like(conv(x))
        grouped = dc._conv_weight_grad_per_class(conv, x, delta, 4, grouped=True)
        looped = dc._conv_weight_grad_per_class(conv, x, delta, 4, grouped=False)
        torch.testing.assert_close(grouped, looped, rtol=1e-4, atol=1e-4)
        full = torch.autograd.grad((conv(x) * delta).sum(), conv.weight)[0]
        torch.testing.assert_close(looped.sum(0), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["batched", "tiled"])
def test_dc_run_equals_per_class_loop(real, mode):
    extra = {"outer_loop": 2, "inner_loop": 1}
    a = dc.distill_dc(real, config(ipc=2, iterations=2, init="noise", extra={**extra, "matching": mode}))
    b = dc.distill_dc(real, config(ipc=2, iterations=2, init="noise", extra={**extra, "matching": "loop"}))
    torch.testing.assert_close(a.images, b.images, rtol=1e-4, atol=1e-5)


def test_matcher_defaults_follow_the_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    short, long = config(iterations=2), config(iterations=1000)
    assert dc.GradientMatcher.for_run(short, cpu, 1).mode == "tiled"
    assert not dc.GradientMatcher.for_run(short, cpu, 1).real_loss.compiled
    assert dc.GradientMatcher.for_run(long, cpu, 10).real_loss.compiled  # long CPU runs compile
    assert dc.GradientMatcher.for_run(long, cuda, 10).mode == "batched"
    forced = config(iterations=2, extra={"matching": "loop", "compile_matching": False})
    assert dc.GradientMatcher.for_run(forced, cpu, 1).mode == "loop"


def matching_objective(real, images, labels, augment=None) -> float:
    """DC's loss on fixed networks and a fixed real batch (and a fixed augmentation)."""
    g = torch.Generator().manual_seed(99)
    total = 0.0
    for net in fixed_nets(real):
        real_batch = dc.sample_real_batch(real, 32, g)
        syn_batch = dc.synthetic_batch(images, labels, real.num_classes)
        if augment is not None:
            real_batch = real_batch.with_images(augment(real_batch.images, 5, real_batch.labels, real.num_classes))
            syn_batch = syn_batch.with_images(augment(images, 5, labels, real.num_classes))
        total += float(dc.matching_loss(net, real_batch, syn_batch).detach())
    return total


@pytest.mark.parametrize("method", ["dc", "dsa"])
def test_gradient_matching_lowers_its_objective(real, method):
    cfg = config(iterations=10, init="noise" if method == "dc" else "real", lr_img=1.0 if method == "dc" else 0.1)
    init = init_synthetic(real, cfg, torch.Generator().manual_seed(cfg.seed))
    syn = get_method(method)(real, cfg)
    augment = SiameseAugment() if method == "dsa" else None
    before = matching_objective(real, init.images, init.labels, augment)
    after = matching_objective(real, syn.images, syn.labels, augment)
    assert after < before
    assert len(syn.history) == cfg.iterations and "loss_gm" in syn.history[0]
    assert syn.images.shape == (10, 1, 28, 28) and not syn.images.requires_grad


# --- DM -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("compile_embed", [False, True])
def test_real_embedder_chunks_equal_one_forward(real, compile_embed):
    torch.manual_seed(3)
    x = real.images[:70]  # two full chunks of 32 and a ragged one
    embedder = RealEmbedder(config(iterations=1, extra={"compile_embed": compile_embed}), torch.device("cpu"))
    for arch in ("convnet", "convnet_bn"):  # BatchNorm in train mode: one forward over the whole batch
        net = build_network(arch, 1, real.num_classes, 28, **WIDTH).train()
        torch.testing.assert_close(embedder(net, x), embed_no_grad(net, x), rtol=1e-4, atol=1e-5)
    assert embedder.fn.compiled == compile_embed



def test_dm_lowers_its_objective(real):
    cfg = config(iterations=20, lr_img=1.0, dsa=False)
    init = init_synthetic(real, cfg, torch.Generator().manual_seed(cfg.seed))
    syn = get_method("dm")(real, cfg)
    x_real, y_real = real.sample_per_class(32, torch.Generator().manual_seed(1))

    def objective(images):
        return sum(float(dm_loss(net, x_real, y_real, images, syn.labels, 10).detach()) for net in fixed_nets(real))

    assert objective(syn.images) < objective(init.images)


# --- MTT ----------------------------------------------------------------------------------------

def mtt_objective(real, expert, images, labels, lr) -> float:
    net = build_network("convnet", 1, 10, 28, **WIDTH)
    student = mtt.Student(net, None)
    start, target = student.params_from(expert[0], "cpu"), student.params_from(expert[2], "cpu")
    plans = mtt.plan_steps(len(labels), 5, len(labels), "cpu", torch.Generator().manual_seed(3))
    with torch.enable_grad():
        loss = mtt.unrolled_loss(student, images, labels, torch.tensor(lr), start, target, plans)
    return float(loss.detach())


def test_mtt_runs_from_a_two_epoch_expert_and_lowers_its_objective(real, expert):
    assert sorted(expert) == [0, 1, 2]
    extra = {"syn_steps": 5, "expert_epochs": 2, "max_start_epoch": 1, "lr_lr": 1e-6}
    cfg = config(iterations=8, lr_img=100.0, dsa=False, extra=extra)
    init = init_synthetic(real, cfg, torch.Generator().manual_seed(cfg.seed))
    syn = get_method("mtt")(real, cfg, experts=[expert])
    assert syn.lr is not None and syn.lr > 0
    before = mtt_objective(real, expert, init.images, init.labels, 0.01)
    after = mtt_objective(real, expert, syn.images, syn.labels, syn.lr)
    assert after < before
    assert all(r["start_epoch"] == 0 for r in syn.history)


def test_mtt_needs_experts(real):
    with pytest.raises(ValueError):
        get_method("mtt")(real, config())
    with pytest.raises(ValueError):  # no checkpoint M epochs after any allowed start
        get_method("mtt")(real, config(extra={"expert_epochs": 5}), experts=[{0: {}, 1: {}}])


def test_mtt_memory_bounded_exact_equals_full_unroll(real, expert):
    net = build_network("convnet", 1, 10, 28, **WIDTH)
    student = mtt.Student(net, SiameseAugment())
    x = real.images[:20].clone().requires_grad_(True)
    y = real.labels[:20]
    lr = torch.tensor(0.01, requires_grad=True)
    start, target = student.params_from(expert[0], "cpu"), student.params_from(expert[2], "cpu")
    plans = mtt.plan_steps(20, 4, 8, "cpu", torch.Generator().manual_seed(0))  # mini-batches, augmented
    loss = mtt.unrolled_loss(student, x, y, lr, start, target, plans)
    dx, dlr = torch.autograd.grad(loss, [x, lr])

    loss_e, dx_e, dlr_e = mtt.bounded_gradients(student, x, y, lr, start, target, plans, "exact")
    torch.testing.assert_close(loss_e, loss.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(dx_e, dx, rtol=1e-4, atol=1e-4 * float(dx.abs().max()))
    torch.testing.assert_close(dlr_e, dlr, rtol=1e-4, atol=0)

    loss_t, dx_t, dlr_t = mtt.bounded_gradients(student, x, y, lr, start, target, plans, "tesla")
    torch.testing.assert_close(loss_t, loss.detach(), rtol=1e-5, atol=0)
    assert torch.nn.functional.cosine_similarity(dx_t.flatten(), dx.flatten(), dim=0) > 0.9  # first-order


def test_mtt_memory_bounded_run_matches_default(real, expert):
    extra = {"syn_steps": 3, "expert_epochs": 2, "max_start_epoch": 1, "batch_syn": 5}
    cfg = config(ipc=1, iterations=2, lr_img=100.0, extra=extra)
    a = mtt.distill_mtt(real, cfg, experts=[expert])
    b = mtt.distill_mtt(real, config(ipc=1, iterations=2, lr_img=100.0, extra={**extra, "memory_bounded": True}),
                        experts=[expert])
    torch.testing.assert_close(a.images, b.images, rtol=1e-4, atol=1e-5)
    assert a.lr == pytest.approx(b.lr, rel=1e-5)


# --- guidance hooks -----------------------------------------------------------------------------

class CountingGuidance:
    """Pulls every synthetic pixel towards 0 and counts the calls."""

    def __init__(self):
        self.calls = 0

    def loss(self, x_syn, y_syn, generator):
        self.calls += 1
        return 0.5 * (x_syn ** 2).mean()


@pytest.mark.parametrize("method", ["dc", "dsa", "dm", "mtt"])
def test_guidance_is_added_once_per_outer_step(real, expert, method):
    guidance = CountingGuidance()
    extra = {"outer_loop": 2, "inner_loop": 1} if method in ("dc", "dsa") else {}
    if method == "mtt":
        extra = {"syn_steps": 2, "expert_epochs": 2, "max_start_epoch": 1}
    cfg = config(iterations=2, lr_img=1.0, extra=extra)
    kwargs = {"experts": [expert]} if method == "mtt" else {}
    syn = get_method(method)(real, cfg, guidance=guidance, **kwargs)
    assert guidance.calls == (4 if method in ("dc", "dsa") else 2)
    assert "loss_ptm" in syn.history[-1]


# --- baselines ----------------------------------------------------------------------------------

def test_random_and_whole_baselines(real):
    syn = get_method("random")(real, config(ipc=3))
    assert torch.bincount(syn.labels, minlength=10).tolist() == [3] * 10
    for img, lab in zip(syn.images, syn.labels):  # every image is a real image of its class
        assert (real.images[real.labels == lab] == img).flatten(1).all(1).any()
    whole = get_method("whole")(real, config(ipc=1))
    assert len(whole.labels) == len(real.labels)


def test_herding_hand_example_and_per_class_selection(real):
    features = torch.tensor([[0.0, 0.0], [10.0, 0.0], [-10.0, 0.0], [1.0, 1.0]])
    # mean (0.25, 0.25): first the point nearest it, then the one that keeps the running mean closest
    assert herding(features, 1) == [0]
    assert herding(features, 2) == [0, 3]
    syn = get_method("herding")(real, config(ipc=2))
    assert torch.bincount(syn.labels, minlength=10).tolist() == [2] * 10
    again = get_method("herding")(real, config(ipc=2))
    assert torch.equal(syn.images, again.images)  # deterministic for a seed


def test_compiled_tiled_matching_equals_the_loop(real):
    """The path long CPU runs take: tiled, real side through torch.compile."""
    k = real.num_classes
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    net = build_network("convnet", 1, k, 28, **WIDTH)
    real_batch = dc.sample_real_batch(real, 24, g)
    x_syn = torch.randn(2 * k, 1, 28, 28, generator=g).requires_grad_(True)
    syn_batch = dc.synthetic_batch(x_syn, torch.arange(k).repeat_interleave(2), k)
    compiled = dc.GradientMatcher("tiled", tile=8, compile=True)
    loss_c = compiled(net, real_batch, syn_batch)
    assert compiled.real_loss.compiled  # did not fall back to eager
    loss_l = dc.GradientMatcher("loop")(net, real_batch, syn_batch)
    torch.testing.assert_close(loss_c, loss_l, rtol=1e-4, atol=1e-5)
    grad_c, = torch.autograd.grad(loss_c, x_syn)
    grad_l, = torch.autograd.grad(loss_l, x_syn)
    assert float((grad_c - grad_l).norm() / grad_l.norm()) < 1e-3
