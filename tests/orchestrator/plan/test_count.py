"""Stages counted from the spec before anything is built: exact for every shipped config, search trials
included, and a grid over the limit refused in one line naming its field, without enumerating it."""

from pathlib import Path

import pytest

from orchestrator.errors import UserError
from orchestrator.plan.count import TRIALS, check_stage_limit, count_stages
from orchestrator.plan.graph import build_stage_graph
from orchestrator.spec.loading import load_spec, profiles_of
from orchestrator.stages import KINDS
from orchestrator.stages.search_space import trial_count
from tests.orchestrator.spec.test_checks import with_expert_pool
from tests.orchestrator.spec.test_models import spec_of

CONFIGS = sorted((Path(__file__).parents[3] / "configs").rglob("*.yaml"))


def trials_of(graph) -> int:
    return sum(trial_count(s.typed_config()) for s in graph.of_kind("search"))


def assert_exact(spec):
    graph = build_stage_graph(spec, None)
    counted = count_stages(spec)
    assert {k: counted[k] for k in KINDS} == graph.counts()
    assert counted[TRIALS] == trials_of(graph)


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(p.parents[1])) for p in CONFIGS])
def test_the_count_is_exact_for_every_shipped_config_and_profile(path):
    for profile in [None, *profiles_of(path)]:
        assert_exact(load_spec(path, profile))


def five_by_forty(d):
    """5 MTT options x 40 values: 102,400,000 option points from a spec of a few KB."""
    with_expert_pool(d)
    d["distillation"]["options"] = {"mtt": {
        "syn_steps": list(range(1, 41)), "expert_epochs": list(range(1, 41)), "max_start_epoch": list(range(1, 41)),
        "lr_lr": [i * 1e-6 for i in range(1, 41)], "lr_teacher": [i * 1e-3 for i in range(1, 41)]}}


def searching(space, **more):
    def mutate(d):
        d["distillation"]["iterations"] = None
        d["distillation"]["search"] = {"space": space, **more}
    return mutate


@pytest.mark.parametrize("mutate", [
    lambda d: None,
    with_expert_pool,  # MTT's experts: a pool keeping every epoch
    lambda d: (with_expert_pool(d), d["distillation"].update(options={"mtt": {"syn_steps": [2, 3, 3], "lr_lr": 0}})),
    lambda d: d["distillation"].update(methods=["dm", "random", "herding", "whole"], ipc=[1, 10, 10], seeds=[0, 1]),
    lambda d: d["evaluation"].update(random_baseline=True),  # the baseline, evaluated with every protocol
    lambda d: d["distillation"].update(methods=["dm", "random"], lr_img=[1.0, 2.0], iterations=[5, 6]),
    lambda d: (d["evaluation"].update(random_baseline=True), d["distillation"].update(methods=["dc", "dm", "random"])),
    lambda d: d["distillation"].update(guidance=["none", {"kind": "clom", "pool": "p", "alpha": 10, "ipc": [1]},
                                                 {"kind": "clom", "pool": "p", "alpha": 10, "ipc": [10]},
                                                 {"kind": "clom", "pool": "p", "alpha": 1, "methods": ["dm"]}]),
    lambda d: d["datasets"][0].update(aligned_ratios=[0.1, 0.8, 0.8], severities=[1, 2]),
    lambda d: (d["datasets"].append({"name": "src", "source": "digits", "bias": "none", "channels": 3, "distill": False}),
               d["ptm_pools"].append({"name": "q", "dataset": "src", "architectures": ["convnet", "mlp"], "epochs": 2}),
               d["distillation"]["guidance"].append({"kind": "cclom", "pool": "q", "alpha": 1})),
    lambda d: (d["ptm_pools"][0].update(aligned_ratio=0.1, severity=1)),  # a pinned variant for every target
    lambda d: d["ptm_pools"].append({**d["ptm_pools"][0], "name": "p5", "seeds": [0, 1, 2]}),  # shares 2 PTMs with p
    searching({"lr_img": {"grid": [0.1, 1.0, 10.0]}, "guidance.alpha": {"grid": [0.1, 1.0]}}, num_samples=3),
    searching({"guidance.alpha": {"choice": [0.1, 1.0]}}, num_samples=2),  # only the guided settings search
    lambda d: (searching({"lr_img": {"grid": [0.1, 1.0]}})(d), d["distillation"].update(methods=["dm", "random"]),
               d["evaluation"].update(random_baseline=True)),
    lambda d: (d["distillation"].update(methods=["dm", "random", "whole"], debias=["none", "kde", "groups"]),
               d["evaluation"].update(random_baseline=True)),  # baselines take no weights: not crossed
    lambda d: (d["ptm_pools"].append({"name": "lffp", "dataset": "d", "architectures": ["convnet"], "recipe": "lff",
                                      "epochs": 2}),
               d["distillation"].update(debias=[{"kind": "lff", "pool": "lffp"},
                                                {"kind": "kde", "embedding": "network", "pool": "p"}],
                                        guidance=["none"])),  # pools read only by weights stages
])
def test_the_count_is_the_graphs_per_kind(mutate):
    assert_exact(spec_of(mutate))


def test_search_trials_are_counted_against_the_limit():
    spec = spec_of(searching({"lr_img": {"grid": [0.1, 1.0, 10.0]}, "guidance.alpha": {"grid": [0.1, 1.0]}},
                             num_samples=5))
    counted = count_stages(spec)
    # 2 variants x 2 IPC: the unguided settings grid lr_img (3 points), the guided ones lr_img x alpha (6)
    assert counted["search"] == 8 and counted[TRIALS] == 4 * 5 * 3 + 4 * 5 * 6
    stages = sum(counted[k] for k in KINDS)
    check_stage_limit(spec, stages + counted[TRIALS])  # at the limit: fine
    with pytest.raises(UserError) as exc:
        build_stage_graph(spec, stages + 10)  # the stages fit, their trials do not
    [line] = exc.value.lines
    assert line.startswith("distillation.search: 8 searches") and f"{counted[TRIALS]:,} search trials" in line


def test_a_huge_option_grid_is_refused_from_its_count_in_one_line_naming_the_field():
    spec = spec_of(five_by_forty)  # validates: its options are checked axis by axis, not point by point
    assert spec.distillation.options["mtt"]["syn_steps"][-1] == 40
    counted = count_stages(spec)  # arithmetic: nothing enumerated
    assert counted["distill"] > 102_400_000
    with pytest.raises(UserError) as exc:
        build_stage_graph(spec, 100_000)
    [line] = exc.value.lines
    assert line.startswith("distillation.options.mtt: the option grid has 102,400,000 points")
    assert line.endswith("more than --max-stages 100,000")


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["distillation"].update(seeds=list(range(1000))), "distillation.seeds: 1,000 entries"),
    (lambda d: d["ptm_pools"][0].update(architectures=["convnet"] * 2, seeds=list(range(1000))), "ptm_pools[0]: "),
    (lambda d: d["datasets"][0].update(aligned_ratios=[i / 1000 for i in range(1, 1000)]), "datasets[0]: 999 aligned"),
])
def test_the_refusal_names_the_field_that_makes_the_study_big(mutate, field):
    with pytest.raises(UserError) as exc:
        build_stage_graph(spec_of(mutate), 1_000)
    [line] = exc.value.lines
    assert line.startswith(field) and "more than --max-stages 1,000" in line
