"""Checks across fields: references, method options, networks for their images, augmentation names."""

import pytest

from orchestrator.spec_checks import option_grid, option_points
from tests.orchestrator.test_spec import errors_of, spec_of


def with_expert_pool(d):
    d["ptm_pools"].append({"name": "experts", "dataset": "d", "architectures": ["convnet"], "recipe": "expert",
                           "epochs": 3})
    d["distillation"].update(methods=["dm", "mtt"], trajectories="experts")


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["distillation"].update(options={"dm": {"no_such_option": 1}}),
     "distillation.options.dm.no_such_option: unknown option"),
    (lambda d: d["distillation"].update(options={"dmm": {}}),
     "distillation.options.dmm: unknown method 'dmm' (did you mean 'dm'?)"),
    (lambda d: (with_expert_pool(d), d["distillation"].update(options={"mtt": {"syn_stpes": 3}})),
     "distillation.options.mtt.syn_stpes: unknown option (did you mean 'syn_steps'?)"),
    (lambda d: (with_expert_pool(d), d["distillation"].update(options={"mtt": {"syn_steps": [5, 0]}})),
     "distillation.options.mtt.syn_steps[1]: must be >= 1"),
    (lambda d: (with_expert_pool(d), d["distillation"].update(options={"mtt": {"gradient": "fast"}})),
     "distillation.options.mtt.gradient[0]: must be 'exact' or 'tesla', got 'fast'"),
    (lambda d: d["distillation"].update(options={"dc": {"outer_loop": 2}}),
     "distillation.options.dc: method 'dc' is not in distillation.methods"),
])
def test_method_options_are_typed_by_the_method(mutate, expected):
    assert expected in errors_of(mutate)


def test_option_grids_expand_to_points():
    spec = spec_of(lambda d: (with_expert_pool(d),
                              d["distillation"].update(options={"mtt": {"syn_steps": [5, 10], "gradient": "tesla"}})))
    assert spec.distillation.options["mtt"] == {"syn_steps": [5, 10], "gradient": ["tesla"]}
    assert option_grid("mtt", spec.distillation.options["mtt"]) == {"syn_steps": [5, 10], "gradient": ["tesla"]}
    assert option_points("mtt", {"syn_steps": [5, 10], "gradient": "tesla"}) == [
        {"syn_steps": 5, "gradient": "tesla"}, {"syn_steps": 10, "gradient": "tesla"}]
    assert option_points("dm", {}) == [{}]


@pytest.mark.parametrize("archs, expected", [
    ([{"name": "resnet18", "width": 64}], "evaluation.architectures[0].width: resnet18 takes no option 'width' (it takes: norm)"),
    ([{"name": "lenet", "width": 32}], "evaluation.architectures[0].width: lenet takes no option 'width' (it takes: no options)"),
    (["convnet", {"name": "vgg11bn", "norm": "instancenorm"}],
     "evaluation.architectures[1].norm: vgg11bn takes no option 'norm' (it takes: no options)"),
])
def test_overrides_an_architecture_does_not_take_are_refused(archs, expected):
    assert expected in errors_of(lambda d: d["evaluation"].update(architectures=archs))


def test_a_network_too_deep_for_its_images_is_refused_before_any_worker():
    lines = errors_of(lambda d: d["distillation"].update(arch={"name": "convnet", "depth": 9}))
    assert len(lines) == 1
    assert lines[0].startswith("distillation.arch: convnet-depth9 cannot take 3x28x28 images of dataset 'd' (")


def test_pool_architectures_are_checked_on_their_own_dataset():
    line = "ptm_pools[0].architectures[0]: convnet-depth6 cannot take 3x28x28 images of dataset 'd' ("
    lines = errors_of(lambda d: d["ptm_pools"][0].update(architectures=[{"name": "convnet", "depth": 6}]))
    assert any(x.startswith(line) for x in lines), lines


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["distillation"]["guidance"][1].update(pool="q"),
     "distillation.guidance[1].pool: unknown ptm pool 'q' (known: p)"),
    (lambda d: d["ptm_pools"][0].update(dataset="dd"), "ptm_pools[0].dataset: unknown dataset 'dd' (did you mean 'd'?)"),
    (lambda d: d["distillation"]["guidance"][1].update(alpha={"convnet": 1.0, "vgg": 2.0}),
     "distillation.guidance[1].alpha.vgg: not an architecture of pool 'p' (known: convnet)"),
    (lambda d: (d["ptm_pools"][0].update(architectures=["convnet", "mlp"]),
                d["distillation"]["guidance"][1].update(alpha={"convnet": 1.0})),
     "distillation.guidance[1].alpha: no weight for pool architecture(s) mlp (give each one, or a 'default')"),
    (lambda d: d["distillation"]["guidance"][1].update(checkpoint_epochs=[9]),
     "distillation.guidance[1].checkpoint_epochs[0]: pool 'p' keeps no checkpoint at epoch 9"),
    (lambda d: d["ptm_pools"][0].update(checkpoint_epochs=[4]),
     "ptm_pools[0].checkpoint_epochs[0]: must be within [0, epochs=3], got 4"),
    (lambda d: d["ptm_pools"][0].update(aligned_ratio=0.5, severity=1),
     "ptm_pools[0].aligned_ratio: 0.5 is not among datasets 'd' aligned_ratios"),
    (lambda d: (d["datasets"][0].update(severities=[1, 2]), d["ptm_pools"][0].update(aligned_ratio=0.1)),
     "ptm_pools[0]: set both aligned_ratio and severity to pin one variant of 'd'"),
    (lambda d: d["datasets"][0].update(distill=False), "datasets: at least one dataset must have distill: true"),
    (lambda d: d["distillation"].update(augmentation="colr_crop"),
     "distillation.augmentation: unknown DSA transform(s) ['colr']; known: ['color', 'crop', 'cutout', 'flip', "
     "'rotate', 'scale'] (or auto, none)"),
])
def test_references_resolve(mutate, expected):
    assert expected in errors_of(mutate)


def test_alpha_default_covers_the_pool():
    spec_of(lambda d: (d["ptm_pools"][0].update(architectures=["convnet", "mlp"]),
                       d["distillation"]["guidance"][1].update(alpha={"convnet": 1.0, "default": 0.5})))


def test_guidance_pool_must_see_the_targets_image_shape():
    def cross_domain(d):
        d["datasets"].append({"name": "f", "source": "fashion_mnist", "bias": "none", "distill": False})
        d["ptm_pools"].append({"name": "fp", "dataset": "f", "architectures": ["convnet"]})
        d["distillation"]["guidance"] = [{"kind": "cclom", "pool": "fp"}]
    assert "distillation.guidance[0]: pool 'fp' sees 1x28x28 images but the targets are 3x28x28" in errors_of(cross_domain)


def test_clom_needs_the_targets_classes():
    def clom_cifar100(d):
        d["datasets"] = [{"name": "c10", "source": "cifar10", "bias": "none"},
                         {"name": "c100", "source": "cifar100", "bias": "none", "distill": False}]
        d["ptm_pools"] = [{"name": "p", "dataset": "c100", "architectures": ["convnet"]}]
    assert "distillation.guidance[1]: CLoM needs a PTM with the target's classes; use cclom for pool 'p'" \
        in errors_of(clom_cifar100)


def test_methods_needing_experts_need_an_expert_pool_keeping_every_epoch():
    lines = errors_of(lambda d: d["distillation"].update(methods=["mtt"]))
    assert "distillation.trajectories: method 'mtt' needs expert trajectories: a ptm pool with recipe: expert" in lines
    lines = errors_of(lambda d: d["distillation"].update(methods=["mtt"], trajectories="p"))
    assert ("distillation.trajectories: pool 'p' trains with recipe 'ptm'; method 'mtt' needs recipe: expert "
            "(MTT's buffer recipe)") in lines

    def pinned(d):
        with_expert_pool(d)
        d["ptm_pools"][1]["checkpoint_epochs"] = [3]
    assert "distillation.trajectories: pool 'experts' must keep every epoch (leave checkpoint_epochs unset)" \
        in errors_of(pinned)
    spec_of(with_expert_pool)
