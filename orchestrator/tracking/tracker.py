"""MLflow tracking, done from the driver only, best-effort during a run and exact afterwards.

One parent run per study (tags: study id and name, spec hash, ddray version,
role "study"; the spec as an artifact, credentials removed) and one FINISHED
child run per stage, linked by `mlflow.parentRunId` (params = the stage
config, metrics, artifacts from the stage's store directory). Workers never
write to the tracking store: parallel writers race on SQLite, and a
cluster's workers may not reach it.

Exactly one FINISHED run per stage, whatever is killed or resubmitted:
- the parent is found exactly: its run id is kept in the store
  (`studies/<id>/parent.json`), with a tag search for role "study" (which
  children never carry) as the fallback, under a study-level lease so two
  submits cannot both create one;
- a child is logged only by the driver that computed the stage, or, for a
  stage already in the store without a FINISHED run, by whichever driver takes
  the stage's lease and finds none after taking it;
- runs left RUNNING by a driver that is gone are closed as KILLED and replaced.

Logging runs in a background thread (`TrackingQueue`) so it never holds up
scheduling; a tracking failure never stops or fails a study (the store is the
truth): what could not be logged is counted, and `ddray study sync` or the
next submit logs it. The preflight check uses a short timeout and no retries;
the run uses MLflow's normal retries.
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
from urllib.parse import urlsplit

from orchestrator.errors import UserError, first_line
from orchestrator.spec.claims import safe_name
from orchestrator.spec.paths import sqlite_file
from orchestrator.stages.base import Stage
from orchestrator.tracking.secrets import redact_text as _redact_text
from orchestrator.tracking.secrets import strip_password

PARENT_TAG = "mlflow.parentRunId"


MAX_PARAM = 500  # MLflow caps param values (6000 chars); long lists are summarised in artifacts


SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
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

    def children(self, parent_run_id: str) -> list:
        """Every child run of the parent (all pages)."""
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                                           max_results=1000, page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return runs

    def finished_child(self, parent_run_id: str, key: str) -> bool:
        found = self.client.search_runs(
            [self.experiment_id], max_results=1,
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`ddray.stage_key` = '{key}' "
                          "and attributes.status = 'FINISHED'")
        return bool(found)

    def log_stage(self, parent_run_id: str, study_id: str, result: dict, store, cached: bool, driver: str) -> str:
        """One child run: created, one batch of params/metrics/tags, the stage's artifacts, terminated."""
        from mlflow.entities import Metric, Param, RunTag  # MLflow: slow to import, only where a run is logged

        coords = {f"ddray.{k}": str(v) for k, v in result.get("coords", {}).items() if v is not None}
        tags = {PARENT_TAG: parent_run_id, "ddray.study_id": study_id, "ddray.stage_key": result["key"],
                "ddray.stage_kind": result["kind"], "ddray.cached": str(cached).lower(), "ddray.driver": driver,
                **{k[:250]: v[:5000] for k, v in coords.items()}}
        if len(result["label"]) > 250:  # run names are cut at 250 characters
            tags["ddray.label"] = result["label"][:5000]
        run_info = result.get("run", {})
        for name in ("host", "node", "device", "attempt"):
            if run_info.get(name):
                tags[f"ddray.run.{name}"] = str(run_info[name])
        # create (the parent tag makes it a child at once), batches, inputs and artifacts if any, terminate
        run = self.client.create_run(self.experiment_id, run_name=result["label"][:250], tags={PARENT_TAG: parent_run_id})
        rid = run.info.run_id
        resources = {f"resources.{k}": run_info[k] for k in ("cpus", "gpus") if k in run_info}
        best = {"best": result["search"]["best"]["config"]} if "search" in result else {}
        params = [Param(k[:250], v) for k, v in flatten({**result.get("config", {}), **resources, **best}).items()]
        metrics = [Metric(k, float(v), 0, 0) for k, v in result.get("metrics", {}).items()]
        self.log_batches(rid, [*metrics, *curves(store, result)], params, [RunTag(k, v) for k, v in tags.items()])
        inputs = input_datasets(store, result)
        if inputs:
            self.client.log_inputs(rid, datasets=inputs)
        for name in result.get("artifacts", []):
            path = store.path(result["kind"], result["key"], name)  # local (a cached copy for object stores)
            if path.exists():
                self.client.log_artifact(rid, str(path))
        for trial in result.get("trials", []):  # a search's trials, nested under its run
            self.log_trial(rid, study_id, result["key"], trial)
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

    def log_trial(self, stage_run_id: str, study_id: str, key: str, trial: dict) -> None:
        """One nested run per trial: the sampled values as params, the proxy curve as a metric series."""
        from mlflow.entities import Metric, Param, RunTag  # MLflow: slow to import, only where a run is logged

        tags = {PARENT_TAG: stage_run_id, "ddray.study_id": study_id, "ddray.trial_of": key,
                "ddray.trial_id": trial["trial_id"], "ddray.stopped_early": str(trial["stopped_early"]).lower()}
        if trial["best"]:
            tags["ddray.best_trial"] = "true"
        if trial["error"]:
            tags["ddray.error"] = trial["error"]
        run = self.client.create_run(self.experiment_id, run_name=f"trial {trial['trial_id']}",
                                     tags={PARENT_TAG: stage_run_id})
        now = int(time.time() * 1000)
        metrics = [Metric(name, float(point[name]), now, int(point["iterations"]))
                   for point in trial["curve"] for name in point if name != "iterations"]
        metrics.append(Metric("iterations_run", float(trial["iterations"]), now, 0))
        params = [Param(k[:250], v) for k, v in flatten(trial["config"]).items()]
        self.log_batches(run.info.run_id, metrics, params, [RunTag(k, str(v)[:5000]) for k, v in tags.items()])
        self.client.set_terminated(run.info.run_id, "FAILED" if trial["error"] else "FINISHED")

    def log_failure(self, parent_run_id: str, study_id: str, label: str, key: str, kind: str, error: str,
                    driver: str) -> None:
        run = self.client.create_run(self.experiment_id, run_name=label[:250], tags={
            PARENT_TAG: parent_run_id, "ddray.study_id": study_id, "ddray.stage_key": key,
            "ddray.stage_kind": kind, "ddray.error": error[:5000], "ddray.driver": driver})
        self.client.set_terminated(run.info.run_id, "FAILED")

    def kill(self, run_id: str) -> None:
        self.client.set_terminated(run_id, "KILLED")

    def finish_parent(self, run_id: str, state: str, counts: dict) -> None:
        from mlflow.entities import Metric  # MLflow: slow to import, only where a run is logged

        self.client.log_batch(run_id, metrics=[Metric(f"stages_{k}", float(v), 0, 0) for k, v in counts.items()])
        self.client.set_tag(run_id, "ddray.state", state)
        status = {"succeeded": "FINISHED", "failed": "FAILED"}.get(state, "KILLED")
        self.client.set_terminated(run_id, status)


def curves(store, result: dict) -> list:
    """A stage's curves as MLflow metric series: a distillation's (or a search's best trial's) objective
    by iteration, a PTM's training by epoch, an evaluation's validation accuracy (mean over networks) by
    checked epoch."""
    from mlflow.entities import Metric  # MLflow: slow to import, only where a run is logged

    kind, key, now = result["kind"], result["key"], int(time.time() * 1000)
    out = []
    try:
        if kind in ("distill", "search", "ptm") and "history.json" in result.get("artifacts", []):
            step_of = "epoch" if kind == "ptm" else "iteration"
            for record in store.read_json(kind, key, "history.json"):
                step = int(record.get(step_of, 0))
                out += [Metric(name, float(v), now, step) for name, v in record.items()
                        if name != step_of and isinstance(v, (int, float)) and math.isfinite(v)]
        elif kind == "evaluate":
            by_epoch: dict[int, list[float]] = {}
            for run in store.read_json(kind, key, "repeats.json"):
                for epoch, acc in run.get("val_curve", []):
                    by_epoch.setdefault(int(epoch), []).append(float(acc))
            out = [Metric("val_acc", sum(v) / len(v), now, e) for e, v in sorted(by_epoch.items())]
    except (OSError, ValueError, KeyError):  # an older stage without curves: nothing to chart
        return []
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


class TrackingQueue:
    """Logs stages from a background thread; failures are counted, never raised into the study.

    After a failed call the queue stops calling MLflow (items wait in `missing`)
    and probes the server every `probe_s` seconds; when it answers again the
    waiting items are logged. `drain` waits for the queue to empty (bounded).
    """

    def __init__(self, tracker: Tracker, parent: str | None, study_id: str, driver: str,
                 on_logged=None, probe_s: float = 15.0):
        self.tracker, self.parent, self.study_id, self.driver = tracker, parent, study_id, driver
        self.on_logged = on_logged or (lambda key: None)  # called in the thread after each logged stage
        self.probe_s = probe_s
        self.items: queue.Queue = queue.Queue()
        self.missing: list[tuple] = []
        self.logged = 0
        self.errors: list[str] = []
        self.down_since: float | None = None if parent else time.time()
        self._busy = threading.Event()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="ddray-tracking", daemon=True)
        self.thread.start()

    def stage(self, result: dict, store, cached: bool, recheck: bool = False) -> None:
        """Log a stage's run; `recheck`: first make sure no FINISHED run exists (a stage found in the store)."""
        self.items.put(("stage", result, store, cached, recheck))

    def failure(self, label: str, key: str, kind: str, error: str) -> None:
        self.items.put(("failure", label, key, kind, error))

    def _call(self, item: tuple) -> None:
        if item[0] == "stage":
            _, result, store, cached, recheck = item
            if not (recheck and self.tracker.finished_child(self.parent, result["key"])):
                self.tracker.log_stage(self.parent, self.study_id, result, store, cached, self.driver)
            self.on_logged(result["key"])
        else:
            _, label, key, kind, error = item
            self.tracker.log_failure(self.parent, self.study_id, label, key, kind, error, self.driver)
        self.logged += 1

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
        while not self._stop.is_set() or not self.items.empty():
            try:
                item = self.items.get(timeout=0.2)
            except queue.Empty:
                if self.down_since is not None and time.time() - last_probe > self.probe_s:
                    last_probe = time.time()
                    self._probe()
                continue
            self._busy.set()
            try:
                if self.down_since is not None:
                    self.missing.append(item)
                    continue
                try:
                    self._call(item)
                except Exception as exc:  # the server went away: keep the item, stop calling for a while
                    self.errors.append(redact_text(reason(exc), self.tracker.uri))
                    self.missing.append(item)
                    self.down_since = last_probe = time.time()
            finally:
                self.items.task_done()
                self._busy.clear()

    def drain(self, timeout: float = 120.0) -> dict:
        """Wait until everything queued is logged (or the server is down); return what happened."""
        deadline = time.time() + timeout
        while time.time() < deadline and self.down_since is None and self.items.unfinished_tasks:
            time.sleep(0.05)
        self._stop.set()
        self.thread.join(timeout=max(0.0, deadline - time.time()) if self.down_since is None else 1.0)
        left = self.missing + list(self.items.queue)
        return {"logged": self.logged, "not_logged": len(left), "errors": self.errors[:3],
                "not_logged_keys": [i[1]["key"] if i[0] == "stage" else i[2] for i in left]}
