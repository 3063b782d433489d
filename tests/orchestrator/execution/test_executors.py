"""The inline executor's contract (the one the scheduler relies on from every executor), and the CPU count
a local Ray is started with. No Ray is started here."""

from __future__ import annotations

import io
import os

import pytest

from orchestrator.execution import ray_session
from orchestrator.execution.executors import InlineExecutor
from orchestrator.execution.executors import inline as inline_module
from orchestrator.execution.ray_session import available_cpus
from orchestrator.spec.models import StageResources
from orchestrator.stages.base import Stage
from orchestrator.stages.worker import execute_stage


def stage(name: str, kind: str = "dataset") -> Stage:
    return Stage(kind, {"name": name}, {}, name)


class Runner:
    """Records what it was called with; raises for labels in `fail`."""

    def __init__(self, fail=()):
        self.calls: list[tuple] = []
        self.fail = set(fail)

    def __call__(self, st, store_root, cpus, gpus, runtime):
        self.calls.append((st.key, store_root, cpus, gpus, runtime))
        if st.label in self.fail:
            raise ValueError(f"bad {st.label}")
        return {"key": st.key, "label": st.label}


def test_stages_finish_in_the_order_submitted_with_their_resources(tmp_path):
    run = Runner()
    ex = InlineExecutor(str(tmp_path), {"compile": False}, run)
    a, b, c = stage("a"), stage("b"), stage("c")
    ex.submit(a, StageResources(cpus=2))
    ex.submit(b, StageResources(cpus=1, gpus=0.5))
    ex.submit(c, StageResources())
    assert ex.running() == 3 and run.calls == []  # nothing runs until a finished one is asked for
    assert ex.next_done(timeout=0.1) == (a.key, {"key": a.key, "label": "a"})
    assert ex.running() == 2
    assert ex.next_done(timeout=0.1)[0] == b.key
    assert ex.next_done(timeout=0.1)[0] == c.key
    assert ex.running() == 0 and ex.next_done(timeout=0.1) is None
    assert run.calls == [(a.key, str(tmp_path), 2, 0.0, {"compile": False}),
                         (b.key, str(tmp_path), 1, 0.5, {"compile": False}),
                         (c.key, str(tmp_path), 1.0, 0.0, {"compile": False})]


def test_an_exception_is_the_outcome_not_raised(tmp_path):
    ex = InlineExecutor(str(tmp_path), {}, Runner(fail={"bad"}))
    bad, good = stage("bad"), stage("good")
    ex.submit(bad, StageResources())
    ex.submit(good, StageResources())
    key, outcome = ex.next_done(timeout=0.1)
    assert key == bad.key and isinstance(outcome, ValueError) and str(outcome) == "bad bad"
    assert ex.next_done(timeout=0.1) == (good.key, {"key": good.key, "label": "good"})  # the next still runs


def test_cancel_drops_one_queued_stage_or_all(tmp_path):
    run = Runner()
    ex = InlineExecutor(str(tmp_path), {}, run)
    a, b, c = stage("a"), stage("b"), stage("c")
    for s in (a, b, c):
        ex.submit(s, StageResources())
    ex.cancel(b.key)
    assert ex.running() == 2
    assert [ex.next_done(0.1)[0], ex.next_done(0.1)[0]] == [a.key, c.key]
    assert [k for k, *_ in run.calls] == [a.key, c.key]  # the cancelled stage never ran
    ex.cancel("no-such-key")  # nothing queued by that key: nothing changes
    for s in (a, b):
        ex.submit(s, StageResources())
    ex.cancel()
    assert ex.running() == 0 and ex.next_done(0.1) is None and len(run.calls) == 2


def test_a_stage_that_drives_ray_gets_a_local_ray_first_and_others_do_not(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(inline_module, "ensure_ray", lambda address, num_cpus: started.append((address, num_cpus)))
    ex = InlineExecutor(str(tmp_path), {}, Runner())
    ex.submit(stage("plain"), StageResources())
    ex.next_done(0.1)
    assert started == []
    search = stage("s", kind="search")
    assert search.record.needs_ray
    ex.submit(search, StageResources())
    assert ex.next_done(0.1)[0] == search.key
    assert started == [(None, None)]


def test_why_pending_names_the_inline_queue(tmp_path):
    assert "inline" in InlineExecutor(str(tmp_path), {}).why_pending(StageResources())


def test_the_default_runner_is_the_worker_entry_point(tmp_path):
    assert InlineExecutor(str(tmp_path), {}).run is execute_stage


# --- available_cpus: affinity, capped by a cgroup quota ------------------------------------------

def test_available_cpus_is_at_least_one_and_at_most_the_machine():
    n = available_cpus()
    assert isinstance(n, int) and 1 <= n <= (os.cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        assert n <= len(os.sched_getaffinity(0))


def fake_cgroup(monkeypatch, files: dict[str, str], affinity: int = 8):
    """`available_cpus` reading these cgroup files (any other path: absent) on a machine of `affinity` CPUs."""
    def fake_open(path, *args, **kwargs):
        if path in files:
            return io.StringIO(files[path])
        raise FileNotFoundError(path)
    monkeypatch.setattr(ray_session, "open", fake_open, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)


@pytest.mark.parametrize("files, expected", [
    ({}, 8),  # no cgroup limit: the affinity mask
    ({"/sys/fs/cgroup/cpu.max": "max 100000\n"}, 8),  # v2, unlimited
    ({"/sys/fs/cgroup/cpu.max": "200000 100000\n"}, 2),  # v2, two CPUs
    ({"/sys/fs/cgroup/cpu.max": "250000 100000\n"}, 2),  # v2, 2.5 CPUs: whole CPUs only
    ({"/sys/fs/cgroup/cpu.max": "50000 100000\n"}, 1),  # v2, half a CPU: still one
    ({"/sys/fs/cgroup/cpu.max": "1600000 100000\n"}, 8),  # a quota above the mask: the mask
    ({"/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "300000\n", "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n"}, 3),
    ({"/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1\n", "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n"}, 8),
    ({"/sys/fs/cgroup/cpu.max": "garbage\n"}, 8),  # unreadable: no limit assumed
], ids=["none", "v2-max", "v2-2", "v2-2.5", "v2-0.5", "v2-above", "v1-3", "v1-unlimited", "v2-garbage"])
def test_available_cpus_honours_a_cgroup_quota(monkeypatch, files, expected):
    fake_cgroup(monkeypatch, files)
    assert available_cpus() == expected
