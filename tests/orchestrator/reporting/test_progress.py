"""The live view's model: counts per kind and state from an O(1) start event and self-describing stage events."""

from orchestrator.reporting.progress import StudyProgress


def test_progress_from_start_counts_and_stage_events():
    p = StudyProgress()
    p.start({"ptm": {"pending": 2, "cached": 1}, "evaluate": {"pending": 4}})
    assert p.total() == 7 and p.finished() == 1
    p.stage("ptm-1", "running", kind="ptm", label="ptm 1")
    p.stage("ptm-1", "executed", 30.0, kind="ptm", label="ptm 1")
    assert p.stage("unknown", "running") is None  # an event naming no kind: not counted
    assert dict(p.counts())["ptm"][:4] == [1, 0, 1, 1]  # pending, running, executed, cached
    assert p.finished() == 2 and p.stages["ptm-1"] == {"kind": "ptm", "label": "ptm 1", "state": "executed"}
    left, unknown = p.eta_seconds(now=p.started + 30.0)
    assert left == 30.0 and unknown  # one ptm left at 30 s; evaluations not timed yet
    assert p.state_counts() == {"total": 7, "pending": 5, "running": 0, "executed": 1, "cached": 1, "reused": 0,
                                "failed": 0, "skipped": 0}


def test_progress_loaded_from_a_record_counts_every_stage():
    p = StudyProgress()
    p.load({"a": {"kind": "ptm", "label": "a", "state": "cached"}, "b": {"kind": "distill", "label": "b", "state": "failed"}})
    assert p.total() == 2 and p.finished() == 2
    p.stage("b", "running")
    assert p.state_counts()["running"] == 1 and p.state_counts()["failed"] == 0
