"""The report of a finished tiny study (real digits, run inline through `submit_study`, SQLite MLflow, no
Ray): every file it lists is written, the tables hold the rows' numbers; and `compare_rows` on rows made
by hand."""

from __future__ import annotations

import math

import pytest

from orchestrator.execution.executors import InlineExecutor
from orchestrator.execution.submit import submit_study
from orchestrator.reporting.compare import KEYS, compare_rows
from orchestrator.reporting.report import build_report, flat_table, paper_tables, plot_debias
from orchestrator.spec.loading import parse_spec
from orchestrator.storage.local import ArtifactStore
from orchestrator.storage.studies import load_record

TINY = {
    "version": 1,
    "name": "report",
    "datasets": [{"name": "d", "source": "digits", "bias": "colored", "aligned_ratios": [0.1, 0.9]}],
    "distillation": {"methods": ["dm"], "ipc": [1], "iterations": 3, "batch_real": 8,
                     "arch": {"name": "convnet", "width": 8}},
    "evaluation": {"architectures": [{"name": "convnet", "width": 8}], "repeats": 1, "epochs": 2, "checkpoints": 1},
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(store, record, outcome) of the tiny study, submitted once for the module."""
    tmp = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # MLflow's default artifact root is relative to the working directory
        outcome = submit_study(parse_spec(TINY), "spec", store_root=str(tmp / "store"),
                               tracking_uri=f"sqlite:///{tmp}/m.db", executor=InlineExecutor)
    assert outcome.state == "succeeded", outcome.errors
    store = ArtifactStore(tmp / "store")
    return store, load_record(store, outcome.study_id), outcome, tmp


@pytest.mark.slow  # the module's study: two dataset variants, DM and the random baseline, evaluated
def test_the_report_writes_every_file_it_lists(finished):
    store, record, _, tmp = finished
    out = tmp / "out"
    report = build_report(store, record, out)
    assert report["files"][:3] == ["report.md", "report.html", "findings.json"]
    # two aligned ratios and a coloured dataset: the ratio and bias-gap plots; DM's curves; one architecture
    # and one guidance setting: no heatmap and no guidance plot
    assert set(report["files"][3:]) == {"accuracy_vs_aligned_ratio.png", "aligned_vs_conflicting.png",
                                        "distillation_curves.png"}
    assert sorted(p.name for p in out.iterdir()) == sorted(report["files"])  # exactly what it lists
    for name in report["files"]:
        data = (out / name).read_bytes()
        assert data, name
        if name.endswith(".png"):
            assert data[:4] == b"\x89PNG", name
    assert report["findings"] == [] and "findings" in (out / "findings.json").read_text()
    # built again into the same folder: the same files, nothing left over
    assert build_report(store, record, out)["files"] == report["files"]


@pytest.mark.slow
def test_the_tables_hold_the_rows_values(finished):
    store, record, outcome, tmp = finished
    report = build_report(store, record, tmp / "out-tables")
    rows = report["rows"]
    assert rows == outcome.results  # the report's rows are the study's results
    assert [(r["method"], r["aligned_ratio"]) for r in rows] == [("dm", 0.1), ("dm", 0.9)]  # baselines score, not rows
    assert all(math.isfinite(r["acc_mean"]) and r["acc_random"] is not None for r in rows)
    md = (tmp / "out-tables" / "report.md").read_text()
    html = (tmp / "out-tables" / "report.html").read_text()
    assert md.startswith(f"# Study {record['study_id']} (succeeded)") and "2 result rows" in md
    paper, flat = report["tables"]
    assert paper["header"] == ["method / ipc", "aligned_ratio=0.1", "aligned_ratio=0.9"]
    (line,) = paper["body"]
    assert line[0] == "dm / 1"
    for row, cell in zip(rows, line[1:]):  # mean ± std in percent, one column per aligned ratio
        assert cell == f"{row['acc_mean'] * 100:.1f} ± {row['acc_std'] * 100:.1f}"
        assert cell in md and cell in html
    assert "| method / ipc | aligned_ratio=0.1 | aligned_ratio=0.9 |" in md
    for row, body in zip(rows, flat["body"]):  # every row in full, fractions to 4 places
        values = dict(zip(flat["header"], body))
        assert values["acc_mean"] == f"{row['acc_mean']:.4f}" and values["acc_random"] == f"{row['acc_random']:.4f}"
        assert values["ior"] == f"{row['acc_mean'] - row['acc_random']:.4f}"
        assert values["aligned_ratio"] == f"{row['aligned_ratio']:.4f}" and values["method"] == "dm"
        assert "| " + " | ".join(body) + " |" in md
    assert html.count("<table>") == 2 and html.count("<img") == 3 and md.count("![") == 3


def test_paper_and_flat_tables_on_hand_made_rows():
    def row(method, ratio, acc, std):
        return {"dataset": "d", "eval_arch": "convnet", "method": method, "ipc": 10, "aligned_ratio": ratio,
                "severity": 1, "guidance": "none", "acc_mean": acc, "acc_std": std, "acc_random": None}
    rows = [row("dm", 0.1, 0.5, 0.01), row("dm", 0.9, 0.75, 0.02), row("dc", 0.1, 0.25, 0.0)]
    (t,) = paper_tables(rows)
    assert t["header"] == ["method / ipc", "aligned_ratio=0.1", "aligned_ratio=0.9"]
    assert t["body"] == [["dc / 10", "25.0 ± 0.0", "-"], ["dm / 10", "50.0 ± 1.0", "75.0 ± 2.0"]]  # a missing cell
    flat = flat_table(rows)
    assert "acc_random" not in flat["header"]  # a column no row has is left out
    assert flat["body"][1][flat["header"].index("acc_mean")] == "0.7500"


def test_debias_kinds_are_columns_and_get_their_plot_oracle_marked():
    def row(debias, ratio, acc):
        return {"dataset": "d", "eval_arch": "convnet", "method": "dm", "ipc": 10, "aligned_ratio": ratio,
                "severity": 4, "guidance": "none", "debias": debias, "debias_oracle": debias == "groups",
                "acc_mean": acc, "acc_std": 0.0, "acc_random": None}
    rows = [row(d, p, a) for d, base in (("none", 0.2), ("kde", 0.5), ("groups", 0.6)) for p, a in
            ((0.95, base + 0.1), (0.99, base))]
    (t,) = paper_tables(rows)
    assert "aligned_ratio=0.99, debias=kde" in t["header"] and t["body"][0][t["header"].index(
        "aligned_ratio=0.99, debias=kde")] == "50.0 ± 0.0"
    assert "debias_oracle" in flat_table(rows)["header"]
    image = plot_debias(rows)
    assert image is not None and image.startswith(b"\x89PNG")
    assert plot_debias([r for r in rows if r["debias"] == "none"]) is None  # one kind: nothing to compare


# --- compare_rows --------------------------------------------------------------------------------

def coords(**over):
    base = dict.fromkeys(KEYS)
    base.update(dataset="d", aligned_ratio=0.1, severity=1, method="dm", ipc=10, guidance="none",
                eval_arch="convnet", eval_protocol="dsa/300ep")
    base.update(over)
    return base


def test_compare_rows_matches_on_coordinates_and_differences_b_minus_a():
    a = [{**coords(), "acc_mean": 0.50, "ior": 0.10},
         {**coords(ipc=50), "acc_mean": 0.70, "ior": None},
         {**coords(method="dc"), "acc_mean": 0.40, "ior": 0.05}]  # only in a
    b = [{**coords(), "acc_mean": 0.55, "ior": 0.20},
         {**coords(ipc=50), "acc_mean": 0.60, "ior": 0.02},
         {**coords(eval_arch="mlp"), "acc_mean": 0.30, "ior": 0.0}]  # only in b
    out = compare_rows(a, b)
    assert len(out) == 4
    by = {(r["method"], r["ipc"], r["eval_arch"]): r for r in out}
    both = by[("dm", 10, "convnet")]
    assert both["acc_mean_a"] == 0.50 and both["acc_mean_b"] == 0.55
    assert both["acc_mean_diff"] == pytest.approx(0.05) and both["ior_diff"] == pytest.approx(0.10)
    fifty = by[("dm", 50, "convnet")]
    assert fifty["acc_mean_diff"] == pytest.approx(-0.10) and fifty["ior_diff"] is None  # a's ior absent
    only_a = by[("dc", 10, "convnet")]
    assert only_a["acc_mean_a"] == 0.40 and only_a["acc_mean_b"] is None and only_a["acc_mean_diff"] is None
    only_b = by[("dm", 10, "mlp")]
    assert only_b["acc_mean_a"] is None and only_b["acc_mean_b"] == 0.30 and only_b["acc_mean_diff"] is None
    assert only_b["dataset"] == "d" and only_b["eval_protocol"] == "dsa/300ep"  # coordinates from the side it is on
    assert all(set(KEYS) <= set(r) for r in out)


def test_compare_rows_of_a_study_with_itself_is_all_zero_and_of_nothing_is_empty():
    rows = [{**coords(ipc=i), "acc_mean": 0.1 * i, "ior": 0.01 * i} for i in (1, 10)]
    out = compare_rows(rows, rows)
    assert len(out) == 2 and all(r["acc_mean_diff"] == 0.0 and r["ior_diff"] == 0.0 for r in out)
    assert compare_rows([], []) == []
    alone = compare_rows(rows, [])
    assert sorted(r["acc_mean_a"] for r in alone) == [0.1, 1.0]
    assert all(r["acc_mean_b"] is None and r["acc_mean_diff"] is None and r["ior_diff"] is None for r in alone)
