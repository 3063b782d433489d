"""Searches run for real: Ray Tune on a local Ray, trials on real digits, MLflow on SQLite; slow.

Trial executions are counted from the attempt files each trial leaves in the store
(`attempts/<search key>~<trial id>/`), never from timings.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest
import yaml

from tests.servers import wait_for
from tests.test_faults import ddray, finish, last_json, reap, submit

pytestmark = pytest.mark.slow


def write_spec(path: Path, search: dict, name: str = "search") -> Path:
    path.write_text(yaml.safe_dump({
        "version": 1, "name": name,
        "datasets": [{"name": "cdigits", "source": "digits", "bias": "colored", "aligned_ratios": [0.95]}],
        "distillation": {"methods": ["dm"], "ipc": [1], "iterations": 30, "arch": {"name": "convnet", "width": 8},
                         "batch_real": 16, "search": {"proxy": {"every": 10, "epochs": 15}, **search}},
        "evaluation": {"architectures": [{"name": "convnet", "width": 8}], "repeats": 1, "epochs": 5,
                       "checkpoints": 1},
    }))
    return path


def trial_executions(store: Path) -> dict[str, int]:
    return {d.name.split("~", 1)[1]: len(list(d.glob("*.json"))) for d in (store / "attempts").glob("search-*~*")}


def search_result(store: Path) -> dict:
    (path,) = list(store.glob("stages/search/*/result.json"))
    return json.loads(path.read_text())


def mlflow_runs(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)


def test_asha_stops_the_bad_region_early_and_trials_are_nested_runs_with_one_best(tmp_path):
    # lr_img 1e5 blows the images up: a region clearly worse than lr_img 1 at the first rung
    spec = write_spec(tmp_path / "asha.yaml", {"space": {"lr_img": {"grid": [1.0, 100000.0]}}, "num_samples": 2,
                                               "scheduler": "asha", "max_concurrent": 1})
    store, uri = tmp_path / "store", f"sqlite:///{tmp_path}/mlflow.db"
    log = tmp_path / "first.log"
    assert finish(submit(spec, store, uri, log=log)) == 0, log.read_text()[-3000:]
    (summary,) = last_json(log)["search"]
    assert summary["trials"] == 4 and summary["stopped_early"] >= 1
    assert summary["best"]["config"] == {"lr_img": 1.0}

    result = search_result(store)
    trials = result["trials"]
    stopped = [t for t in trials if t["stopped_early"]]
    assert stopped and all(t["config"]["lr_img"] == 100000.0 and t["iterations"] < 30 for t in stopped)
    complete = [t for t in trials if t["complete"]]
    best = [t for t in trials if t["best"]]
    assert len(best) == 1 and best[0]["val_acc"] == max(t["val_acc"] for t in complete)
    assert result["search"]["trial_iterations"] == sum(t["iterations"] for t in trials) < 4 * 30

    assert not (store / "searches" / result["key"]).exists()  # published: Tune's state is deleted

    runs = mlflow_runs(uri, "ddray/search")
    (stage_run,) = [r for r in runs if r.data.tags.get("ddray.stage_kind") == "search"]
    trial_runs = [r for r in runs if r.data.tags.get("ddray.trial_of") == result["key"]]
    assert len(trial_runs) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in trial_runs} == {stage_run.info.run_id}
    tagged = [r for r in trial_runs if r.data.tags.get("ddray.best_trial") == "true"]
    assert len(tagged) == 1 and tagged[0].data.tags["ddray.trial_id"] == best[0]["trial_id"]
    assert stage_run.data.params["best.lr_img"] == "1.0"
    assert {"search.png", "trials.json", "best_config.json"} <= {
        a.path for a in __import__("mlflow").tracking.MlflowClient(uri).list_artifacts(stage_run.info.run_id)}
    from mlflow.tracking import MlflowClient
    curve = MlflowClient(uri).get_metric_history(tagged[0].info.run_id, "val_acc")
    assert [m.step for m in sorted(curve, key=lambda m: m.step)] == [p["iterations"] for p in best[0]["curve"]]
    assert sum(r.data.tags.get("ddray.stopped_early") == "true" for r in trial_runs) == summary["stopped_early"]

    # the evaluation read the best trial's set; a resubmit is fully cached and runs no trial
    executions = trial_executions(store)
    log = tmp_path / "again.log"
    assert finish(submit(spec, store, uri, log=log)) == 0, log.read_text()[-3000:]
    again = last_json(log)
    assert again["stages"]["executed"] == 0 and again["search"] == [summary]
    assert trial_executions(store) == executions and set(executions.values()) == {1}
    assert len([r for r in mlflow_runs(uri, "ddray/search") if "ddray.trial_of" in r.data.tags]) == 4


def test_optuna_with_a_fixed_seed_proposes_the_same_trials_twice(tmp_path):
    search = {"space": {"lr_img": {"loguniform": [0.01, 100.0]}}, "num_samples": 4, "algorithm": "optuna",
              "seed": 7, "max_concurrent": 1}
    proposed = []
    for run in ("a", "b"):
        spec = write_spec(tmp_path / f"{run}.yaml", search)
        log = tmp_path / f"{run}.log"
        code = finish(submit(spec, tmp_path / f"store-{run}", f"sqlite:///{tmp_path}/{run}.db", log=log))
        assert code == 0, log.read_text()[-3000:]
        proposed.append([t["config"]["lr_img"] for t in search_result(tmp_path / f"store-{run}")["trials"]])
    assert len(proposed[0]) == 4 and len(set(proposed[0])) == 4
    assert proposed[0] == proposed[1]


def signed_trials(store: Path) -> set[str]:
    """The trials Tune's experiment state records as terminated, in the state as signed (`ddray-state.sig`):
    what a resume must not run again."""
    try:
        (sig,) = list(store.glob("searches/search-*/ddray-state.sig"))
        signed = dict(json.loads(sig.read_text())["files"])
        newest = max(r for r in signed if r.startswith("experiment_state-"))
        data = (sig.parent / newest).read_bytes()
        if hashlib.sha256(data).hexdigest() != signed[newest]:
            return set()  # rewritten since it was signed
        trials = [json.loads(state) for state, _ in json.loads(data)["trial_data"]]
    except (ValueError, OSError, KeyError, TypeError):
        return set()
    return {t["trial_id"] for t in trials if t.get("status") == "TERMINATED"}


def test_a_search_whose_driver_is_killed_resumes_without_rerunning_finished_trials(tmp_path):
    spec = write_spec(tmp_path / "resume.yaml", {"space": {"lr_img": {"loguniform": [0.1, 10.0]}},
                                                 "num_samples": 6, "max_concurrent": 1})
    store, uri = tmp_path / "store", f"sqlite:///{tmp_path}/mlflow.db"
    p = submit(spec, store, uri, log=tmp_path / "killed.log")
    try:
        # Tune saves its state every 10 s and the coordinator signs it within seconds: once two finished
        # trials are in the signed state, the driver is killed
        wait_for(lambda: len(signed_trials(store)) >= 2, timeout=300, every=0.2,
                 what="two finished trials in the signed state")
        done = signed_trials(store)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        reap(p)
    assert 2 <= len(done) < 6 and not list(store.glob("stages/search/*/manifest.json"))
    assert list(store.glob("searches/search-*/tuner.pkl"))  # not published: the state is kept for the resume

    log = tmp_path / "resumed.log"
    assert finish(submit(spec, store, uri, log=log)) == 0, log.read_text()[-3000:]
    (summary,) = last_json(log)["search"]
    assert summary["trials"] == 6
    executions = trial_executions(store)
    assert len(executions) == 6 and all(executions[t] == 1 for t in done)  # no finished trial ran again
    logs = "\n".join(f.read_text() for f in store.glob("attempts/search-*/*.log"))
    assert "resuming the search from" in logs and "not resuming" not in logs
    assert not list(store.glob("searches/search-*/tuner.pkl"))
    assert ddray("study", "status", "search", "--store", store, "--json").returncode == 0
