import re
from pathlib import Path

from distill_core.methods import METHODS
from orchestrator.graph import CONFIGS, build_stage_graph
from tests.orchestrator.test_spec import spec_of
from tests.orchestrator.test_spec_checks import with_expert_pool


def graph_of(mutate=lambda d: None):
    return build_stage_graph(spec_of(mutate))


def keys_of(graph, kind=None, method=None) -> set[str]:
    return {k for k, s in graph.stages.items() if (kind is None or s.kind == kind)
            and (method is None or s.coords.get("method") == method)}


def test_grid_expands_to_the_expected_stage_counts():
    g = graph_of()
    # 2 variants; pool matched per variant: 1 arch x 2 seeds x 2 variants
    # distill: 2 variants x 1 method x 2 ipc x 2 guidance; evaluate: 8 x 2 archs
    assert g.counts() == {"dataset": 2, "ptm": 4, "distill": 8, "search": 0, "external": 0, "evaluate": 16}


def test_graph_is_topologically_ordered_and_inputs_exist():
    g = graph_of()
    seen = set()
    for key, stage in g.stages.items():
        assert all(i in seen for i in stage.input_keys), stage.label
        seen.add(key)
    for key, stage in g.stages.items():  # dependents are the inverse of inputs
        for i in stage.input_keys:
            assert key in g.dependents(i)


def test_keys_are_stable_and_distinct():
    a, b = graph_of(), graph_of()
    assert list(a.stages) == list(b.stages)
    assert len(set(a.stages)) == len(a.stages)


def test_every_stage_config_is_its_typed_config_dict():
    g = graph_of(with_expert_pool)
    for stage in g.stages.values():
        typed = stage.typed_config()
        assert isinstance(typed, CONFIGS[stage.kind])
        assert typed.to_dict() == stage.config
        assert CONFIGS[stage.kind](**typed.to_dict()) == typed


def test_upstream_change_rekeys_downstream_only():
    base = graph_of()
    changed = graph_of(lambda d: d["ptm_pools"][0].update(epochs=4))
    unchanged = {k for k in base.stages if k in changed.stages}
    kinds = {base.stages[k].kind for k in unchanged}
    # datasets and unguided distillations (and their evaluations) keep their keys
    assert kinds == {"dataset", "distill", "evaluate"}
    guided = [s for s in changed.of_kind("distill") if s.config["guidance"] is not None]
    assert guided and all(s.key not in base.stages for s in guided)


def test_evaluation_change_keeps_distillation_keys():
    base = graph_of()
    changed = graph_of(lambda d: d["evaluation"].update(epochs=6))
    assert keys_of(base, "distill") == keys_of(changed, "distill")
    assert not (keys_of(base, "evaluate") & keys_of(changed, "evaluate"))


def test_execution_knobs_and_other_methods_options_keep_every_dm_key():
    base = graph_of(with_expert_pool)
    runtime = graph_of(lambda d: (with_expert_pool(d), d.update(runtime={
        "matching": "loop", "matching_tile": 7, "compile": False, "tile": 0, "memory_bounded": True})))
    assert set(runtime.stages) == set(base.stages)  # nothing re-keys
    mtt_option = graph_of(lambda d: (with_expert_pool(d), d["distillation"].update(options={"mtt": {"syn_steps": 7}})))
    dm = keys_of(base, method="dm")
    assert dm and dm <= set(mtt_option.stages)  # every DM distillation and its evaluations kept
    assert not (keys_of(base, "distill", "mtt") & keys_of(mtt_option, "distill", "mtt"))


def test_pinned_pool_variant_is_shared_across_targets():
    g = graph_of(lambda d: d["ptm_pools"][0].update(aligned_ratio=0.1, severity=1))
    assert g.counts()["ptm"] == 2  # one pool, trained once, used by both variants
    assert len({s.inputs["dataset"] for s in g.of_kind("ptm")}) == 1


def test_method_defaults_come_from_the_registry():
    g = graph_of(lambda d: d["distillation"].update(methods=["dm", "dc"], iterations=None))
    dm = next(s for s in g.of_kind("distill") if s.config["method"] == "dm")
    dc = next(s for s in g.of_kind("distill") if s.config["method"] == "dc")
    assert dm.config["lr_img"] == METHODS["dm"].lr_img and dm.config["iterations"] == METHODS["dm"].iterations
    assert dm.config["init"] == "real" and dm.config["augment"] == "color_crop_cutout_scale_rotate"  # digits: no flip
    assert dc.config["init"] == "noise" and dc.config["augment"] is None


def test_each_method_is_evaluated_with_its_own_protocol():
    g = graph_of(lambda d: (d["distillation"].update(methods=["dm", "dc"]), d["evaluation"].update(epochs=None)))
    evals = {(s.coords["method"], s.config["augment"], s.config["epochs"]) for s in g.of_kind("evaluate")}
    # digits are MNIST-like: DC's own augmentation for 1000 epochs (upstream get_daparam), DM: DSA
    assert evals == {("dm", "dsa:color_crop_cutout_scale_rotate", 1000), ("dc", "dc:crop_scale_rotate", 1000)}
    fashion = graph_of(lambda d: (d["datasets"][0].update(source="fashion_mnist"), d["distillation"].update(
        methods=["dc"]), d["evaluation"].update(epochs=None)))
    assert {(s.config["augment"], s.config["epochs"]) for s in fashion.of_kind("evaluate")} == {(None, 300)}
    forced = graph_of(lambda d: d["evaluation"].update(augmentation="none", epochs=7))
    assert {(s.config["augment"], s.config["epochs"]) for s in forced.of_kind("evaluate")} == {(None, 7)}
    assert all(s.coords["eval_protocol"] == "none/7ep" for s in forced.of_kind("evaluate"))


def test_distillation_seeds_and_option_grids_multiply_distillations():
    g = graph_of(lambda d: d["distillation"].update(seeds=[0, 1, 2]))
    assert g.counts()["distill"] == 3 * 8
    assert {s.config["seed"] for s in g.of_kind("distill")} == {0, 1, 2}
    grid = graph_of(lambda d: (with_expert_pool(d), d["distillation"].update(
        options={"mtt": {"syn_steps": [2, 3]}})))
    mtt = [s for s in grid.of_kind("distill") if s.config["method"] == "mtt"]
    assert sorted({s.config["options"]["syn_steps"] for s in mtt}) == [2, 3]
    assert all("syn_steps=" in s.label for s in mtt)
    assert all(s.config["options"] == {} for s in grid.of_kind("distill") if s.config["method"] == "dm")


def test_baselines_take_no_iterations_lr_or_guidance():
    g = graph_of(lambda d: d["distillation"].update(methods=["random"]))
    assert g.counts()["distill"] == 2 * 2  # variants x ipc; one guidance setting
    assert all(s.config["iterations"] == 0 and s.config["guidance"] is None for s in g.of_kind("distill"))


def test_mtt_reads_its_experts_as_named_inputs():
    g = graph_of(with_expert_pool)
    mtt = [s for s in g.of_kind("distill") if s.config["method"] == "mtt"]
    assert mtt and all(len(s.inputs["experts"]) == 1 for s in mtt)
    experts = {k for s in mtt for k in s.inputs["experts"]}
    assert {g.stages[k].config["momentum"] for k in experts} == {0.0}  # the expert recipe


def test_no_method_name_is_a_literal_in_the_orchestrator():
    """What a method is lives in its registry record; the orchestrator reads records only."""
    names = "|".join(sorted(METHODS, key=len, reverse=True))
    pattern = re.compile(rf"""["']({names})["']""")
    for path in (Path(__file__).parents[2] / "orchestrator").rglob("*.py"):
        # the one exception: Tune's search algorithm "random" shares a method's name
        hits = [line for line in path.read_text().splitlines()
                if pattern.search(line) and not line.startswith("SEARCH_ALGORITHMS = ")]
        assert not hits, (path.name, hits)


def test_every_study_evaluates_a_random_subset_per_variant_and_ipc_with_each_methods_protocol():
    g = graph_of(lambda d: (d["evaluation"].update(random_baseline=True), d["distillation"].update(methods=["dm", "dc"])))
    baselines = [s for s in g.of_kind("distill") if s.coords.get("reference") == "random_subset"]
    assert len(baselines) == 2 * 2  # variants x ipc
    assert all(s.config["method"] == METHODS["random"].name and s.inputs == {"dataset": s.inputs["dataset"]}
               for s in baselines)
    protocols = {(e.inputs["synthetic"], e.coords["eval_protocol"]) for e in g.of_kind("evaluate")
                 if e.inputs["synthetic"] in {b.key for b in baselines}}
    # each set x arch under DM's (DSA, 5 epochs) and DC's (DC's own) protocol: the methods' rows compare like with like
    assert len({p for _, p in protocols}) == 2 and len(protocols) == 4 * 2
    listed = graph_of(lambda d: (d["evaluation"].update(random_baseline=True),
                                 d["distillation"].update(methods=["dm", "random"])))
    assert len([s for s in listed.of_kind("distill") if s.config["method"] == "random"]) == 4  # the same stages
    assert not [s for s in graph_of().of_kind("distill") if s.coords.get("reference")]  # random_baseline: false
