"""Leases: one driver at a time per stage, taken over only from a driver that is gone."""

import json
import os
import threading

from orchestrator.storage.files import HOST
from orchestrator.storage.leases import Leases, Owner


def test_one_holder_at_a_time_and_release(tmp_path):
    a, b = Leases(tmp_path, Owner.here()), Leases(tmp_path, Owner.here())
    assert a.acquire("k") and a.acquire("k")  # re-entrant for its holder
    assert not b.acquire("k")
    a.release("k")
    assert b.acquire("k") and not a.acquire("k")


def test_an_expired_or_dead_owners_lease_is_taken_over(tmp_path):
    a, b = Leases(tmp_path, Owner.here(), ttl=60), Leases(tmp_path, Owner.here())
    assert a.acquire("k")
    path = tmp_path / "leases" / "k.json"
    info = json.loads(path.read_text())
    path.write_text(json.dumps({**info, "pid": 2**22 + 999}))  # its process is gone (same host)
    assert b.acquire("k")
    a.renew()  # the old holder notices it lost the lease
    assert "k" not in a.held and json.loads(path.read_text())["driver"] == b.owner.driver
    path.write_text(json.dumps({**json.loads(path.read_text()), "host": "elsewhere", "expires": 0}))
    assert a.acquire("k")  # another host's lease that expired


def test_a_live_lease_of_another_host_is_respected_until_it_expires(tmp_path):
    b = Leases(tmp_path, Owner.here())
    (tmp_path / "leases").mkdir()
    (tmp_path / "leases" / "k.json").write_text(json.dumps(
        {"driver": "x", "host": "elsewhere", "pid": 1, "expires": 4e9}))
    assert not b.acquire("k")


def test_renew_pushes_the_expiry_and_keeps_the_owner(tmp_path):
    a = Leases(tmp_path, Owner.here(), ttl=5)
    a.acquire("k")
    before = json.loads((tmp_path / "leases" / "k.json").read_text())["expires"]
    a.ttl = 500
    a.renew()
    after = json.loads((tmp_path / "leases" / "k.json").read_text())
    assert after["expires"] > before + 100 and after["driver"] == a.owner.driver and after["host"] == HOST


def test_concurrent_takers_of_a_stale_lease_end_with_exactly_one_holder(tmp_path):
    (tmp_path / "leases").mkdir()
    (tmp_path / "leases" / "k.json").write_text(json.dumps(
        {"driver": "gone", "host": HOST, "pid": 2**22 + 77, "expires": 4e9}))
    takers = [Leases(tmp_path, Owner(f"d{i}", HOST, os.getpid())) for i in range(8)]
    won = race(takers, "k")
    assert len(won) == 1
    assert json.loads((tmp_path / "leases" / "k.json").read_text())["driver"] == won[0]


def test_a_lease_is_never_seen_empty_and_an_unreadable_one_is_held_until_old(tmp_path):
    """Creation writes the whole file under its name at once (a driver that read an empty lease
    judged it stale and computed the stage too: a duplicate the concurrent-submit test caught)."""
    a, b = Leases(tmp_path, Owner.here()), Leases(tmp_path, Owner.here())
    assert a.acquire("s")
    assert json.loads((tmp_path / "leases" / "s.json").read_text())["driver"] == a.owner.driver
    assert not list((tmp_path / "leases").glob(".*.tmp"))  # the temp file is gone
    (tmp_path / "leases" / "t.json").write_text("")  # as if half-written by something else
    assert not b.acquire("t")  # young: held
    old = os.path.getmtime(tmp_path / "leases" / "t.json") - 60
    os.utime(tmp_path / "leases" / "t.json", (old, old))
    assert b.acquire("t")  # old and unreadable: stale


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
