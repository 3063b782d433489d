"""Studies beyond one Ray node: two nodes on this machine (one lost mid-study), the Jobs API of a head
with token auth, a store on S3 (moto), and warm actors against tasks. All real processes; slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from tests.servers import moto_s3, ray_head, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
TOKEN = "ddray-test-token-0123456789abcdef"


def tiny(name="cluster", iterations=40, **resources) -> dict:
    data = {
        "version": 1, "name": name,
        "datasets": [{"name": "cdigits", "source": "digits", "bias": "colored", "aligned_ratios": [0.1, 0.95]}],
        "ptm_pools": [{"name": "pool", "dataset": "cdigits", "architectures": [{"name": "convnet", "width": 8}],
                       "seeds": [0, 1], "epochs": 1}],
        "distillation": {"methods": ["dm"], "ipc": [1, 2], "iterations": iterations,
                         "arch": {"name": "convnet", "width": 8}, "batch_real": 16,
                         "guidance": ["none", {"kind": "clom", "pool": "pool", "alpha": 0.1}]},
        "evaluation": {"architectures": [{"name": "convnet", "width": 8}], "repeats": 1, "epochs": 2,
                       "checkpoints": 1, "random_baseline": False},  # orchestration under test, not baselines
    }
    if resources:
        data["resources"] = resources
    return data


TOTAL = 2 + 4 + 8 + 8  # datasets, PTMs, distillations, evaluations


def executed_nodes(store: Path) -> dict[str, str]:
    """stage key -> Ray node id recorded by the stage itself."""
    out = {}
    for result in store.glob("stages/*/*/result.json"):
        data = json.loads(result.read_text())
        out[data["key"]] = data["run"]["node"]
    return out


def attempts(store: Path) -> dict[str, int]:
    return {d.name: len(list(d.glob("*.json"))) for d in (store / "attempts").glob("*")}


@pytest.fixture
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_stages_land_on_both_nodes_and_losing_one_mid_study_redoes_nothing_finished(two_nodes, tmp_path):
    import ray

    from orchestrator.execution.submit import submit_study
    from orchestrator.spec.loading import parse_spec

    cluster, worker = two_nodes
    store = tmp_path / "store"
    spec = parse_spec(tiny(iterations=150))
    outcome = {}

    def run():
        outcome["value"] = submit_study(spec, "spec", store_root=str(store), tracking_uri=f"sqlite:///{tmp_path}/m.db",
                                        address=cluster.address)

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: len(set(executed_nodes(store).values())) == 2, timeout=300, what="stages on both nodes")
    finished_before = set(executed_nodes(store))
    cluster.remove_node(worker)  # the worker node (and every stage running on it) is gone
    thread.join(timeout=600)
    result = outcome["value"]
    assert result.state == "succeeded", result.errors
    assert result.counts["executed"] == TOTAL
    counts = attempts(store)
    assert all(counts[k] == 1 for k in finished_before)  # nothing that had finished ran again
    nodes = executed_nodes(store)
    assert len(set(nodes.values())) == 2 and ray.get_runtime_context().get_node_id() in nodes.values()


def test_the_actor_path_and_the_task_path_produce_identical_stages(two_nodes, tmp_path):
    from orchestrator.execution.submit import submit_study
    from orchestrator.spec.loading import parse_spec

    cluster, _ = two_nodes
    manifests = {}
    for executor in ("tasks", "actors"):
        store = tmp_path / executor
        spec = parse_spec(tiny(executor=executor))
        out = submit_study(spec, "spec", store_root=str(store), tracking_uri=f"sqlite:///{tmp_path}/{executor}.db",
                           address=cluster.address)
        assert out.state == "succeeded" and out.counts["executed"] == TOTAL, out.errors
        manifests[executor] = {m.parent.name: {n: f["sha256"] for n, f in json.loads(m.read_text())["files"].items()
                                               if n != "result.json"}
                               for m in store.glob("stages/*/*/manifest.json")}
    assert manifests["tasks"] == manifests["actors"] and len(manifests["tasks"]) == TOTAL


@pytest.fixture
def own_ray():
    """The local Ray `submit_study` starts in this process, shut down after the test."""
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


def test_a_study_on_an_s3_store_completes_and_its_resubmit_is_fully_cached(tmp_path, own_ray):
    from orchestrator.execution.submit import submit_study
    from orchestrator.spec.loading import parse_spec

    with moto_s3(tmp_path, "ddray-study") as server:
        spec = parse_spec(tiny(name="s3"))
        kwargs = dict(store_root="s3://ddray-study/studies/one", tracking_uri=f"sqlite:///{tmp_path}/m.db",
                      num_cpus=2)
        first = submit_study(spec, "spec", **kwargs)
        assert first.state == "succeeded" and first.counts["executed"] == TOTAL, first.errors
        second = submit_study(spec, "spec", **kwargs)
        assert second.counts["cached"] == TOTAL and second.results == first.results
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        manifests = fs.glob("ddray-study/studies/one/stages/*/*/manifest.json")
        assert len(manifests) == TOTAL and server["endpoint"].startswith("http://127.0.0.1")


# --- the Jobs API -----------------------------------------------------------------------------------

def ddray(*args, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS")}
    return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**base, "PYTHONPATH": str(ROOT), **env}, timeout=900)


@pytest.fixture(scope="module")
def head():
    with ray_head(TOKEN) as address:
        yield address


def test_a_study_submitted_through_the_jobs_api_completes_and_status_reports_it(head, tmp_path):
    spec = tmp_path / "jobs.yaml"
    spec.write_text(yaml.safe_dump(tiny(name="jobs")))
    store, db = tmp_path / "store", f"sqlite:///{tmp_path}/m.db"
    r = ddray("study", "submit", spec, "--address", head, "--store", store, "--tracking-uri", db, "--json",
              RAY_AUTH_TOKEN=TOKEN)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["state"] == "succeeded" and summary["stages"]["executed"] == TOTAL
    status = ddray("study", "status", "jobs", "--address", head, "--json", RAY_AUTH_TOKEN=TOKEN)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["state"] == "succeeded"
    assert len(attempts(store)) == TOTAL  # the driver on the cluster wrote the shared store
    # a second submit is a new job that finds everything in the store; --no-wait returns at once
    r = ddray("study", "submit", spec, "--address", head, "--store", store, "--tracking-uri", db, "--no-wait",
              RAY_AUTH_TOKEN=TOKEN)
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["state"] in ("submitted", "running")
    wait_for(lambda: json.loads(ddray("study", "status", "jobs", "--address", head, "--json",
                                      RAY_AUTH_TOKEN=TOKEN).stdout)["state"] == "succeeded", timeout=300, every=1,
             what="the second job")
    logs = ddray("study", "logs", "jobs", "--address", head, RAY_AUTH_TOKEN=TOKEN)
    assert logs.returncode == 0 and "ddray-event" in logs.stdout
    # the same spec run here gives the same results as the run on the cluster
    local = ddray("study", "submit", spec, "--store", tmp_path / "local", "--tracking-uri",
                  f"sqlite:///{tmp_path}/local.db", "--num-cpus", "2")
    assert local.returncode == 0, local.stderr[-2000:]
    rows = [json.loads(ddray("study", "results", "jobs", "--store", where, "--format", "json").stdout)
            for where in (store, tmp_path / "local")]
    assert rows[0] == rows[1] and len(rows[0]) == 8  # 2 ratios x 2 IPC x 2 guidance


def test_a_head_of_another_ray_version_is_refused(head, monkeypatch):
    import ray

    from orchestrator.errors import UserError
    from orchestrator.execution.jobs import Cluster

    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    monkeypatch.setattr(ray, "__version__", "2.59.0")
    with pytest.raises(UserError) as exc:
        Cluster(head)
    assert exc.value.lines == [f"ray: the cluster at {head} runs Ray 2.60.0; this ddray uses Ray 2.59.0 "
                               "(the versions must match)"]


@pytest.mark.parametrize("env, message", [
    ({"RAY_AUTH_TOKEN": "wrong"}, "requires authentication and the token was refused"),
    ({}, "requires authentication and it needs a token"),
])
def test_a_missing_or_wrong_token_is_one_line_exit_2(head, tmp_path, env, message):
    spec = tmp_path / "jobs.yaml"
    spec.write_text(yaml.safe_dump(tiny(name="jobs")))
    r = ddray("study", "submit", spec, "--address", head, "--store", tmp_path / "s", "--tracking-uri",
              f"sqlite:///{tmp_path}/m.db", HOME=str(tmp_path), **env)  # HOME: no ~/.ray/auth_token
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr


def test_a_cluster_study_needs_paths_every_node_reaches(head, tmp_path):
    spec = tmp_path / "jobs.yaml"
    spec.write_text(yaml.safe_dump(tiny(name="jobs")))
    r = ddray("study", "submit", spec, "--address", head, "--store", "relative/store", RAY_AUTH_TOKEN=TOKEN)
    assert r.returncode == 2 and "store.root: 'relative/store' is relative" in r.stderr
