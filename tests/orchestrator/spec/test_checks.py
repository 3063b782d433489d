"""Checks across fields: references, method options, networks for their images, augmentation names."""

import pytest

from distill_core.guidance import missing_alpha
from orchestrator.plan.graph import build_stage_graph
from orchestrator.spec.checks import option_grid, option_points
from tests.orchestrator.spec.test_models import errors_of, spec_of


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
    assert list(option_points(option_grid("mtt", {"syn_steps": [5, 10], "gradient": "tesla"}))) == [
        {"syn_steps": 5, "gradient": "tesla"}, {"syn_steps": 10, "gradient": "tesla"}]
    assert list(option_points({})) == [{}]  # no options: one point, the defaults


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
    def two_archs(d, alpha):
        d["ptm_pools"][0].update(architectures=["convnet", "mlp"])
        d["distillation"]["guidance"][1].update(alpha=alpha)

    spec = spec_of(lambda d: two_archs(d, {"convnet": 1.0, "default": 0.5}))  # valid: no error raised
    assert spec.distillation.guidance[1].alpha == {"convnet": 1.0, "default": 0.5}
    assert missing_alpha(spec.distillation.guidance[1].alpha, ["convnet", "mlp"]) == []
    guided = [s for s in build_stage_graph(spec).of_kind("distill") if s.config["guidance"] is not None]
    assert guided and all(s.config["guidance"]["alpha"] == {"convnet": 1.0, "default": 0.5} for s in guided)
    # without the default, mlp has no weight: refused (the default is what covers it)
    assert "distillation.guidance[1].alpha: no weight for pool architecture(s) mlp (give each one, or a 'default')" \
        in errors_of(lambda d: two_archs(d, {"convnet": 1.0}))


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


def pool_on(d, **source):
    """A PTM-only source dataset `f` (CCLoM pool `fp`) beside the coloured digits (3x28x28) target."""
    d["datasets"].append({"name": "f", "bias": "none", "distill": False, **source})
    d["ptm_pools"].append({"name": "fp", "dataset": "f", "architectures": ["convnet"]})
    d["distillation"]["guidance"] = [{"kind": "cclom", "pool": "fp"}]


def test_a_pool_source_of_another_shape_is_checked_after_its_adaptation():
    spec_of(lambda d: pool_on(d, source="fashion_mnist", channels=3))  # grey 1x28x28 read as 3x28x28
    spec_of(lambda d: pool_on(d, source="cifar10", image_size=28))  # 3x32x32 read at 28 px
    assert "distillation.guidance[0]: pool 'fp' sees 3x32x32 images but the targets are 3x28x28" in \
        errors_of(lambda d: pool_on(d, source="fashion_mnist", channels=3, image_size=32))
    assert "distillation.guidance[0]: pool 'fp' sees 1x28x28 images but the targets are 3x28x28" in \
        errors_of(lambda d: pool_on(d, source="cifar10", channels=1, image_size=28))
    lines = errors_of(lambda d: (pool_on(d, source="cifar10", image_size=8),
                                 d["ptm_pools"][1].update(architectures=[{"name": "convnet", "depth": 4}])))
    assert any(x.startswith("ptm_pools[1].architectures[0]: convnet-depth4 cannot take 3x8x8 images of dataset 'f'")
               for x in lines), lines


def test_adapted_channels_must_suit_the_bias_and_colouring_still_makes_rgb():
    spec_of(lambda d: d["datasets"][0].update(source="cifar10", channels=1, image_size=28))  # luma, then coloured
    assert "datasets[0]: bias 'colored' colours grey images: leave channels unset (or 1)" in \
        errors_of(lambda d: d["datasets"][0].update(channels=3))
    assert "datasets[0]: bias 'corrupted' corrupts RGB images: leave channels unset (or 3)" in \
        errors_of(lambda d: d["datasets"][0].update(source="cifar10", bias="corrupted", channels=1))
    spec_of(lambda d: d["datasets"][0].update(bias="corrupted", channels=3))  # grey digits replicated, then corrupted


def test_an_imagefolder_source_declares_its_folder_size_and_classes():
    folder = {"source": "imagefolder", "data_root": "/data/tiny-imagenet-200", "image_size": 28, "num_classes": 200}
    spec_of(lambda d: pool_on(d, **folder))  # CCLoM: any classes; validation reads no file
    assert "distillation.guidance[0]: CLoM needs a PTM with the target's classes; use cclom for pool 'fp'" in \
        errors_of(lambda d: (pool_on(d, **folder), d["distillation"]["guidance"][0].update(kind="clom")))
    spec_of(lambda d: (pool_on(d, **{**folder, "num_classes": 10}), d["distillation"]["guidance"][0].update(kind="clom")))
    assert "datasets[1]: source 'imagefolder' needs data_root, num_classes (the folder, the image size to read it " \
           "at, and its number of class folders)" in errors_of(lambda d: pool_on(d, source="imagefolder", image_size=28))
    assert "datasets[0]: num_classes: only source imagefolder declares it ('digits' has 10 classes)" in \
        errors_of(lambda d: d["datasets"][0].update(num_classes=10))
    assert "datasets[1]: bias 'colored' needs a grayscale source (digits, fashion_mnist, mnist)" in \
        errors_of(lambda d: pool_on(d, **folder, **{"bias": "colored"}))

    def two_folders(d):
        pool_on(d, **folder)
        d["datasets"].append({**d["datasets"][1], "name": "g", "data_root": "/data/imagenette"})
    assert ("datasets[2]: the same settings as datasets[1] on another data_root: a stage's key does not include "
            "data_root, so both would be one stage") in errors_of(two_folders)


def test_submit_checks_an_imagefolders_declared_classes_when_it_reads_the_folder(tmp_path):
    from orchestrator.errors import UserError
    from orchestrator.execution.submit import check_data
    from orchestrator.plan.graph import build_stage_graph
    from tests.distill_core.data.test_sources import _image_folder

    root = _image_folder(tmp_path / "tiny")  # 3 class folders

    def spec(classes):
        return spec_of(lambda d: pool_on(d, source="imagefolder", data_root=str(root), image_size=28,
                                         num_classes=classes))
    good = spec(3)
    check_data(good, build_stage_graph(good), cached=set())
    bad = spec(200)
    with pytest.raises(UserError) as exc:
        check_data(bad, build_stage_graph(bad), cached=set())
    assert exc.value.lines == [f"datasets[1].num_classes: 200 declared but {root} has 3 class folders"]


def test_a_held_out_split_set_to_zero_is_refused_where_the_study_reads_one():
    def val_without_split(d):
        d["evaluation"]["selection"] = "val"
        d["datasets"][0]["val_fraction"] = 0
    assert errors_of(val_without_split) == [
        "datasets[0].val_fraction: is 0, but evaluation.selection 'val' needs a held-out split (leave it unset for 0.1)"]


def restrict(**where):
    return lambda d: d["distillation"]["guidance"][1].update(where)


@pytest.mark.parametrize("mutate, expected", [
    (restrict(ipc=[10, 20]), ["distillation.guidance[1].ipc: 20 is not an IPC of the study (its IPCs: 1, 10)"]),
    (lambda d: (d["distillation"].update(methods=["dm", "dc"]), restrict(methods=["dm", "dsa"])(d)),
     ["distillation.guidance[1].methods: 'dsa' is not a method of the study (its methods: dm, dc)"]),
    (restrict(methods=["dmm"]), ["distillation.guidance[1].methods[0]: unknown method 'dmm' (did you mean 'dm'?)"]),
    # an entry left nowhere to run says so, beside what is wrong with it
    (restrict(ipc=[50]), ["distillation.guidance[1].ipc: 50 is not an IPC of the study (its IPCs: 1, 10)",
                          "distillation.guidance[1]: applies to no (method, IPC) of the study, so it never runs "
                          "(methods taking guidance: dm; IPCs: 1, 10)"]),
    (lambda d: (d["distillation"].update(methods=["dm", "random"]), restrict(methods=["random"])(d)),
     ["distillation.guidance[1].methods: 'random' takes no guidance (it distils no images)",
      "distillation.guidance[1]: applies to no (method, IPC) of the study, so it never runs "
      "(methods taking guidance: dm; IPCs: 1, 10)"]),
])
def test_a_guidance_restriction_names_methods_and_ipcs_of_the_study(mutate, expected):
    assert errors_of(mutate) == expected


def test_a_guidance_restriction_within_the_study_is_valid():
    spec = spec_of(restrict(methods="dm", ipc=10))  # a scalar is a one-point list, as on every grid axis
    assert (spec.distillation.guidance[1].methods, spec.distillation.guidance[1].ipc) == (["dm"], [10])


def five_by_forty_options(d):
    """5 MTT options x 40 values: 102,400,000 points from a few KB of spec."""
    with_expert_pool(d)
    d["distillation"]["options"] = {"mtt": {
        "syn_steps": list(range(1, 41)), "expert_epochs": list(range(1, 41)), "max_start_epoch": list(range(1, 41)),
        "lr_lr": [i * 1e-6 for i in range(1, 41)], "lr_teacher": [i * 1e-3 for i in range(1, 41)]}}


def test_a_huge_option_grid_is_checked_axis_by_axis_not_point_by_point():
    from distill_core.methods import METHODS
    from orchestrator.spec.checks import checked_points
    spec = spec_of(five_by_forty_options)  # returns: not 102,400,000 model validations (nor a MemoryError)
    axes = spec.distillation.options["mtt"]
    points = list(checked_points(METHODS["mtt"].options, axes))
    assert len(points) == 1 + 5 * 39  # the first point, then each other value of each axis once
    assert {p["lr_teacher"] for p in points} == set(axes["lr_teacher"])


def test_a_bad_value_on_the_last_axis_of_a_huge_grid_is_still_refused():
    def mutate(d):
        five_by_forty_options(d)
        d["distillation"]["options"]["mtt"]["lr_teacher"][-1] = 0
    assert "distillation.options.mtt.lr_teacher[39]: must be > 0.0" in errors_of(mutate)


def test_a_model_with_a_cross_field_validator_is_run_on_at_most_the_first_points():
    from pydantic import model_validator

    from distill_core.methods import Options
    from orchestrator.spec.checks import MAX_CHECKED_POINTS, checked_points

    class Crossed(Options):
        a: int = 1
        b: int = 1

        @model_validator(mode="after")
        def a_below_b(self):
            return self

    points = checked_points(Crossed, {"a": list(range(1000)), "b": list(range(1000))})
    assert sum(1 for _ in points) == MAX_CHECKED_POINTS
