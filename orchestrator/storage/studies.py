"""Studies in the store: what a submit runs, what happened to each stage, and the results table.

Per study, under `studies/<study_id>/`:

    record.json          # written once per submit: spec, tracking, the stage index with the states at start
    events.jsonl         # append-only, one line per stage transition (small O_APPEND writes, no rewrite)
    drivers/<id>.json    # each driver's heartbeat: its process, counts, final state (its own file; judged by
                         # the store's clock: its mtime against a probe's, never the writer's wall clock)
    cancel               # `ddray study cancel` asks the running drivers to stop

So a stage transition costs one short append whatever the size of the study,
concurrent submits of one study never overwrite each other's state, and a
driver that died shows as `abandoned` (its heartbeat expired without a final
state) instead of `running` forever. Stage states are the record's states at
start with every later event applied.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from orchestrator.errors import UserError, suggest
from orchestrator.storage.files import atomic_write_json
from orchestrator.storage.leases import Owner, owner_of
from orchestrator.storage.local import ArtifactStore

STATES = ("pending", "running", "executed", "cached", "reused", "failed", "skipped")


DONE = ("executed", "cached", "reused")


HEARTBEAT_S = 5.0


HEARTBEAT_TIMEOUT_S = 30.0  # a running driver silent for this long is gone


STUDY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,80}$")


class StudyLog:
    """The study's on-disk state as one submit (driver) writes it."""

    def __init__(self, store: ArtifactStore, study_id: str, owner: Owner):
        self.dir = store.study_dir(study_id)
        self.study_id, self.owner = study_id, owner
        self.states: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.attempts: dict[str, int] = {}
        self.started = time.time()
        self._fd: int | None = None

    def start(self, fields: dict, stages: dict[str, dict]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        previous = _read_json(self.dir / "record.json") or {}
        self.states = {k: v["state"] for k, v in stages.items()}
        record = {**fields, "study_id": self.study_id, "created": previous.get("created", self.started),
                  "attempts": previous.get("attempts", 0) + 1, "started": self.started, "stages": stages}
        atomic_write_json(self.dir / "record.json", record)
        (self.dir / "cancel").unlink(missing_ok=True)
        self._fd = os.open(self.dir / "events.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.heartbeat("running")

    def set(self, key: str, state: str, error: str | None = None, **extra) -> None:
        self.states[key] = state
        if error:
            self.errors[key] = error
        event = {"t": time.time(), "driver": self.owner.driver, "key": key, "state": state}
        if error:
            event["error"] = error
        event.update(extra)
        os.write(self._fd, (json.dumps(event, default=str) + "\n").encode())  # one write: an atomic append

    def counts(self) -> dict[str, int]:
        return count_states(self.states.values())

    def heartbeat(self, state: str = "running") -> None:
        atomic_write_json(self.dir / "drivers" / f"{self.owner.driver}.json", {
            "driver": self.owner.driver, "host": self.owner.host, "pid": self.owner.pid, "place": self.owner.place,
            "process_started": self.owner.started, "state": state, "started": self.started,
            "heartbeat": time.time(), "counts": self.counts()}, fsync=False)

    def cancel_requested(self) -> bool:
        return (self.dir / "cancel").exists()

    def finish(self, state: str) -> None:
        self.heartbeat(state)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def count_states(states) -> dict[str, int]:
    states = list(states)
    return {"total": len(states), **{k: states.count(k) for k in STATES}}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def drivers_of(study_dir: Path) -> list[dict]:
    """Each driver's heartbeat record, with `written`: when the store last wrote it, by the store's clock."""
    out = []
    for p in (study_dir / "drivers").glob("*.json"):
        d = _read_json(p)
        if d:
            try:
                d["written"] = p.stat().st_mtime
            except OSError:
                continue
            out.append(d)
    return sorted(out, key=lambda d: d.get("started", 0))


def store_now(study_dir: Path) -> float:
    """The store's clock now: the mtime a file written now gets (set by the file server on NFS, by this
    kernel on a local disk), so a driver's silence is judged by one clock, not by comparing the writer's
    wall clock with the reader's; this machine's clock where the store cannot be written."""
    probe = study_dir / "drivers" / f".clock-{os.getpid()}-{time.monotonic_ns()}"
    try:
        probe.write_bytes(b"")
        return probe.stat().st_mtime
    except OSError:
        return time.time()
    finally:
        probe.unlink(missing_ok=True)


def driver_live(d: dict, now: float) -> bool:
    """A running driver whose heartbeat the store wrote within HEARTBEAT_TIMEOUT_S of `now` (`store_now`)
    and whose process is not provably dead."""
    if d.get("state") != "running":
        return False
    if now - d.get("written", d.get("heartbeat", 0)) > HEARTBEAT_TIMEOUT_S:
        return False
    # the record's own "started" is the submit's wall time; the process's start time is "process_started"
    return owner_of({**d, "started": d.get("process_started", "")}).alive()


def live_drivers(study_dir: Path, drivers: list[dict] | None = None) -> list[dict]:
    drivers = drivers_of(study_dir) if drivers is None else drivers
    if not any(d.get("state") == "running" for d in drivers):
        return []
    now = store_now(study_dir)
    return [d for d in drivers if driver_live(d, now)]


def study_state(study_dir: Path, drivers: list[dict]) -> str:
    """running while any driver is alive; else the last driver's final state, or abandoned if it had none."""
    if live_drivers(study_dir, drivers):
        return "running"
    if not drivers:
        return "abandoned"
    last = drivers[-1]["state"]
    return "abandoned" if last == "running" else last


def events_since(study_dir: Path, since: float):
    """The study's events from time `since` on, in order (a line cut by a crash is skipped)."""
    try:
        with open(study_dir / "events.jsonl") as f:
            for line in f:
                try:
                    e = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if e.get("t", 0) >= since:
                    yield e
    except FileNotFoundError:
        return


def _fold(study_dir: Path, record: dict) -> dict:
    """Stage states: the record's at its submit's start, then every event since."""
    stages = {k: dict(v) for k, v in record["stages"].items()}
    attempts: dict[str, int] = {}
    for e in events_since(study_dir, record.get("started", 0)):
        if e.get("key") not in stages:
            continue
        st = stages[e["key"]]
        st["state"] = e["state"]
        if e.get("error"):
            st["error"] = e["error"]
        if e.get("attempts"):
            attempts[e["key"]] = e["attempts"]
    for key, n in attempts.items():
        stages[key]["attempts"] = n
    return stages


def load_record(store: ArtifactStore, study_id: str) -> dict:
    """A study by id, id prefix or name, with its stage states, state, counts and drivers."""
    path = _resolve(store, study_id)
    record = _read_json(path / "record.json")
    if record is None:
        raise UserError(f"study '{study_id}': its record in '{store.root}' is unreadable")
    drivers = drivers_of(path)
    record["stages"] = _fold(path, record)
    record["state"] = study_state(path, drivers)
    record["counts"] = count_states(s["state"] for s in record["stages"].values())
    record["drivers"] = drivers
    record["dir"] = str(path)
    return record


def _resolve(store: ArtifactStore, study_id: str) -> Path:
    if not STUDY_ID.fullmatch(study_id):
        raise UserError(f"study id '{study_id[:80]}': use the id, an id prefix or the name of a study "
                        "(letters, digits, '.', '_' and '-')")
    root = store.studies_root()
    if (root / study_id / "record.json").exists():
        return root / study_id
    ids = sorted(p.name for p in root.glob("*") if (p / "record.json").exists())
    names = {i: i.rsplit("-", 1)[0] for i in ids}  # an id is <name>-<spec hash>
    matches = [i for i in ids if i.startswith(study_id) or names[i] == study_id]
    if len(matches) == 1:
        return root / matches[0]
    if len(matches) > 1:
        raise UserError(f"study id '{study_id}' is ambiguous: {', '.join(matches)}")
    hint = suggest(study_id, {*ids, *names.values()}) if ids else " (the store holds no studies)"
    raise UserError(f"study '{study_id}' not found in store '{store.root}'{hint}")


def list_studies(store: ArtifactStore) -> list[dict]:
    """One summary per study, from its record header and driver files (no event log is read)."""
    out = []
    for path in sorted(store.studies_root().glob("*/record.json")):
        record = _read_json(path)
        if record is None:
            continue
        drivers = drivers_of(path.parent)
        counts = drivers[-1].get("counts") if drivers else None
        out.append({"study_id": record["study_id"], "name": record.get("name"), "state": study_state(path.parent, drivers),
                    "created": record.get("created", 0),
                    "counts": counts or count_states(s["state"] for s in record["stages"].values())})
    return sorted(out, key=lambda r: r["created"])


def stage_matching(record: dict, name: str) -> tuple[str, dict]:
    """The one stage of a study named by a key, key prefix or a part of its label."""
    stages = record["stages"]
    found = [k for k in stages if k == name or k.startswith(name) or k.split("-", 1)[-1].startswith(name)]
    for match in (lambda label: label == name, lambda label: label.startswith(name), lambda label: name in label):
        if not found:
            found = [k for k, st in stages.items() if match(st["label"])]
    if len(found) == 1:
        return found[0], stages[found[0]]
    if not found:
        labels = [st["label"] for st in stages.values()]
        raise UserError(f"study {record['study_id']} has no stage '{name}'{suggest(name, labels)}")
    shown = ", ".join(stages[k]["label"] for k in found[:4]) + (" ..." if len(found) > 4 else "")
    raise UserError(f"stage '{name}' is ambiguous in study {record['study_id']} ({len(found)} match: {shown})")


def transitions(study_dir: Path, record: dict, tail: int) -> list[dict]:
    """The last `tail` events of the study's current submit."""
    return list(events_since(study_dir, record.get("started", 0)))[-tail:]


def request_cancel(store: ArtifactStore, study_id: str) -> dict:
    """Ask the study's driver to stop (a study that is not running is left as it is)."""
    path = _resolve(store, study_id)
    record = load_record(store, path.name)
    if record["state"] == "running":
        (path / "cancel").write_text(str(time.time()))
    return record
