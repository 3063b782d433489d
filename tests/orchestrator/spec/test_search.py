"""The `distillation.search` block: spaces are checked like the rest of the spec, one line each."""

import pytest

from orchestrator.spec.search import Domain
from tests.orchestrator.spec.test_checks import with_expert_pool
from tests.orchestrator.spec.test_models import errors_of, spec_of


def searching(space, **more):
    def mutate(d):
        d["distillation"]["iterations"] = None
        d["distillation"]["search"] = {"space": space, **more}
    return mutate


def test_a_valid_search_block_parses_with_its_defaults():
    spec = spec_of(searching({"lr_img": {"loguniform": [0.001, 100.0]}, "guidance.alpha": {"choice": [0.1, 1.0]},
                              "iterations": {"randint": [10, 40]}}, num_samples=6, scheduler="asha",
                             algorithm="optuna", max_concurrent=2))
    s = spec.distillation.search
    assert (s.num_samples, s.scheduler, s.algorithm, s.max_concurrent) == (6, "asha", "optuna", 2)
    assert s.space["lr_img"].kind == "loguniform" and s.space["iterations"].value == (10, 40)
    assert s.metric == "val_acc" and s.proxy.epochs == 100 and s.proxy.every is None


@pytest.mark.parametrize("space, more, expected", [
    ({"lr_imgg": {"choice": [1.0]}}, {}, "distillation.search.space.lr_imgg: not a searchable field (did you mean 'lr_img'?)"),
    ({"lr_img": {"loguniform": [0.0, 1.0]}}, {}, "distillation.search.space.lr_img: loguniform needs positive bounds, got low 0"),
    ({"lr_img": {"loguniform": [-1.0, 1.0]}}, {}, "distillation.search.space.lr_img: loguniform needs positive bounds, got low -1"),
    ({"lr_img": {"uniform": [2.0, 1.0]}}, {}, "distillation.search.space.lr_img: empty range [2, 1] (low must be below high)"),
    ({"lr_img": {"uniform": [1.0, 1.0]}}, {}, "distillation.search.space.lr_img: empty range [1, 1] (low must be below high)"),
    ({"iterations": {"randint": [5, 4]}}, {}, "distillation.search.space.iterations: empty range [5, 4] (low must not exceed high)"),
    ({"lr_img": {"choice": []}}, {}, "distillation.search.space.lr_img.choice: must not be empty"),
    ({"lr_img": {}}, {}, "distillation.search.space.lr_img: give exactly one of choice, grid, uniform, loguniform, randint"),
    ({"lr_img": {"choice": [1.0], "uniform": [1.0, 2.0]}}, {},
     "distillation.search.space.lr_img: give exactly one of choice, grid, uniform, loguniform, randint"),
    ({"lr_img": {"choise": [1.0]}}, {}, "distillation.search.space.lr_img.choise: unknown key (did you mean 'choice'?)"),
    ({"lr_net": {"choice": [-1.0]}}, {}, "distillation.search.space.lr_net.choice: -1.0: must be > 0.0"),
    ({"iterations": {"uniform": [10, 100]}}, {}, "distillation.search.space.iterations.uniform: 43.3: input should be a valid "
     "integer, got a number with a fractional part; uniform draws fractions, use randint for an integer field"),
    ({"options.dm.foo": {"choice": [1]}}, {}, "distillation.search.space.options.dm.foo: method 'dm' has no options"),
    ({"options.dmm.foo": {"choice": [1]}}, {}, "distillation.search.space.options.dmm.foo: unknown method 'dmm' (did you mean 'dm'?)"),
    ({"options.mtt.syn_steps": {"choice": [1]}}, {}, "distillation.search.space.options.mtt.syn_steps: method 'mtt' is not in distillation.methods"),
    ({"lr_img": {"grid": [1.0, 2.0]}}, {"algorithm": "optuna"},
     "distillation.search.algorithm: optuna cannot search a grid; use choice (or algorithm: random)"),
    ({}, {}, "distillation.search.space: must not be empty"),
    ({"lr_img": {"choice": [1.0]}}, {"scheduler": "hyperband"}, "distillation.search.scheduler: must be 'fifo' or 'asha', got 'hyperband'"),
    ({"lr_img": {"choice": [1.0]}}, {"num_samples": 0}, "distillation.search.num_samples: must be >= 1"),
])
def test_bad_search_spaces_are_one_line_naming_the_field(space, more, expected):
    assert expected in errors_of(searching(space, **more))


def test_a_searched_field_cannot_also_be_a_grid_axis():
    lines = errors_of(lambda d: d["distillation"].update(lr_img=[0.1, 1.0], search={"space": {"lr_img": {"choice": [1.0]}}}))
    assert lines == ["distillation.search.space.lr_img: distillation.lr_img is also a grid axis; search it or list it, not both"]


def test_method_options_are_checked_by_the_methods_own_model():
    def mutate(d):
        with_expert_pool(d)
        d["distillation"]["search"] = {"space": {"options.mtt.syn_steps": {"randint": [0, 5]}}}
    assert "distillation.search.space.options.mtt.syn_steps.randint: 0: must be >= 1" in errors_of(mutate)
    with_mtt = searching({"options.mtt.syn_stpes": {"choice": [3]}})
    assert "distillation.search.space.options.mtt.syn_stpes: unknown option (did you mean 'syn_steps'?)" in \
        errors_of(lambda d: (with_expert_pool(d), with_mtt(d)))


def test_alpha_needs_a_guided_setting():
    lines = errors_of(lambda d: d["distillation"].update(guidance=["none"], search={"space": {"guidance.alpha": {"choice": [1.0]}}}))
    assert "distillation.search.space.guidance.alpha: no guided setting in distillation.guidance to search it in" in lines


def test_a_continuous_domain_is_checked_inside_its_range_for_integer_fields():
    assert Domain(loguniform=(1.0, 100.0)).extremes()[:2] == [1.0, 100.0]
    inside = Domain(loguniform=(1.0, 100.0)).extremes()[2]
    assert 1.0 < inside < 100.0 and inside != round(inside)
    assert Domain(randint=(1, 3)).extremes() == [1, 3]
