"""Leases: one submit computes a stage at a time, however many submits need it.

A lease is a small file `leases/<name>.json` in the store naming its owner (driver id, host, pid), its
fencing token, a renewal counter and the TTL within which its owner renews it. Its owner's heartbeat
bumps the counter every few seconds.

Staleness is judged with the reader's own clock only, never by comparing two machines' wall clocks:
a lease is stale when its version (owner, token, renewal counter) has not changed for its TTL as
measured by the reader's `time.monotonic()` since the reader first saw that version (`Watch`, a small
in-memory map). A reader that has never seen a lease before waits a full TTL of no change before it
takes it over, unless the owner is provably dead: a process on this host that no longer exists.

Fencing. Every acquire of a name gets a token strictly greater than any earlier holder's of that name:
`leases/<name>.fence` keeps the last token issued (it is never deleted, so a released lease does not
reset it) and a new token is `max(fence, token of the lease replaced) + 1`. `token(name)` is this
driver's token, `still_held(name)` re-reads the lease and checks owner and token.

Atomicity. On a POSIX store (`Leases`) every change of a lease (create, take over, renew, release) runs
under an flock of its `.fence` file (threads of one process are serialised too) and writes whole files
by rename, so a renew can never overwrite a lease another driver has just taken, and readers never see
a partial lease. `objects.ObjectLeases` does the same with conditional writes (If-None-Match /
If-Match on S3). Study-level critical sections (creating the MLflow parent run) use the same mechanism
under a `study-<id>` name. `LeaseBook` is the protocol; the media supply `holder`, `_acquire`, `_renew`
and `_release`.

Lost leases. A lease taken over by another driver, or not renewed for longer than its TTL (the store
unreachable: the renew raised for that long), is lost: it leaves `held` for `lost()`, and the scheduler
does not log a stage whose lease it lost as its own. Re-acquiring a lost lease that nobody took renews it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from orchestrator.storage.files import HOST, atomic_write_bytes, pid_alive

DEFAULT_TTL_S = 60.0


BREAKER_STALE_S = 10.0  # an unreadable lease or a takeover breaker unchanged this long (reader's clock) is left over


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


def _int(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def owner_of(info: dict) -> Owner:
    try:
        pid = int(info.get("pid", 0))
    except (TypeError, ValueError):
        pid = 0
    return Owner(str(info.get("driver", "")), str(info.get("host", "")), pid)


def lease_version(info: dict) -> tuple:
    """What changes whenever the lease does: owner, fencing token, renewal counter."""
    return (str(info.get("driver", "")), repr(info.get("token")), repr(info.get("renewals")))


def lease_ttl(info: dict, default: float = DEFAULT_TTL_S) -> float:
    """The TTL the holder renews within (a duration, not a clock reading), else `default`."""
    ttl = info.get("ttl")
    return float(ttl) if isinstance(ttl, (int, float)) and not isinstance(ttl, bool) and ttl > 0 else default


def unreadable_lease(raw_id: str) -> dict:
    """A lease this code did not write (it writes whole files): held until it stays the same a while."""
    return {"driver": "", "host": "", "pid": 0, "token": 0, "renewals": f"unreadable:{raw_id}",
            "ttl": BREAKER_STALE_S}


def lease_stale(info: dict | None, me: Owner, unchanged_s: float, ttl: float = DEFAULT_TTL_S) -> bool:
    """A lease anyone may take: absent; held by another driver that is a dead process here; or one whose
    version has not changed for its TTL (`unchanged_s`: as measured by the reader's monotonic clock)."""
    if info is None:
        return True
    owner = owner_of(info)
    if owner.driver != me.driver and not owner.alive():
        return True
    return unchanged_s >= lease_ttl(info, ttl)


class Watch:
    """What this process has seen of values others keep, timed by its own monotonic clock: for how long
    a key has shown the same value (0 the first time a value is seen)."""

    def __init__(self):
        self._seen: dict[str, tuple[object, float]] = {}
        self._lock = threading.Lock()

    def unchanged_for(self, key: str, value) -> float:
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(key)
            if seen is None or seen[0] != value:
                self._seen[key] = (value, now)
                return 0.0
            return now - seen[1]

    def forget(self, key: str) -> None:
        with self._lock:
            self._seen.pop(key, None)


def encode(info: dict) -> bytes:
    return json.dumps(info, sort_keys=True).encode()


class LeaseBook:
    """The lease protocol, whatever holds the leases: take a lease that is free or stale, renew what this
    driver holds, release it. A medium supplies `holder(name)` (the lease or None) and three atomic steps:
    `_acquire(name)` (take it if absent or stale, judged by `self.stale`, with a new fencing token; the
    new lease or None), `_renew(name, mine)` (bump the counter only if the lease is still `mine`; the new
    lease or None) and `_release(name, mine)` (delete it only if still `mine`)."""

    def __init__(self, owner: Owner, ttl: float = DEFAULT_TTL_S):
        self.owner, self.ttl = owner, ttl
        self.held: set[str] = set()
        self.watch = Watch()
        self._mine: dict[str, dict] = {}  # name -> the lease as this driver last wrote it
        self._renewed: dict[str, float] = {}  # name -> monotonic time at the start of its last successful write
        self._lost: set[str] = set()
        self._lock = threading.Lock()  # the heartbeat thread renews while the scheduler acquires

    def _body(self, token: int, renewals: int = 0) -> dict:
        return {**asdict(self.owner), "token": token, "renewals": renewals, "ttl": self.ttl}

    def stale(self, name: str, info: dict | None) -> bool:
        if info is None:
            self.watch.forget(name)
            return True
        return lease_stale(info, self.owner, self.watch.unchanged_for(name, lease_version(info)), self.ttl)

    def mine(self, info: dict | None) -> bool:
        return info is not None and info.get("driver") == self.owner.driver

    def _same(self, info: dict | None, mine: dict | None) -> bool:
        """`info` is this driver's lease (and, when known, the very acquisition `mine`: same token)."""
        return self.mine(info) and (mine is None or info.get("token") == mine.get("token"))

    def acquire(self, name: str) -> bool:
        """Take the lease if it is free or stale; True when this driver holds it."""
        with self._lock:
            if name in self.held:
                return True
            started = time.monotonic()
            info = None
            if name in self._lost and name in self._mine:
                info = self._renew(name, self._mine[name])  # lost but nobody took it: ours again by renewing it
            if info is None:
                info = self._acquire(name)
            if info is None:
                return False
            self.held.add(name)
            self._lost.discard(name)
            self._mine[name], self._renewed[name] = info, started
            self.watch.forget(name)
            return True

    def renew(self) -> list[str]:
        """Bump the renewal counter of every held lease (the driver's heartbeat calls this); the names
        this pass lost. A lease taken over is lost; one whose renew failed for longer than the TTL (by
        this driver's monotonic clock, from the start of its last good renew) is lost too. After trying
        every lease, the last error is raised (the caller counts failures)."""
        lost, error = [], None
        with self._lock:
            for name in sorted(self.held):
                started = time.monotonic()
                try:
                    info = self._renew(name, self._mine.get(name))
                except Exception as exc:  # a flaky store: keep the lease until its TTL has run out
                    error = exc
                    if started - self._renewed.get(name, started) >= self.ttl:
                        lost.append(name)
                    continue
                if info is None:
                    lost.append(name)  # taken over after we looked dead: no longer ours
                else:
                    self._mine[name], self._renewed[name] = info, started
            for name in lost:
                self.held.discard(name)
                self._lost.add(name)
        if error is not None:
            raise error
        return lost

    def lost(self) -> list[str]:
        """Names this driver held and lost (taken over, or not renewed within the TTL), not re-acquired."""
        with self._lock:
            return sorted(self._lost)

    def token(self, name: str) -> int | None:
        """This driver's fencing token for `name` (None when it does not hold it)."""
        with self._lock:
            mine = self._mine.get(name)
            return _int(mine.get("token")) if name in self.held and mine is not None else None

    def still_held(self, name: str) -> bool:
        """Re-read the lease: still this driver's, with the token it acquired? One found taken over is lost."""
        with self._lock:
            if name not in self.held:
                return False
            mine = self._mine.get(name)
        if self._same(self.holder(name), mine):
            return True
        with self._lock:
            if name in self.held and self._mine.get(name) is mine:
                self.held.discard(name)
                self._lost.add(name)
        return False

    def release(self, name: str) -> None:
        with self._lock:
            if name in self.held or name in self._lost:
                self.held.discard(name)
                self._lost.discard(name)
                mine = self._mine.pop(name, None)
                self._renewed.pop(name, None)
                self._release(name, mine)

    def release_all(self) -> None:
        for name in sorted(self.held | self._lost):
            self.release(name)

    def holder(self, name: str) -> dict | None:
        raise NotImplementedError

    def _acquire(self, name: str) -> dict | None:
        raise NotImplementedError

    def _renew(self, name: str, mine: dict | None) -> dict | None:
        raise NotImplementedError

    def _release(self, name: str, mine: dict | None) -> None:
        raise NotImplementedError


_STRIPES = [threading.Lock() for _ in range(64)]  # flock excludes open files, not threads sharing one: belt and braces


class Leases(LeaseBook):
    """Leases as files beside a POSIX store: every change under an flock of `<name>.fence`."""

    def __init__(self, root: Path, owner: Owner, ttl: float = DEFAULT_TTL_S):
        super().__init__(owner, ttl)
        self.dir = Path(root) / "leases"

    def _path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def _fence_path(self, name: str) -> Path:
        return self.dir / f"{name}.fence"

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[int]:
        """The lease's lock: an flock of its fence file (which holds the last token issued, never deleted)."""
        path = self._fence_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _STRIPES[hash(str(path)) % len(_STRIPES)]:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield fd
            finally:
                os.close(fd)  # releases the flock

    @staticmethod
    def _fence(fd: int) -> int:
        try:
            return int(os.pread(fd, 64, 0).strip() or 0)
        except ValueError:
            return 0

    @staticmethod
    def _set_fence(fd: int, token: int) -> None:
        os.pwrite(fd, f"{token:020d}\n".encode(), 0)  # fixed width: overwrites the old value whole

    def holder(self, name: str) -> dict | None:
        try:
            raw = self._path(name).read_bytes()
        except FileNotFoundError:
            return None
        try:
            info = json.loads(raw)
        except ValueError:
            info = None
        return info if isinstance(info, dict) else unreadable_lease(hashlib.sha256(raw).hexdigest()[:16])

    def _write(self, name: str, info: dict) -> None:
        atomic_write_bytes(self._path(name), encode(info), fsync=False)  # renewed often; the TTL covers a loss

    def _acquire(self, name: str) -> dict | None:
        with self._locked(name) as fd:
            info = self.holder(name)
            if not self.stale(name, info):  # judged under the lock: two takers cannot both replace it
                return None
            new = self._body(max(self._fence(fd), _int((info or {}).get("token"))) + 1)
            self._write(name, new)
            self._set_fence(fd, new["token"])
            return new

    def _renew(self, name: str, mine: dict | None) -> dict | None:
        with self._locked(name):
            info = self.holder(name)
            if not self._same(info, mine):
                return None
            new = {**info, "renewals": _int(info.get("renewals")) + 1, "ttl": self.ttl}
            self._write(name, new)
            return new

    def _release(self, name: str, mine: dict | None) -> None:
        with self._locked(name):
            if self._same(self.holder(name), mine):
                self._path(name).unlink(missing_ok=True)
