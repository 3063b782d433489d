"""The object store (fsspec) and its leases: the POSIX store's guarantees on file://, memory:// and S3.

The S3 cases run against moto's standalone server, started on 127.0.0.1 by a fixture (marked slow);
file:// (local disk through fsspec) and memory:// (fsspec's generic code path) cover the same logic
without it.
"""

import json
import os
import pickle
import threading
import time
import uuid

import pytest
import torch

from orchestrator.storage import objects as objmod
from orchestrator.storage.files import HOST, PLACE, START, CorruptArtifact, tensors_to_bytes
from orchestrator.storage.leases import BREAKER_STALE_S, Leases, Owner
from orchestrator.storage.local import ArtifactStore
from orchestrator.storage.objects import ObjectLeases, ObjectStore, default_cache_dir
from orchestrator.storage.opener import open_leases, open_store
from tests.orchestrator.storage.test_leases import ReaderClock, race
from tests.servers import moto_s3

DEAD_PID = 2**22 + 4321  # above pid_max: never a live process
BUCKET = "ddray-test"


# --- the S3 server -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_server(tmp_path_factory):
    """moto's standalone S3 server on a free port, with AWS_* pointing at it and a bucket created."""
    with moto_s3(tmp_path_factory.mktemp("moto"), BUCKET) as server:
        yield server


def _server_requests(server, store: ObjectStore, method: str, path: str) -> int:
    """How many `method path` requests moto logged (flushed up to a sentinel request sent now)."""
    sentinel = f"{BUCKET}/sentinel-{uuid.uuid4().hex}"
    with pytest.raises(FileNotFoundError):
        store.fs.cat_file(sentinel)
    deadline = time.time() + 10
    while sentinel not in server["log"].read_text() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    return sum(1 for line in server["log"].read_text().splitlines() if f"{method} /{path} " in line)


@pytest.fixture
def clock(monkeypatch):
    """The leases' monotonic clock (the reader's), moved on by hand."""
    return ReaderClock(monkeypatch)


# --- stores on each backend --------------------------------------------------------------------------

ALL = ["file", "memory", pytest.param("s3", marks=pytest.mark.slow)]
ATOMIC = ["file", pytest.param("s3", marks=pytest.mark.slow)]  # backends with an atomic exclusive create


def _url(request, tmp_path) -> str:
    if request.param == "file":
        return f"file://{tmp_path}/store"
    if request.param == "memory":
        return f"memory://ddray-{uuid.uuid4().hex[:10]}"
    server = request.getfixturevalue("moto_server")
    return f"s3://{server['bucket']}/{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=ALL)
def url(request, tmp_path):
    u = _url(request, tmp_path)
    yield u
    if request.param == "memory":
        import fsspec

        fs, path = fsspec.core.url_to_fs(u)
        if fs.exists(path):
            fs.rm(path, recursive=True)


@pytest.fixture(params=ATOMIC)
def atomic_url(request, tmp_path):
    return _url(request, tmp_path)


def node(url: str, tmp_path, name: str = "a") -> ObjectStore:
    """The store as one node sees it: its own local cache."""
    return ObjectStore(url, cache_dir=tmp_path / f"cache-{name}")


def obj(store: ObjectStore, kind: str, key: str, name: str) -> str:
    """The object that holds one published file."""
    return f"{store._prefix(kind, key)}/{store.manifest(kind, key)['files'][name]['object']}"


def listing(store: ObjectStore, *parts: str) -> list[str]:
    return sorted(store.objects.find(store._k(*parts)))


def counting(calls: list, fn):
    def wrapper(*args, **kwargs):
        calls.append(args)
        return fn(*args, **kwargs)
    return wrapper


# --- the store ---------------------------------------------------------------------------------------


def test_write_and_read_back_on_another_node(url, tmp_path):
    a = node(url, tmp_path, "a")
    t = {"x": torch.arange(10, dtype=torch.uint8), "y": torch.randn(3, 4)}
    a.write_stage("dataset", "k1", {"a.pt": tensors_to_bytes(t), "sub/b.json": b'{"v": 1}'}, {"m": 1})
    assert str(a.root) == url
    assert a.exists("dataset", "k1") and a.is_complete("dataset", "k1") and a.is_complete("dataset", "k1", full=True)

    b = node(url, tmp_path, "b")
    got = b.read_tensors("dataset", "k1", "a.pt")
    assert torch.equal(got["x"], t["x"]) and torch.equal(got["y"], t["y"])
    assert b.read_json("dataset", "k1", "sub/b.json") == {"v": 1}
    assert b.meta("dataset", "k1") == {"m": 1}
    # the manifest and the one writer's files, nothing else
    prefix = a.manifest("dataset", "k1")["prefix"]
    assert prefix.startswith(f".tmp-{PLACE}-{os.getpid()}-{START}-")
    assert listing(a, "stages", "dataset", "k1") == sorted(["manifest.json", f"{prefix}/a.pt", f"{prefix}/sub/b.json"])
    assert a.stage_keys("dataset") == ["k1"]
    # local copies for MLflow and the CLI
    d = b.stage_dir("dataset", "k1")
    assert d.is_relative_to(tmp_path / "cache-b")
    assert (d / "a.pt").read_bytes() == tensors_to_bytes(t) and (d / "sub/b.json").read_bytes() == b'{"v": 1}'
    assert b.path("dataset", "k1", "a.pt") == d / "a.pt"
    assert not b.path("dataset", "k1", "nope.png").exists()
    # nothing there
    assert not b.exists("dataset", "nope") and b.manifest("dataset", "nope") is None
    assert b.verify("dataset", "nope") == ["manifest missing or unreadable"]
    with pytest.raises(CorruptArtifact):
        b.read_bytes("dataset", "k1", "missing.pt")


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_damage_is_detected(url, tmp_path, damage):
    a = node(url, tmp_path, "writer")
    a.write_stage("dataset", "k", {"a.bin": bytes(range(200))}, {})
    path = obj(a, "dataset", "k", "a.bin")
    data = a.fs.cat_file(path)
    if damage == "truncate":
        a.fs.pipe_file(path, data[:100])
    elif damage == "flip":
        a.fs.pipe_file(path, data[:5] + bytes([data[5] ^ 0xFF]) + data[6:])
    elif damage == "delete":
        a.fs.rm(path)
    else:
        a.fs.pipe_file(a._manifest_path("dataset", "k"), b"{not json")
    reader = node(url, tmp_path, "reader")  # another node: nothing cached
    expected = {"truncate": ["a.bin: truncated (100 of 200 bytes)"], "flip": ["a.bin: checksum mismatch"],
                "delete": ["a.bin: missing"], "manifest": ["manifest missing or unreadable"]}[damage]
    assert reader.verify("dataset", "k", full=True) == expected
    assert not reader.is_complete("dataset", "k", full=True)
    # the quick check (sizes) sees all but a flipped byte; reading the file catches that one
    assert reader.is_complete("dataset", "k") == (damage == "flip")
    assert reader.exists("dataset", "k")
    if damage in ("flip", "truncate", "delete"):
        with pytest.raises(CorruptArtifact) as exc:
            reader.read_bytes("dataset", "k", "a.bin")
        assert (exc.value.kind, exc.value.key) == ("dataset", "k")
        assert not reader.path("dataset", "k", "a.bin").exists()  # a bad download is not cached
        assert not [p for p in (reader.cache / "blobs").rglob("*") if p.is_file() and not p.name.endswith(".lock")]


def test_quick_verify_is_one_listing_and_no_download(url, tmp_path, monkeypatch):
    a = node(url, tmp_path, "a")
    a.write_stage("ptm", "k", {f"f{i}": bytes([i]) * (100 + i) for i in range(5)}, {})
    b = node(url, tmp_path, "b")
    finds, downloads, gets = [], [], []
    monkeypatch.setattr(b.objects, "find", counting(finds, b.objects.find))
    monkeypatch.setattr(b.objects, "download", counting(downloads, b.objects.download))
    monkeypatch.setattr(b.objects, "get", counting(gets, b.objects.get))
    assert b.verify("ptm", "k") == []
    assert (len(finds), len(downloads), len(gets)) == (1, 0, 1)  # the manifest, one listing
    assert b.verify("ptm", "k", full=True) == []
    assert len(downloads) == 5


def test_a_second_writer_of_the_same_key_keeps_the_first_copy(url, tmp_path):
    a, b = node(url, tmp_path, "a"), node(url, tmp_path, "b")
    a.write_stage("ptm", "k", {"a": b"first"}, {"w": "a"})
    b.write_stage("ptm", "k", {"a": b"other"}, {"w": "b"})  # a duplicate task (bytes may differ run to run)
    assert b.read_bytes("ptm", "k", "a") == b"first" and b.meta("ptm", "k") == {"w": "a"}
    assert (b.stage_dir("ptm", "k") / "a").read_bytes() == b"first"  # the loser's local copy follows the winner
    prefix = a.manifest("ptm", "k")["prefix"]
    assert listing(a, "stages", "ptm", "k") == sorted(["manifest.json", f"{prefix}/a"])
    assert listing(a, "quarantine") == []


def test_concurrent_writers_publish_exactly_one_copy(atomic_url, tmp_path):
    stores = [node(atomic_url, tmp_path, f"w{i}") for i in range(4)]
    barrier, errors = threading.Barrier(len(stores)), []

    def write(i):
        barrier.wait()
        try:
            stores[i].write_stage("distill", "k", {"s.pt": f"copy-{i}".encode() * 50, "r.json": b"{}"}, {"w": i})
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    manifest = stores[0].manifest("distill", "k")
    winner, prefix = manifest["meta"]["w"], manifest["prefix"]
    assert {s.read_bytes("distill", "k", "s.pt") for s in stores} == {f"copy-{winner}".encode() * 50}
    assert listing(stores[0], "stages", "distill", "k") == sorted(["manifest.json", f"{prefix}/r.json", f"{prefix}/s.pt"])


def test_quarantine_moves_a_damaged_stage_aside(url, tmp_path):
    a, b = node(url, tmp_path, "a"), node(url, tmp_path, "b")
    a.write_stage("ptm", "k", {"a": b"123"}, {})
    assert b.path("ptm", "k", "a").read_bytes() == b"123"  # b holds a local copy
    a.fs.pipe_file(obj(a, "ptm", "k", "a"), b"999")
    moved = a.quarantine("ptm", "k")
    assert moved is not None and a.fs.cat_file(moved + "/a") == b"999"  # kept for inspection
    assert json.loads(a.fs.cat_file(moved + "/manifest.json"))["key"] == "k"
    assert not a.exists("ptm", "k") and listing(a, "stages", "ptm", "k") == []
    assert a.quarantine("ptm", "k") is None
    a.write_stage("ptm", "k", {"a": b"456"}, {})
    assert a.is_complete("ptm", "k", full=True)
    assert b.path("ptm", "k", "a").read_bytes() == b"456"  # b's old copy is not served for the new stage
    assert sorted(p.name for p in b.stage_dir("ptm", "k").iterdir()) == ["a"]


def test_a_damaged_copy_is_quarantined_when_the_stage_is_written_again(url, tmp_path):
    a = node(url, tmp_path, "a")
    a.write_stage("ptm", "k", {"a": b"good"}, {})
    a.fs.pipe_file(obj(a, "ptm", "k", "a"), b"bad!")  # same size, wrong bytes
    a.write_stage("ptm", "k", {"a": b"good"}, {})  # the writer's own cached copy does not hide the damage
    assert node(url, tmp_path, "fresh").read_bytes("ptm", "k", "a") == b"good"
    assert a.is_complete("ptm", "k", full=True)
    assert len({name.split("/")[0] for name in listing(a, "quarantine")}) == 1


def test_a_failed_write_leaves_nothing(url, tmp_path, monkeypatch):
    a = node(url, tmp_path, "a")
    with pytest.raises(TypeError):
        a.write_stage("distill", "k", {"a": b"ok", "b": 123}, {})  # not bytes
    assert listing(a, "stages", "distill") == []

    def fail(path, data):
        raise OSError("the manifest PUT failed")

    monkeypatch.setattr(a.objects, "create", fail)  # files uploaded, publication fails
    with pytest.raises(OSError, match="manifest PUT"):
        a.write_stage("distill", "k", {"a": b"ok"}, {})
    assert listing(a, "stages", "distill") == [] and not a.exists("distill", "k")


def test_the_cache_downloads_once_per_node_and_reverifies(url, tmp_path, monkeypatch, request):
    payload = tensors_to_bytes({"x": torch.arange(1000)})
    a = node(url, tmp_path, "writer")
    a.write_stage("dataset", "k", {"dataset.pt": payload}, {})
    b = node(url, tmp_path, "b")
    downloads = []
    monkeypatch.setattr(b.objects, "download", counting(downloads, b.objects.download))
    for _ in range(3):
        assert b.read_bytes("dataset", "k", "dataset.pt") == payload
    local = b.path("dataset", "k", "dataset.pt")
    assert local.read_bytes() == payload and (b.stage_dir("dataset", "k") / "dataset.pt").exists()
    assert len(downloads) == 1
    # another process on the same node shares the cache
    c = ObjectStore(url, cache_dir=b.cache)
    monkeypatch.setattr(c.objects, "download", counting(downloads, c.objects.download))
    assert torch.equal(c.read_tensors("dataset", "k", "dataset.pt")["x"], torch.arange(1000))
    assert len(downloads) == 1
    # a damaged cached copy (same size) is caught by the checksum on read, and downloaded again
    data = bytearray(local.read_bytes())
    data[-3] ^= 0xFF
    with open(local, "r+b") as f:  # in place: the cached blob itself
        f.write(data)
    assert b.read_bytes("dataset", "k", "dataset.pt") == payload
    assert len(downloads) == 2
    # a truncated cached copy is not trusted for a local path either
    blob = b._blob(a.manifest("dataset", "k")["files"]["dataset.pt"]["sha256"])
    with open(blob, "r+b") as f:
        f.truncate(10)
    assert b.path("dataset", "k", "dataset.pt").read_bytes() == payload
    assert len(downloads) == 3
    if "s3" in request.node.callspec.id:  # and the server saw exactly those GETs (the writer's cache needed none)
        server = request.getfixturevalue("moto_server")
        assert _server_requests(server, b, "GET", obj(a, "dataset", "k", "dataset.pt")) == 3


def test_written_files_are_cached_and_local_copies_fetched_only_when_asked(url, tmp_path, monkeypatch):
    files = {"big.pt": b"\x01" * 5000, "grid.png": b"png", "result.json": b"{}"}
    writer = node(url, tmp_path, "writer")
    monkeypatch.setattr(writer.objects, "download", lambda *a: pytest.fail("the writer downloaded its own files"))
    d = writer.write_stage("ptm", "k", files, {})
    assert {p.name: p.read_bytes() for p in d.iterdir()} == files  # from the bytes it wrote
    assert writer.read_bytes("ptm", "k", "big.pt") == files["big.pt"]
    plain = ObjectStore(url, cache_dir=tmp_path / "cache-plain", cache_writes=False)
    monkeypatch.setattr(plain.objects, "download", lambda *a: pytest.fail("write_stage downloaded"))
    plain.write_stage("ptm", "k2", files, {})
    other = node(url, tmp_path, "driver")
    downloads = []
    monkeypatch.setattr(other.objects, "download", counting(downloads, other.objects.download))
    d = other.stage_dir("ptm", "k", names=["grid.png", "result.json"])  # what MLflow logs, not the tensors
    assert sorted(p.name for p in d.iterdir()) == ["grid.png", "result.json"] and len(downloads) == 2


def test_attempts_are_counted_one_object_per_execution(url, tmp_path):
    a, b = node(url, tmp_path, "a"), node(url, tmp_path, "b")
    assert a.attempts("k") == 0
    a.record_attempt("k")
    b.record_attempt("k")
    a.record_attempt("k-other")
    assert a.attempts("k") == 2 and b.attempts("k-other") == 1 and a.attempts("k-") == 0


def test_attempt_logs_are_written_locally_and_published_beside_the_attempt(url, tmp_path):
    import logging

    worker, cli = node(url, tmp_path, "worker"), node(url, tmp_path, "cli")
    first = worker.record_attempt("k")
    handler = logging.FileHandler(worker.attempt_log("k", first), delay=True)  # as stages.py runs an attempt
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger(f"ddray-test-{uuid.uuid4().hex}")
    log.addHandler(handler)
    log.warning("epoch 1 done")
    handler.close()
    assert worker.attempt_log("k", first).is_relative_to(tmp_path / "cache-worker")
    assert cli.stage_logs("k") == []  # not published yet
    worker.publish_log("k", first)
    second = worker.record_attempt("k")
    worker.publish_log("k", second)  # an attempt that logged nothing
    assert cli.stage_logs("k") == [(ObjectStore._attempt_id(first), "epoch 1 done\n")]
    assert cli.attempts("k") == 2


def test_temp_prefixes_of_dead_writers_are_cleaned_and_published_and_live_ones_kept(url, tmp_path, monkeypatch):
    a = node(url, tmp_path, "a")
    base = a._k("stages", "ptm")
    dead = f"{base}/k1/.tmp-{PLACE}-{DEAD_PID}-0-abcd1234"
    live = f"{base}/k2/.tmp-{PLACE}-{os.getpid()}-{START}-abcd1234"
    remote = f"{base}/k3/.tmp-otherhost.1234567890-1-0-abcd1234"
    for p in (dead, live, remote):
        a.fs.pipe_file(p + "/part", b"x")
    # published stages whose writers are gone: their files are under those writers' prefixes, and stay
    monkeypatch.setattr(objmod, "_temp_name", lambda: f".tmp-{PLACE}-{DEAD_PID}-0-feedf00d")
    a.write_stage("ptm", "k4", {"a": b"1"}, {})
    monkeypatch.setattr(objmod, "_temp_name", lambda: ".tmp-otherhost.1234567890-2-0-feedf00d")
    a.write_stage("ptm", "k5", {"a": b"1"}, {})
    loser = f"{base}/k4/.tmp-{PLACE}-{DEAD_PID + 1}-0-0000aaaa"  # a writer of k4 that died before it lost
    a.fs.pipe_file(loser + "/a", b"1")
    assert sorted(a.clean_temp()) == sorted([a.url_of(dead), a.url_of(loser)])
    assert a.clean_temp(now=time.time() + 2 * 86400) == [a.url_of(remote)]  # another host's: after a day
    assert a.objects.exists(live + "/part")
    assert a.is_complete("ptm", "k4", full=True) and a.is_complete("ptm", "k5", full=True)
    assert listing(a, "stages", "ptm", "k4") == sorted(["manifest.json", f".tmp-{PLACE}-{DEAD_PID}-0-feedf00d/a"])


def test_study_dir_is_local_and_the_store_pickles(url, tmp_path):
    a = node(url, tmp_path, "a")
    a.write_stage("dataset", "k", {"a": b"x"}, {})
    assert a.study_dir("s1") == tmp_path / "cache-a" / "studies" / "s1"
    c = pickle.loads(pickle.dumps(a))
    assert (c.url, c.cache) == (a.url, a.cache) and c.read_bytes("dataset", "k", "a") == b"x"


def test_open_store_routes_by_url(tmp_path, monkeypatch):
    monkeypatch.delenv(objmod.FORCE_ENV, raising=False)
    assert isinstance(open_store(tmp_path / "s"), ArtifactStore)
    assert isinstance(open_store(str(tmp_path / "s")), ArtifactStore)
    posix = open_store(f"file://{tmp_path}/s")
    assert isinstance(posix, ArtifactStore) and posix.root == tmp_path / "s"
    mem = open_store("memory://ddray-route")
    assert isinstance(mem, ObjectStore) and str(mem.root) == "memory://ddray-route"
    monkeypatch.setenv(objmod.FORCE_ENV, "1")
    forced = open_store(f"file://{tmp_path}/s")
    assert isinstance(forced, ObjectStore) and str(forced.root) == f"file://{tmp_path}/s"
    assert open_store(forced) is forced
    assert isinstance(open_leases(posix, Owner.here()), Leases)
    assert isinstance(open_leases(forced, Owner.here()), ObjectLeases)
    monkeypatch.setenv(objmod.CACHE_ENV, str(tmp_path / "cache"))
    assert ObjectStore("memory://ddray-route").cache == default_cache_dir("memory://ddray-route")
    assert default_cache_dir("memory://ddray-route").parent == tmp_path / "cache"
    pytest.importorskip("s3fs")
    s3 = open_store("s3://some-bucket/prefix/")
    assert isinstance(s3, ObjectStore) and str(s3.root) == "s3://some-bucket/prefix"


@pytest.mark.slow
def test_s3_conditional_requests_are_enforced_by_the_server(moto_server):
    """The mechanism the store relies on: s3fs mode="create" (If-None-Match: *), If-Match on PUT and DELETE."""
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    path = f"{BUCKET}/conditional/{uuid.uuid4().hex}"
    key = path.split("/", 1)[1]
    fs.pipe_file(path, b"1", mode="create")
    with pytest.raises(FileExistsError):
        fs.pipe_file(path, b"2", mode="create")
    assert fs.cat_file(path) == b"1"
    etag = fs.call_s3("head_object", Bucket=BUCKET, Key=key)["ETag"]
    for call, extra in (("put_object", {"Body": b"3"}), ("delete_object", {})):
        with pytest.raises(OSError) as exc:
            fs.call_s3(call, Bucket=BUCKET, Key=key, IfMatch='"0123456789abcdef0123456789abcdef"', **extra)
        assert objmod._error_code(exc.value) == "PreconditionFailed"
    assert fs.cat_file(path) == b"1"
    new = fs.call_s3("put_object", Bucket=BUCKET, Key=key, Body=b"4", IfMatch=etag)["ETag"]
    fs.call_s3("delete_object", Bucket=BUCKET, Key=key, IfMatch=new)
    assert not fs.exists(path)
    log = moto_server["log"].read_text()
    assert f"PUT /{path} HTTP/1.1" in log and '" 412 -' in log


# --- leases ------------------------------------------------------------------------------------------


@pytest.fixture(params=ATOMIC)
def lease_url(request, tmp_path):
    return _url(request, tmp_path)


class LeaseFiles:
    """Read and write lease objects behind the leases' back (as a crash or another host would)."""

    def __init__(self, url, tmp_path):
        self.store = ObjectStore(url, cache_dir=tmp_path / "cache-leases")

    def path(self, name):
        return f"{self.store.base}/leases/{name}"

    def read(self, name="k.json"):
        return json.loads(self.store.fs.cat_file(self.path(name)))

    def write(self, info, name="k.json"):
        self.store.fs.pipe_file(self.path(name), json.dumps(info).encode())

    def exists(self, name="k.json"):
        return self.store.objects.exists(self.path(name))


def test_one_holder_at_a_time_and_release(lease_url, tmp_path):
    a, b = ObjectLeases(lease_url, Owner.here()), ObjectLeases(lease_url, Owner.here())
    assert a.acquire("k") and a.acquire("k")  # re-entrant for its holder
    assert not b.acquire("k")
    assert a.holder("k")["driver"] == a.owner.driver
    a.release("k")
    assert not LeaseFiles(lease_url, tmp_path).exists()
    assert b.acquire("k") and not a.acquire("k")
    b.release_all()
    assert b.held == set() and a.acquire("k")


def test_an_expired_or_dead_owners_lease_is_taken_over(lease_url, tmp_path, clock):
    files = LeaseFiles(lease_url, tmp_path)
    a, b = ObjectLeases(lease_url, Owner.here(), ttl=60), ObjectLeases(lease_url, Owner.here())
    assert a.acquire("k")
    files.write({**files.read(), "pid": DEAD_PID})  # its process is gone (same host)
    assert b.acquire("k")
    a.renew()  # the old holder notices it lost the lease
    assert "k" not in a.held and files.read()["driver"] == b.owner.driver
    a.held.add("k")
    a.release("k")  # a release by a former holder does not delete the new holder's lease
    assert files.read()["driver"] == b.owner.driver
    files.write({**files.read(), "host": "elsewhere"})
    assert not a.acquire("k")  # another host's lease, first seen now: a full TTL of no change first
    clock.advance(61)
    assert a.acquire("k")  # another host's lease whose counter did not move for a TTL (a's own clock)


def test_a_live_lease_of_another_host_is_respected_until_it_expires(lease_url, tmp_path):
    files = LeaseFiles(lease_url, tmp_path)
    files.write({"driver": "x", "host": "elsewhere", "pid": 1, "renewals": 0})
    b = ObjectLeases(lease_url, Owner.here())
    assert not b.acquire("k") and files.read()["driver"] == "x"


def test_renew_bumps_the_counter_and_keeps_the_owner(lease_url, tmp_path):
    files = LeaseFiles(lease_url, tmp_path)
    a = ObjectLeases(lease_url, Owner.here(), ttl=5)
    a.acquire("k")
    before = files.read()
    a.ttl = 500
    a.renew()
    after = files.read()
    assert after["renewals"] == before["renewals"] + 1 and after["ttl"] == 500 and after["token"] == before["token"]
    assert after["driver"] == a.owner.driver and after["host"] == HOST
    assert a.held == {"k"}


def test_renew_does_not_overwrite_a_takeover_that_lands_meanwhile(lease_url, tmp_path, monkeypatch):
    files = LeaseFiles(lease_url, tmp_path)
    a = ObjectLeases(lease_url, Owner.here())
    assert a.acquire("k")
    replace = a.objects.replace

    def taken_over_first(path, data, etag):  # between a's read and a's write, another driver takes over
        files.write({"driver": "taker", "host": HOST, "pid": os.getpid(), "token": 9})
        return replace(path, data, etag)

    monkeypatch.setattr(a.objects, "replace", taken_over_first)
    a.renew()
    assert "k" not in a.held and files.read()["driver"] == "taker"


def test_a_stale_breaker_is_cleared_and_a_fresh_one_respected(lease_url, tmp_path, clock):
    files = LeaseFiles(lease_url, tmp_path)
    files.write({"driver": "gone", "host": HOST, "pid": DEAD_PID, "place": PLACE})
    files.write({"driver": "breaking", "t": time.time()}, name="k.json.break")
    b = ObjectLeases(lease_url, Owner.here())
    assert not b.acquire("k") and files.exists("k.json.break")  # someone is breaking it right now
    clock.advance(BREAKER_STALE_S / 2)
    files.write({"driver": "breaking-again", "t": time.time()}, name="k.json.break")
    assert not b.acquire("k") and files.exists("k.json.break")  # changed: a new breaker, timed afresh
    clock.advance(BREAKER_STALE_S + 1)
    assert not b.acquire("k") and not files.exists("k.json.break")  # unchanged for a while (b's clock): removed
    assert b.acquire("k") and files.read()["driver"] == b.owner.driver and not files.exists("k.json.break")


def test_concurrent_takers_of_a_stale_lease_end_with_exactly_one_holder(lease_url, tmp_path):
    files = LeaseFiles(lease_url, tmp_path)
    for round_ in range(3):
        name = f"k{round_}"
        files.write({"driver": "gone", "host": HOST, "pid": DEAD_PID, "place": PLACE}, name=f"{name}.json")
        takers = [ObjectLeases(lease_url, Owner(f"d{round_}-{i}", HOST, os.getpid())) for i in range(8)]
        won = race(takers, name)
        assert len(won) == 1
        assert files.read(f"{name}.json")["driver"] == won[0]
        assert not files.exists(f"{name}.json.break")


def test_concurrent_acquirers_of_a_free_lease_end_with_exactly_one_holder(lease_url, tmp_path):
    takers = [ObjectLeases(lease_url, Owner(f"d{i}", HOST, os.getpid())) for i in range(8)]
    won = race(takers, "free")
    assert len(won) == 1 and LeaseFiles(lease_url, tmp_path).read("free.json")["driver"] == won[0]
