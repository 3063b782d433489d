"""Tracking on a real server: `mlflow server` backed by PostgreSQL on 127.0.0.1, a tiny study logged over
HTTP, its runs read back from the server. Real processes; slow."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.servers import mlflow_server, postgres_server
from tests.test_faults import ddray

pytestmark = pytest.mark.slow


def test_a_study_logs_to_an_mlflow_server_on_postgresql_and_a_resubmit_adds_no_run(tmp_path):
    from mlflow.tracking import MlflowClient

    spec = tmp_path / "pg.yaml"
    spec.write_text(yaml.safe_dump({
        "version": 1, "name": "pg",
        "datasets": [{"name": "cdigits", "source": "digits", "bias": "colored", "aligned_ratios": [0.95]}],
        "distillation": {"methods": ["dm"], "ipc": [1], "iterations": 12, "log_every": 4,
                         "arch": {"name": "convnet", "width": 8}, "batch_real": 16},
        "evaluation": {"architectures": [{"name": "convnet", "width": 8}], "repeats": 1, "epochs": 4,
                       "checkpoints": 2},
    }))
    with postgres_server() as db, mlflow_server(db) as (uri, _):
        store = tmp_path / "store"
        r = ddray("study", "submit", spec, "--store", store, "--tracking-uri", uri, "--json", "--num-cpus", "2")
        assert r.returncode == 0, r.stderr[-3000:]
        summary = json.loads(r.stdout.strip().splitlines()[-1])
        assert summary["state"] == "succeeded" and summary["not_logged"] == 0
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("ddray/pg")
        runs = client.search_runs([exp.experiment_id])
        stages = [r for r in runs if "ddray.stage_key" in r.data.tags]
        assert len(stages) == summary["stages"]["total"] and {r.info.status for r in runs} == {"FINISHED"}
        dm = next(r for r in stages if r.data.tags.get("ddray.method") == "dm" and r.data.tags["ddray.stage_kind"] == "distill")
        assert [m.step for m in client.get_metric_history(dm.info.run_id, "loss_dm")] == [0, 4, 8, 11]
        again = ddray("study", "submit", spec, "--store", store, "--tracking-uri", uri, "--json")
        assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1])["stages"]["executed"] == 0
        assert len(client.search_runs([exp.experiment_id])) == len(runs)
