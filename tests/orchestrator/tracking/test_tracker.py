"""What the driver sends to MLflow: flattened params within MLflow's limits."""

import json

from orchestrator.tracking.tracker import MAX_PARAM, flatten


def test_flatten_nests_with_dots_and_serialises_the_rest():
    flat = flatten({"method": "dm", "guidance": {"kind": "clom", "alpha": {"convnet": 1.0}}, "options": {},
                    "arch_options": {"width": 32}, "keep": [1, 2], "none": None})
    assert flat == {"method": "dm", "guidance.kind": "clom", "guidance.alpha.convnet": "1.0", "options": "{}",
                    "arch_options.width": "32", "keep": "[1, 2]", "none": "null"}


def test_long_values_are_cut_to_mlflows_limit():
    flat = flatten({"epochs": list(range(1000))})
    assert len(flat["epochs"]) == MAX_PARAM and flat["epochs"].endswith("...")
    assert json.loads(flatten({"x": [1]})["x"]) == [1]


import pytest  # noqa: E402

from orchestrator.errors import UserError  # noqa: E402
from orchestrator.tracking.tracker import TrackingQueue, check_uri, redact, redact_text  # noqa: E402


@pytest.mark.parametrize("uri, shown", [
    ("http://alice:s3cret@mlflow:5000", "http://alice@mlflow:5000"),
    ("postgresql://u:p%40ss@db/mlflow?sslmode=require", "postgresql://u@db/mlflow?sslmode=require"),
    ("https://mlflow/?token=abc&x=1", "https://mlflow/?token=***&x=1"),
    ("sqlite:////abs/path/mlflow.db", "sqlite:////abs/path/mlflow.db"),
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
])
def test_credentials_never_leave_a_uri(uri, shown):
    assert redact(uri) == shown
    assert "s3cret" not in redact_text(f"tracking: {{uri: {uri}}}", uri)


@pytest.mark.parametrize("uri, message", [
    ("file:///tmp/mlruns", "is a file store, which MLflow refuses since 3.13"),
    ("./mlruns", "is a file store"),
    ("ftp://host/x", "unsupported scheme 'ftp'"),
])
def test_tracking_uris_mlflow_refuses_are_one_line_errors(uri, message):
    with pytest.raises(UserError) as exc:
        check_uri(uri)
    assert len(exc.value.lines) == 1 and message in exc.value.lines[0]
    check_uri("sqlite:///x.db")
    check_uri("postgresql+psycopg2://u@h/db")


class FlakyTracker:
    """Fails every call while `down`; records the keys it logged."""

    uri = "http://u:pw@host"

    def __init__(self):
        self.down, self.logged = False, []
        self.client = self

    def log_stage(self, parent, study_id, result, store, cached, driver, retry=False):
        if self.down:
            raise ConnectionError("connection refused by pw")
        self.logged.append(result["key"])

    def get_run(self, run_id):
        if self.down:
            raise ConnectionError("still down")


def test_the_queue_survives_an_outage_and_logs_what_waited_once_the_server_is_back():
    import time

    tracker = FlakyTracker()
    q = TrackingQueue(tracker, "parent", "s", "d", probe_s=0.05)
    q.stage({"key": "a"}, None, cached=False)
    deadline = time.time() + 5
    while tracker.logged != ["a"] and time.time() < deadline:
        time.sleep(0.01)
    tracker.down = True
    q.stage({"key": "b"}, None, cached=False)
    q.stage({"key": "c"}, None, cached=False)
    while len(q.missing) < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert q.errors and "pw" not in q.errors[0]  # the password is not repeated in what is reported
    tracker.down = False  # back: the probe re-queues what waited
    while len(tracker.logged) < 3 and time.time() < deadline:
        time.sleep(0.01)
    summary = q.drain(timeout=5)
    assert tracker.logged == ["a", "b", "c"] and summary["not_logged"] == 0 and summary["logged"] == 3


def test_drain_gives_up_at_once_while_the_server_is_down():
    tracker = FlakyTracker()
    tracker.down = True
    q = TrackingQueue(tracker, "parent", "s", "d", probe_s=60)
    for k in "xyz":
        q.stage({"key": k}, None, cached=False)
    summary = q.drain(timeout=30)
    assert summary["not_logged"] == 3 and sorted(summary["not_logged_keys"]) == ["x", "y", "z"]


def test_a_sqlite_experiment_keeps_its_artifacts_beside_the_database(tmp_path, monkeypatch):
    from orchestrator.tracking.tracker import Tracker

    monkeypatch.chdir(tmp_path)  # MLflow's own default would be ./mlruns here
    db_dir = tmp_path / "elsewhere"
    tracker = Tracker(f"sqlite:///{db_dir}/mlflow.db", "ddray/quickstart")
    exp = tracker.client.get_experiment(tracker.ensure_experiment())
    assert exp.artifact_location == str(db_dir / "mlartifacts" / "ddray-quickstart")
    assert not (tmp_path / "mlruns").exists()
