"""Faults injected for real on a 63-stage study: signals to workers and drivers, concurrent submits,
a tracking server stopped mid-study. Executions are counted from the store's attempt files, not timed.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.storage.studies import events_since
from tests.servers import free_port, mlflow_server, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
TOTAL = 63  # 3 datasets, 6 PTMs, 18 distillations, 36 evaluations


def spec_text(name="faults", iterations=30, eval_epochs=2) -> str:
    return yaml.safe_dump({
        "version": 1, "name": name,
        "datasets": [{"name": "cdigits", "source": "digits", "bias": "colored", "aligned_ratios": [0.1, 0.5, 0.95]}],
        "ptm_pools": [{"name": "pool", "dataset": "cdigits", "architectures": [{"name": "convnet", "width": 8}],
                       "seeds": [0, 1], "epochs": 1}],
        "distillation": {"methods": ["random", "dm"], "ipc": [1, 2], "iterations": iterations,
                         "arch": {"name": "convnet", "width": 8}, "batch_real": 16,
                         "guidance": ["none", {"kind": "clom", "pool": "pool", "alpha": 0.1}]},
        "evaluation": {"architectures": [{"name": "convnet", "width": 8}, "mlp"], "repeats": 1,
                       "epochs": eval_epochs, "checkpoints": 1},
    })


@pytest.fixture
def study(tmp_path):
    """A spec file, a store and a SQLite tracking URI in a fresh directory."""
    def make(name="faults", **kw):
        path = tmp_path / f"{name}.yaml"
        path.write_text(spec_text(name, **kw))
        return path
    return make, tmp_path / "store", f"sqlite:///{tmp_path}/mlflow.db"


def env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "token", **extra}


def submit(spec: Path, store: Path, uri: str, *args, log: Path | None = None, **extra) -> subprocess.Popen:
    """`ddray study submit` as a user runs it, in its own session (so its Ray processes can be reaped)."""
    out = open(log or spec.with_suffix(f".{time.time_ns()}.log"), "w")
    return subprocess.Popen([sys.executable, "-m", "cli.main", "study", "submit", str(spec), "--json", "--store",
                             str(store), "--tracking-uri", uri, "--num-cpus", "2", *args],
                            cwd=spec.parent, env=env(**extra), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def ddray(*args, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env(**extra), timeout=600)


def reap(p: subprocess.Popen) -> None:
    """Kill what the driver's session left (Ray's agents), once the driver itself is gone."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def finish(p: subprocess.Popen, timeout=600) -> int:
    try:
        p.wait(timeout=timeout)
    finally:
        reap(p)
    return p.returncode


def last_json(log: Path) -> dict:
    return json.loads([line for line in log.read_text().splitlines() if line.startswith("{")][-1])


def study_dir(store: Path) -> Path:
    (d,) = list((store / "studies").glob("*"))
    return d


def events(store: Path) -> list[dict]:
    # The product's reader: a line the driver is still writing is skipped, not misread.
    return [e for d in (store / "studies").glob("*") for e in events_since(d, 0)]


def executed(store: Path) -> set[str]:
    return {e["key"] for e in events(store) if e["state"] == "executed"}


def attempts(store: Path) -> dict[str, int]:
    return {d.name: len(list(d.glob("*.json"))) for d in (store / "attempts").glob("*")}


def finished_runs(uri: str, experiment: str = "ddray/faults") -> tuple[collections.Counter, list, list]:
    """(FINISHED runs per stage key, parent runs, runs still RUNNING)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=50000)
    per_key = collections.Counter(r.data.tags["ddray.stage_key"] for r in runs
                                  if r.info.status == "FINISHED" and "ddray.stage_key" in r.data.tags)
    parents = [r for r in runs if r.data.tags.get("ddray.role") == "study"]
    running = [r for r in runs if r.info.status == "RUNNING"]
    return per_key, parents, running


def assert_one_finished_run_per_stage(uri: str, experiment: str = "ddray/faults") -> None:
    per_key, parents, running = finished_runs(uri, experiment)
    assert len(per_key) == TOTAL and set(per_key.values()) == {1}, per_key.most_common(3)
    assert len(parents) == 1 and not [r for r in running if r.data.tags.get("ddray.role") != "study"]


def ray_worker_running(label: str) -> list:
    import psutil

    # Ray titles a worker "ray::<task name>" while it runs that task (padded with spaces)
    return [p for p in psutil.process_iter(["cmdline"]) if " ".join(p.info["cmdline"] or []).strip() == f"ray::{label}"]


# --- the faults ---------------------------------------------------------------------------------

def test_resubmit_of_a_study_with_more_than_50_stages_adds_no_mlflow_run(study):
    make, store, uri = study
    spec = make()
    log = spec.with_suffix(".first.log")
    assert finish(submit(spec, store, uri, log=log)) == 0, log.read_text()[-2000:]
    assert last_json(log)["stages"]["executed"] == TOTAL
    assert_one_finished_run_per_stage(uri)
    log2 = spec.with_suffix(".second.log")
    assert finish(submit(spec, store, uri, log=log2)) == 0, log2.read_text()[-2000:]
    assert last_json(log2)["stages"] == {"total": TOTAL, "executed": 0, "cached": TOTAL, "failed": 0}
    assert_one_finished_run_per_stage(uri)  # the parent was found among more than 50 children, nothing re-logged
    assert set(attempts(store).values()) == {1}


def test_a_sigkilled_worker_is_retried_and_the_study_succeeds(study):
    make, store, uri = study
    spec = make(iterations=200)  # distillations of a few seconds: a window to kill one in
    victim = "dm ipc2 none on cdigits[p=0.5,s=1]"
    log = spec.with_suffix(".log")
    p = submit(spec, store, uri, log=log)
    try:
        procs = wait_for(lambda: ray_worker_running(victim), what=f"a worker running {victim}", every=0.02)
        procs[0].send_signal(signal.SIGKILL)
        assert p.wait(timeout=600) == 0, log.read_text()[-2000:]
    finally:
        reap(p)
    summary = last_json(log)
    assert summary["state"] == "succeeded" and summary["stages"]["executed"] == TOTAL
    assert summary["retried"] == {victim: 2}
    counts = attempts(store)
    assert sum(counts.values()) == TOTAL + 1 and max(counts.values()) == 2  # only the killed stage ran twice
    assert_one_finished_run_per_stage(uri)


def test_a_sigkilled_driver_then_resubmit_redoes_no_finished_stage(study):
    make, store, uri = study
    spec = make(iterations=100)
    p = submit(spec, store, uri)
    try:
        wait_for(lambda: len(executed(store)) >= 20, what="20 executed stages")
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        reap(p)
    done_before = executed(store)
    status = ddray("study", "status", "faults", "--store", store, "--json")
    assert json.loads(status.stdout)["state"] == "abandoned"  # not "running" forever
    log = spec.with_suffix(".resubmit.log")
    assert finish(submit(spec, store, uri, log=log)) == 0, log.read_text()[-2000:]
    counts = attempts(store)
    assert all(counts[k] == 1 for k in done_before)  # nothing that had finished ran again
    assert set(counts) == set(json.loads((study_dir(store) / "record.json").read_text())["stages"])
    assert last_json(log)["stages"]["executed"] + len(done_before) >= TOTAL - 2  # (at most the 2 in flight redone)
    assert_one_finished_run_per_stage(uri)


def test_two_concurrent_submits_of_one_spec_compute_each_stage_once(study):
    make, store, uri = study
    spec = make(iterations=60)
    logs = [spec.with_suffix(f".{i}.log") for i in range(2)]
    procs = [submit(spec, store, uri, "--num-cpus", "1", log=log) for log in logs]
    codes = [finish(p) for p in procs]
    assert codes == [0, 0], [log.read_text()[-1500:] for log in logs]
    counts = attempts(store)
    assert len(counts) == TOTAL and set(counts.values()) == {1}  # each stage computed once, by one of them
    summaries = [last_json(log) for log in logs]
    assert sum(s["stages"]["executed"] for s in summaries) == TOTAL
    assert all(s["state"] == "succeeded" for s in summaries)
    sync = ddray("study", "sync", "faults", "--store", store, "--tracking-uri", uri, "--json")
    assert sync.returncode == 0, sync.stderr
    assert_one_finished_run_per_stage(uri)


def test_two_specs_sharing_a_ptm_pool_train_it_once(study):
    make, store, uri = study
    a, b = make("share-a", iterations=40), make("share-b", iterations=40, eval_epochs=3)
    logs = [a.with_suffix(".log"), b.with_suffix(".log")]
    procs = [submit(a, store, uri, "--num-cpus", "1", log=logs[0]), submit(b, store, uri, "--num-cpus", "1", log=logs[1])]
    assert [finish(p) for p in procs] == [0, 0], [log.read_text()[-1500:] for log in logs]
    ptms = [d for d in (store / "stages" / "ptm").iterdir() if not d.name.startswith(".")]
    counts = attempts(store)
    assert len(ptms) == 6 and all(counts[d.name] == 1 for d in ptms)
    datasets = [d for d in (store / "stages" / "dataset").iterdir() if not d.name.startswith(".")]
    assert all(counts[d.name] == 1 for d in datasets)
    assert set(counts.values()) == {1}


def test_a_tracking_server_stopped_mid_study_loses_nothing_and_sync_fills_the_runs(study, tmp_path):
    make, store, _ = study
    spec = make(iterations=60)
    db, port = f"sqlite:///{tmp_path}/server.db", free_port()
    log = spec.with_suffix(".log")
    with mlflow_server(db, port) as (uri, server):
        p = submit(spec, store, uri, log=log, MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
        try:
            wait_for(lambda: len(executed(store)) >= 15, what="15 executed stages")
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
            assert p.wait(timeout=600) == 0, log.read_text()[-2000:]
        finally:
            reap(p)
    summary = last_json(log)
    assert summary["state"] == "succeeded" and summary["stages"]["executed"] == TOTAL
    assert summary["not_logged"] > 0 and f"ddray study sync {summary['study_id']}" in log.read_text()
    with mlflow_server(db, port) as (uri, _):
        sync = ddray("study", "sync", summary["study_id"], "--store", store, "--json")
        assert sync.returncode == 0, sync.stderr
        assert_one_finished_run_per_stage(uri)
        per_key, parents, _ = finished_runs(uri)
        assert parents[0].info.status == "FINISHED"


@pytest.mark.parametrize("sig, code, state", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_sigterm_and_ctrl_c_leave_final_states(study, sig, code, state):
    make, store, uri = study
    spec = make(iterations=100)
    p = submit(spec, store, uri)
    try:
        wait_for(lambda: len(executed(store)) >= 10, what="10 executed stages")
        os.kill(p.pid, sig)
        assert p.wait(timeout=120) == code
    finally:
        reap(p)
    status = json.loads(ddray("study", "status", "faults", "--store", store, "--json").stdout)
    assert status["state"] == state
    assert status["counts"]["running"] == 0  # every running stage went back to pending
    assert not list((store / "leases").glob("*.json"))
    per_key, parents, running = finished_runs(uri)
    assert not running and len(parents) == 1 and parents[0].info.status == "KILLED"
    assert set(per_key.values()) == {1}


def test_study_cancel_stops_a_running_study(study):
    make, store, uri = study
    spec = make(iterations=100)
    log = spec.with_suffix(".log")
    p = submit(spec, store, uri, log=log)
    try:
        wait_for(lambda: len(executed(store)) >= 5, what="5 executed stages")
        r = ddray("study", "cancel", "faults", "--store", store)
        assert r.returncode == 0 and "cancel requested" in r.stdout, r.stderr
        assert p.wait(timeout=120) == 1
    finally:
        reap(p)
    assert last_json(log)["state"] == "cancelled"
    status = json.loads(ddray("study", "status", "faults", "--store", store, "--json").stdout)
    assert status["state"] == "cancelled" and status["counts"]["running"] == 0


def test_a_stage_kind_timeout_fails_those_stages_and_skips_their_dependents(study):
    make, store, uri = study
    spec = make(iterations=3000)  # distillations of a minute and more
    data = yaml.safe_load(spec.read_text())
    data["resources"] = {"distill": {"timeout_s": 2}}
    data["distillation"]["methods"] = ["dm"]
    spec.write_text(yaml.safe_dump(data))
    log = spec.with_suffix(".log")
    assert finish(submit(spec, store, uri, log=log)) == 1, log.read_text()[-2000:]
    status = json.loads(ddray("study", "status", "faults", "--store", store, "--json").stdout)
    distills = [s for s in status["stages"].values() if s["kind"] == "distill"]
    assert distills and all(s["state"] == "failed" and s["error"] == "timed out after 2 s" for s in distills)
    assert all(s["state"] == "skipped" for s in status["stages"].values() if s["kind"] == "evaluate")
    assert status["counts"]["executed"] == 9  # the datasets and PTMs are kept
