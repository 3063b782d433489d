"""Leases: one driver at a time per stage, taken over only from a driver that is gone."""

import json
import os
import threading
import time
import types

import pytest

from orchestrator.storage import leases as leases_module
from orchestrator.storage.files import HOST, PLACE
from orchestrator.storage.leases import BREAKER_STALE_S, Leases, Owner


class ReaderClock:
    """The leases' `time.monotonic` (the reader's own clock, the only one staleness is judged by), moved on
    by hand; only orchestrator.storage.leases sees it (asyncio and the S3 client keep the real clock)."""

    def __init__(self, monkeypatch):
        self.offset = 0.0
        clock = self

        class Time(types.ModuleType):  # the time module, but for monotonic
            def __getattr__(self, name):
                return getattr(time, name)

            @staticmethod
            def monotonic():
                return time.monotonic() + clock.offset

        monkeypatch.setattr(leases_module, "time", Time("time"))

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
def clock(monkeypatch):
    return ReaderClock(monkeypatch)


def test_one_holder_at_a_time_and_release(tmp_path):
    a, b = Leases(tmp_path, Owner.here()), Leases(tmp_path, Owner.here())
    assert a.acquire("k") and a.acquire("k")  # re-entrant for its holder
    assert not b.acquire("k")
    a.release("k")
    assert b.acquire("k") and not a.acquire("k")


def test_an_expired_or_dead_owners_lease_is_taken_over(tmp_path, clock):
    a, b = Leases(tmp_path, Owner.here(), ttl=60), Leases(tmp_path, Owner.here())
    assert a.acquire("k")
    path = tmp_path / "leases" / "k.json"
    info = json.loads(path.read_text())
    path.write_text(json.dumps({**info, "pid": 2**22 + 999}))  # its process is gone (same host)
    assert b.acquire("k")
    a.renew()  # the old holder notices it lost the lease
    assert "k" not in a.held and json.loads(path.read_text())["driver"] == b.owner.driver
    path.write_text(json.dumps({**json.loads(path.read_text()), "host": "elsewhere"}))
    assert not a.acquire("k")  # another host's lease, first seen now: a full TTL of no change first
    clock.advance(61)
    assert a.acquire("k")  # another host's lease whose counter did not move for a TTL (a's own clock)


def test_a_live_lease_of_another_host_is_respected_until_it_expires(tmp_path):
    b = Leases(tmp_path, Owner.here())
    (tmp_path / "leases").mkdir()
    (tmp_path / "leases" / "k.json").write_text(json.dumps(
        {"driver": "x", "host": "elsewhere", "pid": 1, "renewals": 0}))
    assert not b.acquire("k")


def test_renew_bumps_the_counter_and_keeps_the_owner(tmp_path):
    a = Leases(tmp_path, Owner.here(), ttl=5)
    a.acquire("k")
    before = json.loads((tmp_path / "leases" / "k.json").read_text())
    a.ttl = 500
    a.renew()
    after = json.loads((tmp_path / "leases" / "k.json").read_text())
    assert after["renewals"] == before["renewals"] + 1 and after["ttl"] == 500 and after["token"] == before["token"]
    assert after["driver"] == a.owner.driver and after["host"] == HOST


def test_concurrent_takers_of_a_stale_lease_end_with_exactly_one_holder(tmp_path):
    (tmp_path / "leases").mkdir()
    (tmp_path / "leases" / "k.json").write_text(json.dumps(
        {"driver": "gone", "host": HOST, "pid": 2**22 + 77, "place": PLACE}))
    takers = [Leases(tmp_path, Owner(f"d{i}", HOST, os.getpid())) for i in range(8)]
    won = race(takers, "k")
    assert len(won) == 1
    assert json.loads((tmp_path / "leases" / "k.json").read_text())["driver"] == won[0]


def test_a_lease_is_never_seen_empty_and_an_unreadable_one_is_held_until_old(tmp_path, clock):
    """Creation writes the whole file under its name at once (a driver that read an empty lease
    judged it stale and computed the stage too: a duplicate the concurrent-submit test caught)."""
    a, b = Leases(tmp_path, Owner.here()), Leases(tmp_path, Owner.here())
    assert a.acquire("s")
    assert json.loads((tmp_path / "leases" / "s.json").read_text())["driver"] == a.owner.driver
    assert not list((tmp_path / "leases").glob(".*.tmp"))  # the temp file is gone
    (tmp_path / "leases" / "t.json").write_text("")  # as if half-written by something else
    assert not b.acquire("t")  # first seen: held
    clock.advance(BREAKER_STALE_S + 1)
    assert b.acquire("t")  # unreadable and unchanged for a while (b's own clock): stale


def test_many_threads_creating_one_lease_give_exactly_one_holder(tmp_path):
    assert len(race([Leases(tmp_path, Owner.here()) for _ in range(8)], "fresh")) == 1


def race(takers: list[Leases], name: str) -> list[str]:
    """Every taker tries `name` at once (a barrier); the drivers that got it."""
    barrier, won = threading.Barrier(len(takers)), []

    def take(leases):
        barrier.wait()
        if leases.acquire(name):
            won.append(leases.owner.driver)

    threads = [threading.Thread(target=take, args=(t,)) for t in takers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won
