"""`ddray`: the command line. Thin: parse, call the orchestrator, render.

Bad input and unreachable resources print one line per problem to stderr and
exit 2; a study whose stages failed exits 1. Set DDRAY_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

import orchestrator  # its exports resolve on first use: `ddray --help` imports no torch, Ray or MLflow
from cli import render
from orchestrator.errors import UserError

app = typer.Typer(help="ddray: dataset-distillation studies on Ray, tracked in MLflow.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
study_app = typer.Typer(help="Validate, submit and inspect studies.", no_args_is_help=True)
dataset_app = typer.Typer(help="Build and inspect biased datasets.", no_args_is_help=True)
app.add_typer(study_app, name="study")
app.add_typer(dataset_app, name="dataset")

# Piped output (CI logs, `| tee`) gets wide tables instead of rich's 80-column default.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 160)

StoreOpt = typer.Option(None, "--store", help="Artifact store root (default: the spec's store.root, else ./ddray-store).")
AddressOpt = typer.Option(None, "--address", envvar="RAY_ADDRESS",
                          help="Ray cluster: http://HEAD:8265 (Jobs API: the driver runs on the cluster), "
                               "ray://HEAD:10001 or HOST:PORT (a driver here); default: a local Ray.")
MaxStagesOpt = typer.Option(100_000, "--max-stages", min=1, help="Refuse a study whose grid expands to more stages.")
ProfileOpt = typer.Option(None, "--profile", help="Apply one of the spec's profiles (e.g. smoke) over it.")
# exit codes of a submit that did not succeed: failed stages 1, Ctrl-C 130, SIGTERM 143, cancelled 1
EXIT_CODES = {"succeeded": 0, "failed": 1, "cancelled": 1, "interrupted": 130, "terminated": 143}


def handles_errors(fn):
    """Turn UserError into one line per problem and exit 2; never show a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            for line in exc.lines:  # user text may hold brackets (labels like d[p=0.1,s=1]): not markup
                err.print(f"[red]error:[/red] {escape(line)}", markup=True, highlight=False)
            raise typer.Exit(2)
        except KeyboardInterrupt as exc:

            err.print("terminated" if isinstance(exc, orchestrator.Terminated) else "interrupted")
            raise typer.Exit(143 if isinstance(exc, orchestrator.Terminated) else 130)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:  # a bug, not bad input: still one line unless debugging
            if os.environ.get("DDRAY_DEBUG"):
                raise
            err.print(f"[red]internal error:[/red] {type(exc).__name__}: {escape(str(exc).splitlines()[0]) if str(exc) else ''} "
                      "(set DDRAY_DEBUG=1 for the traceback)", highlight=False)
            raise typer.Exit(1)
    return wrapper


def _one_of(flag: str, value: str, choices: tuple[str, ...]) -> None:
    """A flag that takes one of a few words: anything else is one line naming it (exit 2)."""
    if value not in choices:
        raise UserError(f"{flag}: must be {', '.join(choices[:-1])} or {choices[-1]}, got '{value}'")


def _store(path: Optional[str]):
    return orchestrator.open_store(path or "./ddray-store")


# --- study ------------------------------------------------------------------------------------------

@study_app.command("validate")
@handles_errors
def study_validate(spec: Path = typer.Argument(..., help="Study spec (YAML)."), max_stages: int = MaxStagesOpt,
                   profile: Optional[str] = ProfileOpt):
    """Check a spec (and each of its profiles); print stage counts. Exit 2 with one line per problem."""

    for name in [profile] if profile else [None, *orchestrator.profiles_of(spec)]:
        s = orchestrator.load_spec(spec, name)
        counts = orchestrator.build_stage_graph(s, max_stages).counts()
        shown = f"{spec} --profile {name}" if name else str(spec)
        out.print(f"{shown}: valid (study {s.study_id}; stages: " +
                  ", ".join(f"{k} {v}" for k, v in counts.items()) + ")", highlight=False)
        for line in orchestrator.missing_data(s):
            out.print(f"  {line}", highlight=False)


@study_app.command("submit")
@handles_errors
def study_submit(
    spec: Path = typer.Argument(..., help="Study spec (YAML)."),
    json_out: bool = typer.Option(False, "--json", metavar="", help="End with one JSON line: study id, state, stage counts."),
    store: Optional[str] = StoreOpt,
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                                               help="Override the spec's tracking.uri."),
    address: Optional[str] = AddressOpt,
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus",
                                           help="CPUs for the local Ray (default: all this process may use)."),
    max_stages: int = MaxStagesOpt,
    no_wait: bool = typer.Option(False, "--no-wait", metavar="", help="With a Jobs API address: return once submitted."),
    events: bool = typer.Option(False, "--events", metavar="", hidden=True, help="Print every event as a JSON line (jobs)."),
    profile: Optional[str] = ProfileOpt,
):
    """Run a study: every stage not already in the store, in parallel on Ray (here, or as a job on a cluster)."""

    # a cluster's driver cannot use the laptop's directories: relative paths stay as written, and are refused
    s, text = orchestrator.read_spec(spec, profile, anchored=not orchestrator.is_jobs_address(address))
    if orchestrator.is_jobs_address(address):
        return _submit_job(s, spec, address, store, tracking_uri, max_stages, json_out, no_wait, profile)
    view = render.ProgressView(err)
    on_event = view if not events else render.EventPrinter(view)
    try:
        outcome = orchestrator.submit_study(s, text, store_root=store, tracking_uri=tracking_uri,
                               address=address, num_cpus=num_cpus, on_event=on_event, max_stages=max_stages)
    finally:
        view.stop()
    if events:
        on_event({"type": "results", "rows": outcome.results, "errors": outcome.errors,
                  "attempts": outcome.attempts, "tracking": outcome.tracking, "findings": outcome.findings})
    _report(outcome.study_id, outcome.state, outcome.results, outcome.errors, outcome.summary(), outcome.attempts,
            outcome.tracking, json_out, outcome.findings)


def _report(study_id, state, results, errors, summary, attempts, tracking, json_out, findings=()) -> None:
    console = err if json_out else out  # with --json, stdout holds only the JSON line
    if results:
        console.print(render.results_table(results, f"results of {study_id}", console.width, study_id))
    if findings:
        console.print(render.findings_table(findings, f"findings of {study_id}"))
    for key, message in errors.items():
        err.print(f"[red]stage {key}:[/red] {escape(message)}", highlight=False)
    c = summary["stages"]
    err.print(f"study {study_id} {state}: {c['total']} stages, {c['executed']} executed, "
              f"{c['cached']} cached, {c['failed']} failed or skipped", highlight=False)
    for label, n in attempts.items():
        err.print(f"retried: {label} took {n} attempts", highlight=False)
    if tracking.get("not_logged"):
        err.print(f"[yellow]tracking:[/yellow] {tracking['not_logged']} run(s) could not be logged; "
                  f"the results are in the store: run `ddray study sync {study_id}`", highlight=False)
    if json_out:
        print(render.json_line(summary))
    if state != "succeeded":
        raise typer.Exit(EXIT_CODES.get(state, 1))


def _submit_job(s, spec: Path, address: str, store, tracking_uri, max_stages, json_out, no_wait,
                profile: str | None = None) -> None:
    """The study's driver as a Ray job on the cluster; this command follows it (or returns with --no-wait)."""

    store_root, uri = store or s.store.root, tracking_uri or s.tracking.uri
    orchestrator.check_uri(uri)
    orchestrator.check_cluster_paths(store_root, uri)
    cluster = orchestrator.Cluster(address)
    # the URI travels without its password: the cluster's drivers take MLFLOW_TRACKING_* from their environment
    # (so does the store's: the entrypoint is kept by the cluster, and shown by `ray job list`)
    args = ["--store", orchestrator.redact(str(store_root)), "--tracking-uri", orchestrator.redact(uri),
            "--max-stages", str(max_stages)]
    args += ["--profile", profile] if profile else []
    submission, attached = cluster.submit(s.study_id, s.name, spec, args)
    shown = orchestrator.redact_uri(address)
    err.print(f"study {s.study_id}: {'following the running' if attached else 'submitted'} job {submission} "
              f"on {shown}", highlight=False)
    if no_wait:
        print(render.json_line({"study_id": s.study_id, "submission_id": submission,
                                "state": "running" if attached else "submitted"}))
        return
    view = render.ProgressView(err)
    results: dict = {}

    def on_event(event: dict) -> None:
        if event["type"] == "results":
            results.update(event)
        else:
            view(event)

    try:
        summary = cluster.follow(submission, on_event)
    finally:
        view.stop()
    if "stages" not in summary:  # the job ended without a summary: it died before or outside the study
        raise UserError(f"ray: job {submission} ended {summary.get('job_status')} without a study summary; "
                        f"see `ddray study logs {s.study_id} --address {shown}`")
    _report(s.study_id, summary["state"], results.get("rows", []), results.get("errors", {}), summary,
            results.get("attempts", {}), results.get("tracking", {}), json_out, results.get("findings", []))


@study_app.command("status")
@handles_errors
def study_status(study_id: str, json_out: bool = typer.Option(False, "--json", metavar=""), store: Optional[str] = StoreOpt,
                 address: Optional[str] = AddressOpt):
    """State of a study (running, succeeded, failed, interrupted, cancelled, abandoned) and of its stages."""

    if orchestrator.is_jobs_address(address):
        status = orchestrator.Cluster(address).status(study_id)
        if json_out:
            print(render.json_line({**status, "stages": {k: {x: v.get(x) for x in ("kind", "label", "state")}
                                                         for k, v in status["stages"].items()}}))
            return
        out.print(f"study {study_id}: [bold]{status['state']}[/bold] (job {status['job']}: {status['job_status']})",
                  highlight=False)
        view = render.ProgressView(out)
        view.show(study_id, status["stages"])
        view.progress.tally = status["tally"]  # every stage, also those the job's events never named
        out.print(view.render())
        return
    rec = orchestrator.load_record(_store(store), study_id)
    summary = {"study_id": rec["study_id"], "state": rec["state"], "counts": rec["counts"],
               "attempts": rec.get("attempts", 1), "parent_run_id": rec.get("parent_run_id"),
               "tracking_uri": rec.get("tracking_uri"), "store": rec.get("store_root"),
               "drivers": [{k: d.get(k) for k in ("host", "pid", "state", "heartbeat")} for d in rec["drivers"]]}
    if json_out:
        summary["stages"] = {k: {x: v.get(x) for x in ("kind", "label", "state", "error", "attempts")}
                             for k, v in rec["stages"].items()}
        print(render.json_line(summary))
        return
    view = render.ProgressView(out)
    view.show(rec["study_id"], rec["stages"])
    out.print(f"study {rec['study_id']}: [bold]{rec['state']}[/bold] (submit {summary['attempts']}, "
              f"store {escape(str(rec.get('store_root') or ''))}, tracking {summary['tracking_uri']}, "
              f"parent run {summary['parent_run_id']})", highlight=False)
    if rec["drivers"]:
        d = rec["drivers"][-1]
        out.print(f"last driver: {d.get('host')} pid {d.get('pid')}, {d.get('state')}, "
                  f"heartbeat {render.ago(d.get('heartbeat'))}", highlight=False)
    out.print(view.render())
    for st in rec["stages"].values():
        if st.get("error"):
            out.print(f"[red]{st['state']}[/red] {escape(st['label'])}: {escape(st['error'])}", highlight=False)


@study_app.command("list")
@handles_errors
def study_list(json_out: bool = typer.Option(False, "--json", metavar=""), store: Optional[str] = StoreOpt):
    """All studies in the store."""
    from rich.table import Table


    st = _store(store)
    studies = orchestrator.list_studies(st)
    rows = [{"study_id": r["study_id"], "name": r.get("name"), "state": r["state"], **r["counts"]} for r in studies]
    if json_out:
        print(render.json_line(rows))
        return
    if not rows:  # say where it looked: from another directory, the default store is another store
        err.print(f"no studies in store {escape(str(st.root))} (--store names another)", highlight=False)
        return
    cols = ("study_id", "name", "state", "total", "executed", "cached", "reused", "failed", "skipped")
    table = Table(title=f"studies in {escape(str(st.root))}")
    for c in cols:
        table.add_column(c)
    for r in rows:
        table.add_row(*[str(r.get(c, 0)) for c in cols])
    out.print(table)


@study_app.command("logs")
@handles_errors
def study_logs(study_id: str,
               stage: Optional[str] = typer.Argument(None, help="A stage key (or prefix) or part of its label."),
               store: Optional[str] = StoreOpt,
               tail: int = typer.Option(40, "--tail", help="Transitions shown when no stage is named."),
               address: Optional[str] = AddressOpt):
    """A stage's log (every attempt), the study's latest transitions, or with --address its job's driver log."""

    if orchestrator.is_jobs_address(address) and stage is None:
        sys.stdout.write(orchestrator.Cluster(address).logs(study_id))
        return
    st = _store(store)
    rec = orchestrator.load_record(st, study_id)
    if stage is None:
        for line in render.transitions(rec, tail):
            out.print(line, highlight=False, markup=False)
        return
    key, info = orchestrator.stage_matching(rec, stage)
    logs = st.stage_logs(key)
    if not logs:
        raise UserError(f"stage '{info['label']}' ({key}): no log in the store (state {info['state']})")
    for attempt, text in logs:
        out.print(f"--- {info['label']} ({key}), attempt {attempt} ---", highlight=False, markup=False)
        out.print(text.rstrip(), highlight=False, markup=False)


@study_app.command("cancel")
@handles_errors
def study_cancel(study_id: str, store: Optional[str] = StoreOpt, address: Optional[str] = AddressOpt):
    """Ask a running study to stop: running stages are cancelled, finished ones stay in the store."""

    if orchestrator.is_jobs_address(address):
        out.print(f"study {study_id}: stopping job {orchestrator.Cluster(address).cancel(study_id)}", highlight=False)
        return
    rec = orchestrator.request_cancel(_store(store), study_id)
    if rec["state"] != "running":
        out.print(f"study {rec['study_id']} is {rec['state']}, not running; nothing to cancel", highlight=False)
        return
    out.print(f"study {rec['study_id']}: cancel requested; its driver stops within a few seconds", highlight=False)


@study_app.command("sync")
@handles_errors
def study_sync(study_id: str, store: Optional[str] = StoreOpt,
               tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                                                          help="Tracking URI (default: the study's, as recorded)."),
               json_out: bool = typer.Option(False, "--json", metavar="")):
    """Log to MLflow every finished stage that has no run yet (after a tracking outage)."""

    result = orchestrator.sync_study(_store(store), study_id, tracking_uri)
    if json_out:
        print(render.json_line(result))
        return
    out.print(f"study {result['study_id']}: {result['logged']} run(s) logged, {result['already_logged']} already "
              f"there, {result['not_logged']} not logged (parent run {result['parent_run_id']})", highlight=False)
    if result["not_logged"]:
        raise typer.Exit(1)


@study_app.command("results")
@handles_errors
def study_results_cmd(study_id: str,
                      format: str = typer.Option("table", "--format", help="table | json | csv"),
                      store: Optional[str] = StoreOpt):
    """One row per (dataset, aligned_ratio, severity, method, ipc, guidance, eval_arch)."""

    _one_of("--format", format, ("table", "json", "csv"))
    st = _store(store)
    rec = orchestrator.load_record(st, study_id)
    rows = orchestrator.study_results(st, rec)
    if format == "json":
        print(render.json_line(rows))
    elif format == "csv":
        sys.stdout.write(render.results_csv(rows))
    else:
        out.print(render.results_table(rows, f"results of {rec['study_id']} ({rec['state']})", out.width,
                                       rec["study_id"]))


@study_app.command("findings")
@handles_errors
def study_findings_cmd(study_id: str, json_out: bool = typer.Option(False, "--json", metavar=""),
                       store: Optional[str] = StoreOpt):
    """The spec's claims tested on the results: effect, 95% interval, verdict (holds | contradicted | inconclusive)."""

    st = _store(store)
    rec = orchestrator.load_record(st, study_id)
    findings = orchestrator.study_findings(st, rec)
    if json_out:
        print(render.json_line({"findings": findings}))
    elif not findings:
        out.print(f"study {rec['study_id']} declares no findings (a spec's findings: block)", highlight=False)
    else:
        out.print(render.findings_table(findings, f"findings of {rec['study_id']} ({rec['state']})"))


@study_app.command("report")
@handles_errors
def study_report(study_id: str, out_dir: Path = typer.Option(Path("report"), "--out", help="Directory to write."),
                 store: Optional[str] = StoreOpt,
                 no_log: bool = typer.Option(False, "--no-log", metavar="", help="Do not log the report to MLflow.")):
    """Markdown and HTML tables as the papers lay them out, with plots; logged to the study's MLflow run."""

    st = _store(store)
    rec = orchestrator.load_record(st, study_id)
    written = orchestrator.build_report(st, rec, out_dir)
    out.print(f"report of {rec['study_id']}: {len(written['rows'])} rows, {len(written['tables'])} tables, "
              f"{len(written['files']) - 2} plots in {out_dir}/ (report.html, report.md)", highlight=False)
    if not no_log:
        problem = orchestrator.log_report(rec, out_dir, written["files"])
        if problem:
            err.print(f"[yellow]tracking:[/yellow] report not logged to MLflow ({escape(problem)})", highlight=False)


@study_app.command("compare")
@handles_errors
def study_compare(study_a: str, study_b: str, store: Optional[str] = StoreOpt,
                  format: str = typer.Option("table", "--format", help="table | json")):
    """Two studies' rows side by side on their coordinates, with b - a."""

    _one_of("--format", format, ("table", "json"))
    st = _store(store)
    recs = [orchestrator.load_record(st, s) for s in (study_a, study_b)]
    rows = orchestrator.compare_rows(*(orchestrator.study_results(st, r) for r in recs))
    if format == "json":
        print(render.json_line(rows))
    else:
        out.print(render.compare_table(rows, recs[0]["study_id"], recs[1]["study_id"]))


@app.command("evaluate")
@handles_errors
def evaluate_external(
    synthetic: Path = typer.Option(..., "--synthetic", help="torch file: {images, labels[, lr]} from any codebase."),
    spec: Path = typer.Option(..., "--spec", help="The study spec whose datasets and evaluation protocol to use."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="One of the spec's datasets (default: the first)."),
    protocol: Optional[str] = typer.Option(None, "--protocol", help="Evaluate as this method's sets are (default: "
                                                                     "the spec's first method)."),
    space: str = typer.Option("pixels", "--space", help="pixels ([0, 1]) | normalized (the dataset's normalisation)"),
    aligned_ratio: Optional[float] = typer.Option(None, "--aligned-ratio", help="Only this variant (default: all)."),
    severity: Optional[int] = typer.Option(None, "--severity", help="Only this severity (default: all)."),
    profile: Optional[str] = ProfileOpt,
    json_out: bool = typer.Option(False, "--json", metavar="", help="End with one JSON line: study id, state, stage counts."),
    store: Optional[str] = StoreOpt,
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI"),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus"),
):
    """Evaluate a synthetic set made elsewhere with a study's exact protocol, beside the same random baseline."""

    _one_of("--space", space, ("pixels", "normalized"))
    s, text = orchestrator.read_spec(spec, profile)
    study, graph = orchestrator.external_study(s, synthetic, dataset, protocol, space, aligned_ratio, severity)
    view = render.ProgressView(err)
    try:
        outcome = orchestrator.submit_study(study, text, store_root=store, tracking_uri=tracking_uri, num_cpus=num_cpus,
                               on_event=view, graph=graph)
    finally:
        view.stop()
    _report(outcome.study_id, outcome.state, outcome.results, outcome.errors, outcome.summary(), outcome.attempts,
            outcome.tracking, json_out, outcome.findings)


# --- dataset -----------------------------------------------------------------------------------------

@dataset_app.command("build")
@handles_errors
def dataset_build(
    spec: Optional[Path] = typer.Option(None, "--spec", help="Build every dataset variant of a study spec."),
    source: Optional[str] = typer.Option(None, "--source"),
    bias: str = typer.Option("colored", "--bias", help="colored | corrupted | none"),
    aligned_ratio: float = typer.Option(0.95, "--aligned-ratio"),
    severity: int = typer.Option(1, "--severity"),
    max_per_class: Optional[int] = typer.Option(None, "--max-per-class"),
    data_root: Optional[str] = typer.Option(None, "--data-root"),
    json_out: bool = typer.Option(False, "--json", metavar=""),
    store: Optional[str] = StoreOpt,
):
    """Build (or reuse) biased dataset variants in the store."""

    if spec is None and source is None:
        raise UserError("give --source (with --bias, --aligned-ratio, --severity) or --spec")
    if spec is not None:
        s = orchestrator.load_spec(spec)
        specs, st = list(s.datasets), _store(store or s.store.root)
    else:
        specs = [orchestrator.dataset_spec_from_flags(source, bias, aligned_ratio, severity, max_per_class, data_root)]
        st = _store(store)
    results = [r for ds in specs for r in orchestrator.build_variants(ds, st)]
    for r in results:
        if not json_out:
            out.print(render.counts_table(r["counts"], f"{r['label']} ({r['key']}){' [cached]' if r['cached'] else ''}"))
    if json_out:
        summaries = [{"key": r["key"], "label": r["label"], "cached": r["cached"],
                      **{k: r["counts"][k] for k in ("train_aligned", "train_conflicting", "test_aligned",
                                                      "test_conflicting", "unbiased_aligned", "unbiased_conflicting")}}
                     for r in results]
        if len(summaries) == 1:
            print(render.json_line(summaries[0]))
        else:
            print(render.json_line({"cached": all(x["cached"] for x in summaries), "datasets": summaries}))


@dataset_app.command("show")
@handles_errors
def dataset_show(name: str = typer.Argument(..., help="Dataset key (or prefix) or label, e.g. 'digits[p=0.95,s=1]'."),
                 out_png: Optional[Path] = typer.Option(None, "--png", help="Copy the sample grid here."),
                 store: Optional[str] = StoreOpt):
    """Per-class aligned/conflicting counts and the sample grid (aligned then conflicting per class)."""

    r = orchestrator.find_dataset(_store(store), name)
    out.print(render.counts_table(r["counts"], f"{r['label']} ({r['key']})"))
    if out_png is not None:  # a file only when asked for
        shutil.copyfile(r["grid_path"], out_png)
        out.print(f"grid: {out_png} (one row per class: aligned samples, then conflicting samples)")
    else:
        out.print(f"sample grid: {r['grid_path']} (--png FILE copies it)")


# --- what a spec can name --------------------------------------------------------------------------

@app.command("list")
@handles_errors
def list_registry(kind: str = typer.Argument(..., help="methods | architectures | sources"),
                  json_out: bool = typer.Option(False, "--json", metavar="", help="One JSON line instead of a table.")):
    """The registered methods (defaults, options), architectures (overrides) or data sources."""

    if kind not in orchestrator.CATALOGUE_KINDS:
        raise UserError(f"list: unknown kind '{kind}'{orchestrator.suggest(kind, orchestrator.CATALOGUE_KINDS)}")
    entries = orchestrator.catalogue(kind)
    if json_out:
        print(render.json_line(entries))
    else:
        out.print(render.catalogue_table(kind, entries))


def _version(value: bool) -> None:
    if value:

        print(f"ddray {orchestrator.version()}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", metavar="", callback=_version, is_eager=True,
                                      help="Print the version and exit.")):
    """ddray: dataset-distillation studies on Ray, tracked in MLflow."""


# --- ui ------------------------------------------------------------------------------------------------

@app.command("ui")
@handles_errors
def ui(study_id: Optional[str] = typer.Argument(None, help="Open this study's tracking URI."),
       tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI"),
       port: int = typer.Option(5000, "--port"),
       store: Optional[str] = StoreOpt):
    """The MLflow UI on the study's tracking URI, bound to 127.0.0.1."""

    uri = tracking_uri
    if study_id:
        uri = orchestrator.load_record(_store(store), study_id)["tracking_uri"]
    uri = uri or "sqlite:///mlflow.db"
    orchestrator.check_ui(uri, port)
    err.print(f"MLflow UI for {orchestrator.redact_uri(uri)} on http://127.0.0.1:{port}")  # the URI: by env only
    raise typer.Exit(orchestrator.serve_ui(uri, port))


if __name__ == "__main__":
    app()
