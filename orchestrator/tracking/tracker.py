"""MLflow tracking, done from the driver only, best-effort during a run and exact afterwards.

One parent run per study (tags: study id and name, spec hash, ddray version,
role "study"; the spec as an artifact, credentials removed) and one FINISHED
child run per stage, linked by `mlflow.parentRunId` (params = the stage
config, metrics, artifacts from the stage's store directory). Workers never
write to the tracking store: parallel writers race on SQLite, and a
cluster's workers may not reach it.

Exactly one FINISHED run per stage, whatever is killed, resubmitted or retried:
- the parent is found exactly: its run id is kept in the store
  (`studies/<id>/parent.json`), with a tag search for role "study" (which
  children never carry) as the fallback, under a study-level lease so two
  submits cannot both create one;
- a child is logged only by the driver that computed the stage, or, for a
  stage already in the store without a FINISHED run, by whichever driver takes
  the stage's lease and finds none after taking it (one paged search of the
  parent's FINISHED children once the leases are taken, not one per stage);
- every run carries its identity from the moment it is created (parent and
  `ddray.stage_key`, `ddray.trial_of` + `ddray.trial_id` for a trial, with
  `ddray.driver`): a retried call (its reply may have been lost after the
  server acted) first looks its run up, by the id this driver recorded or by
  those tags, and finishes that run instead of creating a second one; a first
  try costs no lookup;
- runs left RUNNING by a driver that is gone are closed as KILLED and replaced.

Logging runs in a background thread (`TrackingQueue`) so it never holds up
scheduling; a tracking failure never stops or fails a study (the store is the
truth): what could not be logged is counted, and `ddray study sync` or the
next submit logs it. A failing MLflow call pauses logging until the server
answers a probe; a stage whose stored files cannot be read is only counted
(the server is not to blame, the others go on). The preflight check uses a
short timeout and no retries; the run uses MLflow's normal retries.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import queue
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

from orchestrator.errors import UserError, first_line
from orchestrator.spec.claims import safe_name
from orchestrator.spec.paths import sqlite_file
from orchestrator.stages.base import Stage
from orchestrator.tracking.secrets import redact_text as _redact_text
from orchestrator.tracking.secrets import redact_data, strip_password

PARENT_TAG = "mlflow.parentRunId"


MAX_PARAM = 500  # MLflow caps param values (6000 chars); long lists are summarised in artifacts


SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """MLflow params from a nested config: dotted names, JSON values, credentials redacted (a data root or
    a teacher's URI in a stage config may carry one), long values cut."""
    out: dict[str, str] = {}
    for k, v in redact_data(d).items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v and all(isinstance(x, (str, int, float, bool, type(None), list, dict)) for x in v.values()):
            out.update(flatten(v, f"{name}."))
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out[name] = text if len(text) <= MAX_PARAM else text[: MAX_PARAM - 3] + "..."
    return out


def redact(uri: str) -> str:
    """The URI without its password (and with secret query parameters masked), still usable: stored in the
    study record and passed to a cluster's driver, which take the password from their environment
    (MLFLOW_TRACKING_PASSWORD, PGPASSWORD). One redaction for all of ddray: `orchestrator.tracking.secrets`."""
    return strip_password(uri)


def redact_text(text: str, uri: str | None = None) -> str:
    """`text` with every URI and secret-named value redacted (`secrets.redact_text`); the password of `uri`,
    if one is given, is also masked wherever it appears out of a URI (an error quoting it alone)."""
    out = _redact_text(text)
    password = urlsplit(uri).password if uri and "://" in uri else None
    return out.replace(password, "***") if password else out


def check_uri(uri: str) -> None:
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    base = scheme.split("+", 1)[0]
    if base == "file" or not scheme or len(scheme) == 1:  # a path (or a Windows drive letter)
        raise UserError(f"tracking.uri: '{redact(uri)}' is a file store, which MLflow refuses since 3.13; "
                        "use sqlite:///path/mlflow.db or an http(s) tracking server")
    if base not in SCHEMES:
        raise UserError(f"tracking.uri: unsupported scheme '{scheme}' in '{redact(uri)}' "
                        f"(one of {', '.join(SCHEMES)})")


@contextmanager
def short_http_timeouts(seconds: int = 10):
    """Preflight only: fail fast instead of MLflow's minutes of retries."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(seconds)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return first_line(text[0]) if text else type(exc).__name__


@contextmanager
def sqlite_creation_lock(uri: str):
    """Serialise the first use of a SQLite tracking DB: MLflow creates its tables then, and two
    processes creating them at once fail ("table ... already exists", alembic version races)."""
    db = sqlite_file(uri)
    if db is None:
        yield
        return

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".ddray-lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Tracker:
    def __init__(self, uri: str, experiment: str):
        from mlflow.tracking import MlflowClient  # MLflow: slow to import, only where a run is logged

        check_uri(uri)
        self.uri = uri
        self.experiment_name = experiment
        with sqlite_creation_lock(uri):  # the client creates a new SQLite DB's tables when it opens it
            self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id: str | None = None
        # identity -> id of each run this driver created: a retry finds its run here without a search
        self.created: dict[tuple, str] = {}

    @property
    def safe_uri(self) -> str:
        return redact(self.uri)

    def check(self) -> None:
        with short_http_timeouts(), sqlite_creation_lock(self.uri):
            try:
                self.client.search_experiments(max_results=1)
            except Exception as exc:  # mlflow raises several types for unreachable stores
                message = redact_text(reason(exc), self.uri)
                raise UserError(f"tracking.uri: cannot reach the tracking server '{self.safe_uri}' ({message})") from None

    def artifact_location(self) -> str | None:
        """Beside a SQLite DB, `mlartifacts/` (MLflow's default is the working directory's `mlruns/`,
        which would scatter one study's artifacts over every directory it was run from);
        a server's own default otherwise."""
        db = sqlite_file(self.uri)
        return None if db is None else str(db.absolute().parent / "mlartifacts" / re.sub(r"[^A-Za-z0-9._-]+", "-", self.experiment_name))

    def ensure_experiment(self) -> str:
        """Create the experiment once, here on the driver (parallel creation races on SQLite)."""
        with sqlite_creation_lock(self.uri):
            return self._ensure_experiment()

    def _ensure_experiment(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment_name)
        if exp is None:
            try:
                self.experiment_id = self.client.create_experiment(self.experiment_name,
                                                                   artifact_location=self.artifact_location())
            except Exception:
                exp = self.client.get_experiment_by_name(self.experiment_name)
                if exp is None:
                    raise
                self.experiment_id = exp.experiment_id
        else:
            self.experiment_id = exp.experiment_id
        return self.experiment_id

    def find_parent(self, study_id: str, known: str | None) -> str | None:
        """The study's parent run: the one the store names, else the one tagged role=study (never a child)."""
        if known:
            try:
                run = self.client.get_run(known)
                if run.info.experiment_id == self.experiment_id and run.info.lifecycle_stage == "active":
                    return known
            except Exception:  # deleted, or another tracking store
                pass
        found = self.client.search_runs(
            [self.experiment_id], max_results=2, order_by=["attributes.start_time ASC"],
            filter_string=f"tags.`ddray.study_id` = '{study_id}' and tags.`ddray.role` = 'study'")
        return found[0].info.run_id if found else None

    def start_parent(self, study_id: str, known: str | None, name: str, spec_hash: str, spec_text: str,
                     version: str) -> str:
        run_id = self.find_parent(study_id, known)
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, "ddray.resumed", "true")
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=study_id, tags={
            "ddray.study_id": study_id, "ddray.study_name": name, "ddray.spec_hash": spec_hash,
            "ddray.version": version, "ddray.role": "study"})
        self.client.log_text(run.info.run_id, redact_text(spec_text, self.uri), "spec.yaml")
        return run.info.run_id

    def children(self, parent_run_id: str, finished_only: bool = False) -> list:
        """Every child run of the parent (all pages, 1,000 runs a query), or only its FINISHED ones."""
        where = f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
        if finished_only:
            where += " and attributes.status = 'FINISHED'"
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=where, max_results=1000,
                                           page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return runs

    def finished_keys(self, parent_run_id: str) -> set[str]:
        """The stage keys that have a FINISHED child run now (one query per 1,000 runs, not one per stage)."""
        runs = self.children(parent_run_id, finished_only=True)
        return {r.data.tags["ddray.stage_key"] for r in runs
                if "ddray.stage_key" in r.data.tags and "ddray.error" not in r.data.tags}

    # --- one run per identity: a retry finds the run its lost reply created ------------------

    def _runs_tagged(self, identity: tuple, tags: dict[str, str]) -> list:
        """A retry's look-up: the run this driver recorded for `identity`, else the runs carrying `tags`."""
        known = self.created.get(identity)
        if known:
            return [self.client.get_run(known)]
        where = " and ".join(f"tags.`{k}` = '{quoted(v)}'" for k, v in tags.items())
        return list(self.client.search_runs([self.experiment_id], filter_string=where, max_results=100,
                                            order_by=["attributes.start_time ASC"]))

    def _existing_stage(self, parent_run_id: str, key: str, driver: str):
        """The stage's run if one exists: a FINISHED one (another try of ours got through), else one this
        driver created and did not finish (reused); a failure run (`ddray.error`) is never either."""
        runs = [r for r in self._runs_tagged(("stage", parent_run_id, key),
                                             {PARENT_TAG: parent_run_id, "ddray.stage_key": key})
                if "ddray.error" not in r.data.tags]
        done = [r for r in runs if r.info.status == "FINISHED"]
        ours = [r for r in runs if r.data.tags.get("ddray.driver") == driver]
        return (done or ours or [None])[0]

    def log_stage(self, parent_run_id: str, study_id: str, result: dict, store, cached: bool, driver: str,
                  retry: bool = False) -> str:
        """One child run: created with its identity, one batch of params/metrics/tags, the stage's artifacts,
        terminated. The store is read first: a damaged file raises `StoreReadError` before any MLflow call.
        `retry`: an earlier try may have reached the server; its run is found and finished, not doubled."""
        from mlflow.entities import Metric, Param, RunTag  # MLflow: slow to import, only where a run is logged

        points, inputs = read_stage(store, result)
        key = result["key"]
        identity = {PARENT_TAG: parent_run_id, "ddray.study_id": study_id, "ddray.stage_key": key,
                    "ddray.stage_kind": result["kind"], "ddray.driver": driver}
        tags = {**identity, "ddray.cached": str(cached).lower(), **stage_tags(result)}
        run = self._existing_stage(parent_run_id, key, driver) if retry else None
        if run is not None and run.info.status == "FINISHED":
            return run.info.run_id  # logged by a try whose reply was lost
        reused = run is not None
        if run is None:
            run = self.client.create_run(self.experiment_id, run_name=result["label"][:250], tags=identity)
        rid = run.info.run_id
        self.created[("stage", parent_run_id, key)] = rid
        when = run.info.start_time  # the curves' timestamp: the same on a retry, so MLflow drops the repeats
        run_info = result.get("run", {})
        resources = {f"resources.{k}": run_info[k] for k in ("cpus", "gpus") if k in run_info}
        best = {"best": result["search"]["best"]["config"]} if "search" in result else {}
        params = [Param(k[:250], v) for k, v in flatten({**result.get("config", {}), **resources, **best}).items()]
        metrics = [Metric(k, float(v), 0, 0) for k, v in result.get("metrics", {}).items()]
        metrics += [Metric(name, value, when, step) for name, value, step in points]
        self.log_batches(rid, metrics, params, [RunTag(k, v) for k, v in tags.items()])
        if inputs:
            self.client.log_inputs(rid, datasets=inputs)
        for name in result.get("artifacts", []):
            path = store.path(result["kind"], key, name)  # local (a cached copy for object stores)
            if path.exists():
                self.client.log_artifact(rid, str(path))
        trials = self._trial_runs(rid) if reused else {}
        for trial in result.get("trials", []):  # a search's trials, nested under its run
            self.log_trial(rid, study_id, key, trial, trials.get(str(trial["trial_id"])))
        self.client.set_terminated(rid, "FINISHED")
        return rid

    def log_batches(self, run_id: str, metrics: list, params: list, tags: list) -> None:
        """Everything in as few `log_batch` calls as MLflow's limits allow: per call at most 1000 metrics,
        100 params and 100 tags, 1000 entities in all."""
        while metrics or params or tags:
            p, t = params[:100], tags[:100]
            m = metrics[:1000 - len(p) - len(t)]
            self.client.log_batch(run_id, metrics=m, params=p, tags=t)
            metrics, params, tags = metrics[len(m):], params[len(p):], tags[len(t):]

    def log_findings(self, run_id: str, findings: list[dict]) -> None:
        """Each claim on the study's parent run: `finding/<id>/effect|ci_lo|ci_hi|n` metrics (accuracy points)
        and a `finding.<id>` tag holding its verdict."""
        from mlflow.entities import Metric, RunTag  # MLflow: slow to import, only where a run is logged


        now = int(time.time() * 1000)
        metrics, tags = [], []
        for f in findings:
            name = safe_name(f["id"])
            tags.append(RunTag(f"finding.{name}", f["verdict"]))
            if f["effect"] is not None:
                values = {"effect": f["effect"], "ci_lo": f["ci95"][0], "ci_hi": f["ci95"][1], "n": f["n"]}
                metrics += [Metric(f"finding/{name}/{k}", float(v), now, 0) for k, v in values.items()]
        self.log_batches(run_id, metrics, [], tags)

    def _trial_runs(self, stage_run_id: str) -> dict:
        """A reused stage run's trial runs by trial id (one paged search): the ones an earlier try created."""
        return {r.data.tags.get("ddray.trial_id"): r for r in self.children(stage_run_id)
                if "ddray.trial_of" in r.data.tags}

    def log_trial(self, stage_run_id: str, study_id: str, key: str, trial: dict, existing=None) -> None:
        """One nested run per trial: the sampled values as params, the proxy curve as a metric series.
        `existing`: the trial's run from an earlier try of the stage; done if it was terminated, else reused."""
        from mlflow.entities import Metric, Param, RunTag  # MLflow: slow to import, only where a run is logged

        status = "FAILED" if trial["error"] else "FINISHED"
        if existing is not None and existing.info.status == status:
            return
        identity = {PARENT_TAG: stage_run_id, "ddray.study_id": study_id, "ddray.trial_of": key,
                    "ddray.trial_id": str(trial["trial_id"])}
        tags = {**identity, "ddray.stopped_early": str(trial["stopped_early"]).lower()}
        if trial["best"]:
            tags["ddray.best_trial"] = "true"
        if trial["error"]:
            tags["ddray.error"] = trial["error"]
        run = existing or self.client.create_run(self.experiment_id, run_name=f"trial {trial['trial_id']}",
                                                 tags=identity)
        self.created[("trial", stage_run_id, str(trial["trial_id"]))] = run.info.run_id
        when = run.info.start_time  # the same on a retry: MLflow drops repeated points
        metrics = [Metric(name, float(point[name]), when, int(point["iterations"]))
                   for point in trial["curve"] for name in point if name != "iterations"]
        metrics.append(Metric("iterations_run", float(trial["iterations"]), when, 0))
        params = [Param(k[:250], v) for k, v in flatten(trial["config"]).items()]
        self.log_batches(run.info.run_id, metrics, params, [RunTag(k, str(v)[:5000]) for k, v in tags.items()])
        self.client.set_terminated(run.info.run_id, status)

    def log_failure(self, parent_run_id: str, study_id: str, label: str, key: str, kind: str, error: str,
                    driver: str, retry: bool = False) -> None:
        """A FAILED run for a stage that failed under this driver (one per driver: its final failure)."""
        identity = ("failure", parent_run_id, key)
        tags = {PARENT_TAG: parent_run_id, "ddray.study_id": study_id, "ddray.stage_key": key,
                "ddray.stage_kind": kind, "ddray.error": error[:5000], "ddray.driver": driver}
        if retry:
            found = [r for r in self._runs_tagged(identity, {PARENT_TAG: parent_run_id, "ddray.stage_key": key,
                                                             "ddray.driver": driver})
                     if "ddray.error" in r.data.tags]
            if found:
                if found[0].info.status != "FAILED":
                    self.client.set_terminated(found[0].info.run_id, "FAILED")
                return
        run = self.client.create_run(self.experiment_id, run_name=label[:250], tags=tags)
        self.created[identity] = run.info.run_id
        self.client.set_terminated(run.info.run_id, "FAILED")

    def kill(self, run_id: str) -> None:
        self.client.set_terminated(run_id, "KILLED")

    def finish_parent(self, run_id: str, state: str, counts: dict) -> None:
        from mlflow.entities import Metric  # MLflow: slow to import, only where a run is logged

        self.client.log_batch(run_id, metrics=[Metric(f"stages_{k}", float(v), 0, 0) for k, v in counts.items()])
        self.client.set_tag(run_id, "ddray.state", state)
        status = {"succeeded": "FINISHED", "failed": "FAILED"}.get(state, "KILLED")
        self.client.set_terminated(run_id, status)


def quoted(value: str) -> str:
    """A value inside a single-quoted MLflow filter string."""
    return str(value).replace("\\", "\\\\").replace("'", "\\'")


def stage_tags(result: dict) -> dict[str, str]:
    """A stage run's descriptive tags: its coordinates, a long label, where it ran."""
    tags = {k[:250]: v[:5000] for k, v in
            ((f"ddray.{k}", str(v)) for k, v in result.get("coords", {}).items() if v is not None)}
    if len(result["label"]) > 250:  # run names are cut at 250 characters
        tags["ddray.label"] = result["label"][:5000]
    run_info = result.get("run", {})
    for name in ("host", "node", "device", "attempt"):
        if run_info.get(name):
            tags[f"ddray.run.{name}"] = str(run_info[name])
    return tags


class StoreReadError(Exception):
    """A stage's stored data could not be read (a damaged or unreachable file): that stage is not logged,
    and it says nothing about the tracking server, so logging goes on."""

    def __init__(self, key: str, cause: BaseException):
        super().__init__(f"{key}: reading the stored stage failed ({reason(cause)})")
        self.key = key


def read_stage(store, result: dict) -> tuple[list, list]:
    """What a stage's run needs from the store, read before any MLflow call: its curve points
    (name, value, step) and its dataset inputs. Any failure is the item's own (`StoreReadError`)."""
    try:
        return curve_points(store, result), input_datasets(store, result)
    except Exception as exc:
        raise StoreReadError(result["key"], exc) from exc


def curve_points(store, result: dict) -> list[tuple[str, float, int]]:
    """A stage's curves as (metric, value, step): a distillation's (or a search's best trial's) objective
    by iteration, a PTM's training by epoch, an evaluation's validation accuracy (mean over networks) by
    checked epoch. A stage stored without them has none; a listed file that cannot be read raises."""
    kind, key, artifacts = result["kind"], result["key"], result.get("artifacts", [])
    out = []
    if kind in ("distill", "search", "ptm") and "history.json" in artifacts:
        step_of = "epoch" if kind == "ptm" else "iteration"
        for record in store.read_json(kind, key, "history.json"):
            step = int(record.get(step_of, 0))
            out += [(name, float(v), step) for name, v in record.items()
                    if name != step_of and isinstance(v, (int, float)) and math.isfinite(v)]
    elif kind == "evaluate" and "repeats.json" in artifacts:
        by_epoch: dict[int, list[float]] = {}
        for run in store.read_json(kind, key, "repeats.json"):
            for epoch, acc in run.get("val_curve", []):
                by_epoch.setdefault(int(epoch), []).append(float(acc))
        out = [("val_acc", sum(v) / len(v), e) for e, v in sorted(by_epoch.items())]
    return out


def input_datasets(store, result: dict) -> list:
    """The stage's stored inputs (dataset variant, synthetic set) as MLflow dataset inputs: lineage in the UI,
    each named by its stage label and identified by the sha256 of its stored tensors."""
    from mlflow.entities import Dataset, DatasetInput, InputTag  # MLflow: slow to import, only where a run is logged


    out = []
    for role, file in (("dataset", "dataset.pt"), ("synthetic", "synthetic.pt")):
        key = result.get("inputs", {}).get(role)
        if not isinstance(key, str):
            continue
        kind = Stage.kind_of(key)
        manifest = store.manifest(kind, key) or {}
        digest = manifest.get("files", {}).get(file, {}).get("sha256", "")
        label = key  # unless the input's result names it
        try:
            label = store.read_json(kind, key, "result.json")["label"]
        except (OSError, ValueError, KeyError):
            pass
        dataset = Dataset(name=label[:500], digest=digest[:36], source_type="ddray-store",
                          source=json.dumps({"store": str(store.root), "stage": key, "file": file}))
        out.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", role)]))
    return out


# MLflow's answers that a request itself is wrong while the server is up: retrying that item cannot help
REFUSED = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE", "BAD_REQUEST"}
MAX_TRIES = 3  # tries of one item, each after the server answered a probe, before it is given up


def item_refused(exc: BaseException) -> bool:
    return isinstance(exc, StoreReadError) or getattr(exc, "error_code", None) in REFUSED


@dataclass(eq=False)
class Item:
    """One thing to log: a stage's run, a failure's run, or a refresh of what is FINISHED."""

    kind: str  # "stage", "failure" or "refresh"
    key: str
    args: tuple
    recheck: bool = False  # a stored stage: skipped if its key is among the FINISHED ones
    tries: int = 0  # failed calls so far: the next call is a retry, which looks its run up first


class TrackingQueue:
    """Logs stages from a background thread; failures are counted, never raised into the study.

    After a failed MLflow call the queue stops calling MLflow (items wait in
    `missing`) and probes the server every `probe_s` seconds; when it answers
    again the waiting items are tried again. An item whose own data is bad (its
    stored files cannot be read) or that MLflow refuses is given up alone, and
    so is one still failing after MAX_TRIES tries. `drain` waits for the queue
    to empty (bounded); every item not logged by then, the one in flight
    included, is counted as not logged.
    """

    def __init__(self, tracker: Tracker, parent: str | None, study_id: str, driver: str,
                 on_logged=None, probe_s: float = 15.0, finished: set[str] | None = None):
        self.tracker, self.parent, self.study_id, self.driver = tracker, parent, study_id, driver
        self.on_logged = on_logged or (lambda key: None)  # called in the thread once a stage's run is complete
        self.probe_s = probe_s
        self.finished = finished if finished is not None else set()  # keys with a FINISHED run (the session's)
        self.items: queue.Queue = queue.Queue()
        self.missing: list[Item] = []
        self.given_up: list[Item] = []
        self.logged = 0
        self.errors: list[str] = []
        self.outages = 0  # how often logging was paused for a failing server
        self.down_since: float | None = None if parent else time.time()
        self._open: dict[int, Item] = {}  # every item put and not yet logged, in order: what drain reports
        self.current: Item | None = None  # the item being logged now
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._abandon = threading.Event()  # drain's deadline passed: take nothing more from the queue
        self.thread = threading.Thread(target=self._loop, name="ddray-tracking", daemon=True)
        self.thread.start()

    def _put(self, item: Item) -> None:
        with self._lock:
            self._open[id(item)] = item
        self.items.put(item)

    def stage(self, result: dict, store, cached: bool, recheck: bool = False) -> None:
        """Log a stage's run; `recheck`: a stage found in the store, skipped if it has a FINISHED run."""
        self._put(Item("stage", result["key"], (result, store, cached), recheck))

    def failure(self, label: str, key: str, kind: str, error: str) -> None:
        self._put(Item("failure", key, (label, kind, error)))

    def refresh(self) -> None:
        """Learn which stages have a FINISHED run now (one paged search), before the stored stages queued
        after this: another driver may have logged one since the session opened."""
        self._put(Item("refresh", "", ()))

    def _call(self, item: Item) -> None:
        retry = item.tries > 0
        if item.kind == "refresh":
            self.finished |= self.tracker.finished_keys(self.parent)
        elif item.kind == "stage":
            result, store, cached = item.args
            if not (item.recheck and item.key in self.finished):
                self.tracker.log_stage(self.parent, self.study_id, result, store, cached, self.driver, retry=retry)
        else:
            label, kind, error = item.args
            self.tracker.log_failure(self.parent, self.study_id, label, item.key, kind, error, self.driver,
                                     retry=retry)

    def _done(self, item: Item) -> None:
        with self._lock:
            self._open.pop(id(item), None)
            if item.kind != "refresh":
                self.logged += 1
        if item.kind == "stage":
            self.on_logged(item.key)  # only now: its lease is held until its run is complete

    def _failed(self, item: Item, exc: Exception) -> None:
        """The item's own fault: give it up alone. Else the server's: pause, keep the item for the probe."""
        item.tries += 1
        text = redact_text(reason(exc), self.tracker.uri)
        if item_refused(exc) or item.tries >= MAX_TRIES:
            self.given_up.append(item)
            if item.kind == "refresh":  # the stages after it are still logged, each checked on a retry
                with self._lock:
                    self._open.pop(id(item), None)
            else:
                self.errors.append(f"{item.key}: {text}")
            return
        self.errors.append(text)
        self.missing.append(item)
        self.down_since = time.time()
        self.outages += 1

    def _probe(self) -> bool:
        if self.parent is None:
            return False
        try:
            self.tracker.client.get_run(self.parent)
        except Exception:
            return False
        self.down_since = None
        for item in self.missing:
            self.items.put(item)
        self.missing = []
        return True

    def _loop(self) -> None:
        last_probe = 0.0
        while not self._abandon.is_set() and (not self._stop.is_set() or not self.items.empty()):
            try:
                item = self.items.get(timeout=0.2)
            except queue.Empty:
                if self.down_since is not None and time.time() - last_probe > self.probe_s:
                    last_probe = time.time()
                    self._probe()
                continue
            try:
                if self.down_since is not None or self._abandon.is_set():
                    self.missing.append(item)
                    continue
                self.current = item
                try:
                    self._call(item)
                except Exception as exc:  # each failure is judged: this item's, or the server's
                    self._failed(item, exc)
                    last_probe = time.time()
                else:
                    self._done(item)
            finally:
                self.current = None
                self.items.task_done()

    def drain(self, timeout: float = 120.0) -> dict:
        """Wait until everything queued is logged (or the server is down); return what happened: every item
        put and not logged by then (waiting, given up, or still in flight) is in `not_logged`; `in_flight`
        names a stage still being logged (its lease is released by `on_logged` only once it is done)."""
        deadline = time.time() + timeout
        while time.time() < deadline and self.down_since is None and self.items.unfinished_tasks:
            time.sleep(0.05)
        self._stop.set()
        self.thread.join(timeout=max(0.0, deadline - time.time()) if self.down_since is None else 1.0)
        self._abandon.set()  # an item in flight may still finish (then its lease is released), nothing after it
        current = self.current
        with self._lock:
            left = [i for i in self._open.values() if i.kind != "refresh"]
            return {"logged": self.logged, "not_logged": len(left), "errors": self.errors[:3],
                    "not_logged_keys": [i.key for i in left],
                    "failed_keys": [i.key for i in self.given_up if i.kind != "refresh"],
                    "in_flight": current.key if current is not None and current.kind == "stage" else None}
