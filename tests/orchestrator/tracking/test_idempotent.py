"""Tracking that logs each run once: a lost reply, a slow call at drain, a damaged stored file, a resubmit."""

import json
import threading
import time
from urllib.parse import urlsplit

import pytest

from orchestrator.stages.base import Stage
from orchestrator.storage.files import CorruptArtifact
from orchestrator.storage.leases import Leases, Owner
from orchestrator.storage.local import ArtifactStore
from orchestrator.tracking.session import TrackingSession
from orchestrator.tracking.tracker import Tracker, TrackingQueue


class Wrapped:
    """An MlflowClient with some methods replaced; every other call goes to the real one."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name):
        return getattr(self._client, name)


class LostReply(Wrapped):
    """`method` reaches the server, then its first reply is lost: the caller sees a connection error."""

    def __init__(self, client, method: str):
        super().__init__(client)
        self.method, self.lost = method, 0

    def __getattr__(self, name):
        real = getattr(self._client, name)
        if name != self.method:
            return real

        def call(*args, **kwargs):
            out = real(*args, **kwargs)
            if not self.lost:
                self.lost += 1
                raise ConnectionError("connection reset by peer")
            return out
        return call


class Counting(Wrapped):
    """Counts the queries (search_runs, get_run)."""

    def __init__(self, client):
        super().__init__(client)
        self.searches = self.gets = 0

    def search_runs(self, *args, **kwargs):
        self.searches += 1
        return self._client.search_runs(*args, **kwargs)

    def get_run(self, *args, **kwargs):
        self.gets += 1
        return self._client.get_run(*args, **kwargs)


def sqlite_tracker(tmp_path) -> Tracker:
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "ddray/test")
    tracker.ensure_experiment()
    return tracker


def result(key: str, kind: str = "distill", artifacts=()) -> dict:
    return {"key": key, "kind": kind, "label": f"stage {key}", "config": {"seed": 0}, "coords": {},
            "metrics": {"x": 1.0}, "artifacts": list(artifacts)}


def wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.01)
    assert condition()


@pytest.mark.parametrize("what, method, status", [
    ("stage", "set_terminated", "FINISHED"),  # the run was finished, the reply lost
    ("stage", "create_run", "FINISHED"),  # the run was created, its id never came back
    ("failure", "set_terminated", "FAILED"),
])
def test_a_lost_reply_is_retried_into_the_same_run_not_a_second_one(tmp_path, what, method, status):
    tracker = sqlite_tracker(tmp_path)
    parent = tracker.start_parent("s", None, "study", "h", "spec", "0")
    tracker.client = LostReply(tracker.client, method)
    q = TrackingQueue(tracker, parent, "s", "d", probe_s=0.05)
    if what == "stage":
        q.stage(result("k1"), ArtifactStore(tmp_path / "store"), cached=False)
    else:
        q.failure("stage k1", "k1", "distill", "boom")
    wait_for(lambda: q.logged == 1)  # failed once, probed, retried
    summary = q.drain(timeout=10)
    assert summary["logged"] == 1 and summary["not_logged"] == 0
    runs = tracker.children(parent)
    assert [(r.data.tags.get("ddray.stage_key"), r.info.status) for r in runs] == [("k1", status)]
    assert tracker.client.lost == 1 and q.outages == 1  # it was a retry after a pause


class SlowTracker:
    """A tracker whose log_stage blocks until `release` is set."""

    uri = "sqlite:///unused.db"

    def __init__(self):
        self.client = self
        self.started, self.release = threading.Event(), threading.Event()

    def log_stage(self, parent, study_id, result, store, cached, driver, retry=False):
        self.started.set()
        self.release.wait(10)

    def get_run(self, run_id):
        return None


def test_drain_counts_the_item_in_flight_and_keeps_its_lease_until_it_is_logged():
    tracker, released = SlowTracker(), []
    q = TrackingQueue(tracker, "parent", "s", "d", on_logged=released.append, probe_s=0.05)
    q.stage(result("slow"), None, cached=False)
    q.stage(result("queued"), None, cached=False)
    assert tracker.started.wait(5)
    summary = q.drain(timeout=0.3)
    assert summary["logged"] == 0 and summary["not_logged"] == 2
    assert summary["not_logged_keys"] == ["slow", "queued"] and summary["in_flight"] == "slow"
    assert released == []  # its lease is still held: the run is not complete
    tracker.release.set()
    q.thread.join(5)
    assert released == ["slow"]  # released once its log really finished; nothing after the deadline


class DamagedStore:
    """Every stage has a history; reading `bad`'s fails its checksum."""

    def __init__(self, root):
        self.root = root

    def read_json(self, kind, key, name):
        if key == "bad":
            raise CorruptArtifact(kind, key, f"'{name}' fails its checksum")
        return [{"iteration": i, "loss": 1.0 / (i + 1)} for i in range(3)]

    def manifest(self, kind, key):
        return None

    def path(self, kind, key, name):
        return self.root / "absent" / name


def test_a_damaged_stored_file_fails_its_stage_alone_and_the_server_is_not_blamed(tmp_path):
    tracker = sqlite_tracker(tmp_path)
    parent = tracker.start_parent("s", None, "study", "h", "spec", "0")
    store = DamagedStore(tmp_path)
    q = TrackingQueue(tracker, parent, "s", "d", probe_s=60)  # a pause would outlast the test
    for key in ("good1", "bad", "good2", "good3"):
        q.stage(result(key, artifacts=["history.json"]), store, cached=False)
    summary = q.drain(timeout=15)
    assert summary["logged"] == 3 and summary["not_logged"] == 1 and summary["not_logged_keys"] == ["bad"]
    assert q.outages == 0 and q.down_since is None
    assert summary["errors"][0].startswith("bad: ") and "checksum" in summary["errors"][0]
    runs = tracker.children(parent)
    assert sorted(r.data.tags["ddray.stage_key"] for r in runs) == ["good1", "good2", "good3"]  # none for bad
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert [m.step for m in tracker.client.get_metric_history(runs[0].info.run_id, "loss")] == [0, 1, 2]


def test_an_item_mlflow_refuses_is_given_up_alone():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    class Refusing(SlowTracker):
        def log_stage(self, parent, study_id, result, store, cached, driver, retry=False):
            if result["key"] == "refused":
                raise MlflowException("Changing param values is not allowed", error_code=INVALID_PARAMETER_VALUE)

    q = TrackingQueue(Refusing(), "parent", "s", "d", probe_s=60)
    for key in ("a", "refused", "b"):
        q.stage(result(key), None, cached=False)
    summary = q.drain(timeout=5)
    assert summary["logged"] == 2 and summary["not_logged_keys"] == ["refused"] and q.outages == 0


def stored_stages(store: ArtifactStore, n: int) -> dict[str, str]:
    kinds = {}
    for i in range(n):
        stage = Stage("distill", {"i": i}, {}, f"distill {i}")
        store.write_stage(stage.kind, stage.key, {"result.json": json.dumps(result(stage.key)).encode()}, {})
        kinds[stage.key] = stage.kind
    return kinds


def session(tmp_path, store: ArtifactStore) -> TrackingSession:
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "ddray/test")
    return TrackingSession(tracker, store, "s1", Leases(store.root, Owner.here()), lambda e: None)


def test_a_resubmit_after_an_outage_queries_mlflow_per_page_not_per_stage(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    first = session(tmp_path, store)  # the parent was made, then every child run was lost
    parent = first.open("study", "h", "spec", "0")
    first.close(None, {})
    kinds = stored_stages(store, 50)

    again = session(tmp_path, store)
    counting = again.tracker.client = Counting(again.tracker.client)
    assert again.open("study", "h", "spec", "0") == parent
    again.log_stored(kinds)
    summary = again.close("succeeded", {"cached": 50})
    assert summary["logged"] == 50 and summary["not_logged"] == 0
    # the parent by its id, one page of children at open, one page of FINISHED ones once the leases are taken
    assert counting.searches <= 3 and counting.gets <= 2, (counting.searches, counting.gets)
    runs = again.tracker.children(parent)
    assert len(runs) == 50 and {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.data.tags["ddray.stage_key"] for r in runs) == sorted(kinds)


def test_a_search_retried_after_a_trials_lost_reply_keeps_one_run_per_trial(tmp_path):
    tracker = sqlite_tracker(tmp_path)
    parent = tracker.start_parent("s", None, "study", "h", "spec", "0")
    tracker.client = LostReply(tracker.client, "set_terminated")  # the first: trial 0's
    trials = [{"trial_id": i, "stopped_early": False, "best": i == 1, "error": None, "iterations": 10,
               "curve": [{"iterations": 10, "proxy_acc": 0.5 + i / 10}], "config": {"lr": 0.1 * (i + 1)}}
              for i in range(2)]
    q = TrackingQueue(tracker, parent, "s", "d", probe_s=0.05)
    q.stage({**result("k1", kind="search"), "trials": trials}, ArtifactStore(tmp_path / "store"), cached=False)
    wait_for(lambda: q.logged == 1)
    assert q.drain(timeout=10)["not_logged"] == 0
    (stage,) = tracker.children(parent)
    assert stage.info.status == "FINISHED" and tracker.client.lost == 1
    nested = tracker.children(stage.info.run_id)
    assert sorted((r.data.tags["ddray.trial_id"], r.info.status) for r in nested) == [("0", "FINISHED"),
                                                                                    ("1", "FINISHED")]


# --- the same over the wire: a real MLflow server behind a proxy that drops one reply ------------------------


class DroppingProxy:
    """An HTTP proxy on 127.0.0.1 in front of `upstream`: every request is forwarded (one upstream connection
    per request), and the first `drops` replies to a request whose path ends with `path` are thrown away
    (the client's connection is closed instead): the server acted, the client never hears of it."""

    def __init__(self, upstream: str, path: str, drops: int = 1):
        import socket

        self.upstream = urlsplit(upstream)
        self.path, self.drops, self.dropped, self.forwarded = path, drops, 0, 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    @staticmethod
    def _read_request(sock) -> bytes | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            body += sock.recv(65536)
        lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
        return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n" + body

    def _serve(self, client) -> None:
        import socket

        with client:
            while True:
                request = self._read_request(client)
                if request is None:
                    return
                target = request.split(b" ", 2)[1].decode()
                with socket.create_connection((self.upstream.hostname, self.upstream.port)) as up:
                    up.sendall(request)
                    reply = b""
                    while chunk := up.recv(65536):
                        reply += chunk
                self.forwarded += 1
                if target.split("?")[0].endswith(self.path) and self.dropped < self.drops:
                    self.dropped += 1
                    return  # the server has done it; the client's connection just closes
                client.sendall(reply.replace(b"Connection: keep-alive", b"Connection: close"))
                return

    def close(self) -> None:
        self.server.close()


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/runs/update", "/runs/create"])
def test_a_reply_dropped_by_the_network_leaves_one_finished_run(tmp_path, monkeypatch, path):
    """A real MLflow server; the reply to the stage run's terminate (or create) is dropped on the wire after
    the server acted. MLflow's own retries are off (they would hide the loss): ddray's retry finds the run."""
    from tests.servers import mlflow_server

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    with mlflow_server(f"sqlite:///{tmp_path}/mlflow.db") as (uri, _):
        parent = Tracker(uri, "ddray/dropped")
        parent.ensure_experiment()
        parent_id = parent.start_parent("s", None, "study", "h", "spec", "0")
        proxy = DroppingProxy(uri, path)
        try:
            tracker = Tracker(proxy.url, "ddray/dropped")
            tracker.ensure_experiment()
            q = TrackingQueue(tracker, parent_id, "s", "d", probe_s=0.2)
            q.stage(result("k1"), ArtifactStore(tmp_path / "store"), cached=False)
            wait_for(lambda: q.logged == 1, seconds=60)
            summary = q.drain(timeout=30)
        finally:
            proxy.close()
        assert proxy.dropped == 1, "the proxy never dropped a reply: the test tested nothing"
        assert summary["logged"] == 1 and summary["not_logged"] == 0
        runs = parent.children(parent_id)
        assert [(r.data.tags.get("ddray.stage_key"), r.info.status) for r in runs] == [("k1", "FINISHED")]
        assert q.outages == 1
