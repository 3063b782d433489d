"""The architecture registry: every network a spec can name, for 28x28 and 32x32 inputs.

Definitions follow the dataset-distillation reference code (DC/DSA/DM, MTT), so
that accuracies are comparable with published numbers. Every network has
`embed(x)` (penultimate features, used by DM and CCLoM) and `classifier`.
Instance norm is GroupNorm(C, C, affine=True), as upstream.

Look networks up by the names used in specs with `build_network(name, ...)`.
Each architecture declares the overrides it takes (the ConvNet family:
`width`, `depth`, `norm`, `act`, `pool`; MLP: `width`; VGG11 and ResNet18:
`norm`); `check_network` builds one on the meta device, so a spec can be
refused before any worker fails on an impossible override or image size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "groupnorm":
        return nn.GroupNorm(4, channels, affine=True)
    if kind == "layernorm":
        return nn.GroupNorm(1, channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm '{kind}'")


def make_act(kind: str) -> nn.Module:
    return {"relu": nn.ReLU, "leakyrelu": lambda: nn.LeakyReLU(0.01), "sigmoid": nn.Sigmoid}[kind]()


def make_pool(kind: str) -> nn.Module:
    return {
        "avgpooling": lambda: nn.AvgPool2d(2, 2),
        "maxpooling": lambda: nn.MaxPool2d(2, 2),
        "none": nn.Identity,
    }[kind]()


def first_padding(image_size: int, base: int) -> int:
    """Pad 28x28 inputs to the 32x32 geometry the deep networks were designed for."""
    return base + (32 - image_size) // 2 if image_size < 32 else base


class Classifier(nn.Module):
    """Base: `forward = classifier(embed(x))`; subclasses define `embed`."""

    classifier: nn.Module

    def embed(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def _feature_dim(features: nn.Module, channels: int, image_size: int) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, channels, image_size, image_size)).flatten(1).shape[1])


class ConvNet(Classifier):
    """depth x [conv3x3 -> norm -> act -> pool], then a linear head."""

    def __init__(self, channels, num_classes, image_size, width=128, depth=3,
                 norm="instancenorm", act="relu", pool="avgpooling"):
        super().__init__()
        layers: list[nn.Module] = []
        c = channels
        for d in range(depth):
            # upstream pads grayscale 28x28 MNIST by 3 in the first layer (28 -> 32)
            pad = 3 if (channels == 1 and d == 0 and image_size == 28) else 1
            layers += [nn.Conv2d(c, width, 3, padding=pad), make_norm(norm, width), make_act(act), make_pool(pool)]
            c = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(_feature_dim(self.features, channels, image_size), num_classes)

    def embed(self, x):
        return self.features(x).flatten(1)


class MLP(Classifier):
    def __init__(self, channels, num_classes, image_size, width=128):
        super().__init__()
        self.features = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * image_size * image_size, width), nn.ReLU(),
            nn.Linear(width, width), nn.ReLU(),
        )
        self.classifier = nn.Linear(width, num_classes)

    def embed(self, x):
        return self.features(x)


class LeNet(Classifier):
    def __init__(self, channels, num_classes, image_size):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=2 if image_size == 28 else 0), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2, 2), nn.Flatten(),
        )
        dim = _feature_dim(self.features, channels, image_size)
        self.head = nn.Sequential(nn.Linear(dim, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU())
        self.classifier = nn.Linear(84, num_classes)

    def embed(self, x):
        return self.head(self.features(x))


class AlexNet(Classifier):
    def __init__(self, channels, num_classes, image_size):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 128, 5, padding=first_padding(image_size, 2)), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(128, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(192, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 192, 3, padding=1), nn.ReLU(),
            nn.Conv2d(192, 192, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
        )
        self.classifier = nn.Linear(_feature_dim(self.features, channels, image_size), num_classes)

    def embed(self, x):
        return self.features(x).flatten(1)


class VGG11(Classifier):
    CFG = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]

    def __init__(self, channels, num_classes, image_size, norm="instancenorm"):
        super().__init__()
        layers: list[nn.Module] = []
        c = channels
        for i, v in enumerate(self.CFG):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                pad = first_padding(image_size, 1) if i == 0 else 1
                layers += [nn.Conv2d(c, v, 3, padding=pad), make_norm(norm, v), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(_feature_dim(self.features, channels, image_size), num_classes)

    def embed(self, x):
        return self.features(x).flatten(1)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, norm, avgpool_downsample):
        super().__init__()
        conv_stride = 1 if avgpool_downsample else stride
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=conv_stride, padding=1, bias=False)
        self.bn1 = make_norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = make_norm(norm, cout)
        self.pool = nn.AvgPool2d(2, 2) if (avgpool_downsample and stride != 1) else nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            short = [nn.Conv2d(cin, cout, 1, stride=conv_stride, bias=False)]
            if avgpool_downsample and stride != 1:
                short.append(nn.AvgPool2d(2, 2))
            short.append(make_norm(norm, cout))
            self.shortcut = nn.Sequential(*short)

    def forward(self, x):
        out = F.relu(self.bn1(self.pool(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(Classifier):
    def __init__(self, channels, num_classes, image_size, norm="instancenorm", avgpool_downsample=False):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(channels, 64, 3, padding=first_padding(image_size, 1), bias=False),
            make_norm(norm, 64), nn.ReLU(),
        )
        blocks, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            blocks += [BasicBlock(cin, cout, stride, norm, avgpool_downsample),
                       BasicBlock(cout, cout, 1, norm, avgpool_downsample)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.classifier = nn.Linear(512, num_classes)

    def embed(self, x):
        out = self.layers(self.stem(x))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


Factory = Callable[..., Classifier]

CONVNET_OPTIONS = frozenset({"width", "depth", "norm", "act", "pool"})


@dataclass(frozen=True)
class Architecture:
    name: str
    factory: Factory
    options: frozenset[str] = frozenset()  # the overrides a spec may set


def _convnet(name: str, **fixed) -> Architecture:
    return Architecture(name, lambda c, k, s, **kw: ConvNet(c, k, s, **{**fixed, **kw}), CONVNET_OPTIONS - set(fixed))


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    _convnet("convnet"),
    _convnet("convnet_bn", norm="batchnorm"),
    _convnet("convnet_nonorm", norm="none"),
    *(_convnet(f"convnetd{d}", depth=d) for d in (1, 2, 3, 4)),
    Architecture("mlp", MLP, frozenset({"width"})),
    Architecture("lenet", LeNet),
    Architecture("alexnet", AlexNet),
    Architecture("vgg11", VGG11, frozenset({"norm"})),
    Architecture("vgg11bn", lambda c, k, s: VGG11(c, k, s, norm="batchnorm")),
    Architecture("resnet18", ResNet18, frozenset({"norm"})),
    Architecture("resnet18bn", lambda c, k, s: ResNet18(c, k, s, norm="batchnorm")),
    Architecture("resnet18_ap", lambda c, k, s, **kw: ResNet18(c, k, s, avgpool_downsample=True, **kw),
                 frozenset({"norm"})),
)}

class UnknownArchitecture(ValueError):
    pass


def build_network(name: str, channels: int, num_classes: int, image_size: int, **options) -> Classifier:
    if name not in ARCHITECTURES:
        raise UnknownArchitecture(f"unknown architecture '{name}' (known: {', '.join(sorted(ARCHITECTURES))})")
    arch = ARCHITECTURES[name]
    unknown = unknown_options(name, options)
    if unknown:
        raise ValueError(unknown[0])
    return arch.factory(channels, num_classes, image_size, **options)


def unknown_options(name: str, options) -> list[str]:
    """One message per override that architecture `name` does not take."""
    takes = ARCHITECTURES[name].options
    return [f"{name} takes no option '{o}' (it takes: {', '.join(sorted(takes)) or 'no options'})"
            for o in sorted(options) if o not in takes]


def check_network(name: str, options: dict, channels: int, num_classes: int, image_size: int) -> str | None:
    """Why `name` with `options` cannot run on (channels, image_size) images, or None if it can.

    Builds the network and runs a batch of two through it on the meta device:
    no memory, no compute, only the shape checks.
    """
    try:
        with torch.device("meta"):
            net = build_network(name, channels, num_classes, image_size, **options)
            net(torch.zeros(2, channels, image_size, image_size))
    except (ValueError, RuntimeError, TypeError) as exc:
        text = str(exc).strip().splitlines()
        return text[0] if text else type(exc).__name__
    return None
