"""`ddray study sync`: log to MLflow what a study's store holds and its tracking missed (the store is the truth)."""

from __future__ import annotations

from pathlib import Path

import yaml

from distill_core import __version__
from orchestrator.errors import UserError
from orchestrator.reporting.results import study_findings
from orchestrator.spec.paths import absolute_sqlite
from orchestrator.storage.leases import Owner
from orchestrator.storage.local import ArtifactStore
from orchestrator.storage.opener import open_leases
from orchestrator.storage.studies import load_record
from orchestrator.tracking.session import TrackingSession
from orchestrator.tracking.tracker import Tracker, redact


def sync_study(store: ArtifactStore, study_id: str, tracking_uri: str | None = None) -> dict:
    """Log every finished stage of a study that has no FINISHED run, the spec's findings, and finish the
    parent run."""
    record = load_record(store, study_id)
    study_id = record["study_id"]
    uri = absolute_sqlite(tracking_uri, Path.cwd()) if tracking_uri else record["tracking_uri"]
    tracker = Tracker(uri, record["experiment"])
    tracker.check()
    owner = Owner.here()
    leases = open_leases(store, owner)
    tracker.ensure_experiment()
    session = TrackingSession(tracker, store, study_id, leases, lambda e: None)
    spec_text = yaml.safe_dump(record["spec"], sort_keys=False)  # as recorded (credentials already removed)
    parent = session.open(record["name"], record["spec_hash"], spec_text, __version__)
    if parent is None:
        raise UserError(f"tracking.uri: cannot log to '{redact(uri)}'")
    done = {k: st["kind"] for k, st in record["stages"].items() if st["state"] in ("executed", "cached", "reused")}
    already = len(session.finished & set(done))
    session.log_stored(done)
    findings = study_findings(store, record)
    if findings:
        tracker.log_findings(parent, findings)
    summary = session.close(None if record["state"] == "running" else record["state"], record["counts"])
    leases.release_all()
    return {"study_id": study_id, "parent_run_id": parent, "already_logged": already,
            "logged": summary["logged"], "not_logged": summary["not_logged"]}
