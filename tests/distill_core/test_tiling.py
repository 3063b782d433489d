"""Tiled training steps: the summed tile gradients are the whole batch's gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill_core.networks import build_network
from distill_core.tiling import TILE_CPU, batch_loss_backward, default_tile, samples_independent


def grads_after(net, x, y, tile):
    net.zero_grad(set_to_none=True)
    batch_loss_backward(lambda xb, yb, reduction: F.cross_entropy(net(xb), yb, reduction=reduction), x, y, tile)
    return [p.grad.clone() for p in net.parameters()]


def test_tiles_sum_to_the_whole_batch_gradient():
    torch.manual_seed(0)
    net = build_network("convnet", 1, 10, 28, width=8)
    x, y = torch.randn(23, 1, 28, 28), torch.randint(0, 10, (23,))
    whole = grads_after(net, x, y, None)
    for tile in (1, 5, 16, 23, 64):  # ragged last tiles, and tiles larger than the batch
        for a, b in zip(grads_after(net, x, y, tile), whole):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_batchnorm_networks_are_not_tiled():
    bn = build_network("convnet_bn", 1, 10, 28, width=8)
    inorm = build_network("convnet", 1, 10, 28, width=8)
    assert not samples_independent(bn) and samples_independent(inorm)
    assert default_tile(bn, torch.device("cpu")) is None
    assert default_tile(inorm, torch.device("cpu")) == TILE_CPU
    assert default_tile(inorm, torch.device("cuda")) is None
