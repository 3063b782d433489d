"""Rich rendering for the CLI: progress view, results, counts tables."""

from __future__ import annotations

import csv
import io
import json
import math
import time

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

import orchestrator  # exports resolve on first use

STATE_STYLE = {"pending": "dim", "running": "yellow", "executed": "green", "cached": "cyan", "reused": "cyan",
               "failed": "red", "skipped": "magenta"}


def ago(t: float | None) -> str:
    if not t:
        return "never"
    s = time.time() - t
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 else f"{s / 3600:.1f} h ago"


def fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, dict):
        return ",".join(f"{k}={x}" for k, x in v.items())
    return str(v)


def eta_text(left: tuple[float, bool] | None) -> str | None:
    """`ETA ~12 min`, from `StudyProgress.eta_seconds`."""
    if left is None:
        return None
    seconds, unknown = left
    text = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
    return f"ETA ~{text}" + (" (+ kinds not yet timed)" if unknown else "")


class ProgressView:
    """Live table of stages by kind and state, the stages running now, and an ETA.

    On a terminal it redraws in place; piped (CI logs) it prints one plain line
    per finished or failed stage instead.
    """

    def __init__(self, console: Console):
        self.console = console
        self.progress = orchestrator.StudyProgress()
        self.study_id = ""
        self.live: Live | None = None
        self.notes: list[str] = []

    @property
    def stages(self) -> dict[str, dict]:
        return self.progress.stages

    def show(self, study_id: str, stages: dict[str, dict]) -> None:
        """A study's stages as its record (or a job's events) gives them, for `ddray study status`."""
        self.study_id = study_id
        self.progress.load(stages)

    def __call__(self, event: dict) -> None:
        t = event["type"]
        if t == "start":
            self.study_id = event["study_id"]
            self.progress.start(event["counts"])
            self.console.print(f"study [bold]{escape(self.study_id)}[/bold] (store {event.get('store')}, tracking "
                               f"{event.get('tracking_uri')}, MLflow parent run {event['parent_run_id']})",
                               highlight=False)
            if self.console.is_terminal:
                self.live = Live(self.render(), console=self.console, refresh_per_second=4, transient=False)
                self.live.start()
        elif t == "stage" and (st := self.progress.stage(event["key"], event["state"], event.get("run_s"),
                                                           event.get("kind"), event.get("label"))) is not None:
            if event["state"] == "failed":
                self.notes.append(f"[red]failed[/red] {escape(st['label'])}: {escape(event.get('error', ''))}")
            if self.live is None and event["state"] in ("executed", "failed", "reused"):
                done = self.progress.finished()
                self.console.print(f"[{done}/{self.progress.total()}] {event['state']} {st['label']}"
                                   + (f": {event.get('error')}" if event.get("error") else ""),
                                   markup=False, highlight=False)
        elif t == "progress" and event["key"] in self.stages:
            st = self.stages[event["key"]]
            st["trials"] = trials_text(event)
            if self.live is None:
                self.console.print(f"{st['label']}: {st['trials']}", markup=False, highlight=False)
        elif t == "warning":
            self.notes.append(f"[yellow]warning[/yellow] {escape(event['message'])}")
            if self.live is None:
                self.console.print(f"warning: {event['message']}", markup=False, highlight=False)
        elif t == "end" and self.live is not None:
            self.live.update(self.render())
            self.live.stop()
            self.live = None
            return
        if self.live is not None:
            self.live.update(self.render())

    def render(self):
        table = Table(title=f"stages of {escape(self.study_id)}", show_lines=False)
        table.add_column("kind")
        for s in orchestrator.STATES:
            table.add_column(s, justify="right", style=STATE_STYLE.get(s, ""))
        for kind, counts in self.progress.counts():
            table.add_row(kind, *map(str, counts))
        running = [v for v in self.stages.values() if v["state"] == "running"][:8]
        lines = [f"[yellow]running[/yellow] {escape(v['label'])}" + (f" ({escape(v['trials'])})" if v.get("trials") else "")
                 for v in running] + self.notes[-5:]
        left = eta_text(self.progress.eta_seconds())
        return Group(table, *([left] if left else []), *lines)

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()


def trials_text(p: dict) -> str:
    """`3/6 trials done, 2 running, 1 stopped early, best val_acc 0.7812`."""
    text = f"{p['done']}/{p['total']} trials done, {p['running']} running"
    if p.get("stopped_early"):
        text += f", {p['stopped_early']} stopped early"
    if p.get("failed"):
        text += f", {p['failed']} failed"
    return text + (f", best val_acc {p['best']:.4f}" if p.get("best") is not None else "")


RESULT_COLUMNS = ["dataset", "aligned_ratio", "severity", "method", "ipc", "guidance", "eval_arch",
                  "acc_mean", "acc_std", "acc_std_distill", "acc_val_selected", "acc_random", "ior", "acc_whole",
                  "acc_unbiased", "acc_aligned", "acc_conflicting", "gap", "n_distillations", "n_repeats"]
# shown when some row has one
OPTIONAL = ("acc_val_selected", "acc_random", "ior", "acc_whole", "acc_aligned", "acc_conflicting", "gap")
CSV_ONLY = ["selection", "val_split", "acc_last", "acc_last_std", "acc_val_selected_std", "debias_oracle"]
VARYING = ("debias", "iterations", "lr_img", "options", "eval_protocol")  # in the table only when the grid varies them


def result_columns(rows: list[dict]) -> list[str]:
    cols = [c for c in RESULT_COLUMNS if c not in OPTIONAL or any(r.get(c) is not None for r in rows)]
    for extra in reversed(VARYING):
        if len({json.dumps(r.get(extra), sort_keys=True, default=str) for r in rows}) > 1:
            cols.insert(cols.index("guidance") + 1, extra)
    return cols


WIDE = 160  # below this many columns the results table is the compact one


def results_table(rows: list[dict], title: str, width: int | None = None, study_id: str = "ID") -> Table:
    """Every column on a wide console; on a narrow one (80, 120 columns) the setting, accuracy as mean ± std
    and its improvement over the random subset, with a caption naming the command for the full table."""
    if width is not None and width < WIDE:
        return compact_results_table(rows, title, width, study_id)
    table = Table(title=title)
    cols = result_columns(rows)
    for c in cols:
        table.add_column(c, justify="right" if c.startswith(("acc", "n_", "ipc", "aligned", "sev", "it", "lr")) else "left")
    for r in sorted(rows, key=lambda r: tuple(str(r.get(c)) for c in cols[:8])):
        table.add_row(*[fmt(r.get(c)) for c in cols])
    return table


def _variant(r: dict) -> str:
    if r.get("aligned_ratio") is None:
        return str(r["dataset"])
    return f"{r['dataset']}[p={r['aligned_ratio']:g},s={r['severity']}]"


def compact_results_table(rows: list[dict], title: str, width: int, study_id: str) -> Table:
    varying = {k for k in ("guidance", "debias", "eval_arch", "iterations", "lr_img", "options")
               if len({json.dumps(r.get(k), default=str) for r in rows}) > 1}
    table = Table(title=title, caption=f"full table: ddray study results {study_id} --format csv", expand=False)
    cols = ["variant", "method", "ipc", *[k for k in ("guidance", "debias", "eval_arch") if k in varying], "acc %",
            "ior"]
    for c in cols:
        table.add_column(c, justify="right" if c in ("ipc", "acc %", "ior") else "left", overflow="fold")
    for r in sorted(rows, key=lambda r: (_variant(r), str(r["method"]), str(r["ipc"]), str(r.get("guidance")))):
        extra = "".join(f" {k}={fmt(r.get(k))}" for k in ("iterations", "lr_img", "options") if k in varying)
        acc = f"{r['acc_mean'] * 100:.1f}±{(r.get('acc_std') or 0) * 100:.1f}" if r.get("acc_mean") is not None else "-"
        ior = f"{r['ior'] * 100:+.1f}" if r.get("ior") is not None else "-"
        oracle = " (oracle)" if r.get("debias_oracle") else ""  # weighted with the attribute labels
        cells = {"variant": _variant(r), "method": f"{r['method']}{extra}", "ipc": fmt(r["ipc"]),
                 "guidance": fmt(r.get("guidance")), "debias": fmt(r.get("debias")) + oracle,
                 "eval_arch": fmt(r.get("eval_arch")), "acc %": acc, "ior": ior}
        table.add_row(*[escape(cells[c]) for c in cols])  # variant labels hold brackets, not markup
    return table


def catalogue_table(kind: str, entries: list[dict]) -> Table:
    table = Table(title=kind)
    for c in entries[0]:
        table.add_column(c)
    for e in entries:
        table.add_row(*[", ".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict)
                        else ", ".join(map(str, x)) if isinstance(x, list) else fmt(x) for x in e.values()])
    return table


def compare_table(rows: list[dict], a: str, b: str) -> Table:
    table = Table(title=f"{a} (a) vs {b} (b)")
    keys = [k for k in ("dataset", "aligned_ratio", "severity", "method", "ipc", "guidance", "debias", "eval_arch")
            if len({str(r.get(k)) for r in rows}) > 1] or ["method"]
    for c in [*keys, "acc a", "acc b", "b - a", "ior a", "ior b"]:
        table.add_column(c, justify="right" if c not in ("dataset", "method", "guidance", "eval_arch") else "left")
    for r in rows:
        diff = r["acc_mean_diff"]
        table.add_row(*[fmt(r.get(k)) for k in keys], fmt(r["acc_mean_a"]), fmt(r["acc_mean_b"]),
                      "-" if diff is None else f"{diff:+.4f}", fmt(r["ior_a"]), fmt(r["ior_b"]))
    return table


def results_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    cols = RESULT_COLUMNS[:7] + list(VARYING) + RESULT_COLUMNS[7:] + CSV_ONLY
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else fmt(r[k]) if isinstance(r.get(k), dict) else r.get(k))
                         for k in cols})
    return buf.getvalue()


def counts_table(counts: dict, title: str) -> Table:
    table = Table(title=title)
    table.add_column("class", justify="right")
    cols = ["train_aligned", "train_conflicting", "test_aligned", "test_conflicting",
            "unbiased_aligned", "unbiased_conflicting"]
    for c in cols:
        table.add_column(c.replace("_", " "), justify="right")
    n = len(counts["train_aligned"])
    for i in range(n):
        table.add_row(str(i), *[str(counts[c][i]) for c in cols])
    table.add_row("total", *[str(sum(counts[c])) for c in cols], style="bold")
    return table


class EventPrinter:
    """Prints every event as one `ddray-event {json}` line on stdout (what the job's follower reads), and
    passes it on to `then` (the live view, which draws on stderr)."""

    def __init__(self, then):
        self.then = then

    def __call__(self, event: dict) -> None:
        shown = {k: v for k, v in event.items() if k != "result"}  # a stage's full result stays in the store
        print(orchestrator.EVENT_PREFIX + json_line(shown), flush=True)
        if event["type"] != "results":
            self.then(event)


def transitions(record: dict, tail: int) -> list[str]:
    """The study's latest stage transitions, one line each."""
    lines = []
    for e in orchestrator.study_transitions(record, tail):
        label = e["label"]
        when = time.strftime("%H:%M:%S", time.localtime(e["t"]))
        extra = f" ({e['error']})" if e.get("error") else f" on {e['host']}" if e.get("host") else ""
        lines.append(f"{when} {e['state']:<9} {label}{extra}")
    return lines or [f"study {record['study_id']}: no transitions yet"]


def json_line(obj) -> str:
    """One JSON line; NaN (no aligned samples, say) becomes null."""
    return json.dumps(_nan_to_none(obj), default=str)


def _nan_to_none(obj):
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


VERDICT_STYLE = {"holds": "green", "contradicted": "red", "inconclusive": "yellow"}


def findings_table(findings: list[dict], title: str) -> Table:
    """One line per claim: verdict, effect and 95% interval in accuracy points, networks read."""
    table = Table(title=title, caption="effect: a - b, or the fitted change of a trend, in points; "
                  "95% bootstrap interval over distillation seeds x networks")
    for c in ("claim", "verdict", "effect", "95% CI", "n", "statement"):
        table.add_column(c, justify="right" if c in ("effect", "95% CI", "n") else "left", overflow="fold")
    for f in findings:
        effect = "-" if f["effect"] is None else f"{f['effect']:+.1f}"
        ci = "-" if f["ci95"] is None else f"[{f['ci95'][0]:+.1f}, {f['ci95'][1]:+.1f}]"
        style = VERDICT_STYLE.get(f["verdict"], "")
        table.add_row(escape(f["id"]), f"[{style}]{f['verdict']}[/{style}]", effect, ci, str(f["n"]),
                      escape(f["statement"]))
    return table
