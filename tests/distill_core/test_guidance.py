"""PTM guidance: CLoM and CCLoM against hand computations on small tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from pydantic import ValidationError

from distill_core.guidance import GuidanceConfig, PTMGuidance, PTMPool, cclom_loss, clom_loss, missing_alpha
from distill_core.networks import Classifier
from distill_core.sets import Normalization, RealData


class TinyNet(Classifier):
    """embed = x.flatten() @ A (no bias); classifier = linear with fixed weights."""

    def __init__(self, seed: int = 0, in_dim: int = 4, feat: int = 3, classes: int = 2):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(torch.randn(in_dim, feat, generator=g))
        self.classifier = nn.Linear(feat, classes)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.randn(classes, feat, generator=g))
            self.classifier.bias.copy_(torch.randn(classes, generator=g))

    def embed(self, x):
        return x.flatten(1) @ self.A


def small_data(seed=1, n=3, classes=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 2, 2, generator=g)
    y = torch.arange(n) % classes
    return x, y


def hand_clom(model: TinyNet, x, y) -> float:
    """Mean cross-entropy, one sample and one logit at a time."""
    A = model.A.tolist()
    W = model.classifier.weight.tolist()
    b = model.classifier.bias.tolist()
    total = 0.0
    for i in range(len(y)):
        pixels = x[i].flatten().tolist()
        feat = [sum(pixels[p] * A[p][f] for p in range(len(pixels))) for f in range(len(A[0]))]
        logits = [sum(W[c][f] * feat[f] for f in range(len(feat))) + b[c] for c in range(len(b))]
        log_norm = math.log(sum(math.exp(v) for v in logits))
        total += log_norm - logits[int(y[i])]
    return total / len(y)


def hand_cclom(model: TinyNet, x_syn, y_syn, x_real, y_real) -> float:
    """sum_ij M_ij D_ij / sum_ij D_ij with D = 1 - cosine of the embeddings, element by element."""
    def features(x):
        A = model.A.tolist()
        out = []
        for img in x:
            pixels = img.flatten().tolist()
            out.append([sum(pixels[p] * A[p][f] for p in range(len(pixels))) for f in range(len(A[0]))])
        return out

    def cosine(u, v):
        dot = sum(a * b for a, b in zip(u, v))
        return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))

    fs, fr = features(x_syn), features(x_real)
    num = den = 0.0
    for i in range(len(fs)):
        for j in range(len(fr)):
            d = 1.0 - cosine(fs[i], fr[j])
            den += d
            if int(y_syn[i]) == int(y_real[j]):
                num += d
    return num / den


def test_clom_matches_hand_computation():
    model = TinyNet()
    x, y = small_data()
    assert float(clom_loss(model, x, y).detach()) == pytest.approx(hand_clom(model, x, y), rel=1e-5)


def test_cclom_matches_hand_computation():
    model = TinyNet(seed=2)
    x_syn, y_syn = small_data(seed=3, n=3)
    x_real, y_real = small_data(seed=4, n=5)
    value = cclom_loss(model, x_syn, y_syn, x_real, y_real)
    assert float(value.detach()) == pytest.approx(hand_cclom(model, x_syn, y_syn, x_real, y_real), rel=1e-5)


def test_cclom_gradient_reaches_only_synthetic_images():
    model = TinyNet(seed=2)
    x_syn, y_syn = small_data(seed=3)
    x_syn.requires_grad_(True)
    x_real, y_real = small_data(seed=4, n=5)
    x_real.requires_grad_(True)
    cclom_loss(model, x_syn, y_syn, x_real, y_real).backward()
    assert x_syn.grad is not None and x_syn.grad.abs().sum() > 0
    assert x_real.grad is None  # real features are computed without a graph


def real_data(n=6) -> RealData:
    x, y = small_data(seed=5, n=n)
    return RealData(x, y, 2, Normalization([0.0], [1.0]))


def test_guidance_scales_by_alpha_per_architecture():
    pool = PTMPool()
    model_a, model_b = TinyNet(seed=0), TinyNet(seed=1)
    pool.add("a", model_a)
    pool.add("b", model_b)
    assert not any(p.requires_grad for p in model_a.parameters())  # frozen
    x, y = small_data()
    seen = set()
    for seed in range(20):
        guidance = PTMGuidance(GuidanceConfig(kind="clom", alpha={"a": 2.0, "b": 10.0}), pool, seed=seed)
        arch, model = pool.sample(torch.Generator().manual_seed(seed))  # its own stream, seeded by `seed`
        value = float(guidance.loss(x, y))
        assert value == pytest.approx(guidance.alpha_for(arch) * hand_clom(model, x, y), rel=1e-5)
        seen.add(arch)
    assert seen == {"a", "b"}  # both architectures get sampled


def test_cclom_guidance_uses_a_real_batch_with_replacement():
    pool = PTMPool()
    model = TinyNet(seed=2)
    pool.add("tiny", model)
    real = real_data()
    guidance = PTMGuidance(GuidanceConfig(kind="cclom", alpha=3.0, real_batch=7), pool, real=real)
    x_syn, y_syn = small_data(seed=3)
    value = float(guidance.loss(x_syn, y_syn))
    # replay the generator: one draw for the architecture, one for the member, then the real indices
    g = torch.Generator().manual_seed(0)
    pool.sample(g)
    idx = torch.randint(len(real.labels), (7,), generator=g)
    expected = 3.0 * hand_cclom(model, x_syn, y_syn, real.images[idx], real.labels[idx])
    assert value == pytest.approx(expected, rel=1e-5)


def test_guidance_validates_its_inputs():
    pool = PTMPool()
    with pytest.raises(ValueError):
        PTMGuidance(GuidanceConfig(kind="clom"), pool)  # empty pool
    pool.add("tiny", TinyNet())
    with pytest.raises(ValueError):
        PTMGuidance(GuidanceConfig(kind="cclom"), pool)  # CCLoM without real data
    with pytest.raises(ValidationError):
        GuidanceConfig(kind="other")
    with pytest.raises(ValidationError):
        GuidanceConfig(kind="clom", real_batch=0)
    with pytest.raises(ValidationError):
        GuidanceConfig(kind="clom", alpha=float("nan"))
    assert GuidanceConfig(kind="clom").alpha == 1.0 and GuidanceConfig(kind="cclom").real_batch == 8196


def two_arch_pool() -> PTMPool:
    pool = PTMPool()
    pool.add("a", TinyNet(seed=0))
    pool.add("b", TinyNet(seed=1))
    return pool


def test_an_alpha_mapping_that_misses_a_pool_architecture_is_refused():
    with pytest.raises(ValueError, match="alpha gives no weight to pool architecture\\(s\\) b"):
        PTMGuidance(GuidanceConfig(kind="clom", alpha={"a": 2.0}), two_arch_pool())
    with pytest.raises(ValueError, match="a, b"):
        PTMGuidance(GuidanceConfig(kind="clom", alpha={"c": 2.0}), two_arch_pool())
    assert missing_alpha({"a": 1.0}, ["b", "a", "c"]) == ["b", "c"]
    assert missing_alpha({"a": 1.0, "default": 0.5}, ["b", "a"]) == []
    assert missing_alpha(2.0, ["b", "a"]) == []


def test_the_default_alpha_covers_the_architectures_a_mapping_leaves_out():
    pool = two_arch_pool()
    guidance = PTMGuidance(GuidanceConfig(kind="clom", alpha={"a": 2.0, "default": 5.0}), pool)
    assert guidance.alpha_for("a") == 2.0 and guidance.alpha_for("b") == 5.0
    x, y = small_data()
    seen = set()
    for seed in range(20):
        arch, model = pool.sample(torch.Generator().manual_seed(seed))
        value = float(PTMGuidance(guidance.config, pool, seed=seed).loss(x, y))
        assert value == pytest.approx({"a": 2.0, "b": 5.0}[arch] * hand_clom(model, x, y), rel=1e-5)
        seen.add(arch)
    assert seen == {"a", "b"}
