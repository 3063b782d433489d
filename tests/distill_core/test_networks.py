"""The architecture registry: every network runs at the project's geometries; impossible builds are refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill_core.networks import (
    ARCHITECTURES,
    Architecture,
    UnknownArchitecture,
    build_network,
    check_network,
    unknown_options,
)

GEOMETRIES = [(1, 28), (3, 28), (3, 32)]


@pytest.mark.parametrize("channels,size", GEOMETRIES)
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_forward_backward_and_embed(name, channels, size):
    torch.manual_seed(0)
    net = build_network(name, channels, 10, size)
    x = torch.randn(2, channels, size, size, requires_grad=True)
    logits = net(x)
    assert logits.shape == (2, 10)
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in net.parameters())
    features = net.embed(x.detach())
    assert features.dim() == 2 and features.shape[0] == 2
    assert features.shape[1] == net.classifier.in_features


def test_convnet_options_and_unknown_names():
    net = build_network("convnet", 1, 10, 28, width=16, depth=2)
    assert net.classifier.in_features == 16 * 8 * 8  # 28 padded to 32, two 2x2 poolings
    assert build_network("convnetd1", 3, 10, 32, width=8).classifier.in_features == 8 * 16 * 16
    with pytest.raises(UnknownArchitecture):
        build_network("no_such_net", 1, 10, 28)


def test_registry_records_declare_their_options():
    for name, arch in ARCHITECTURES.items():
        assert isinstance(arch, Architecture) and arch.name == name
    assert ARCHITECTURES["convnet"].options == {"width", "depth", "norm", "act", "pool"}
    assert ARCHITECTURES["convnet_bn"].options == {"width", "depth", "act", "pool"}  # norm is fixed
    assert ARCHITECTURES["convnetd2"].options == {"width", "norm", "act", "pool"}  # depth is fixed
    assert ARCHITECTURES["mlp"].options == {"width"}
    assert ARCHITECTURES["lenet"].options == ARCHITECTURES["vgg11bn"].options == frozenset()
    assert ARCHITECTURES["resnet18"].options == {"norm"}
    assert set().union(*(a.options for a in ARCHITECTURES.values())) == {"width", "depth", "norm", "act", "pool"}


def test_build_network_refuses_overrides_an_architecture_does_not_take():
    with pytest.raises(ValueError, match="resnet18 takes no option 'width' \\(it takes: norm\\)"):
        build_network("resnet18", 3, 10, 32, width=64)
    with pytest.raises(ValueError, match="convnet_bn takes no option 'norm'"):
        build_network("convnet_bn", 1, 10, 28, norm="instancenorm")  # would silently drop BatchNorm
    assert unknown_options("lenet", {"width": 1, "depth": 2}) == [
        "lenet takes no option 'depth' (it takes: no options)", "lenet takes no option 'width' (it takes: no options)"]
    assert unknown_options("convnet", {"width": 8, "depth": 2}) == []
    net = build_network("resnet18", 3, 10, 32, norm="batchnorm")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


@pytest.mark.parametrize("name,options,channels,size,reason", [
    ("resnet18", {"width": 64}, 3, 32, "resnet18 takes no option 'width'"),
    ("lenet", {"width": 32}, 1, 28, "lenet takes no option 'width'"),
    ("vgg11bn", {"norm": "instancenorm"}, 3, 32, "vgg11bn takes no option 'norm'"),
    ("convnet", {"depth": 9}, 1, 28, None),  # pooled down to nothing
    ("lenet", {}, 1, 8, None),  # 8x8 images are too small for its 5x5 convolutions
    ("convnet", {"norm": "spectral"}, 1, 28, "unknown norm 'spectral'"),
    ("no_such_net", {}, 1, 28, "unknown architecture 'no_such_net'"),
])
def test_check_network_says_why_a_network_cannot_run(name, options, channels, size, reason):
    why = check_network(name, options, channels, 10, size)
    assert isinstance(why, str) and why
    if reason is not None:
        assert reason in why


@pytest.mark.parametrize("channels,size", GEOMETRIES)
def test_check_network_accepts_every_architecture_at_the_project_geometries(channels, size):
    assert {name: check_network(name, {}, channels, 10, size) for name in ARCHITECTURES} == \
        {name: None for name in ARCHITECTURES}
    assert check_network("convnet", {"width": 32, "depth": 4, "norm": "batchnorm"}, channels, 10, size) is None


def test_check_network_allocates_nothing():
    before = torch.zeros(1)  # the default device stays the CPU after the meta-device check
    assert check_network("vgg11", {}, 3, 10, 32) is None
    assert torch.zeros(1).device == before.device == torch.device("cpu")
