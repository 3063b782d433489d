"""Paper 1's study at smoke size, end to end as a user runs it: submit --profile smoke, results, report,
compare. Real digits, a real local Ray, SQLite MLflow; slow."""

from __future__ import annotations

import json
import re

import pytest

from tests.test_faults import ROOT, ddray

pytestmark = pytest.mark.slow

SPEC = ROOT / "configs" / "biased-dd" / "cmnist.yaml"


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cmnist-smoke")
    store, uri = tmp / "store", f"sqlite:///{tmp}/mlflow.db"
    r = ddray("study", "submit", SPEC, "--profile", "smoke", "--store", store, "--tracking-uri", uri, "--json",
              "--num-cpus", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["state"] == "succeeded" and summary["stages"]["failed"] == 0
    return tmp, store, uri, summary["study_id"]


def test_the_smoke_profile_runs_and_every_row_is_scored_against_the_random_subset(smoke_study):
    _, store, _, study_id = smoke_study
    rows = json.loads(ddray("study", "results", study_id, "--store", store, "--format", "json").stdout)
    methods = {r["method"] for r in rows}
    assert methods == {"dc", "dm", "whole"}  # the random subsets score rows; they are not rows themselves
    distilled = [r for r in rows if r["method"] in ("dc", "dm")]
    assert len(distilled) == 2 * 2 * 2  # methods x aligned ratios x IPC
    for r in distilled:
        assert 0.0 < r["acc_random"] < 1.0 and r["ior"] == pytest.approx(r["acc_mean"] - r["acc_random"])
        assert r["acc_aligned"] is not None and r["gap"] == pytest.approx(r["acc_aligned"] - r["acc_conflicting"])
    assert all(r["acc_whole"] is not None for r in distilled if r["method"] == "dm")  # same (DSA) protocol


def test_the_report_has_every_table_and_plot_and_the_results_numbers(smoke_study):
    from mlflow.tracking import MlflowClient

    tmp, store, uri, study_id = smoke_study
    out = tmp / "report"
    r = ddray("study", "report", study_id, "--store", store, "--out", out)
    assert r.returncode == 0, r.stderr
    claims = {f"finding_{c}_method_{m}.png" for c in ("conflicting-falls-with-bias", "gap-grows-with-bias")
              for m in ("dc", "dm")}
    assert {p.name for p in out.iterdir()} == {"report.md", "report.html", "findings.json",
                                               "accuracy_vs_aligned_ratio.png", "aligned_vs_conflicting.png",
                                               "distillation_curves.png", *claims}
    md = (out / "report.md").read_text()
    rows = json.loads(ddray("study", "results", study_id, "--store", store, "--format", "json").stdout)
    for row in rows:  # every row's accuracy appears, as the paper table's mean +- std and in the full table
        assert f"{row['acc_mean'] * 100:.1f} ± {row['acc_std'] * 100:.1f}" in md
        assert f"{row['acc_mean']:.4f}" in md
    assert re.search(r"\| method / ipc \| aligned_ratio=0.1 \| aligned_ratio=0.95 \|", md)
    assert md.count("<img") == 0 and (out / "report.html").read_text().count("<img") == 3 + len(claims)
    assert "### Findings" in md and "conflicting-falls-with-bias[method=dm]" in md
    record = json.loads(ddray("study", "status", study_id, "--store", store, "--json").stdout)
    client = MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(record["parent_run_id"], "report")}
    assert "report/report.html" in logged and "report/accuracy_vs_aligned_ratio.png" in logged


def test_the_papers_claims_are_tested_and_logged_on_the_parent_run(smoke_study):
    from mlflow.tracking import MlflowClient

    _, store, uri, study_id = smoke_study
    r = ddray("study", "findings", study_id, "--store", store, "--json")
    assert r.returncode == 0, r.stderr
    found = {f["id"]: f for f in json.loads(r.stdout.strip().splitlines()[-1])["findings"]}
    assert set(found) == {f"{c}[method={m}]" for c in ("conflicting-falls-with-bias", "gap-grows-with-bias")
                          for m in ("dc", "dm")}
    for f in found.values():
        assert f["verdict"] in ("holds", "contradicted", "inconclusive") and f["n"] > 0
        lo, hi = f["ci95"]
        assert lo <= f["effect"] <= hi  # a two-level bootstrap interval holds its point estimate here
    table = ddray("study", "findings", study_id, "--store", store)
    assert table.returncode == 0 and "conflicting-falls-with-bias[method=dm]" in table.stdout
    record = json.loads(ddray("study", "status", study_id, "--store", store, "--json").stdout)
    tags = MlflowClient(uri).get_run(record["parent_run_id"]).data.tags
    assert {t for t in tags if t.startswith("finding.")} == {
        f"finding.{c}_method_{m}" for c in ("conflicting-falls-with-bias", "gap-grows-with-bias") for m in ("dc", "dm")}


def test_rows_report_the_last_epoch_as_upstream_and_hold_nothing_out(smoke_study):
    _, store, _, study_id = smoke_study
    rows = json.loads(ddray("study", "results", study_id, "--store", store, "--format", "json").stdout)
    for r in rows:
        assert r["selection"] == "last" and r["val_split"] is None
        assert r["acc_last"] == pytest.approx(r["acc_mean"]) and r["acc_val_selected"] is None
        assert r["acc_std_distill"] == 0.0  # one distillation seed in the smoke profile


def test_compare_of_a_study_with_itself_shows_no_difference(smoke_study):
    _, store, _, study_id = smoke_study
    r = ddray("study", "compare", study_id, study_id, "--store", store, "--format", "json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert rows and all(x["acc_mean_diff"] == 0.0 for x in rows)
    assert ddray("study", "compare", study_id, study_id, "--store", store).returncode == 0


def test_an_external_set_is_evaluated_exactly_as_the_study_evaluates_its_own(smoke_study):
    import torch

    from orchestrator.storage.local import ArtifactStore

    tmp, store, uri, study_id = smoke_study
    st = ArtifactStore(store)
    rows = json.loads(ddray("study", "results", study_id, "--store", store, "--format", "json").stdout)
    own = next(r for r in rows if (r["method"], r["ipc"], r["aligned_ratio"]) == ("dm", 10, 0.95))
    def setting(k):
        c = st.read_json("distill", k, "result.json")["coords"]
        return c["method"], c["ipc"], c["aligned_ratio"]
    (key,) = [k for k in st.stage_keys("distill") if setting(k) == ("dm", 10, 0.95)]
    tensors = st.read_tensors("distill", key, "synthetic.pt")
    path = tmp / "from-elsewhere.pt"
    torch.save({"images": tensors["images"], "labels": tensors["labels"]}, path)  # upstream's normalised form
    r = ddray("evaluate", "--synthetic", path, "--spec", SPEC, "--profile", "smoke", "--protocol", "dm",
              "--space", "normalized", "--aligned-ratio", "0.95", "--store", store, "--tracking-uri", uri, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    ext_id = json.loads(r.stdout.strip().splitlines()[-1])["study_id"]
    (ext,) = json.loads(ddray("study", "results", ext_id, "--store", store, "--format", "json").stdout)
    assert ext["method"] == "external:from-elsewhere" and ext["ipc"] == 10
    for name in ("acc_mean", "acc_std", "acc_random", "ior", "acc_aligned", "acc_conflicting"):
        assert ext[name] == pytest.approx(own[name], abs=1e-9), name
    bad = ddray("evaluate", "--synthetic", tmp / "missing.pt", "--spec", SPEC, "--profile", "smoke")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith("file not found: "
                                                                               f"{tmp / 'missing.pt'}")
