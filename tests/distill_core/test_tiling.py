"""Tiled training steps: the summed tile gradients are the whole batch's gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill_core.networks import build_network
from distill_core.tiling import TILE_CPU, batch_backward, ce_sum, default_tile, samples_independent


def grads_after(net, x, y, tile):
    net.zero_grad(set_to_none=True)
    total, correct = batch_backward(lambda xb, yb: ce_sum(net, xb, yb), x, y, tile)
    return [p.grad.clone() for p in net.parameters()], total, correct


def test_ce_sum_is_the_summed_cross_entropy_and_the_correct_count():
    torch.manual_seed(0)
    net = build_network("convnet", 1, 10, 28, width=8)
    x, y = torch.randn(9, 1, 28, 28), torch.randint(0, 10, (9,))
    loss, correct = ce_sum(net, x, y)
    logits = net(x)
    torch.testing.assert_close(loss, F.cross_entropy(logits, y, reduction="sum"))
    assert int(correct) == int((logits.argmax(1) == y).sum())


def test_tiles_sum_to_the_whole_batch_gradient():
    torch.manual_seed(0)
    net = build_network("convnet", 1, 10, 28, width=8)
    x, y = torch.randn(23, 1, 28, 28), torch.randint(0, 10, (23,))
    whole, whole_total, whole_correct = grads_after(net, x, y, None)
    # the batch's MEAN loss is what is differentiated
    expected = torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()))
    for a, b in zip(whole, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for tile in (1, 5, 16, 23, 64):  # ragged last tiles, and tiles larger than the batch
        grads, total, correct = grads_after(net, x, y, tile)
        for a, b in zip(grads, whole):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(total, whole_total, rtol=1e-5, atol=1e-5)
        assert int(correct) == int(whole_correct)
        assert not total.requires_grad  # detached: no graph kept alive


def test_batchnorm_networks_are_not_tiled():
    bn = build_network("convnet_bn", 1, 10, 28, width=8)
    inorm = build_network("convnet", 1, 10, 28, width=8)
    assert not samples_independent(bn) and samples_independent(inorm)
    assert default_tile(bn, torch.device("cpu")) is None
    assert default_tile(inorm, torch.device("cpu")) == TILE_CPU
    assert default_tile(inorm, torch.device("cuda")) is None
