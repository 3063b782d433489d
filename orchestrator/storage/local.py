"""The artifact store: one directory per stage, written atomically, checksummed.

Layout under the root (a local path, or a shared filesystem such as an RWX
volume mounted at the same path on every Ray node):

    stages/<kind>/<key>/manifest.json   # written last: files, sha256, sizes, meta
    stages/<kind>/<key>/<files...>
    attempts/<key>/<attempt>.json       # one file per execution of a stage (host, pid, start)
    leases/<key>.json                   # who computes a stage now (orchestrator.storage.leases)
    studies/<study_id>/...              # records, event logs, driver heartbeats (orchestrator.storage.studies)
    quarantine/<key>-<time>-<id>/       # damaged copies, kept for inspection, never read

A stage directory is built under a temporary name that names its writer
(`.<key>.tmp-<host>-<pid>-<id>`) and renamed into place in one step, so
readers see either nothing or a complete stage; a temp dir whose writer is
dead is removed by the next submit (`clean_temp`). Whether a stage is present
is a quick check (manifest readable, every file there with its recorded size);
the full sha256 of a file is checked whenever it is read, and a stage that
fails it is verified in full, moved aside and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

from orchestrator.storage.base import SEARCH_PROGRESS, StoreReads
from orchestrator.storage.files import (
    HOST,
    MANIFEST,
    STALE_TEMP_S,
    CorruptArtifact,
    atomic_write_json,
    sha256_file,
    writer_gone,
    writer_here,
    writer_tag,
)
from orchestrator.storage.leases import check_fence


def _bytes_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


class ArtifactStore(StoreReads):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    def stage_dir(self, kind: str, key: str) -> Path:
        return self.root / "stages" / kind / key

    def study_dir(self, study_id: str) -> Path:
        return self.root / "studies" / study_id

    # --- writing -------------------------------------------------------------------------------

    def write_stage(self, kind: str, key: str, files: dict[str, bytes], meta: dict, fence: int | None = None) -> Path:
        """Write all files and the manifest into a temp dir, then rename it into place; with `fence` (the
        fencing token the stage's computation holds), only if the stage's lease still carries it."""
        final = self.stage_dir(kind, key)
        tmp = final.with_name(f".{key}.tmp-{writer_tag()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        try:
            entries = {}
            for name, data in files.items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                with open(tmp / name, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                entries[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            manifest = {"kind": kind, "key": key, "created": time.time(), "files": entries, "meta": meta}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
            if fence is not None:
                check_fence(key, fence, _bytes_or_none(self.root / "leases" / f"{key}.json"))
            self._publish(kind, key, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def _publish(self, kind: str, key: str, tmp: Path) -> None:
        final = self.stage_dir(kind, key)
        if final.exists() and not self.verify(kind, key, full=True):
            shutil.rmtree(tmp)  # an identical stage (same key) was published first: keep it
            return
        if final.exists():
            self.quarantine(kind, key)  # damaged; the caller holds the stage's lease
        try:
            os.replace(tmp, final)
        except OSError:  # published by another writer between the check and the rename
            if self.verify(kind, key, full=True):
                raise
            shutil.rmtree(tmp)

    def quarantine(self, kind: str, key: str) -> Path | None:
        """Move a damaged stage out of the way (kept for inspection, never read)."""
        src = self.stage_dir(kind, key)
        if not src.exists():
            return None
        dst = self.root / "quarantine" / f"{key}-{int(time.time())}-{uuid.uuid4().hex[:4]}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(src, dst)
        except FileNotFoundError:  # moved by another process meanwhile
            return None
        return dst

    def record_attempt(self, key: str) -> Path:
        """One file per execution of a stage, written when it starts: executions are counted, not guessed."""
        path = self.root / "attempts" / key / f"{time.time():.6f}-{HOST}-{os.getpid()}-{uuid.uuid4().hex[:6]}.json"
        atomic_write_json(path, {"host": HOST, "pid": os.getpid(), "started": time.time()}, fsync=False)
        return path

    def attempts(self, key: str) -> int:
        d = self.root / "attempts" / key
        return sum(1 for p in d.iterdir() if p.suffix == ".json") if d.exists() else 0

    def attempt_log(self, key: str, attempt: Path) -> Path:
        """Where an attempt writes its log while it runs (a local file, here beside the attempt)."""
        return attempt.with_suffix(".log")

    def publish_log(self, key: str, attempt: Path) -> None:
        """The attempt's log is already in place in a POSIX store."""

    def stage_logs(self, key: str) -> list[tuple[str, str]]:
        """(attempt, log text) of every attempt of a stage, oldest first."""
        d = self.root / "attempts" / key
        return [(p.stem, p.read_text(errors="replace")) for p in sorted(d.glob("*.log"))] if d.exists() else []

    def clean_temp(self, now: float | None = None) -> list[Path]:
        """Remove temp dirs whose writer is gone: a dead pid on this host, or older than a day elsewhere."""
        now = now or time.time()
        removed = []
        for kind_dir in (self.root / "stages").glob("*"):
            for tmp in kind_dir.glob(".*.tmp-*"):
                mine = writer_here(tmp.name)
                if writer_gone(tmp.name) or \
                        (not mine and now - tmp.stat().st_mtime > STALE_TEMP_S):
                    shutil.rmtree(tmp, ignore_errors=True)
                    removed.append(tmp)
        return removed

    # --- reading -------------------------------------------------------------------------------

    def manifest(self, kind: str, key: str) -> dict | None:
        path = self.stage_dir(kind, key) / MANIFEST
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (json.JSONDecodeError, OSError):
            return {}  # present but unreadable: damaged

    def verify(self, kind: str, key: str, full: bool = False) -> list[str]:
        """Problems with a stored stage; empty when it is complete (sizes, and with `full` every sha256)."""
        manifest = self.manifest(kind, key)
        if not manifest or "files" not in manifest:
            return ["manifest missing or unreadable"]
        problems = []
        d = self.stage_dir(kind, key)
        for name, entry in manifest["files"].items():
            p = d / name
            try:
                size = p.stat().st_size
            except FileNotFoundError:
                problems.append(f"{name}: missing")
                continue
            if size != entry["bytes"]:
                problems.append(f"{name}: truncated ({size} of {entry['bytes']} bytes)")
            elif full and sha256_file(p) != entry["sha256"]:
                problems.append(f"{name}: checksum mismatch")
        return problems

    def is_complete(self, kind: str, key: str, full: bool = False) -> bool:
        return not self.verify(kind, key, full)

    def exists(self, kind: str, key: str) -> bool:
        """Something (complete or damaged) is stored under this key."""
        return self.stage_dir(kind, key).exists()

    def stage_keys(self, kind: str) -> list[str]:
        """Keys of the published stages of a kind."""
        return sorted(p.parent.name for p in (self.root / "stages" / kind).glob(f"*/{MANIFEST}"))

    def studies_root(self) -> Path:
        return self.root / "studies"

    def searches(self) -> tuple[str, None]:
        """Where Tune keeps searches' experiment state (a path; Tune's own local filesystem)."""
        return str(self.root / "searches"), None

    def search_progress_file(self, key: str) -> Path:
        """The search's progress for the live view, beside Tune's state (`searches/<key>/`)."""
        return self.root / "searches" / key / SEARCH_PROGRESS

    def path(self, kind: str, key: str, name: str) -> Path:
        return self.stage_dir(kind, key) / name

    def read_bytes(self, kind: str, key: str, name: str) -> bytes:
        manifest = self.manifest(kind, key)
        if not manifest or name not in manifest.get("files", {}):
            raise CorruptArtifact(kind, key, f"no stored file '{name}'")
        try:
            data = self.path(kind, key, name).read_bytes()
        except FileNotFoundError:
            raise CorruptArtifact(kind, key, f"'{name}' is missing") from None
        if hashlib.sha256(data).hexdigest() != manifest["files"][name]["sha256"]:
            raise CorruptArtifact(kind, key, f"'{name}' fails its checksum")
        return data
