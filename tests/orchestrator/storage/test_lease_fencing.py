"""Leases with fencing and without shared clocks (issue 18): each test is named for the defect it shows.

Staleness is judged by the reader's own monotonic clock (the `clock` fixture moves the leases' clock on
by hand); wall clocks are skewed by patching `time.time` around the writer's calls. Each runs on the POSIX
leases and on the object leases over file:// (and over moto's S3 server, marked slow, as test_objects).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from orchestrator.errors import UserError
from orchestrator.execution import scheduler as scheduler_module
from orchestrator.execution.submit import Heartbeat
from orchestrator.storage.files import HOST, PLACE
from orchestrator.storage.leases import DEFAULT_TTL_S, Leases, Owner
from orchestrator.storage.local import ArtifactStore
from orchestrator.storage.objects import ObjectLeases
from tests.orchestrator.execution.test_scheduler import Counting, diamond, publish, run_scheduler
from tests.orchestrator.storage.test_leases import ReaderClock, race
from tests.servers import moto_s3

DEAD_PID = 2**22 + 4321  # above pid_max: never a live process
BUCKET = "ddray-fencing"

MEDIA = ["posix", "file", pytest.param("s3", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def moto_server(tmp_path_factory):
    """moto's standalone S3 server (as in test_objects), with AWS_* pointing at it and a bucket created."""
    with moto_s3(tmp_path_factory.mktemp("moto"), BUCKET) as server:
        yield server


@pytest.fixture
def clock(monkeypatch):
    """The leases' monotonic clock (the reader's), moved on by hand."""
    return ReaderClock(monkeypatch)


@pytest.fixture(params=MEDIA)
def book(request, tmp_path):
    """`book(owner, ttl)`: one driver's leases on a shared store of the medium under test."""
    if request.param == "posix":
        return lambda owner, ttl=DEFAULT_TTL_S: Leases(tmp_path / "store", owner, ttl)
    if request.param == "file":
        url = f"file://{tmp_path}/store"
    else:
        request.getfixturevalue("moto_server")
        url = f"s3://{BUCKET}/{uuid.uuid4().hex[:10]}"
    return lambda owner, ttl=DEFAULT_TTL_S: ObjectLeases(url, owner, ttl)


def owner(name: str, pid: int | None = None, host: str = HOST) -> Owner:
    """A driver on `host`: this place (host, boot, PID namespace) when it is this host, so a pid that does
    not exist here is provably dead; another place otherwise."""
    return Owner(name, host, os.getpid() if pid is None else pid, PLACE if host == HOST else f"{host}.0000000000")


@contextlib.contextmanager
def wall_clock_off_by(seconds: float):
    """This process's wall clock off by `seconds` (the writer's skewed clock) while the block runs."""
    real = time.time
    time.time = lambda: real() + seconds
    try:
        yield
    finally:
        time.time = real


# --- 1. expiry compared two machines' wall clocks ----------------------------------------------------


def test_clock_skew_a_writer_120s_slow_keeps_its_lease_while_it_renews(book, clock):
    """The writer's clock runs 120 s slow: its lease must not look expired to a reader while it renews."""
    a, b = book(owner("a", host="slow-node")), book(owner("b"))
    with wall_clock_off_by(-120):
        assert a.acquire("k")
    for _ in range(6):  # three minutes of the reader's clock, the holder renewing every 30 s
        clock.advance(30)
        with wall_clock_off_by(-120):
            a.renew()
        assert not b.acquire("k"), "a live, renewing lease was taken because the writer's clock is slow"
    assert a.still_held("k") and a.held == {"k"}


def test_clock_skew_a_lease_whose_counter_stops_moving_is_taken_after_the_readers_ttl(book, clock):
    a, b = book(owner("a", host="elsewhere"), ttl=60), book(owner("b"))
    assert a.acquire("k")
    assert not b.acquire("k")  # first seen by b now
    clock.advance(40)
    a.renew()
    assert not b.acquire("k")  # b sees the counter move: timed afresh
    clock.advance(40)  # 80 s since b first saw the lease, but only 40 s since its counter moved
    assert not b.acquire("k")
    clock.advance(19)
    assert not b.acquire("k")  # 59 s unchanged
    late = book(owner("c"))
    assert not late.acquire("k")
    clock.advance(2)
    assert not late.acquire("k")  # saw it 2 s ago: waits a full TTL of no change, however old the lease is
    assert b.acquire("k")  # 61 s unchanged by b's own clock: the holder is gone
    assert b.holder("k")["driver"] == "b" and b.token("k") > a.token("k")


def test_clock_skew_rule_keeps_the_fast_path_for_a_dead_process_on_this_host(book):
    a, b = book(owner("a", DEAD_PID)), book(owner("b"))
    assert a.acquire("k")
    assert b.acquire("k")  # the fast path: no TTL to wait for a holder we know is dead


# --- 2. renew and release checked, then wrote ----------------------------------------------------------


@contextlib.contextmanager
def taken_over_after_the_read(a, b, name: str = "k"):
    """While the block runs, `b` takes the lease over right after `a` has read it (once)."""
    read = "holder" if isinstance(a, Leases) else "_read"
    real_read = getattr(a, read)
    taker = threading.Thread(target=b.acquire, args=(name,))

    def read_then_taken_over(*args):
        got = real_read(*args)
        if taker.ident is None:
            taker.start()
            taker.join(timeout=0.5)  # the takeover lands now (or waits for the lease's lock)
        return got

    setattr(a, read, read_then_taken_over)
    try:
        yield
    finally:
        setattr(a, read, real_read)
        if taker.ident is not None:
            taker.join(timeout=10)


def test_renew_race_a_takeover_between_renews_read_and_write_is_not_overwritten(book):
    """Another driver takes the lease over between the renew's read and its write: the renew must not win."""
    a = book(owner("a", DEAD_PID))  # a holder that looks dead (same host, pid gone): b may take it over
    b = book(owner("b"))
    assert a.acquire("k")
    with taken_over_after_the_read(a, b):
        a.renew()
    assert b.held == {"k"} and b.holder("k")["driver"] == "b", "the renew overwrote the takeover"
    assert b.still_held("k")
    a.renew()
    assert "k" not in a.held and a.lost() == ["k"] and not a.still_held("k")
    a.release("k")  # a release by the former holder does not delete the new holder's lease
    assert b.holder("k")["driver"] == "b"


def test_renew_race_a_takeover_between_releases_read_and_delete_is_not_deleted(book):
    a, b = book(owner("a", DEAD_PID)), book(owner("b"))
    assert a.acquire("k")
    with taken_over_after_the_read(a, b):
        a.release("k")
    assert b.held == {"k"} and (b.holder("k") or {}).get("driver") == "b", "the release deleted the new lease"


# --- 3. fencing tokens ---------------------------------------------------------------------------------


def test_fencing_tokens_strictly_increase_across_holders(book):
    a, b, c = book(owner("a")), book(owner("b", DEAD_PID)), book(owner("c"))
    tokens = []
    assert a.acquire("k")
    tokens.append(a.token("k"))
    assert a.holder("k")["token"] == tokens[-1] and a.still_held("k")
    a.release("k")  # the lease is gone, its token is not forgotten
    assert a.token("k") is None and not a.still_held("k")
    assert b.acquire("k")
    tokens.append(b.token("k"))
    assert c.acquire("k")  # b looks dead: taken over
    tokens.append(c.token("k"))
    assert not b.still_held("k") and c.still_held("k")
    c.release("k")
    assert a.acquire("k")
    tokens.append(a.token("k"))
    assert all(isinstance(t, int) for t in tokens) and tokens == sorted(set(tokens)), tokens
    assert a.holder("k")["token"] == tokens[-1]
    assert book(owner("d")).token("k") is None  # only a holder has a token


def test_fencing_tokens_of_concurrent_takers_go_to_exactly_one_and_grow(tmp_path, clock):
    store = tmp_path / "store"
    first = Leases(store, owner("gone", DEAD_PID))
    assert first.acquire("k")
    takers = [Leases(store, owner(f"d{i}")) for i in range(8)]
    won = race(takers, "k")
    assert len(won) == 1
    winner = next(t for t in takers if t.owner.driver == won[0])
    assert winner.token("k") == first.token("k") + 1 and winner.still_held("k")


# --- 4. the heartbeat thread died on an exception that is no OSError -----------------------------------


class EndpointDown(Exception):
    """Like botocore's EndpointConnectionError: not an OSError."""


class FlakyLeases:
    """Leases whose renew raises for the first `failing` calls, then works; `lost()` after it recovers."""

    def __init__(self, failing: int, ttl: float):
        self.ttl, self.failing, self.calls = ttl, failing, 0
        self.lost_keys: list[str] = []

    def renew(self):
        self.calls += 1
        if self.calls <= self.failing:
            raise EndpointDown("Could not connect to the endpoint URL")
        self.lost_keys = ["k1"]
        return []

    def lost(self):
        return self.lost_keys


class BeatLog:
    def __init__(self):
        self.beats = 0

    def heartbeat(self, state):
        self.beats += 1
        if self.beats == 2:
            raise EndpointDown("the log's disk too")


def test_heartbeat_survives_a_non_oserror_from_renew_and_keeps_beating():
    leases, log, events = FlakyLeases(failing=12, ttl=0.05), BeatLog(), []
    hb = Heartbeat(log, leases, 0.01)
    hb.emit = events.append  # as run_stages passes the study's emit
    with hb:
        deadline = time.time() + 10
        while leases.calls < 20 and time.time() < deadline:
            time.sleep(0.01)
        assert hb.thread.is_alive(), "the heartbeat thread died"
    assert leases.calls >= 20 and log.beats >= 20  # it kept beating through every error
    assert hb.failures == 0  # counted while failing, reset once a renew worked
    warnings = [e["message"] for e in events if e["type"] == "warning"]
    assert sum("not renewed" in m and "EndpointDown" in m for m in warnings) == 1  # once per outage
    assert sum("lost the lease" in m and "k1" in m for m in warnings) == 1  # once per lost lease


def test_heartbeat_a_lease_not_renewed_for_its_ttl_is_lost_and_reclaimed_if_nobody_took_it(book, clock):
    a = book(owner("a"), ttl=60)
    assert a.acquire("k")
    real = a._renew

    def unreachable(*args):
        raise EndpointDown("store down")

    a._renew = unreachable
    with pytest.raises(EndpointDown):
        a.renew()
    assert a.held == {"k"} and a.lost() == []  # a blip: still within the TTL
    clock.advance(61)
    with pytest.raises(EndpointDown):
        a.renew()
    assert a.held == set() and a.lost() == ["k"]  # others may have taken it by now
    a._renew = real
    assert a.acquire("k") and a.lost() == [] and a.still_held("k")  # nobody did: ours again, same token


# --- 5. the scheduler did not re-check completion after acquiring ---------------------------------------


@pytest.fixture
def fast_poll(monkeypatch):
    monkeypatch.setattr(scheduler_module, "POLL_S", 0.1)


def test_scheduler_rechecks_completion_after_acquire(tmp_path, monkeypatch, fast_poll):
    """Another driver publishes the stage between the scheduler's `is_complete` check and its acquire."""
    store = ArtifactStore(tmp_path / "store")
    graph, k = diamond()
    real_acquire = Leases.acquire

    def acquire(self, name):
        if name == k["a"] and not store.exists("distill", name):
            publish(store, graph.stages[name])  # the other driver's publication lands just now
        return real_acquire(self, name)

    monkeypatch.setattr(Leases, "acquire", acquire)
    runner = Counting()
    state, log, _, executed = run_scheduler(store, graph, runner)
    assert state == "succeeded"
    assert k["a"] not in runner.calls, "computed a stage another driver had just published"
    assert log.states[k["a"]] == "reused" and k["a"] not in executed
    assert not list((store.root / "leases").glob("*.json"))  # the lease taken for nothing is released


def test_scheduler_does_not_log_a_stage_whose_lease_was_taken_over_while_it_ran(tmp_path, fast_poll):
    store = ArtifactStore(tmp_path / "store")
    graph, k = diamond()

    class TakenOverWhileRunning(Counting):
        def __call__(self, stage, store_root, cpus, gpus, runtime):
            if stage.key == k["a"]:  # another driver judged this one gone and took its lease
                path = store.root / "leases" / f"{stage.key}.json"
                info = json.loads(path.read_text())
                path.write_text(json.dumps({**info, "driver": "taker", "host": "elsewhere", "token": 99}))
            return super().__call__(stage, store_root, cpus, gpus, runtime)

    state, log, events, executed = run_scheduler(store, graph, TakenOverWhileRunning())
    assert state == "succeeded"
    assert k["a"] not in executed, "logged as its own a stage whose lease another driver holds"
    assert log.states[k["a"]] == "reused"
    assert any(e["type"] == "warning" and "lost its lease" in e["message"] for e in events)
    assert json.loads((store.root / "leases" / f"{k['a']}.json").read_text())["driver"] == "taker"


# --- 6. fsspec backends without conditional writes ------------------------------------------------------


class NoConditionalWrites(MemoryFileSystem):
    """A filesystem fsspec has no conditional writes for (as gs://, az://, ... here)."""

    protocol = ("nocas",)


def test_no_conditional_writes_backend_is_refused_for_leases(monkeypatch):
    fsspec.register_implementation("nocas", NoConditionalWrites, clobber=True)
    monkeypatch.delenv("DDRAY_SINGLE_DRIVER", raising=False)
    with pytest.raises(UserError) as exc:
        ObjectLeases("nocas://bucket/store", Owner.here())
    assert str(exc.value).startswith("store.root: nocas:// has no conditional writes")
    assert "s3://" in str(exc.value) and "\n" not in str(exc.value)
    monkeypatch.setenv("DDRAY_SINGLE_DRIVER", "1")  # one driver said so: allowed
    assert ObjectLeases("nocas://bucket/store", Owner.here()).acquire("k")


def test_no_conditional_writes_memory_is_allowed_and_atomic_within_its_process():
    url = f"memory://ddray-{uuid.uuid4().hex[:10]}"
    takers = [ObjectLeases(url, owner(f"d{i}")) for i in range(8)]
    assert len(race(takers, "free")) == 1


# --- 7. renewal cost grew with the leases held ------------------------------------------------------------


class CountingWrites:
    """Counts the store writes of one book's renew passes (lease renewals and liveness-record writes)."""

    def __init__(self, book):
        self.renews = self.beats = 0
        real_renew, real_beat = book._renew, book._write_beat

        def renew(*args):
            self.renews += 1
            return real_renew(*args)

        def beat(*args):
            self.beats += 1
            return real_beat(*args)

        book._renew, book._write_beat = renew, beat


def test_scale_a_renew_pass_writes_a_bounded_number_of_objects_however_many_leases_are_held(book, clock):
    a = book(owner("a", host="elsewhere"))
    names = [f"k{i}" for i in range(200)]
    assert all(a.acquire(n) for n in names)
    writes = CountingWrites(a)
    for _ in range(5):
        clock.advance(5)
        a.renew()
    assert writes.beats == 5  # one liveness record write per pass
    assert writes.renews == 5 * a.VERIFY_PER_PASS  # and a fixed few leases renewed in turn: not 200 per pass
    assert a.beat_of("a")["beats"] == 5


def test_scale_leases_outside_the_renew_turn_stay_fresh_through_the_drivers_liveness_record(book, clock):
    """Only the record moves for most leases; a reader must still see every one of them as alive, and
    take them over one TTL after the driver stops beating."""
    a, b = book(owner("a", host="elsewhere"), ttl=60), book(owner("b"))
    names = [f"k{i}" for i in range(40)]
    assert all(a.acquire(n) for n in names)
    assert not any(b.acquire(n) for n in names)  # b first sees them now
    for _ in range(12):  # three minutes of a beating every 15 s
        clock.advance(15)
        a.renew()
        assert not any(b.acquire(n) for n in names), "a lease of a live driver was taken over"
    untouched = names[-1]  # with 8 renewed per pass some were renewed only twice in three minutes
    clock.advance(61)  # a stops: nothing of it moves for a TTL by b's clock
    assert b.acquire(untouched) and b.token(untouched) > a.token(untouched)


def test_scale_after_a_stall_every_lease_at_risk_is_checked_before_the_driver_goes_on(book, clock):
    """The driver was paused longer than the TTL (SIGSTOP, a long GC, the store unreachable): others may
    have taken some of its leases. Its next pass finds each of those lost, not only the few in turn."""
    a, b = book(owner("a", host="elsewhere"), ttl=60), book(owner("b"))
    names = [f"k{i}" for i in range(30)]
    assert all(a.acquire(n) for n in names)
    assert not b.acquire("k29")
    clock.advance(61)
    assert b.acquire("k29")  # a looked gone
    lost = a.renew()
    assert lost == ["k29"] and a.lost() == ["k29"] and a.held == set(names[:-1])
    assert b.still_held("k29")


def test_scale_a_stall_with_the_store_down_loses_only_leases_without_a_sign_of_life_for_a_ttl(book, clock):
    a = book(owner("a", host="elsewhere"), ttl=60)
    assert a.acquire("old")
    clock.advance(30)
    a.renew()  # the record written at t=30
    clock.advance(20)
    assert a.acquire("new")  # t=50
    broken = RuntimeError("store unreachable")

    def down(*args):
        raise broken

    a._write_beat, a._renew = down, down
    clock.advance(45)  # t=95: "old" last showed life at 30 (65 s ago), "new" at 50 (45 s ago)
    with pytest.raises(RuntimeError):
        a.renew()
    assert a.lost() == ["old"] and a.held == {"new"}


# --- 10. process identity was host + pid --------------------------------------------------------------


def test_process_identity_a_pid_of_another_pid_namespace_on_the_same_hostname_is_not_judged_dead():
    other_container = Owner("x", HOST, DEAD_PID, f"{HOST}.ffffffffff")  # same hostname, its own PID namespace
    assert other_container.alive()  # cannot tell from here: its leases wait a TTL, never taken at once
    assert not Owner("x", HOST, DEAD_PID, PLACE).alive()  # this place, no such process: dead


def test_process_identity_a_reused_pid_is_judged_dead_by_its_start_time():
    from orchestrator.storage.files import START

    assert Owner.here().alive()
    assert START  # /proc is here
    assert not Owner("x", HOST, os.getpid(), PLACE, str(int(START) + 1)).alive()  # this pid, another process
    assert Owner("x", HOST, os.getpid(), PLACE, START).alive()


def test_process_identity_temp_names_carry_the_place_and_start_time(tmp_path):
    from orchestrator.storage.files import START, writer_gone, writer_of, writer_tag

    name = f".k.tmp-{writer_tag()}-abcd1234"
    assert writer_of(name) == (PLACE, os.getpid(), START) and not writer_gone(name)
    assert writer_gone(f".k.tmp-{PLACE}-{DEAD_PID}-0-abcd1234")
    assert not writer_gone(f".k.tmp-{HOST}.ffffffffff-{DEAD_PID}-0-abcd1234")  # another PID namespace
    assert writer_gone(f".k.tmp-{PLACE}-{os.getpid()}-{int(START) + 1}-abcd1234")  # this pid reused


# --- 2b. a driver that lost its lease still published ---------------------------------------------------


@pytest.mark.parametrize("medium", ["posix", "file"])
def test_publish_fence_a_worker_whose_lease_was_taken_over_cannot_publish(tmp_path, medium):
    from orchestrator.storage.leases import FenceRejected
    from orchestrator.storage.objects import ObjectStore

    root = tmp_path / "store"
    store = ArtifactStore(root) if medium == "posix" else ObjectStore(f"file://{root}", cache_dir=tmp_path / "cache")
    books = (lambda o: Leases(root, o)) if medium == "posix" else (lambda o: ObjectLeases(store, o))
    a, b = books(owner("a", DEAD_PID)), books(owner("b"))  # a looks dead (this place, no such pid)
    assert a.acquire("ptm-0123") and b.acquire("ptm-0123")  # b took it over while a computed
    with pytest.raises(FenceRejected):
        store.write_stage("ptm", "ptm-0123", {"result.json": b"{}"}, {}, fence=a.token("ptm-0123"))
    assert not store.exists("ptm", "ptm-0123"), "the former holder published"
    store.write_stage("ptm", "ptm-0123", {"result.json": b"{}"}, {}, fence=b.token("ptm-0123"))
    assert store.is_complete("ptm", "ptm-0123", full=True)
    with pytest.raises(FenceRejected):  # no lease at all: nobody may publish under a token
        store.write_stage("ptm", "ptm-4567", {"result.json": b"{}"}, {}, fence=1)


def test_publish_fence_the_scheduler_passes_its_token_and_waits_for_the_new_holder(tmp_path, fast_poll):
    """The stage's lease passes to another driver (which then dies) while it runs: its publish is refused
    (the worker publishes with the stage's fence, as `finish_stage` does), the stage is not taken as done,
    and it is computed again under a new token once the taker is gone; the study succeeds."""
    store = ArtifactStore(tmp_path / "store")
    graph, k = diamond()
    tokens = []

    class Fenced(Counting):
        def __call__(self, stage, store_root, cpus, gpus, runtime):
            self.calls.append(stage.key)
            tokens.append((stage.key, stage.fence))
            if stage.key == k["a"] and self.calls.count(k["a"]) == 1:  # taken over by a driver that then died
                path = store.root / "leases" / f"{stage.key}.json"
                info = json.loads(path.read_text())
                path.write_text(json.dumps({**info, "driver": "taker", "pid": DEAD_PID, "place": PLACE,
                                            "token": info["token"] + 1}))
            result = {"key": stage.key, "kind": stage.kind, "label": stage.label, "metrics": {"value": 1.0}}
            ArtifactStore(store_root).write_stage(stage.kind, stage.key, {"result.json": repr(result).encode()},
                                                  {}, fence=stage.fence)
            return result

    runner = Fenced()
    state, log, events, executed = run_scheduler(store, graph, runner)
    assert state == "succeeded"
    assert runner.calls.count(k["a"]) == 2  # refused once, then computed under its own new lease
    first, second = [t for key, t in tokens if key == k["a"]]
    assert isinstance(first, int) and second > first + 1  # the taker's token came in between
    assert all(isinstance(t, int) for _, t in tokens)
    assert any(e["type"] == "warning" and "not published" in e["message"] for e in events)
    assert k["a"] in executed and log.states[k["a"]] == "executed"
