"""One driver's MLflow side of a study: the parent run, the child runs it owes, and what it could not log.

Everything here is best-effort: a tracking server that fails after preflight
turns tracking off for the rest of the run (the study goes on; the store is the
truth) and the runs it owes are logged by `ddray study sync` or the next submit.
"""

from __future__ import annotations

import hashlib
import json
import time

from orchestrator.storage.files import atomic_write_json
from orchestrator.storage.leases import DEFAULT_TTL_S, Leases
from orchestrator.storage.local import ArtifactStore
from orchestrator.storage.studies import live_drivers
from orchestrator.tracking.tracker import Tracker, TrackingQueue, reason, redact_text

# two TTLs: a lock left by a crashed driver elsewhere is taken once it has not moved for one TTL, as the
# reader measures it (it must first watch it for that long)
STUDY_LOCK_WAIT_S = 2 * DEFAULT_TTL_S


class TrackingSession:
    def __init__(self, tracker: Tracker, store: ArtifactStore, study_id: str, leases: Leases, emit):
        self.tracker, self.store, self.study_id, self.leases, self.emit = tracker, store, study_id, leases, emit
        self.parent: str | None = None
        self.finished: set[str] = set()  # stage keys with a FINISHED child run
        self.queue: TrackingQueue | None = None

    def _warn(self, what: str, exc: BaseException) -> None:
        self.emit({"type": "warning", "message": f"tracking: {what} failed ({redact_text(reason(exc), self.tracker.uri)}); "
                                                 "the study goes on, `ddray study sync` logs its runs later"})

    def open(self, name: str, spec_hash: str, spec_text: str, version: str) -> str | None:
        """Find or create the parent (under the study's lease), close runs of dead drivers, start the queue."""
        try:
            self.tracker.ensure_experiment()
            self.parent = self._parent(name, spec_hash, spec_text, version)
            self._close_dead_children()
        except Exception as exc:  # the server went away after preflight
            self._warn("starting the study's runs", exc)
            self.parent = None
        self.queue = TrackingQueue(self.tracker, self.parent, self.study_id, self.leases.owner.driver,
                                   on_logged=self._logged, finished=self.finished)
        return self.parent

    def _parent(self, name: str, spec_hash: str, spec_text: str, version: str) -> str:
        lock = f"study-{self.study_id}"
        deadline = time.time() + STUDY_LOCK_WAIT_S
        while not self.leases.acquire(lock):  # another submit is creating the parent right now
            if time.time() > deadline:
                raise TimeoutError(f"the study lease {lock} stayed held for {STUDY_LOCK_WAIT_S:.0f} s")
            time.sleep(0.2)
        try:
            path = self.store.study_dir(self.study_id) / "parent.json"
            known = json.loads(path.read_text()).get("run_id") if path.exists() else None
            run_id = self.tracker.start_parent(self.study_id, known, name, spec_hash,
                                               redact_text(spec_text, self.tracker.uri), version)
            atomic_write_json(path, {"run_id": run_id, "experiment_id": self.tracker.experiment_id,
                                     "tracking_uri": self.tracker.safe_uri})
            return run_id
        finally:
            self.leases.release(lock)

    def _close_dead_children(self) -> None:
        live = {d["driver"] for d in live_drivers(self.store.study_dir(self.study_id))}
        for run in self.tracker.children(self.parent):
            key, status = run.data.tags.get("ddray.stage_key"), run.info.status
            if status == "FINISHED" and key:
                self.finished.add(key)
            elif status == "RUNNING" and run.data.tags.get("ddray.driver") not in live:
                self.tracker.kill(run.info.run_id)  # its driver is gone: replaced below or when the stage runs

    def _logged(self, key: str) -> None:
        self.finished.add(key)
        self.leases.release(key)  # computed or claimed by this driver: its run is in MLflow now

    # --- what this driver logs --------------------------------------------------------------

    def log_stored(self, kinds: dict[str, str]) -> None:
        """Stages found in the store (key -> kind) without a FINISHED run: log each once, under its lease.

        No query per stage: `open` paged through the parent's children once; once every lease is taken, the
        queue pages through the FINISHED ones once more (a driver that held a lease may have logged its stage
        since), and each stage is logged unless found there. Only a retried call looks its own run up."""
        if self.queue is None:
            return
        stored = []
        for key, kind in kinds.items():
            if key in self.finished:
                continue
            if not self.leases.acquire(key):
                continue  # another live driver computes or logs it
            try:
                stored.append(self.store.read_json(kind, key, "result.json"))
            except Exception:  # damaged: the scheduler rebuilds it and logs it then
                self.leases.release(key)
        if stored:
            self.queue.refresh()
        for result in stored:
            self.queue.stage(result, self.store, cached=True, recheck=True)

    def executed(self, key: str, result: dict) -> None:
        if self.queue is not None and key not in self.finished:
            self.queue.stage(result, self.store, cached=False)
        else:
            self.leases.release(key)

    def failed(self, label: str, key: str, kind: str, error: str) -> None:
        if self.queue is not None:
            self.queue.failure(label, key, kind, redact_text(error, self.tracker.uri))  # a tag on a FAILED run

    def remember_complete(self, keys) -> None:
        """Note in the store that every stage of this graph has its FINISHED run (a later no-op submit skips MLflow)."""
        keys = set(keys)
        if self.parent is not None and keys <= self.finished:
            atomic_write_json(self.store.study_dir(self.study_id) / "tracked.json", {
                "tracking_uri": self.tracker.safe_uri, "experiment": self.tracker.experiment_name,
                "parent_run_id": self.parent, "stages": keys_digest(keys)})

    def close(self, state: str | None, counts: dict) -> dict:
        """Drain the queue (bounded), finish the parent (unless `state` is None); report what was not logged."""
        summary = self.queue.drain() if self.queue is not None else {"logged": 0, "not_logged": 0, "errors": []}
        if state is not None and self.parent is not None and not summary["not_logged"]:
            try:
                self.tracker.finish_parent(self.parent, state, counts)
            except Exception as exc:
                self._warn("finishing the parent run", exc)
                summary["not_logged"] += 1
        return summary


def keys_digest(keys) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


def fully_tracked(store: ArtifactStore, study_id: str, safe_uri: str, experiment: str, keys) -> str | None:
    """The parent run id, if the store notes that MLflow holds a FINISHED run for every one of `keys`."""
    path = store.study_dir(study_id) / "tracked.json"
    try:
        note = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    same = note.get("tracking_uri") == safe_uri and note.get("experiment") == experiment
    return note.get("parent_run_id") if same and note.get("stages") == keys_digest(keys) else None


class NoTracking:
    """Stands in for a TrackingSession when nothing is left to log (every stage cached and tracked)."""

    def __init__(self, parent: str):
        self.parent = parent

    def log_stored(self, kinds) -> None:
        pass

    def executed(self, key, result) -> None:
        pass

    def failed(self, *args) -> None:
        pass

    def remember_complete(self, keys) -> None:
        pass

    def close(self, state, counts) -> dict:
        return {"logged": 0, "not_logged": 0, "errors": []}
