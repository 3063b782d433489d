"""Claims over result rows (orchestrator.findings): effects, intervals and verdicts with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from orchestrator.reporting.findings import Evaluation, evaluate_claim, evaluate_findings, verdict
from orchestrator.spec.claims import ClaimSpec, unmatched_filters

BASE = {"dataset": "fmnist", "aligned_ratio": None, "method": "dm", "ipc": 10, "eval_arch": "convnet",
        "guidance": "none"}


def ev(seed: int, values, **coords) -> Evaluation:
    return Evaluation({**BASE, **coords}, seed, {"acc": list(values)})


def compare_claim(**extra) -> ClaimSpec:
    return ClaimSpec(**{"id": "clom-helps", "statement": "CLoM beats no guidance", "a": {"guidance": "clom:*"},
                        "b": {"guidance": "none"}, "expect": "greater", **extra})


def test_a_paired_difference_is_measured_exactly_whatever_the_spread_of_networks():
    """Network r of seed s starts alike in both groups: a constant +2 points per pair is +2 [2, 2], even though
    the networks themselves spread over 40 points (an unpaired interval would be wide)."""
    rng = np.random.default_rng(1)
    evals = []
    for seed in range(3):
        base = rng.uniform(0.4, 0.8, size=5)
        evals += [ev(seed, base, guidance="none"), ev(seed, base + 0.02, guidance="clom:pool:a100")]
    [f] = evaluate_claim(compare_claim(), evals)
    assert f.effect == pytest.approx(2.0, abs=1e-9)
    assert f.ci95 == pytest.approx([2.0, 2.0], abs=1e-6)
    assert f.verdict == "holds" and f.n == 30
    assert f.detail["cells"] == 1 and f.detail["paired_cells"] == 1

    shuffled = [Evaluation(e.coords, e.seed, {"acc": e.networks["acc"][::-1]}) if e.coords["guidance"] != "none"
                else e for e in evals]  # the same values, the pairs broken within each seed
    [g] = evaluate_claim(compare_claim(), shuffled)
    assert g.effect == pytest.approx(2.0, abs=1e-9)  # the means are the same
    assert g.ci95[1] - g.ci95[0] > 1.0  # but the pairs no longer cancel the networks' spread

    alone = [e for e in evals if e.coords["guidance"] != "none"]  # a group with no counterpart in any cell
    [h] = evaluate_claim(compare_claim(), alone)
    assert h.verdict == "inconclusive" and h.effect is None and h.n == 0


def test_verdicts_follow_the_interval():
    assert verdict("greater", [0.5, 3.0], 1.0) == "holds"
    assert verdict("greater", [-3.0, -0.5], 1.0) == "contradicted"
    assert verdict("greater", [-1.0, 2.0], 1.0) == "inconclusive"
    assert verdict("decreasing", [-5.0, -1.0], 1.0) == "holds"
    assert verdict("less", [0.1, 1.0], 1.0) == "contradicted"
    assert verdict("not_less", [-0.9, 2.0], 1.0) == "holds"  # no worse by more than the margin
    assert verdict("not_less", [-3.0, -1.5], 1.0) == "contradicted"
    assert verdict("not_less", [-2.0, 0.5], 1.0) == "inconclusive"


def test_guidance_that_hurts_contradicts_the_claim_and_the_result_is_deterministic():
    evals = []
    for seed in range(4):
        evals += [ev(seed, [0.76, 0.77, 0.75], guidance="none"),
                  ev(seed, [0.745, 0.75, 0.74], guidance="clom:x1:a100")]
    first = evaluate_findings([compare_claim()], evals)
    assert first == evaluate_findings([compare_claim()], evals)  # a fixed bootstrap seed
    [f] = first
    assert f["verdict"] == "contradicted" and f["effect"] == pytest.approx(-1.5, abs=1e-6)
    assert f["ci95"][1] < 0 and set(f) >= {"id", "statement", "verdict", "effect", "ci95", "n"}
    assert f["groups"] == {"a": pytest.approx(74.5), "b": pytest.approx(76.0)}


def test_a_trend_is_the_fitted_change_from_the_first_level_to_the_last():
    """Accuracy falling linearly by 10 points per level over 4 levels: the fitted change is -30 points."""
    evals = [ev(s, [0.8 - 0.1 * i + 0.01 * s] * 2, aligned_ratio=p)
             for i, p in enumerate([0.1, 0.8, 0.95, 0.99]) for s in range(2)]
    claim = ClaimSpec(id="falls", statement="accuracy falls with bias", trend="aligned_ratio", expect="decreasing")
    [f] = evaluate_claim(claim, evals)
    assert f.effect == pytest.approx(-30.0, abs=1e-6) and f.verdict == "holds"
    assert f.ci95[0] <= -30.0 <= f.ci95[1] and f.ci95[1] < 0
    assert list(f.detail["levels"]) == ["0.1", "0.8", "0.95", "0.99"]  # in numeric order
    rising = ClaimSpec(id="rises", statement="x", trend="aligned_ratio", expect="increasing")
    assert evaluate_claim(rising, evals)[0].verdict == "contradicted"


def test_per_splits_a_claim_and_cells_average_over_other_coordinates():
    evals = []
    for method, gain in (("dm", 0.03), ("dc", -0.03)):
        for arch in ("convnet", "mlp"):
            for s in range(3):
                vals = [0.5 + 0.01 * s, 0.52, 0.49]
                evals += [ev(s, vals, method=method, eval_arch=arch),
                          ev(s, [v + gain for v in vals], method=method, eval_arch=arch, guidance="clom:p:a1")]
    baseline = [ev(s, [0.3, 0.31], method="random") for s in range(3)]  # unguided only: nothing to compare
    found = {f.id: f for f in evaluate_claim(compare_claim(per=["method"]), evals + baseline)}
    assert set(found) == {"clom-helps[method=dc]", "clom-helps[method=dm]"}
    assert found["clom-helps[method=dm]"].verdict == "holds" and found["clom-helps[method=dc]"].verdict == "contradicted"
    assert found["clom-helps[method=dm]"].detail["cells"] == 2  # convnet and mlp, averaged
    [pooled] = evaluate_claim(compare_claim(), evals)
    assert pooled.effect == pytest.approx(0.0, abs=1e-9) and pooled.detail["cells"] == 4
    [scoped] = evaluate_claim(compare_claim(where={"method": ["dm", "dc"]}), evals)
    assert scoped.detail["cells"] == 4  # a `where` naming two methods keeps them apart, cell by cell


def test_best_of_picks_the_best_level_and_its_interval_pays_for_the_choice():
    evals = []
    for s in range(3):
        final = [0.70, 0.71, 0.69]
        evals.append(ev(s, final, guidance="clom:p@150:a100"))
        for epoch, shift in ((1, -0.05), (4, 0.01), (6, 0.0)):
            evals.append(ev(s, [v + shift + 0.002 * s for v in final], guidance=f"clom:p@{epoch}:a100"))
    claim = ClaimSpec(id="suboptimal", statement="the best sub-optimal checkpoint is no worse than the final one",
                      a={"guidance": ["clom:p@1:*", "clom:p@4:*", "clom:p@6:*"]}, b={"guidance": "clom:p@150:*"},
                      best_of="guidance", expect="not_less")
    [f] = evaluate_claim(claim, evals)
    assert f.detail["best"]["guidance"] == "clom:p@4:a100"
    assert f.effect == pytest.approx(1.2, abs=1e-6)  # +1 point, +0.2 for the seeds' drift
    assert f.verdict == "holds" and f.ci95[0] > -claim.margin


def test_claims_are_checked_when_declared():
    with pytest.raises(ValidationError, match="either a comparison"):
        ClaimSpec(id="x", statement="s", expect="greater")
    with pytest.raises(ValidationError, match="both groups"):
        ClaimSpec(id="x", statement="s", a={"method": "dm"}, expect="greater")
    with pytest.raises(ValidationError, match="expects increasing or decreasing"):
        ClaimSpec(id="x", statement="s", trend="aligned_ratio", expect="greater")
    with pytest.raises(ValidationError, match="unknown coordinate 'guidnce'.*did you mean 'guidance'"):
        ClaimSpec(id="x", statement="s", a={"guidnce": "clom:*"}, b={"guidance": "none"}, expect="greater")
    with pytest.raises(ValidationError):
        ClaimSpec(id="x", statement="s", metric="accuracy", trend="ipc", expect="increasing")


def test_a_group_that_selects_nothing_is_named_with_the_values_the_study_has():
    coords = [{**BASE, "guidance": g} for g in ("none", "clom:x1:a100")]
    claim = ClaimSpec(id="x", statement="s", a={"guidance": "cclom:*"}, b={"guidance": "none"}, expect="greater")
    [problem] = unmatched_filters(claim, coords)
    assert problem.startswith("a: matches no evaluation of the study (guidance \"cclom:*\"; the study has")
    assert "clom:x1:a100" in problem
    assert unmatched_filters(compare_claim(), coords) == []
