"""The fast engines behind DC/DSA and DM, each against the plain form it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from distill_core.augment import SiameseAugment
from distill_core.methods import engines
from distill_core.methods.dc import freeze_batchnorm
from distill_core.methods.engines import (
    DEFAULT_TILE,
    GradientMatcher,
    RealEmbedder,
    embed_no_grad,
    looped_class_gradients,
    matched_parameters,
    matching_loss,
    sample_real_batch,
    synthetic_batch,
    tiled_class_gradients,
)
from distill_core.networks import build_network
from tests.distill_core.methods.helpers import WIDTH


@pytest.fixture(scope="module")
def real(digits_real):
    return digits_real


# --- class-major batches ------------------------------------------------------------------------

def test_real_batches_are_class_major_with_zero_weight_padding(real):
    batch = sample_real_batch(real, 200, torch.Generator().manual_seed(0))  # more than any class holds
    sizes = [len(i) for i in real.class_index]
    assert batch.counts == sizes and batch.per_class == max(sizes) and batch.num_classes == 10
    w = batch.weights.view(10, -1)
    for c in range(10):
        x, y = batch.block(c)
        assert len(y) == sizes[c] and bool((y == c).all())
        assert bool((batch.labels.view(10, -1)[c] == c).all())  # padding keeps the class label
        torch.testing.assert_close(w[c, :sizes[c]], torch.full((sizes[c],), 1.0 / sizes[c]))
        assert bool((w[c, sizes[c]:] == 0).all())
    torch.testing.assert_close(batch.weights.sum(), torch.tensor(10.0))
    syn = synthetic_batch(torch.zeros(30, 1, 28, 28), torch.arange(10).repeat_interleave(3), 10)
    assert syn.counts == [3] * 10 and torch.allclose(syn.weights, torch.full((30,), 1 / 3))


# --- gradient matching --------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["convnet", "convnet_bn", "lenet", "mlp"])
def test_matching_modes_equal_per_class_loop(real, arch):
    k = real.num_classes
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = build_network(arch, 1, k, 28, **(WIDTH if arch.startswith("convnet") else {}))
    freeze_batchnorm(net, real, g)
    real_batch = sample_real_batch(real, 200, g)  # more than any class holds: uneven, padded blocks
    assert len(set(real_batch.counts)) > 1
    x_syn = torch.randn(3 * k, 1, 28, 28, generator=g).requires_grad_(True)
    y_syn = torch.arange(k).repeat_interleave(3)
    augment = SiameseAugment()
    real_batch = real_batch.with_images(augment(real_batch.images, 7, real_batch.labels, k))

    def loss_and_grad(mode, tile=DEFAULT_TILE):
        syn_batch = synthetic_batch(augment(x_syn, 7, y_syn, k), y_syn, k)
        loss = matching_loss(net, real_batch, syn_batch, mode, tile)
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
    params = matched_parameters(net)
    batch = sample_real_batch(real, 40, g)
    tiled = tiled_class_gradients(net, batch, params, tile=6)
    whole = looped_class_gradients(net, batch, params)
    for t, w in zip(tiled, whole):
        assert t.shape == (real.num_classes, *w.shape[1:])
        torch.testing.assert_close(t, w, rtol=1e-4, atol=1e-6)


def test_unknown_matching_mode_is_rejected(real):
    with pytest.raises(ValueError, match="unknown matching mode 'fast'"):
        GradientMatcher("fast")
    batch = sample_real_batch(real, 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="unknown matching mode 'fast'"):
        matching_loss(build_network("mlp", 1, 10, 28), batch, batch, "fast")


def test_grouped_conv_weight_grads_equal_per_class_calls():
    torch.manual_seed(0)
    for conv in (nn.Conv2d(3, 5, 3, stride=2, padding=3), nn.Conv2d(2, 4, 3, padding=1)):
        x = torch.randn(4 * 3, conv.in_channels, 11, 11)
        delta = torch.randn_like(conv(x))
        grouped = engines._conv_weight_grad_per_class(conv, x, delta, 4, grouped=True)
        looped = engines._conv_weight_grad_per_class(conv, x, delta, 4, grouped=False)
        torch.testing.assert_close(grouped, looped, rtol=1e-4, atol=1e-4)
        full = torch.autograd.grad((conv(x) * delta).sum(), conv.weight)[0]
        torch.testing.assert_close(looped.sum(0), full, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compiled_tiled_matching_equals_the_loop(real):
    """The path long CPU runs take: tiled, real side through torch.compile."""
    k = real.num_classes
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    net = build_network("convnet", 1, k, 28, **WIDTH)
    real_batch = sample_real_batch(real, 24, g)
    x_syn = torch.randn(2 * k, 1, 28, 28, generator=g).requires_grad_(True)
    syn_batch = synthetic_batch(x_syn, torch.arange(k).repeat_interleave(2), k)
    compiled = GradientMatcher("tiled", tile=8, compile=True)
    loss_c = compiled(net, real_batch, syn_batch)
    assert compiled.real_loss.compiled  # did not fall back to eager
    loss_l = GradientMatcher("loop")(net, real_batch, syn_batch)
    torch.testing.assert_close(loss_c, loss_l, rtol=1e-4, atol=1e-5)
    grad_c, = torch.autograd.grad(loss_c, x_syn)
    grad_l, = torch.autograd.grad(loss_l, x_syn)
    assert float((grad_c - grad_l).norm() / grad_l.norm()) < 1e-3


# --- DM's real embedding ------------------------------------------------------------------------

@pytest.mark.parametrize("compile_embed", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_real_embedder_chunks_equal_one_forward(real, compile_embed):
    torch.manual_seed(3)
    x = real.images[:70]  # two full chunks of 32 and a ragged one
    embedder = RealEmbedder(compile=compile_embed)
    for arch in ("convnet", "convnet_bn"):  # BatchNorm in train mode: one forward over the whole batch
        net = build_network(arch, 1, real.num_classes, 28, **WIDTH).train()
        torch.testing.assert_close(embedder(net, x), embed_no_grad(net, x), rtol=1e-4, atol=1e-5)
    assert embedder.fn.compiled == compile_embed


def test_real_embedder_chunks_on_cpu_only_for_sample_independent_networks(real, monkeypatch):
    sizes = []
    monkeypatch.setattr(engines, "embed_no_grad", lambda net, x: (sizes.append(len(x)), net.embed(x))[1])
    embedder = RealEmbedder(compile=False)
    x = real.images[:70]
    embedder(build_network("convnet", 1, 10, 28, **WIDTH), x)
    assert sizes == [32, 32, 6]
    sizes.clear()
    embedder(build_network("convnet_bn", 1, 10, 28, **WIDTH), x)
    assert sizes == [70]
