"""Leases: one submit computes a stage at a time, however many submits need it.

A lease is a small file `leases/<name>.json` in the store, created whole by
hard-linking a complete temp file to the name (atomic and exclusive on POSIX
filesystems, NFS v3+ included: never an empty lease another driver could read), naming its
owner (driver id, host, pid) and an expiry that the owner's heartbeat renews.
Another driver that needs the stage waits for it to appear in the store; it
takes a lease over only when the owner is gone: the expiry has passed, or the
owner is a dead process on this host. Taking over happens under a short-lived
breaker file (`<name>.json.break`, itself O_EXCL): the taker re-reads the lease
under it, so two takers cannot both judge one lease stale and each replace it.
Study-level critical sections (creating the MLflow parent run) use the same
mechanism under a `study-<id>` name. `LeaseBook` is that protocol; `Leases`
keeps it in files, `object_store.ObjectLeases` in objects with conditional writes.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from orchestrator.storage.files import HOST, atomic_write_bytes, pid_alive

DEFAULT_TTL_S = 60.0


BREAKER_STALE_S = 10.0


@dataclass(frozen=True)
class Owner:
    driver: str
    host: str
    pid: int

    @classmethod
    def here(cls) -> "Owner":
        return cls(uuid.uuid4().hex[:12], HOST, os.getpid())

    def alive(self) -> bool:
        """False only when we can tell: a process on this host that no longer exists."""
        return self.host != HOST or pid_alive(self.pid)


def lease_stale(info: dict | None, me: Owner) -> bool:
    """A lease anyone may take: absent, expired, or held by another driver that is a dead process here."""
    if info is None or info.get("expires", 0) < time.time():
        return True
    owner = Owner(info.get("driver", ""), info.get("host", ""), int(info.get("pid", 0)))
    return owner.driver != me.driver and not owner.alive()


class LeaseBook:
    """The lease protocol, whatever holds the leases: take a lease that is free or stale, renew what
    this driver holds, release it. A medium supplies five primitives: `holder`, `_create` (create
    whole, fail if the name exists), `_take_over` (replace a lease judged stale, under a breaker, if
    it is still stale), `_renew` (False once the lease is no longer ours) and `_delete_mine`."""

    def __init__(self, owner: Owner, ttl: float = DEFAULT_TTL_S):
        self.owner, self.ttl = owner, ttl
        self.held: set[str] = set()
        self._lock = threading.Lock()  # the heartbeat thread renews while the scheduler acquires

    def _body(self) -> bytes:  # the token makes every version's bytes unique (compare-and-swap media)
        return json.dumps({**asdict(self.owner), "expires": time.time() + self.ttl,
                           "token": uuid.uuid4().hex}).encode()

    def stale(self, info: dict | None) -> bool:
        return lease_stale(info, self.owner)

    def mine(self, info: dict | None) -> bool:
        return info is not None and info.get("driver") == self.owner.driver

    def acquire(self, name: str) -> bool:
        """Take the lease if it is free or stale; True when this driver holds it."""
        with self._lock:
            if name in self.held:
                return True
            if self._create(name) or (self.stale(self.holder(name)) and self._take_over(name)):
                self.held.add(name)
                return True
            return False

    def renew(self) -> None:
        """Push every held lease's expiry forward (the driver's heartbeat calls this)."""
        with self._lock:
            for name in list(self.held):
                if not self._renew(name):
                    self.held.discard(name)  # taken over after we looked dead: no longer ours

    def release(self, name: str) -> None:
        with self._lock:
            if name in self.held:
                self.held.discard(name)
                self._delete_mine(name)

    def release_all(self) -> None:
        for name in list(self.held):
            self.release(name)

    def holder(self, name: str) -> dict | None:
        raise NotImplementedError

    def _create(self, name: str) -> bool:
        raise NotImplementedError

    def _take_over(self, name: str) -> bool:
        raise NotImplementedError

    def _renew(self, name: str) -> bool:
        raise NotImplementedError

    def _delete_mine(self, name: str) -> None:
        raise NotImplementedError


class Leases(LeaseBook):
    """Leases as files beside a POSIX store."""

    def __init__(self, root: Path, owner: Owner, ttl: float = DEFAULT_TTL_S):
        super().__init__(owner, ttl)
        self.dir = Path(root) / "leases"

    def _path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def holder(self, name: str) -> dict | None:
        path = self._path(name)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:  # not written by this code (it creates whole files): held until it is old
            try:
                return {"driver": "", "host": "", "pid": 0, "expires": path.stat().st_mtime + BREAKER_STALE_S}
            except FileNotFoundError:
                return None

    def _create(self, name: str) -> bool:
        """Create the lease with its content in one step: a complete temp file hard-linked to the name
        (fails if the name exists). O_EXCL then write would let another driver read an empty lease,
        judge it stale and take it too."""
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(self._body())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def _take_over(self, name: str) -> bool:
        """Replace a stale lease, under the breaker file; False if someone else is breaking or won it."""
        path = self._path(name)
        breaker = path.with_name(path.name + ".break")
        try:
            fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:  # a breaker left by a taker that died within its few microseconds
                if time.time() - breaker.stat().st_mtime > BREAKER_STALE_S:
                    breaker.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            return False
        os.close(fd)
        try:
            if not self.stale(self.holder(name)):  # re-read under the breaker: still stale?
                return False
            path.unlink(missing_ok=True)
            return self._create(name)
        finally:
            breaker.unlink(missing_ok=True)

    def _renew(self, name: str) -> bool:
        if not self.mine(self.holder(name)):
            return False
        atomic_write_bytes(self._path(name), self._body(), fsync=False)  # renewed often; the TTL covers a loss
        return True

    def _delete_mine(self, name: str) -> None:
        if self.mine(self.holder(name)):
            self._path(name).unlink(missing_ok=True)
