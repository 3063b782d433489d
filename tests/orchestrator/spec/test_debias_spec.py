"""`distillation.debias`: a grid axis of debias kinds, validated like method options, one line per problem."""

import pytest

from orchestrator.plan.count import count_stages
from orchestrator.plan.graph import build_stage_graph
from tests.orchestrator.spec.test_checks import with_expert_pool
from tests.orchestrator.spec.test_models import errors_of, spec_of


def debias(*entries, pools=()):
    def mutate(d):
        d["distillation"]["debias"] = list(entries)
        d["ptm_pools"] += list(pools)
    return mutate


LFF_POOL = {"name": "lffp", "dataset": "d", "architectures": ["convnet"], "recipe": "lff", "epochs": 2}


@pytest.mark.parametrize("mutate, expected", [
    (debias("none", {"kind": "kde", "bandwith": 0.3}),
     "distillation.debias[1].bandwith: unknown option (did you mean 'bandwidth'?)"),
    (debias({"kind": "kde", "bandwidth": -1}), "distillation.debias[0].bandwidth: must be > 0"),
    (debias("kdee"), "distillation.debias[0].kind: unknown debias kind 'kdee' (did you mean 'kde'?)"),
    (debias({"kind": "lff"}), "distillation.debias[0].pool: kind 'lff' needs pool: NAME"),
    (debias({"kind": "lff", "pool": "lf"}, pools=[LFF_POOL]),
     "distillation.debias[0].pool: unknown ptm pool 'lf' (did you mean 'lffp'?)"),
    (debias({"kind": "lff", "pool": "p"}), "distillation.debias[0].pool: pool 'p' trains with recipe 'ptm'"),
    (debias({"kind": "lff", "pool": "lffp"}, pools=[{**LFF_POOL, "aligned_ratio": 0.1, "severity": 1}]),
     "distillation.debias[0].pool: pool 'lffp' must train on each target's own variant"),
    (debias({"kind": "kde", "pool": "p"}), "distillation.debias[0].pool: kind 'kde' reads no ptm pool"),
    (debias({"kind": "kde", "embedding": "network"}), "distillation.debias[0].pool: kind 'kde' needs pool: NAME"),
    (lambda d: (with_expert_pool(d), d["distillation"].update(debias=["none", "kde"])),
     "distillation.debias[1]: method 'mtt' takes no sample weights"),
    (debias({"pool": "p"}), "distillation.debias[0]: kind 'none' weights nothing: it takes no pool and no options"),
    (debias(5), "distillation.debias[0]: expected a debias kind (groups, kde, lff, none) or a mapping"),
    (lambda d: (d["datasets"][0].update(bias="none"), d["distillation"].update(debias=["groups"])),
     "distillation.debias[0]: kind 'groups' weights by attribute (bias) labels, but dataset 'd' has none"),
])
def test_a_bad_debias_entry_is_one_line_naming_its_field(mutate, expected):
    lines = errors_of(mutate)
    assert len(lines) == 1 and lines[0].startswith(expected), lines


def test_groups_is_refused_on_unbiased_data_but_kde_is_not():
    def unbiased(entry):
        return lambda d: (d["datasets"][0].update(bias="none"), d["distillation"].update(debias=[entry]))
    assert any("groups" in line for line in errors_of(unbiased("groups")))
    spec_of(unbiased("kde"))  # density weights need no attribute


def test_a_study_without_debias_keeps_its_id_and_every_key():
    plain, explicit = spec_of(), spec_of(debias("none"))
    assert plain.study_id == explicit.study_id
    assert list(build_stage_graph(plain).stages) == list(build_stage_graph(explicit).stages)


def test_weights_are_one_stage_per_variant_and_entry_shared_by_every_distillation():
    spec = spec_of(debias("none", "kde", {"kind": "lff", "pool": "lffp"}, "groups", pools=[LFF_POOL]))
    g = build_stage_graph(spec)
    weights = g.of_kind("weights")
    # 2 variants x 3 weighted entries; each read by 2 IPCs x 2 guidance entries
    assert len(weights) == 6 and {k: n for k, n in count_stages(spec).items() if k != "trials"} == g.counts()
    readers = {w.key: [s for s in g.of_kind("distill") if s.inputs.get("weights") == w.key] for w in weights}
    assert all(len(r) == 4 for r in readers.values())
    assert len(g.of_kind("distill")) == 2 * 2 * 2 * 4
    lff = [w for w in weights if w.config["kind"] == "lff"]
    assert all(w.inputs["ptms"] and all(g.stages[k].config["objective"] == "lff" for k in w.inputs["ptms"])
               for w in lff)
    for w in lff:  # lff's PTMs train on the variant the weights are for (their scores index its samples)
        assert {g.stages[k].inputs["dataset"] for k in w.inputs["ptms"]} == {w.inputs["dataset"]}
    rows = {(s.coords["debias"], s.coords["debias_oracle"]) for s in g.of_kind("evaluate")}
    assert rows == {("none", False), ("kde", False), ("lff:lffp", False), ("groups", True)}


def test_unweighted_distillations_keep_their_keys_when_debias_entries_are_added():
    base = build_stage_graph(spec_of())
    more = build_stage_graph(spec_of(debias("none", "kde")))
    assert set(base.stages) <= set(more.stages)
    assert {s.kind for k, s in more.stages.items() if k not in base.stages} == {"weights", "distill", "evaluate"}


def test_a_debias_option_changes_only_the_weighted_keys():
    a = build_stage_graph(spec_of(debias("none", {"kind": "kde", "bandwidth": 0.5})))
    b = build_stage_graph(spec_of(debias("none", {"kind": "kde", "bandwidth": 0.25})))
    changed = {a.stages[k].kind for k in set(a.stages) - set(b.stages)}
    assert changed == {"weights", "distill", "evaluate"}
    assert all("weights" in a.stages[k].inputs for k in set(a.stages) - set(b.stages) if a.stages[k].kind == "distill")


def debiased_experts(entry):
    def mutate(d):
        with_expert_pool(d)
        d["ptm_pools"][-1]["debias"] = entry
        d["distillation"]["methods"] = ["mtt"]
    return mutate


def test_mtt_distils_from_experts_trained_on_reweighted_data():
    g = build_stage_graph(spec_of(debiased_experts("kde")))
    experts = [s for s in g.of_kind("ptm") if s.coords["pool"] == "experts"]
    assert experts and all("weights" in s.inputs for s in experts)
    for s in experts:  # the weights of the expert's own source variant
        w = g.stages[s.inputs["weights"]]
        assert w.kind == "weights" and w.inputs["dataset"] == s.inputs["dataset"] and w.config["kind"] == "kde"
    assert all(s.coords["debias"] == "none" for s in g.of_kind("distill"))  # the distillation itself: unweighted
    plain = build_stage_graph(spec_of(debiased_experts("none")))
    assert not plain.of_kind("weights") and spec_of(debiased_experts("none")).study_id == \
        spec_of(lambda d: (with_expert_pool(d), d["distillation"].update(methods=["mtt"]))).study_id
    assert {k: n for k, n in count_stages(spec_of(debiased_experts("kde"))).items() if k != "trials"} == g.counts()


def test_a_pool_and_a_distillation_with_the_same_weights_share_one_stage():
    def both(d):
        debiased_experts("kde")(d)
        d["distillation"]["methods"] = ["dm", "mtt"]
        d["distillation"]["debias"] = ["none", "kde"]
    with pytest.raises(Exception, match="mtt"):  # mtt itself takes no weights, so the study is refused...
        spec_of(both)
    def dm_only(d):
        both(d)
        d["distillation"]["methods"] = ["dm"]
        d["distillation"]["guidance"] = ["none", {"kind": "clom", "pool": "experts", "alpha": 1}]
    spec = spec_of(dm_only)  # ...but a guidance pool on the same reweighting shares the weights stage
    g = build_stage_graph(spec)
    assert len(g.of_kind("weights")) == 2  # one per variant, read by the pool's PTMs and the distillations
    assert {k: n for k, n in count_stages(spec).items() if k != "trials"} == g.counts()


@pytest.mark.parametrize("entry, expected", [
    ({"kind": "lff", "pool": "p"}, "ptm_pools[1].debias: a pool's weights read no other ptm pool"),
    ({"kind": "kde", "bandwith": 1}, "ptm_pools[1].debias.bandwith: unknown option (did you mean 'bandwidth'?)"),
])
def test_a_pools_debias_is_checked_like_a_distillations(entry, expected):
    lines = errors_of(debiased_experts(entry))
    assert len(lines) == 1 and lines[0].startswith(expected), lines
