"""The CLI as a user meets it: real subprocesses, exit codes, no tracebacks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # real subprocesses (and Ray, MLflow): CI runs them all

ROOT = Path(__file__).parents[2]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def ddray(*args, cwd=None, **env):
    return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def write_spec(tmp_path, mutate):
    data = yaml.safe_load(QUICKSTART.read_text())
    mutate(data)
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_help_lists_every_command():
    r = ddray("--help")
    assert r.returncode == 0
    for cmd in ("study", "dataset", "ui", "evaluate", "list"):
        assert cmd in r.stdout
    r = ddray("study", "--help")
    for cmd in ("validate", "submit", "status", "list", "results", "report", "compare", "logs"):
        assert cmd in r.stdout


def test_validate_quickstart():
    r = ddray("study", "validate", QUICKSTART)
    assert r.returncode == 0, r.stderr
    assert "valid" in r.stdout and "distill 12" in r.stdout and "evaluate 24" in r.stdout  # + the random subsets


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.update(distilation=d.pop("distillation")), "distilation: unknown key (did you mean 'distillation'?)"),
    (lambda d: d["distillation"].update(ipc=[1, -10]), "distillation.ipc[1]: must be >= 1"),
    (lambda d: d["evaluation"]["architectures"].append("resnet99"), "evaluation.architectures[2].name: unknown architecture"),
    (lambda d: d["distillation"].update(methods=["dm", "gm"]), "distillation.methods[1]: unknown method 'gm'"),
    (lambda d: d["distillation"].update(debias=["none", {"kind": "kde", "temprature": 2}]),
     "distillation.debias[1].temprature: unknown option (did you mean 'temperature'?)"),
])
def test_validate_bad_spec_exits_2_with_one_line(tmp_path, mutate, field):
    r = ddray("study", "validate", write_spec(tmp_path, mutate))
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert field in lines[0]
    assert "Traceback" not in r.stderr + r.stdout


DEBIAS = ROOT / "configs" / "biased-dd" / "debias.yaml"


@pytest.mark.parametrize("profile", [None, "findings", "smoke"])
def test_the_debias_config_validates_in_every_profile(profile):
    r = ddray("study", "validate", DEBIAS, *(["--profile", profile] if profile else []))
    assert r.returncode == 0, r.stderr
    assert "weights" in r.stdout and "weights 0" not in r.stdout


def test_missing_spec_and_unknown_study_exit_2(tmp_path):
    r = ddray("study", "validate", tmp_path / "none.yaml")
    assert r.returncode == 2 and "spec file not found" in r.stderr
    r = ddray("study", "status", "nope", "--store", tmp_path / "store")
    assert r.returncode == 2 and "study 'nope' not found" in r.stderr
    assert "Traceback" not in r.stderr


def test_unreachable_tracking_server_exits_2_before_writing(tmp_path):
    spec = write_spec(tmp_path, lambda d: d.update(tracking={"uri": "http://127.0.0.1:9"}))
    r = ddray("study", "submit", spec, "--store", tmp_path / "store", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "tracking.uri: cannot reach the tracking server 'http://127.0.0.1:9'" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "store").exists()


def test_results_format_is_checked(tmp_path):
    r = ddray("study", "results", "x", "--format", "xml", "--store", tmp_path)
    assert r.returncode == 2 and "--format" in r.stderr


def test_dataset_build_json_and_cache(tmp_path):
    args = ("dataset", "build", "--source", "digits", "--bias", "colored", "--aligned-ratio", "0.8",
            "--severity", "2", "--json", "--store", tmp_path / "store")
    first = ddray(*args)
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout.strip().splitlines()[-1])
    assert out["cached"] is False
    assert sum(out["train_aligned"]) + sum(out["train_conflicting"]) == 1347
    assert sum(out["test_aligned"]) == 0 and sum(out["test_conflicting"]) == 450
    second = json.loads(ddray(*args).stdout.strip().splitlines()[-1])
    assert second["cached"] is True and second["train_aligned"] == out["train_aligned"]
    shown = ddray("dataset", "show", out["key"], "--png", tmp_path / "grid.png", "--store", tmp_path / "store")
    assert shown.returncode == 0, shown.stderr
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    # by source and parameters, whatever the study named it; a file only when asked for
    by_source = ddray("dataset", "show", "digits[p=0.8,s=2]", "--store", tmp_path / "store", cwd=tmp_path)
    assert by_source.returncode == 0 and out["key"] in by_source.stdout, by_source.stderr
    assert not list(tmp_path.glob("*_grid.png"))
    typo = ddray("dataset", "show", "digit[p=0.8,s=2]", "--store", tmp_path / "store")
    assert typo.returncode == 2 and "(did you mean 'digits[p=0.8,s=2]'?)" in typo.stderr


def test_version_and_what_a_spec_can_name():
    assert ddray("--version").stdout.startswith("ddray ")
    methods = json.loads(ddray("list", "methods", "--json").stdout)
    assert {"dc", "dsa", "dm", "mtt", "random", "whole"} <= {m["name"] for m in methods}
    assert next(m for m in methods if m["name"] == "mtt")["options"]["syn_steps"] == "30"
    archs = json.loads(ddray("list", "architectures", "--json").stdout)
    assert "width" in next(a for a in archs if a["name"] == "convnet")["options"]
    bad = ddray("list", "archs")
    assert bad.returncode == 2, bad.stderr
    # one line naming the unknown kind and what it could be: a suggestion, or (none close) the known kinds
    assert "list: unknown kind 'archs' (" in bad.stderr and "architectures" in bad.stderr, bad.stderr
    assert "did you mean" in bad.stderr or "known: " in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr


def test_dataset_build_bad_flag_exits_2(tmp_path):
    r = ddray("dataset", "build", "--source", "digits", "--aligned-ratio", "1.5", "--store", tmp_path)
    assert r.returncode == 2 and "--aligned-ratio: must be <= 1.0" in r.stderr


def test_missing_dataset_offline_exits_2_naming_it(tmp_path):
    r = ddray("dataset", "build", "--source", "cifar10", "--bias", "corrupted", "--store", tmp_path / "store",
              "--data-root", tmp_path / "empty", DDRAY_OFFLINE="1", DDRAY_DATA=str(tmp_path / "empty"),
              HOME=str(tmp_path))
    assert r.returncode == 2, r.stderr
    assert "dataset 'cifar10' not found locally" in r.stderr and "downloads are off" in r.stderr
    assert "Traceback" not in r.stderr
    assert not list((tmp_path / "store").rglob("manifest.json"))


def test_damaged_stored_dataset_is_detected_and_rebuilt(tmp_path):
    args = ("dataset", "build", "--source", "digits", "--aligned-ratio", "0.5", "--json", "--store", tmp_path / "s")
    first = json.loads(ddray(*args).stdout.strip().splitlines()[-1])
    stored = next((tmp_path / "s" / "stages" / "dataset").glob("*/dataset.pt"))
    stored.write_bytes(stored.read_bytes()[:1000])  # truncated, as a crashed copy would be
    again = ddray(*args)
    assert again.returncode == 0, again.stderr
    rebuilt = json.loads(again.stdout.strip().splitlines()[-1])
    assert rebuilt["cached"] is False and rebuilt["train_aligned"] == first["train_aligned"]
    assert list((tmp_path / "s" / "quarantine").iterdir())  # the damaged copy is kept aside, never used


def start_ui(db: Path, port: int, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli.main", "ui", "--tracking-uri", f"sqlite:///{db}",
                             "--port", str(port)], cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def ui_answer(port: int, proc: subprocess.Popen) -> str | None:
    """The experiments the UI on `port` lists, once it answers (None if `proc` ends or a minute passes)."""
    import time
    import urllib.request

    for _ in range(120):
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search?max_results=10",
                                          timeout=2).read().decode()
        except OSError:
            if proc.poll() is not None:
                return None
            time.sleep(0.5)
    return None


def stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass


def probe_db(tmp_path: Path) -> Path:
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").create_experiment("probe")
    return db


def test_ui_serves_mlflow_on_localhost(tmp_path):
    import socket
    import time

    db = probe_db(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_ui(db, port, tmp_path)
    try:
        body = ui_answer(port, proc)
        assert body is not None and "probe" in body
        busy = ddray("ui", "--tracking-uri", f"sqlite:///{db}", "--port", port, cwd=tmp_path)
        assert busy.returncode == 2 and busy.stderr.strip() == f"error: --port: 127.0.0.1:{port} is in use " \
                                                              "(choose another with --port)"
        proc.send_signal(15)  # SIGTERM to ddray alone: it stops the server it started, workers included
        assert proc.wait(timeout=60) == 0
        time.sleep(1)
        with socket.socket() as s:  # nothing is left listening on the port (closed connections may linger)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
    finally:
        stop_group(proc)


def test_ui_takes_a_port_whose_last_connections_are_still_closing(tmp_path):
    """Restarting `ddray ui` at once: the old server's closed connections (TIME_WAIT, about a minute)
    hold the port for a plain bind, but nothing listens there, so it is not busy."""
    import socket

    db = probe_db(tmp_path)
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server side closes first, as an HTTP server does: its end waits in TIME_WAIT
    client.recv(1)
    client.close()
    server.close()
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # the state this test is about
    proc = start_ui(db, port, tmp_path)
    try:
        body = ui_answer(port, proc)
        assert body is not None and "probe" in body, proc.stderr.read().decode() if proc.poll() is not None else ""
        proc.send_signal(15)
        assert proc.wait(timeout=60) == 0
    finally:
        stop_group(proc)


def test_ui_without_database_exits_2(tmp_path):
    r = ddray("ui", "--tracking-uri", f"sqlite:///{tmp_path}/none.db", cwd=tmp_path)
    assert r.returncode == 2 and "no such database" in r.stderr


def test_unreachable_ray_cluster_exits_2_quickly(tmp_path):
    r = ddray("study", "submit", QUICKSTART, "--address", "127.0.0.1:9", "--store", tmp_path / "store", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "ray: cannot reach cluster '127.0.0.1:9'" in r.stderr and "Traceback" not in r.stderr
    assert not list((tmp_path / "store").rglob("manifest.json"))


def test_resources_larger_than_the_cluster_exit_2(tmp_path):
    spec = write_spec(tmp_path, lambda d: d.update(resources={"distill": {"cpus": 1, "gpus": 1}}))
    r = ddray("study", "submit", spec, "--num-cpus", "1", "--store", tmp_path / "store", cwd=tmp_path,
              CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 2, r.stderr
    assert "resources.distill.gpus: 1 requested but the largest Ray node has 0" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_huge_option_grid_is_refused_by_validate_in_one_line_without_enumerating_it(tmp_path):
    """5 MTT options x 40 values (102,400,000 points, a few KB of YAML) through `--max-stages 10`: counted
    from the spec, refused before any point is built (the timeout only guards against a hang)."""
    def mutate(d):
        d["ptm_pools"].append({"name": "experts", "dataset": d["datasets"][0]["name"], "architectures": ["convnet"],
                               "recipe": "expert", "epochs": 3})
        d["distillation"].update(methods=["dm", "mtt"], trajectories="experts", options={"mtt": {
            "syn_steps": list(range(1, 41)), "expert_epochs": list(range(1, 41)),
            "max_start_epoch": list(range(1, 41)), "lr_lr": [i * 1e-6 for i in range(1, 41)],
            "lr_teacher": [i * 1e-3 for i in range(1, 41)]}})
    spec = write_spec(tmp_path, mutate)
    r = subprocess.run([sys.executable, "-m", "cli.main", "study", "validate", str(spec), "--max-stages", "10"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       timeout=60, check=False)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert "distillation.options.mtt: the option grid has 102,400,000 points" in lines[0]
    assert "more than --max-stages 10" in lines[0] and "Traceback" not in r.stderr + r.stdout


def test_results_and_report_on_a_damaged_store_are_one_line_not_an_internal_error(tmp_path):
    from tests.orchestrator.execution.test_damaged import damaged_study

    spec, *_ = damaged_study(tmp_path)
    for args in (("results", spec.study_id), ("report", spec.study_id, "--out", tmp_path / "report", "--no-log")):
        r = ddray("study", *args, "--store", tmp_path / "store", cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, r.stderr
        assert "damaged" in lines[0] and "resubmit" in lines[0] and "internal error" not in r.stderr
