"""Search stages in the graph, and how a trial's sampled values become its distillation config."""

import numpy as np

from distill_core.methods import DistillConfig
from orchestrator.plan.graph import build_stage_graph
from orchestrator.spec.search import SearchConfig
from orchestrator.stages.search_space import trial_config, tune_space
from tests.orchestrator.spec.test_models import spec_of


def searching(space, **more):
    def mutate(d):
        d["distillation"]["iterations"] = 40
        d["distillation"]["search"] = {"space": space, **more}
    return mutate


def graph_of(mutate):
    return build_stage_graph(spec_of(mutate))


def test_each_setting_a_field_applies_to_becomes_one_search_stage():
    g = graph_of(searching({"lr_img": {"loguniform": [0.01, 10.0]}}))
    # every DM setting (2 variants x 2 ipc x 2 guidance) is searched; evaluations read the searches' sets
    assert g.counts()["search"] == 8 and g.counts()["distill"] == 0
    for ev in g.of_kind("evaluate"):
        assert ev.inputs["synthetic"].startswith("search-")
    s = g.of_kind("search")[0]
    cfg = SearchConfig(**s.config)
    assert cfg.space == {"lr_img": {"loguniform": [0.01, 10.0]}}
    assert (cfg.every, cfg.grace_period, cfg.distill.iterations) == (10, 10, 40)  # 4 reports by default
    assert cfg.proxy.checkpoints == 1 and cfg.proxy.augment is None and cfg.proxy.epochs == 100
    assert s.label.startswith("search dm ipc") and s.coords["search"] == "lr_img"


def test_alpha_is_searched_only_where_there_is_guidance():
    g = graph_of(searching({"guidance.alpha": {"choice": [0.1, 1.0]}}))
    assert g.counts()["search"] == 4 and g.counts()["distill"] == 4
    assert all(SearchConfig(**s.config).distill.guidance is not None for s in g.of_kind("search"))


def test_search_keys_follow_the_search_config_not_the_trial_resources():
    base = {"lr_img": {"loguniform": [0.01, 10.0]}}
    keys = {s.key for s in graph_of(searching(base)).of_kind("search")}
    assert keys == {s.key for s in graph_of(lambda d: (searching(base)(d), d.update(
        resources={"trial": {"cpus": 2}, "search": {"cpus": 0.5}}))).of_kind("search")}
    assert keys.isdisjoint(s.key for s in graph_of(searching(base, num_samples=9)).of_kind("search"))
    assert keys.isdisjoint(s.key for s in graph_of(searching({"lr_img": {"loguniform": [0.01, 1.0]}})).of_kind("search"))
    trial = graph_of(lambda d: (searching(base)(d), d.update(resources={"trial": {"cpus": 2}}))).of_kind("search")[0]
    assert trial.runtime["trial"] == {"cpus": 2.0, "gpus": 0.0}


def test_proxy_and_asha_settings_reach_the_stage_config():
    g = graph_of(searching({"lr_img": {"choice": [0.1, 1.0]}}, scheduler="asha", grace_period=5, reduction_factor=2,
                           proxy={"every": 8, "epochs": 7, "repeats": 2, "augmentation": "auto"}))
    cfg = SearchConfig(**g.of_kind("search")[0].config)
    assert (cfg.scheduler, cfg.grace_period, cfg.reduction_factor, cfg.every) == ("asha", 5, 2.0, 8)
    assert (cfg.proxy.epochs, cfg.proxy.repeats) == (7, 2) and cfg.proxy.augment.startswith("dsa:")


def test_sampled_values_replace_fields_options_and_guidance():
    base = DistillConfig(method="mtt", ipc=1, iterations=10, lr_img=100.0, options={"syn_steps": 20},
                         guidance={"kind": "clom", "alpha": 1.0})
    got = trial_config(base, {"lr_img": np.float64(3.5), "iterations": np.int64(7), "options.mtt.syn_steps": 5,
                              "guidance.alpha": 0.01})
    assert (got.lr_img, got.iterations, got.options.syn_steps, got.guidance.alpha) == (3.5, 7, 5, 0.01)
    assert type(got.iterations) is int and base.lr_img == 100.0  # the base is not changed


def test_tune_domains_keep_the_specs_bounds():
    space = tune_space({"a": {"randint": [2, 4]}, "b": {"loguniform": [0.1, 10.0]}, "c": {"choice": [1, 2]},
                        "d": {"grid": [1, 2]}, "e": {"uniform": [0.0, 1.0]}})
    assert (space["a"].lower, space["a"].upper) == (2, 5)  # the spec's randint is inclusive, Tune's high is not
    assert (space["b"].lower, space["b"].upper) == (0.1, 10.0) and space["c"].categories == [1, 2]
    assert space["d"] == {"grid_search": [1, 2]} and (space["e"].lower, space["e"].upper) == (0.0, 1.0)
