"""Leases: one submit computes a stage at a time, however many submits need it.

A lease is a small file `leases/<name>.json` in the store naming its owner (driver id, host, pid, and
where that pid means something: `files.PLACE`, the process's start time), its fencing token, a renewal
counter and the TTL within which its owner shows it is alive. Its owner's heartbeat shows that for all
its leases at once: it bumps the counter of the driver's own liveness record,
`leases/drivers/<driver>.json`, every few seconds (one write per beat, however many leases it holds),
and renews a few of its leases in turn (which finds one taken over).

Staleness is judged with the reader's own clock only, never by comparing two machines' wall clocks:
a lease is stale when neither its version (owner, token, renewal counter) nor its owner's liveness
record has changed for its TTL as measured by the reader's `time.monotonic()` since the reader first saw
them (`Watch`, a small in-memory map). A reader that has never seen a lease before waits a full TTL of
no change before it takes it over, unless the owner is provably dead: a process of this host, boot and
PID namespace that no longer exists (`files.process_dead`).

Fencing. Every acquire of a name gets a token strictly greater than any earlier holder's of that name:
`leases/<name>.fence` keeps the last token issued (it is never deleted, so a released lease does not
reset it) and a new token is `max(fence, token of the lease replaced) + 1`. `token(name)` is this
driver's token, `still_held(name)` re-reads the lease and checks owner and token.

Atomicity. On a POSIX store (`Leases`) every change of a lease (create, take over, renew, release) runs
under an flock of its `.fence` file (threads of one process are serialised too) and writes whole files
by rename, so a renew can never overwrite a lease another driver has just taken, and readers never see
a partial lease. `objects.ObjectLeases` does the same with conditional writes (If-None-Match /
If-Match on S3). Study-level critical sections (creating the MLflow parent run) use the same mechanism
under a `study-<id>` name. `LeaseBook` is the protocol; the media supply `holder`, `_acquire`, `_renew`,
`_release` and the liveness record's `beat_of`, `_write_beat`, `_drop_beat`.

Lost leases. A lease taken over by another driver, or without a sign of life for longer than its TTL
(the store unreachable: the writes raised for that long), is lost: it leaves `held` for `lost()`, the
scheduler does not log a stage whose lease it lost as its own, and the worker computing it does not
publish it (the store checks the stage's fencing token just before the publishing rename:
`Store.write_stage(..., fence=)`). Re-acquiring a lost lease that nobody took renews it.
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

from orchestrator.storage.files import HOST, PLACE, START, atomic_write_bytes, process_dead

DEFAULT_TTL_S = 60.0


BEAT_READ_S = 1.0  # a driver's liveness record is re-read at most this often by one reader


BREAKER_STALE_S = 10.0  # an unreadable lease or a takeover breaker unchanged this long (reader's clock) is left over


@dataclass(frozen=True)
class Owner:
    """A driver: its id, and the process that runs it (`files.process_dead` says how it is judged dead)."""

    driver: str
    host: str
    pid: int
    place: str = ""  # host + boot id + PID namespace (files.PLACE); "" in leases older ddray versions wrote
    started: str = ""  # the process's start time, clock ticks since boot

    @classmethod
    def here(cls) -> "Owner":
        return cls(uuid.uuid4().hex[:12], HOST, os.getpid(), PLACE, START)

    def alive(self) -> bool:
        """False only when we can tell: a process of this place (host, boot, PID namespace) that no longer
        exists, or whose pid now belongs to a process started at another time."""
        return not process_dead(self.place, self.pid, self.started)


def _int(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def owner_of(info: dict) -> Owner:
    try:
        pid = int(info.get("pid", 0))
    except (TypeError, ValueError):
        pid = 0
    return Owner(str(info.get("driver", "")), str(info.get("host", "")), pid, str(info.get("place", "")),
                 str(info.get("started", "")))


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


class FenceRejected(RuntimeError):
    """A stage was not published: its lease no longer carries the fencing token its computation started
    under (another driver took it over). Picklable across Ray with its attributes."""

    def __init__(self, key: str, token: int, found: object):
        super().__init__(f"{key}: not published, its lease now carries token {found!r}, not {token} "
                         "(taken over by another driver)")
        self.key, self.token, self.found = key, token, found

    def __reduce__(self):
        return (FenceRejected, (self.key, self.token, self.found))


def check_fence(key: str, token: int, lease: bytes | None) -> None:
    """Raise FenceRejected unless `lease` (the stage's lease file as stored) still carries `token`. The
    store calls this just before the publishing step, so a driver that lost its lease cannot publish."""
    try:
        found = json.loads(lease).get("token") if lease is not None else None
    except (ValueError, AttributeError):
        found = "unreadable"
    if found != token:
        raise FenceRejected(key, token, found)


def encode(info: dict) -> bytes:
    return json.dumps(info, sort_keys=True).encode()


class LeaseBook:
    """The lease protocol, whatever holds the leases: take a lease that is free or stale, keep what this
    driver holds alive, release it. A medium supplies `holder(name)` (the lease or None), three atomic
    steps: `_acquire(name)` (take it if absent or stale, judged by `self.stale`, with a new fencing token;
    the new lease or None), `_renew(name, mine)` (bump the counter only if the lease is still `mine`; the
    new lease or None) and `_release(name, mine)` (delete it only if still `mine`), and the driver's
    liveness record: `beat_of(driver)`, `_write_beat(body)`, `_drop_beat()`.

    Renewal costs the same however many leases a driver holds: a pass writes the driver's own liveness
    record (`leases/drivers/<driver>.json`, a counter only its driver writes) once, and a reader judges a
    lease stale only when neither the lease nor its owner's record has changed for the TTL. Each pass
    also renews up to `VERIFY_PER_PASS` held leases in turn by compare-and-swap, which finds a lease taken
    over (every lease is checked every len(held) / VERIFY_PER_PASS passes) and, after a stall of a TTL or
    more (the driver paused, the store unreachable), every lease that others may have judged stale is
    renewed or found lost before the driver goes on."""

    VERIFY_PER_PASS = 8

    def __init__(self, owner: Owner, ttl: float = DEFAULT_TTL_S):
        self.owner, self.ttl = owner, ttl
        self.held: set[str] = set()
        self.watch = Watch()
        self._mine: dict[str, dict] = {}  # name -> the lease as this driver last wrote it
        self._renewed: dict[str, float] = {}  # name -> monotonic time at the start of its last successful write
        self._lost: set[str] = set()
        self._beats = 0  # the driver record's counter
        self._beat_ok: float | None = None  # monotonic time at the start of the last good write of the record
        self._turn: list[str] = []  # held leases still to verify in this round
        self._beat_seen: dict[str, tuple[float, str | None]] = {}  # driver -> (when read, its record's counter)
        self._lock = threading.Lock()  # the heartbeat thread renews while the scheduler acquires

    def _body(self, token: int, renewals: int = 0) -> dict:
        return {**asdict(self.owner), "token": token, "renewals": renewals, "ttl": self.ttl}

    def stale(self, name: str, info: dict | None) -> bool:
        if info is None:
            self.watch.forget(name)
            return True
        unchanged = self.watch.unchanged_for(name, lease_version(info))
        driver = str(info.get("driver", ""))
        if driver and driver != self.owner.driver:  # its owner's liveness record must have stood still as long
            unchanged = min(unchanged, self.watch.unchanged_for(f"driver:{driver}", self._beat_version(driver)))
        return lease_stale(info, self.owner, unchanged, self.ttl)

    def _beat_version(self, driver: str) -> str | None:
        """The counter of `driver`'s liveness record, read at most once a second per driver (a driver with
        a thousand leases waiting on it costs one read, not a thousand)."""
        now = time.monotonic()
        seen = self._beat_seen.get(driver)
        if seen is None or now - seen[0] >= BEAT_READ_S:
            beat = self.beat_of(driver)
            seen = self._beat_seen[driver] = (now, None if beat is None else repr(beat.get("beats")))
            if len(self._beat_seen) > 4096:  # drivers long gone
                self._beat_seen = dict(list(self._beat_seen.items())[-1024:])
        return seen[1]

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
        """One heartbeat pass (the driver's heartbeat thread calls this): the driver's liveness record
        written once, a few held leases renewed in turn, and after a stall every lease at risk renewed;
        the names this pass lost. A lease taken over is lost; one that has gone without any sign of
        life for longer than the TTL (by this driver's monotonic clock) while the store failed is lost
        too. After the pass, the first error is raised (the caller counts failures)."""
        with self._lock:
            if not self.held:
                return []
            started = time.monotonic()
            self._beats += 1
            error = None
            try:
                self._write_beat({**asdict(self.owner), "beats": self._beats, "ttl": self.ttl})
            except Exception as exc:  # a flaky store: the leases stay ours until their TTL has run out
                error = exc
            last = self._beat_ok
            if error is None:
                self._beat_ok = started

            def quiet(name: str) -> bool:  # no sign of life (its own write or the record's) for a TTL
                signs = [t for t in (self._renewed.get(name), last) if t is not None]
                return started - max(signs, default=started) >= self.ttl

            at_risk = [n for n in self.held if quiet(n)]
            if not self._turn:
                self._turn = sorted(self.held)
            check, self._turn = self._turn[:self.VERIFY_PER_PASS], self._turn[self.VERIFY_PER_PASS:]
            lost = []
            for name in dict.fromkeys([*at_risk, *check]):
                if name not in self.held:
                    continue
                try:
                    info = self._renew(name, self._mine.get(name))
                except Exception as exc:
                    error = error or exc
                    if quiet(name):
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

    def release_all(self, keep=()) -> None:
        """Release every lease but those in `keep` (a stage whose run is still being logged: nobody else
        may log it until its TTL has run out); the liveness record goes with the last lease."""
        for name in sorted((self.held | self._lost) - set(keep)):
            self.release(name)
        with self._lock:
            if self._beat_ok is not None and not self.held:
                self._beat_ok = None
                with contextlib.suppress(Exception):  # a record left behind only delays takeovers by a TTL
                    self._drop_beat()

    def holder(self, name: str) -> dict | None:
        raise NotImplementedError

    def _acquire(self, name: str) -> dict | None:
        raise NotImplementedError

    def _renew(self, name: str, mine: dict | None) -> dict | None:
        raise NotImplementedError

    def _release(self, name: str, mine: dict | None) -> None:
        raise NotImplementedError

    def beat_of(self, driver: str) -> dict | None:
        """A driver's liveness record (None when absent or unreadable)."""
        raise NotImplementedError

    def _write_beat(self, body: dict) -> None:
        raise NotImplementedError

    def _drop_beat(self) -> None:
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

    def _beat_path(self, driver: str) -> Path:
        return self.dir / "drivers" / f"{driver}.json"

    def beat_of(self, driver: str) -> dict | None:
        try:
            info = json.loads(self._beat_path(driver).read_bytes())
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def _write_beat(self, body: dict) -> None:
        atomic_write_bytes(self._beat_path(self.owner.driver), encode(body), fsync=False)  # only its driver writes it

    def _drop_beat(self) -> None:
        self._beat_path(self.owner.driver).unlink(missing_ok=True)
