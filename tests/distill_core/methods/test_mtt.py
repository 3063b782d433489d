"""MTT on a two-epoch expert: a falling objective, the exact memory-bounded gradient, typed options."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from distill_core.augment import SiameseAugment
from distill_core.methods import get_method, mtt
from distill_core.methods.base import init_synthetic
from distill_core.methods.mtt import MTTOptions
from distill_core.networks import build_network
from distill_core.runtime import Runtime
from tests.distill_core.methods.helpers import WIDTH, config


@pytest.fixture(scope="module")
def real(digits_real):
    return digits_real


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
    options = {"syn_steps": 5, "expert_epochs": 2, "max_start_epoch": 1, "lr_lr": 1e-6}
    cfg = config("mtt", iterations=8, lr_img=100.0, options=options)
    init = init_synthetic(real, cfg, torch.Generator().manual_seed(cfg.seed))
    syn = get_method("mtt").distill(real, cfg, experts=[expert])
    assert syn.lr is not None and syn.lr > 0
    before = mtt_objective(real, expert, init.images, init.labels, 0.01)
    after = mtt_objective(real, expert, syn.images, syn.labels, syn.lr)
    assert after < before
    assert all(r["start_epoch"] == 0 for r in syn.history)


def test_mtt_needs_experts(real):
    with pytest.raises(ValueError):
        get_method("mtt").distill(real, config("mtt"))
    with pytest.raises(ValueError):  # no checkpoint M epochs after any allowed start
        get_method("mtt").distill(real, config("mtt", options={"expert_epochs": 5}), experts=[{0: {}, 1: {}}])


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
    options = {"syn_steps": 3, "expert_epochs": 2, "max_start_epoch": 1, "batch_syn": 5}
    cfg = config("mtt", ipc=1, iterations=2, lr_img=100.0, options=options)
    a = mtt.distill_mtt(real, cfg, experts=[expert])
    b = mtt.distill_mtt(real, cfg, runtime=Runtime(memory_bounded=True), experts=[expert])
    torch.testing.assert_close(a.images, b.images, rtol=1e-4, atol=1e-5)
    assert a.lr == pytest.approx(b.lr, rel=1e-5)
    assert a.lr != pytest.approx(0.01, rel=1e-9)  # the learning rate was learned
    tesla = mtt.distill_mtt(real, config("mtt", ipc=1, iterations=2, lr_img=100.0,
                                         options={**options, "gradient": "tesla"}), experts=[expert])
    assert torch.isfinite(tesla.images).all() and not torch.allclose(tesla.images, a.images, rtol=0, atol=1e-6)


def test_student_batches_are_augmented_per_sample(real):
    augment = SiameseAugment("crop")
    student = mtt.Student(build_network("convnet", 1, 10, 28, **WIDTH), augment)
    x = real.images[:12]
    plan = mtt.StepPlan(torch.tensor([3, 1, 4, 10, 5, 9, 2, 6]), seed=11)
    torch.testing.assert_close(student.batch(x, plan), augment.per_sample(x[plan.index], 11), rtol=0, atol=0)
    assert not torch.equal(student.batch(x, plan), augment(x[plan.index], 11))  # not one shared crop
    assert torch.equal(mtt.Student(student.net, None).batch(x, plan), x[plan.index])


def test_plan_steps_walks_fresh_permutations_in_chunks():
    plans = mtt.plan_steps(10, 5, 4, "cpu", torch.Generator().manual_seed(0))
    assert [len(p.index) for p in plans] == [4, 4, 2, 4, 4]
    assert sorted(torch.cat([p.index for p in plans[:3]]).tolist()) == list(range(10))  # one epoch
    assert len({p.seed for p in plans}) == 5


def test_start_epochs():
    trajectory = {e: {} for e in (0, 1, 2, 3, 5)}
    assert mtt.start_epochs(trajectory, 2, 20) == [0, 1, 3]
    assert mtt.start_epochs(trajectory, 2, 1) == [0]
    assert mtt.start_epochs(trajectory, 9, 20) == []


def test_mtt_options_are_typed_and_bounded(real, expert):
    assert MTTOptions() == MTTOptions(syn_steps=30, expert_epochs=2, max_start_epoch=20, lr_lr=1e-5,
                                      lr_teacher=0.01, batch_syn=None, gradient="exact")
    for bad in ({"syn_steps": 0}, {"expert_epochs": 0}, {"lr_teacher": 0.0}, {"batch_syn": 0},
                {"gradient": "approximate"}, {"lr_lr": float("nan")}):
        with pytest.raises(ValidationError):
            MTTOptions(**bad)
    with pytest.raises(ValidationError, match="memory_bounded"):  # now a Runtime setting, not an option
        MTTOptions(memory_bounded=True)
    with pytest.raises(ValidationError, match="syn_step"):  # unknown options fail the run
        get_method("mtt").distill(real, config("mtt", options={"syn_step": 5}), experts=[expert])
