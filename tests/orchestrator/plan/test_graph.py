import re
from pathlib import Path

import pytest

from distill_core.methods import METHODS
from orchestrator.plan.graph import build_stage_graph
from orchestrator.stages import KINDS
from tests.orchestrator.spec.test_checks import with_expert_pool
from tests.orchestrator.spec.test_models import spec_of


def graph_of(mutate=lambda d: None):
    return build_stage_graph(spec_of(mutate))


def keys_of(graph, kind=None, method=None) -> set[str]:
    return {k for k, s in graph.stages.items() if (kind is None or s.kind == kind)
            and (method is None or s.coords.get("method") == method)}


def test_grid_expands_to_the_expected_stage_counts():
    g = graph_of()
    # 2 variants; pool matched per variant: 1 arch x 2 seeds x 2 variants
    # distill: 2 variants x 1 method x 2 ipc x 2 guidance; evaluate: 8 x 2 archs
    assert g.counts() == {"dataset": 2, "ptm": 4, "weights": 0, "distill": 8, "search": 0, "external": 0,
                          "evaluate": 16}


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
        assert isinstance(typed, KINDS[stage.kind].config)
        assert typed.to_dict() == stage.config
        assert KINDS[stage.kind].config(**typed.to_dict()) == typed


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
    for path in (Path(__file__).parents[3] / "orchestrator").rglob("*.py"):
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


def test_a_sources_adaptation_reaches_its_dataset_stage_and_keys_it():
    from tests.orchestrator.spec.test_checks import pool_on

    g = graph_of(lambda d: pool_on(d, source="mnist", channels=3))
    (mnist,) = [s for s in g.of_kind("dataset") if s.coords["dataset"] == "f"]
    assert (mnist.config["channels"], mnist.config["image_size"]) == (3, None)
    assert all(s.config["channels"] is None for s in g.of_kind("dataset") if s is not mnist)
    assert KINDS["dataset"].config(**mnist.config).channels == 3
    rgb32 = graph_of(lambda d: (pool_on(d, source="mnist", channels=3, image_size=32),
                                d["datasets"][0].update(source="cifar10", channels=1)))  # luma, then coloured
    (mnist32,) = [s for s in rgb32.of_kind("dataset") if s.coords["dataset"] == "f"]
    assert (mnist32.config["channels"], mnist32.config["image_size"]) == (3, 32) and mnist32.key != mnist.key
    folder = graph_of(lambda d: pool_on(d, source="imagefolder", data_root="/data/tiny", image_size=28, num_classes=200))
    (tiny,) = [s for s in folder.of_kind("dataset") if s.coords["dataset"] == "f"]
    assert tiny.config["source"] == "imagefolder" and tiny.config["image_size"] == 28
    assert tiny.runtime == {"data_root": "/data/tiny"}  # where it lies: not part of the key


def test_nothing_is_held_out_unless_the_study_reads_a_validation_split():
    """As upstream, distillation and PTMs see the whole training split; `selection: val` (or a search's proxy)
    holds 10% out, `datasets[].val_fraction` sets it, and the choice keys the dataset and every stage after it."""
    last = graph_of()
    assert {s.config["val_fraction"] for s in last.of_kind("dataset")} == {0.0}
    assert {s.coords["val_split"] for s in last.of_kind("evaluate")} == {None}
    assert {s.config["selection"] for s in last.of_kind("evaluate")} == {"last"}

    def val(d):
        d["evaluation"]["selection"] = "val"
    selected = graph_of(val)
    assert {s.config["val_fraction"] for s in selected.of_kind("dataset")} == {0.1}
    assert {s.coords["val_split"] for s in selected.of_kind("evaluate")} == {"biased"}
    assert {s.config["selection"] for s in selected.of_kind("evaluate")} == {"val"}
    assert keys_of(selected, "distill").isdisjoint(keys_of(last, "distill"))  # distilled from less data

    def balanced(d):
        d["datasets"][0].update(val_fraction=0.2, val_split="balanced")
    held = graph_of(balanced)
    assert {(s.config["val_fraction"], s.config["val_split"]) for s in held.of_kind("dataset")} == {(0.2, "balanced")}
    assert {s.coords["val_split"] for s in held.of_kind("evaluate")} == {"balanced"}


def test_a_claim_that_selects_no_evaluation_is_one_line_naming_it():
    from orchestrator.errors import UserError

    def claim(d):
        d["findings"] = [{"id": "c", "statement": "s", "a": {"guidance": "clom:q:*"}, "b": {"guidance": "none"},
                          "expect": "greater"}]
    with pytest.raises(UserError) as exc:
        graph_of(claim)
    assert exc.value.lines == ['findings[0].a: matches no evaluation of the study (guidance "clom:q:*"; the study '
                               'has "clom:p:a10", "none")']

    def good(d):
        claim(d)
        d["findings"][0]["a"] = {"guidance": "clom:p:*"}
    assert graph_of(good).counts() == graph_of().counts()  # claims add no stage
    assert spec_of(good).study_id == spec_of().study_id  # nor change what the study computes


def restricted_guidance(d):
    d["distillation"].update(methods=["dc", "dm"], guidance=[
        "none", {"kind": "clom", "pool": "p", "alpha": 10, "methods": ["dm"], "ipc": [10]},
        {"kind": "clom", "pool": "p", "alpha": 20}])


def test_a_restricted_guidance_entry_runs_only_at_its_methods_and_ipcs():
    g = graph_of(restricted_guidance)
    cells: dict[str, set] = {}
    for s in g.of_kind("distill"):
        cells.setdefault(s.coords["guidance"], set()).add((s.config["method"], s.config["ipc"]))
    every = {(m, i) for m in ("dc", "dm") for i in (1, 10)}
    assert cells == {"none": every, "clom:p:a10": {("dm", 10)}, "clom:p:a20": every}
    assert len([s for s in g.of_kind("evaluate") if s.coords["guidance"] == "clom:p:a10"]) == 2 * 2  # variants x archs
    # where an entry runs is not part of the guidance a stage distils with
    assert {tuple(sorted(s.config["guidance"])) for s in g.of_kind("distill") if s.config["guidance"]} == \
        {("alpha", "checkpoint_epochs", "kind", "real_batch")}

    def unrestricted(d):
        restricted_guidance(d)
        del d["distillation"]["guidance"][1]["methods"], d["distillation"]["guidance"][1]["ipc"]
    free = graph_of(unrestricted)
    # the restriction only leaves cells out: the stages it keeps are the unrestricted entry's, keys and labels
    assert set(g.stages) < set(free.stages)
    assert all(free.stages[k].label == s.label for k, s in g.stages.items())


def test_an_unrestricted_entry_keeps_its_label_dump_study_id_and_stage_keys():
    plain = spec_of()
    guide = plain.distillation.guidance[1]
    assert guide.label == "clom:p:a10" and guide.applies("dm", 1) and guide.applies("anything", 99)
    # an unset restriction is not dumped, so the study id hashes what it hashed before the fields existed
    assert set(guide.model_dump()) == {"kind", "pool", "alpha", "checkpoint_epochs", "real_batch"}
    explicit = spec_of(lambda d: d["distillation"]["guidance"][1].update(methods=None, ipc=None))
    assert explicit.study_id == plain.study_id
    everywhere = spec_of(lambda d: d["distillation"]["guidance"][1].update(methods=["dm"], ipc=[1, 10]))
    assert everywhere.distillation.guidance[1].label == guide.label
    assert list(build_stage_graph(everywhere).stages) == list(build_stage_graph(plain).stages)
    assert {s.label for s in build_stage_graph(everywhere).stages.values()} == \
        {s.label for s in build_stage_graph(plain).stages.values()}
