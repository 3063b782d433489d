"""A finished study as the papers show it: results tables (mean +- std) and plots, as Markdown and HTML.

Everything comes from the store (the rows `ddray study results` prints, and the
stages' own histories), so a report can be rebuilt at any time, anywhere the
store is. Tables: one per (dataset, evaluation architecture), methods x IPC down
the side and whatever the study varies across (aligned ratio, severity,
guidance) along the top, cells `mean +- std` in percent, as paper 1 lays out its
bias grid and paper 2 its PTM options; then every row with the random-subset
and whole-dataset references (`acc_random`, `ior`, `acc_whole`, `gap`). Plots,
each only when the study has the axis it needs:

- accuracy vs aligned ratio, a line per method and IPC, the random subset dashed;
- aligned vs conflicting accuracy (the bias gap) per setting;
- the cross-architecture heatmap (setting x evaluation architecture);
- the PTM-option ablation (accuracy per guidance setting, per method and IPC);
- bias-aware distillation: conflicting-test accuracy per debias kind x aligned ratio (oracle kinds dashed);
- distillation curves (each distillation's objective by iteration).

`compare_rows` lines two studies' rows up on their coordinates.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from orchestrator.reporting.results import (
    evaluation_results,
    study_findings,
    study_results,
)
from orchestrator.spec.claims import safe_name
from orchestrator.stages.figures import png, pyplot
from orchestrator.storage.studies import DONE
from orchestrator.tracking.tracker import Tracker, reason, redact_text

ACROSS = ("aligned_ratio", "severity", "guidance", "debias")  # what a table spreads along the top when it varies


PERCENT = 100.0


def _varying(rows: list[dict], keys) -> list[str]:
    return [k for k in keys if len({json.dumps(r.get(k), default=str) for r in rows}) > 1]


def _cell(row: dict | None) -> str:
    if row is None or row.get("acc_mean") is None:
        return "-"
    return f"{row['acc_mean'] * PERCENT:.1f} ± {(row.get('acc_std') or 0.0) * PERCENT:.1f}"


def paper_tables(rows: list[dict]) -> list[dict]:
    """One table per (dataset, eval_arch): {title, header, body} with body rows of strings."""
    tables = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["eval_arch"]), []).append(r)
    for (dataset, arch), group in sorted(groups.items(), key=lambda kv: str(kv[0])):
        across = _varying(group, ACROSS)
        # beyond method and IPC, only what varies within one method's rows (DC's options are not DM's)
        per_method = [set(_varying([r for r in group if r["method"] == m], ("iterations", "lr_img", "options",
                                                                              "eval_protocol")))
                      for m in {r["method"] for r in group}]
        down = ["method", "ipc", *sorted(set().union(*per_method))]
        columns = sorted({json.dumps([r.get(k) for k in across], default=str) for r in group})
        lines = sorted({json.dumps([r.get(k) for k in down], default=str) for r in group})
        index = {(json.dumps([r.get(k) for k in down], default=str),
                  json.dumps([r.get(k) for k in across], default=str)): r for r in group}
        header = [" / ".join(down)] + [", ".join(f"{k}={v}" for k, v in zip(across, json.loads(c))) or "accuracy"
                                      for c in columns]
        body = [[" / ".join(str(v) for v in json.loads(line))] + [_cell(index.get((line, c))) for c in columns]
                for line in lines]
        tables.append({"title": f"{dataset}, evaluated on {arch} (accuracy %, mean ± std over distillations "
                                f"x networks)", "header": header, "body": body})
    return tables


FLAT = ["dataset", "aligned_ratio", "severity", "method", "ipc", "guidance", "debias", "debias_oracle", "eval_arch", "eval_protocol",
        "acc_mean", "acc_std", "acc_random", "ior", "acc_whole", "acc_aligned", "acc_conflicting", "gap",
        "n_distillations", "n_repeats"]


def flat_table(rows: list[dict]) -> dict:
    cols = [c for c in FLAT if any(r.get(c) is not None for r in rows)]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4f}"
        return "-" if v is None else str(v)
    return {"title": "every row (accuracies as fractions; ior = acc_mean - acc_random)", "header": cols,
            "body": [[fmt(r.get(c)) for c in cols] for r in rows]}


def plot_ratio(rows: list[dict]) -> bytes | None:
    rows = [r for r in rows if r.get("aligned_ratio") is not None]
    if len({r["aligned_ratio"] for r in rows}) < 2:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines: dict[tuple, list] = {}
    for r in rows:
        lines.setdefault((r["method"], r["ipc"], r["guidance"], r["eval_arch"], r["severity"]), []).append(r)
    for (method, ipc, guidance, arch, severity), pts in sorted(lines.items(), key=lambda kv: str(kv[0])):
        pts = sorted(pts, key=lambda r: r["aligned_ratio"])
        label = f"{method} ipc{ipc}" + (f" {guidance}" if guidance != "none" else "") + f" s{severity} ({arch})"
        ax.plot([p["aligned_ratio"] for p in pts], [p["acc_mean"] * PERCENT for p in pts], marker="o", label=label)
        if all(p.get("acc_random") is not None for p in pts):
            ax.plot([p["aligned_ratio"] for p in pts], [p["acc_random"] * PERCENT for p in pts], ls=":", lw=1,
                    color=ax.lines[-1].get_color())
    ax.set(xlabel="aligned ratio p of the training data", ylabel="test accuracy % (bias-conflicting)",
           title="accuracy vs aligned ratio (dotted: the random subset at the same IPC)")
    ax.legend(fontsize=7, ncol=2)
    return png(fig)


def plot_bias_gap(rows: list[dict]) -> bytes | None:
    rows = [r for r in rows if r.get("acc_aligned") is not None and r.get("acc_conflicting") is not None]
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows)), 4.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["acc_aligned"] * PERCENT for r in rows], width=0.4, label="aligned")
    ax.bar([x + 0.2 for x in xs], [r["acc_conflicting"] * PERCENT for r in rows], width=0.4, label="conflicting")
    ax.set_xticks(list(xs), [f"{r['method']} ipc{r['ipc']} p={r['aligned_ratio']}" for r in rows], rotation=70,
                  fontsize=7)
    ax.set(ylabel="accuracy % on the unbiased test set", title="aligned vs conflicting samples")
    ax.legend()
    return png(fig)


def plot_cross_arch(rows: list[dict]) -> bytes | None:
    archs = sorted({r["eval_arch"] for r in rows})
    if len(archs) < 2:
        return None
    settings = sorted({(r["dataset"], r["aligned_ratio"], r["method"], r["ipc"], r["guidance"]) for r in rows},
                      key=str)
    index = {(r["dataset"], r["aligned_ratio"], r["method"], r["ipc"], r["guidance"], r["eval_arch"]): r["acc_mean"]
             for r in rows}
    grid = [[(index.get((*s, a)) or math.nan) * PERCENT for a in archs] for s in settings]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.6 * len(archs) + 4, 0.35 * len(settings) + 1.5))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(archs)), archs, rotation=30)
    ax.set_yticks(range(len(settings)), [f"{s[2]} ipc{s[3]} {s[4]}" + (f" p={s[1]}" if s[1] is not None else "")
                                         for s in settings], fontsize=7)
    for i, line in enumerate(grid):
        for j, v in enumerate(line):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(im, ax=ax, label="accuracy %")
    ax.set_title("cross-architecture evaluation")
    return png(fig)


def plot_guidance(rows: list[dict]) -> bytes | None:
    guidances = sorted({r["guidance"] for r in rows})
    if len(guidances) < 2:
        return None
    settings = sorted({(r["method"], r["ipc"]) for r in rows if r["guidance"] in guidances}, key=str)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(settings) * len(guidances) / 2), 4.5))
    width = 0.8 / len(guidances)
    for g_i, g in enumerate(guidances):
        vals = []
        for method, ipc in settings:
            accs = [r["acc_mean"] for r in rows if (r["method"], r["ipc"], r["guidance"]) == (method, ipc, g)]
            vals.append(sum(accs) / len(accs) * PERCENT if accs else 0.0)
        ax.bar([i + g_i * width for i in range(len(settings))], vals, width=width, label=g)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(settings))], [f"{m} ipc{i}" for m, i in settings])
    ax.set(ylabel="accuracy % (mean over variants and architectures)", title="PTM guidance options")
    ax.legend(fontsize=7)
    return png(fig)


def plot_debias(rows: list[dict]) -> bytes | None:
    """Conflicting-test accuracy (a biased study's `acc`) per debias entry across aligned ratios: a line per
    (method, IPC, guidance, debias), oracle entries (attribute labels: FairDD's groups) dashed."""
    rows = [r for r in rows if r.get("aligned_ratio") is not None and r.get("debias") is not None]
    if len({r["debias"] for r in rows}) < 2:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(methods := sorted({r["method"] for r in rows})), squeeze=False,
                             figsize=(5 * len(methods), 4.2), sharey=True)
    for ax, method in zip(axes[0], methods):
        lines: dict[tuple, list] = {}
        for r in rows:
            if r["method"] == method:
                lines.setdefault((r["ipc"], r["guidance"], r["debias"], r["debias_oracle"]), []).append(r)
        for (ipc, guidance, debias, oracle), pts in sorted(lines.items(), key=lambda kv: str(kv[0])):
            by_ratio: dict[float, list[float]] = {}  # mean over severities and architectures
            for p in pts:
                by_ratio.setdefault(p["aligned_ratio"], []).append(p["acc_mean"] * PERCENT)
            xs = sorted(by_ratio)
            label = f"ipc{ipc} {debias}" + (" (oracle)" if oracle else "") + (f" {guidance}" if guidance != "none" else "")
            ax.plot(xs, [sum(by_ratio[x]) / len(by_ratio[x]) for x in xs], marker="o", ls="--" if oracle else "-",
                    label=label)
        ax.set(xlabel="aligned ratio p of the training data", title=f"{method}: debiasing")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("test accuracy % (bias-conflicting)")
    return png(fig)


def plot_curves(store, record: dict) -> bytes | None:
    curves = []
    for key, st in record["stages"].items():
        if st["kind"] in ("distill", "search") and st["state"] in DONE:
            try:
                history = store.read_json(st["kind"], key, "history.json")
            except Exception:  # a coreset baseline has no history file content worth plotting
                continue
            loss_keys = sorted({k for h in history for k in h if k.startswith("loss")})
            if history and loss_keys:
                curves.append((st["label"], history, loss_keys[0]))
    if not curves:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, history, name in curves[:24]:
        ax.plot([h["iteration"] for h in history], [h[name] for h in history], lw=1, label=f"{label} ({name})")
    ax.set(xlabel="iteration", ylabel="objective", yscale="log", title="distillation curves")
    ax.legend(fontsize=6)
    return png(fig)


def _markdown_table(t: dict) -> str:
    lines = [f"### {t['title']}", "", "| " + " | ".join(t["header"]) + " |",
             "|" + "---|" * len(t["header"])]
    lines += ["| " + " | ".join(row) + " |" for row in t["body"]]
    return "\n".join(lines) + "\n"


def _html_table(t: dict) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t["header"])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in t["body"])
    return f"<h3>{html.escape(t['title'])}</h3><table><tr>{head}</tr>{body}</table>"


def findings_table(findings: list[dict]) -> dict:
    body = [[f["id"], f["verdict"], "-" if f["effect"] is None else f"{f['effect']:+.1f}",
             "-" if f["ci95"] is None else f"[{f['ci95'][0]:+.1f}, {f['ci95'][1]:+.1f}]", str(f["n"]), f["statement"]]
            for f in findings]
    return {"title": "Findings (effect in accuracy points: a - b, or a trend's fitted change; 95% bootstrap "
                     "interval over distillation seeds x networks)",
            "header": ["claim", "verdict", "effect", "95% CI", "n", "statement"], "body": body}


def plot_finding(f: dict) -> bytes | None:
    """A claim's groups (a comparison) or levels (a trend) in points, titled with its verdict and interval."""
    means = f.get("levels") or f.get("groups")
    if not means:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    names, vals = list(means), list(means.values())
    if "levels" in f:
        ax.plot(range(len(vals)), vals, marker="o")
        ax.set_xticks(range(len(vals)), names)
    else:
        ax.bar(range(len(vals)), vals, color=["tab:blue"] * (len(vals) - 1) + ["tab:gray"])
        ax.set_xticks(range(len(vals)), names, fontsize=7)
        ax.set_ylim(min(vals) - 5, max(vals) + 3)
    ax.set(ylabel=f"{f['metric']} % (mean over cells)")
    ci = "" if f["ci95"] is None else f" {f['effect']:+.1f} [{f['ci95'][0]:+.1f}, {f['ci95'][1]:+.1f}]"
    ax.set_title(f"{f['id']}: {f['verdict']}{ci}", fontsize=9)
    return png(fig)


def finding_plot_name(finding_id: str) -> str:
    return f"finding_{safe_name(finding_id)}.png"


def build_report(store, record: dict, out: Path) -> dict:
    """Write report.md, report.html and the plots under `out`; return what was written and the rows."""
    out.mkdir(parents=True, exist_ok=True)
    results = evaluation_results(store, record)  # read once, for the rows and the claims
    rows = study_results(store, record, results)
    findings = study_findings(store, record, results)
    tables = [*([findings_table(findings)] if findings else []), *paper_tables(rows), flat_table(rows)]
    plots = {finding_plot_name(f["id"]): plot_finding(f) for f in findings}
    plots |= {"accuracy_vs_aligned_ratio.png": plot_ratio(rows), "aligned_vs_conflicting.png": plot_bias_gap(rows),
              "cross_architecture.png": plot_cross_arch(rows), "ptm_guidance.png": plot_guidance(rows),
              "debias.png": plot_debias(rows),
              "distillation_curves.png": plot_curves(store, record)}
    plots = {name: data for name, data in plots.items() if data is not None}
    for name, data in plots.items():
        (out / name).write_bytes(data)
    title = f"Study {record['study_id']} ({record['state']})"
    md = [f"# {title}", "", f"{len(rows)} result rows from `{record.get('store_root', store.root)}`.", ""]
    md += [_markdown_table(t) for t in tables]
    md += [f"![{name}]({name})\n" for name in plots]
    (out / "report.md").write_text("\n".join(md))
    style = "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 6px;font:12px sans-serif}"
    body = "".join(_html_table(t) for t in tables) + "".join(f'<p><img src="{n}" alt="{n}"></p>' for n in plots)
    (out / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
                                     f"</title><style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
                                     f"{body}</body></html>")
    (out / "findings.json").write_text(json.dumps({"findings": findings}, indent=1))
    return {"files": ["report.md", "report.html", "findings.json", *plots], "rows": rows, "tables": tables,
            "findings": findings}


def log_report(record: dict, out: Path, files: list[str]) -> str | None:
    """The report's files as artifacts of the study's MLflow parent run (`report/`); the reason if not."""

    if not record.get("parent_run_id"):
        return "the study has no MLflow parent run"
    try:
        tracker = Tracker(record["tracking_uri"], record["experiment"])
        tracker.check()
        for name in files:
            tracker.client.log_artifact(record["parent_run_id"], str(out / name), "report")
        tracker.log_findings(record["parent_run_id"], json.loads((out / "findings.json").read_text())["findings"])
    except Exception as exc:  # the report is written either way; tracking is best-effort
        return redact_text(reason(exc), record.get("tracking_uri", ""))
    return None
