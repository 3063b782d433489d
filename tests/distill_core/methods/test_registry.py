"""The method registry: built-in records, a method defined here end to end, and the evaluation protocols."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from pydantic import Field, ValidationError

from distill_core.augment import DSA_STRATEGY, DSA_STRATEGY_NO_FLIP, DCAugment, SiameseAugment, make_augmentation
from distill_core.data.sources import SOURCES
from distill_core.methods import (
    METHODS,
    DistillConfig,
    EvalProtocol,
    Method,
    Options,
    UnknownMethod,
    dc,
    get_method,
    register,
    unregister,
)
from distill_core.methods.base import init_synthetic, log_iteration
from distill_core.methods.registry import dsa_protocol, dsa_strategy
from distill_core.runtime import DEFAULT_RUNTIME
from distill_core.sets import SyntheticSet
from tests.distill_core.methods.helpers import config

BUILT_IN = {"dc", "dsa", "dm", "mtt", "random", "herding", "whole"}


@pytest.fixture(scope="module")
def real(digits_real):
    return digits_real


# --- a method defined in the test -----------------------------------------------------------------

class NudgeOptions(Options):
    step: float = Field(default=0.5, gt=0, le=1)


def distill_nudge(real, cfg, runtime=DEFAULT_RUNTIME, guidance=None, experts=None, progress=None) -> SyntheticSet:
    """Every iteration moves each synthetic image `step` of the way to its class's mean real image."""
    opts = cfg.options  # NudgeOptions, built with the config
    syn = init_synthetic(real, cfg, torch.Generator().manual_seed(cfg.seed))
    means = torch.stack([real.images[idx].mean(0) for idx in real.class_index])
    for it in range(cfg.iterations):
        syn.images = syn.images + opts.step * (means[syn.labels] - syn.images)
        log_iteration(syn, it, cfg, {"distance": float((syn.images - means[syn.labels]).norm())}, progress)
    return syn


def nudge_method(name: str = "test_nudge") -> Method:
    return Method(name=name, distill=distill_nudge, iterations=3, lr_img=1.0, init="noise", augment=False,
                  evaluation=dsa_protocol, options=NudgeOptions, summary="moves images to their class mean")


@pytest.fixture
def nudge():
    method = register(nudge_method())
    try:
        yield method
    finally:
        unregister(method.name)


def test_a_registered_method_is_found_validated_and_run(real, nudge):
    assert get_method("test_nudge") is nudge and METHODS["test_nudge"] is nudge
    cfg = config("test_nudge", ipc=2, iterations=nudge.iterations, init=nudge.init, options={"step": 0.25})
    assert cfg.options == NudgeOptions(step=0.25) and type(cfg.options) is NudgeOptions
    assert config("test_nudge").options == NudgeOptions(step=0.5)  # defaults
    for bad in ({"step": 2.0}, {"step": 0.0}, {"stride": 0.5}):  # bounds, and unknown options
        with pytest.raises(ValidationError):
            config("test_nudge", options=bad)
    # stored as the options that were set, and rebuilt typed from that dict (a stage's config round trip)
    assert cfg.to_dict()["options"] == {"step": 0.25} and config("test_nudge").to_dict()["options"] == {}
    assert DistillConfig(**cfg.to_dict()) == cfg
    syn = get_method("test_nudge").distill(real, cfg)
    init = init_synthetic(real, cfg, torch.Generator().manual_seed(cfg.seed))
    means = torch.stack([real.images[idx].mean(0) for idx in real.class_index])[init.labels]
    torch.testing.assert_close(syn.images, means + 0.75**3 * (init.images - means))
    assert [r["iteration"] for r in syn.history] == [0, 1, 2]
    assert nudge.protocol(SOURCES["digits"], "convnet") == EvalProtocol(f"dsa:{DSA_STRATEGY_NO_FLIP}", 1000)


def test_unregister_removes_a_method():
    method = register(nudge_method("test_gone"))
    try:
        assert get_method("test_gone") is method
    finally:
        unregister("test_gone")
    assert "test_gone" not in METHODS
    with pytest.raises(UnknownMethod, match="unknown method 'test_gone'"):
        get_method("test_gone")
    unregister("test_gone")  # unregistering twice is harmless


def test_a_method_record_needs_its_defaults():
    with pytest.raises(TypeError):
        Method(name="bare", distill=distill_nudge)  # no iterations, lr_img, init, augment, evaluation
    with pytest.raises(ValueError, match="iterations >= 1"):
        dataclasses.replace(nudge_method(), iterations=0)
    with pytest.raises(ValueError, match="lr_img > 0"):
        dataclasses.replace(nudge_method(), lr_img=0.0)
    with pytest.raises(ValueError, match="lowercase"):
        dataclasses.replace(nudge_method(), name="Nudge-2")
    with pytest.raises(TypeError, match="options must subclass"):
        dataclasses.replace(nudge_method(), options=dict)
    coreset = dataclasses.replace(nudge_method(), iterations=0, lr_img=0.0, optimises_images=False)
    assert not coreset.optimises_images  # a method that does not optimise images needs neither


def test_names_are_unique():
    before = METHODS["dc"]
    with pytest.raises(ValueError, match="'dc' is already registered"):
        register(dataclasses.replace(nudge_method(), name="dc"))
    assert METHODS["dc"] is before
    assert register(before) is before  # registering the same record again is a no-op


def test_unknown_methods_name_the_known_ones():
    with pytest.raises(UnknownMethod, match="known: .*dc.*mtt") as info:
        get_method("dd")
    assert isinstance(info.value, ValueError)


# --- the built-in methods -------------------------------------------------------------------------

def test_registry_names_every_method():
    assert BUILT_IN <= set(METHODS)
    assert get_method("dsa").distill is dc.gradient_matching
    assert get_method("dc").distill is dc.gradient_matching  # one recipe: DSA when cfg.augment is set


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_built_in_records_have_a_summary_and_sane_defaults(name):
    m = get_method(name)
    assert m.name == name and m.summary
    assert m.init in ("real", "noise")
    assert issubclass(m.options, Options)
    opts = m.options()  # every option has a default
    assert m.options(**opts.model_dump()) == opts
    if m.optimises_images:
        assert m.iterations >= 1 and m.lr_img > 0
        cfg = DistillConfig(method=name, ipc=10, iterations=m.iterations, lr_img=m.lr_img, init=m.init)
        assert cfg.options == opts and type(cfg.options) is m.options
    else:
        assert m.iterations == 0 and m.lr_img == 0.0
    assert m.needs_experts == (name == "mtt")
    assert m.augment == (name in ("dsa", "dm", "mtt"))
    for source in SOURCES.values():  # every protocol is a valid evaluation setting
        protocol = m.protocol(source, "convnet")
        assert protocol.epochs >= 1
        make_augmentation(protocol.augment)


# --- evaluation protocols -------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["fashion_mnist", "cifar10", "cifar100", "svhn"])
def test_dc_protocol_without_augmentation_for_300_epochs(source):
    protocol = get_method("dc").protocol(SOURCES[source], "convnet")
    assert (protocol.augment, protocol.epochs) == (None, 300) and protocol.label == "none/300ep"


@pytest.mark.parametrize("source", ["mnist", "digits"])
def test_dc_protocol_on_mnist_like_sources(source):
    protocol = get_method("dc").protocol(SOURCES[source], "convnet")
    assert (protocol.augment, protocol.epochs) == ("dc:crop_scale_rotate", 1000)
    assert isinstance(make_augmentation(protocol.augment), DCAugment)


@pytest.mark.parametrize("source", ["mnist", "fashion_mnist", "cifar10"])
def test_dc_protocol_for_a_batchnorm_convnet(source):
    protocol = get_method("dc").protocol(SOURCES[source], "convnet_bn")
    assert (protocol.augment, protocol.epochs) == ("dc:crop_noise", 1000)


@pytest.mark.parametrize("method", ["dsa", "dm", "mtt", "random", "herding", "whole"])
def test_dsa_protocol_drops_flip_for_digits(method):
    m = get_method(method)
    for source in ("digits", "mnist", "svhn"):
        assert m.protocol(SOURCES[source], "convnet") == EvalProtocol(f"dsa:{DSA_STRATEGY_NO_FLIP}", 1000)
        assert dsa_strategy(SOURCES[source]) == DSA_STRATEGY_NO_FLIP
    for source in ("fashion_mnist", "cifar10"):
        assert m.protocol(SOURCES[source], "convnet") == EvalProtocol(f"dsa:{DSA_STRATEGY}", 1000)
        assert dsa_strategy(SOURCES[source]) == DSA_STRATEGY
    assert m.protocol(SOURCES["mnist"], "convnet_bn").epochs == 1000
    aug = make_augmentation(m.protocol(SOURCES["digits"], "convnet").augment)
    assert isinstance(aug, SiameseAugment) and "flip" not in aug.families


# --- the guidance hook, for every method that optimises images ------------------------------------

class CountingGuidance:
    """Pulls every synthetic pixel towards 0 and counts the calls."""

    def __init__(self):
        self.calls = 0

    def loss(self, x_syn, y_syn):
        self.calls += 1
        return 0.5 * (x_syn ** 2).mean()


@pytest.mark.parametrize("method", ["dc", "dsa", "dm", "mtt"])
def test_guidance_is_added_once_per_outer_step(real, expert, method):
    guidance = CountingGuidance()
    options = {"outer_loop": 2, "inner_loop": 1} if method in ("dc", "dsa") else {}
    if method == "mtt":
        options = {"syn_steps": 2, "expert_epochs": 2, "max_start_epoch": 1}
    augment = DSA_STRATEGY_NO_FLIP if get_method(method).augment else None
    cfg = config(method, iterations=2, lr_img=1.0, options=options, augment=augment)
    kwargs = {"experts": [expert]} if method == "mtt" else {}
    syn = get_method(method).distill(real, cfg, guidance=guidance, **kwargs)
    assert guidance.calls == (4 if method in ("dc", "dsa") else 2)
    assert "loss_ptm" in syn.history[-1]
    unguided = get_method(method).distill(real, cfg, **kwargs)
    assert "loss_ptm" not in unguided.history[-1]
    assert not torch.equal(syn.images, unguided.images)  # the term reaches the synthetic images
