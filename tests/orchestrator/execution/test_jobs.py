"""The Jobs API client's warning for a Ray token sent over plain HTTP: no network, no Ray cluster."""

from __future__ import annotations

import json
import logging

import pytest

from orchestrator.errors import UserError
from orchestrator.execution import jobs

TOKEN = "test-only-token"  # never deployed


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch):
    """Each test starts as a process that has not warned yet."""
    monkeypatch.setattr(jobs, "_warned_plain_http", False)


@pytest.mark.parametrize(
    "address",
    ["http://10.0.0.5:8265", "http://ray-head.example.org:8265", "http://[2001:db8::1]:8265", "http://128.0.0.1:8265"],
)
def test_plain_http_to_another_host_warns(address):
    message = jobs.plain_http_warning(address, TOKEN)
    assert message and "unencrypted" in message and "https://" in message
    assert TOKEN not in message


@pytest.mark.parametrize(
    "address,token",
    [
        ("http://127.0.0.1:8265", TOKEN),
        ("http://127.1.2.3:8265", TOKEN),
        ("http://localhost:8265", TOKEN),
        ("http://[::1]:8265", TOKEN),
        ("https://10.0.0.5:8265", TOKEN),
        ("http://10.0.0.5:8265", None),
        ("http://10.0.0.5:8265", ""),
    ],
)
def test_no_warning_for_loopback_https_or_no_token(address, token):
    assert jobs.plain_http_warning(address, token) is None


def test_the_message_names_the_host_only():
    message = jobs.plain_http_warning("http://admin:hunter2@10.0.0.5:8265/", TOKEN)
    assert "10.0.0.5:8265" in message
    assert "hunter2" not in message and "admin" not in message


def test_warned_once_per_process(capsys, caplog):
    caplog.set_level(logging.WARNING, logger="ddray")
    assert jobs.warn_plain_http("http://10.0.0.5:8265", TOKEN) is True
    assert jobs.warn_plain_http("http://10.0.0.5:8265", TOKEN) is False
    assert jobs.warn_plain_http("http://10.0.0.6:8265", TOKEN) is False
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ray: the Ray token is sent unencrypted to 10.0.0.5:8265")
    records = [r for r in caplog.records if r.name == "ddray"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING


@pytest.mark.parametrize("address,token", [("http://127.0.0.1:8265", TOKEN), ("https://10.0.0.5:8265", TOKEN),
                                           ("http://10.0.0.5:8265", None)])
def test_not_warned(address, token, capsys, caplog):
    caplog.set_level(logging.WARNING, logger="ddray")
    assert jobs.warn_plain_http(address, token) is False
    assert capsys.readouterr().err == ""
    assert not [r for r in caplog.records if r.name == "ddray"]
    # A quiet call does not use up the one warning.
    assert jobs.warn_plain_http("http://10.0.0.5:8265", TOKEN) is True


def test_cluster_warns_before_it_sends_the_token(monkeypatch, capsys):
    """The constructor's wiring, with the reachability check and the Jobs client stubbed out."""
    import ray.job_submission

    sent = []

    def refuse(address, headers):
        sent.append(headers)
        raise ConnectionError("stub: no cluster here")

    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    monkeypatch.setattr(jobs, "check_reachable", lambda address: None)
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", refuse)
    for _ in range(2):
        with pytest.raises(UserError, match="cannot use the Jobs API"):
            jobs.Cluster("http://10.0.0.5:8265")
    assert sent == [{"Authorization": f"Bearer {TOKEN}"}] * 2
    err = capsys.readouterr().err
    assert err.count("sent unencrypted to 10.0.0.5:8265") == 1
    assert TOKEN not in err


# --- following a job's log (issue 18: the whole log was downloaded once a second) ---------------------------


class FakeJobs:
    """A Jobs client whose log is `text`, streamed in `chunks` (cut anywhere, even inside a line); the
    stream breaks once after `break_after` chunks when set; Ray's tail restarts at the log's first byte."""

    def __init__(self, text: str, cut: int, break_after: int | None = None):
        self.text, self.cut, self.break_after = text, cut, break_after
        self.full_reads = 0
        self.connections = 0

    async def _stream(self):
        self.connections += 1
        pieces = [self.text[i:i + self.cut] for i in range(0, len(self.text), self.cut)]
        for n, piece in enumerate(pieces):
            if self.break_after is not None and self.connections == 1 and n == self.break_after:
                raise RuntimeError("WebSocket connection closed unexpectedly")
            yield piece

    def tail_job_logs(self, submission_id):
        return self._stream()

    def get_job_logs(self, submission_id):
        self.full_reads += 1
        return self.text

    def get_job_status(self, submission_id):
        return "SUCCEEDED"


def job_log(n: int) -> str:
    events = [json.dumps({"type": "stage", "key": f"k{i}", "state": "executed"}) for i in range(n)]
    return "".join(f"{jobs.EVENT_PREFIX}{e}\nsome worker output\n" for e in events) + '{"study_id": "s", "state": "succeeded"}\n'


def follow(client) -> tuple[list[dict], dict]:
    cluster = jobs.Cluster.__new__(jobs.Cluster)  # no head to reach: only the client is used by follow
    cluster.client = client
    seen: list[dict] = []
    return seen, cluster.follow("ddray-s", seen.append)


@pytest.mark.parametrize("cut", [1, 7, 64, 100_000])
def test_follow_streams_each_event_once_in_order_without_reading_the_whole_log(cut, monkeypatch):
    monkeypatch.setattr(jobs, "POLL_S", 0.0)
    client = FakeJobs(job_log(50), cut)
    events, summary = follow(client)
    assert [e["key"] for e in events] == [f"k{i}" for i in range(50)]
    assert summary == {"study_id": "s", "state": "succeeded"}
    assert client.full_reads == 1  # one final catch-up read at the end, not one per second


def test_follow_after_a_broken_stream_resumes_without_repeating_or_losing_events(monkeypatch):
    monkeypatch.setattr(jobs, "POLL_S", 0.0)
    client = FakeJobs(job_log(30), cut=13, break_after=40)
    events, summary = follow(client)
    assert [e["key"] for e in events] == [f"k{i}" for i in range(30)]
    assert summary["state"] == "succeeded"


def test_log_lines_catch_up_feeds_only_what_was_not_seen():
    got: list[dict] = []
    lines = jobs.LogLines(got.append)
    text = job_log(3)
    lines.feed(text[:40])
    lines.catch_up(text)
    lines.catch_up(text)  # nothing new
    assert [e["key"] for e in got] == ["k0", "k1", "k2"]
