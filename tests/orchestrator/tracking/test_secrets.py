"""Secrets never at rest: one redaction for every URI and text ddray stores, uploads, logs or prints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from orchestrator.tracking.secrets import redact_data, redact_text, redact_uri, secret_name, strip_password

PLANTED = "PLANTED-SECRET-1234"


@pytest.mark.parametrize("uri, shown", [
    ("http://alice:s3cret@mlflow:5000", "http://alice:***@mlflow:5000"),
    ("postgresql+psycopg2://u:p%40ss@db:5432/mlflow?sslmode=require",
     "postgresql+psycopg2://u:***@db:5432/mlflow?sslmode=require"),
    ("https://mlflow/?token=abc&x=1", "https://mlflow/?token=***&x=1"),
    ("https://h/p?Access_Token=a&apiKey=b&X-Amz-Signature=c&X-Amz-Credential=d&client_secret=e&passwd=f&page=2",
     ("https://h/p?Access_Token=***&apiKey=***&X-Amz-Signature=***&X-Amz-Credential=***&client_secret=***"
      "&passwd=***&page=2")),
    ("https://acct.blob.core.windows.net/c?sv=2024&sig=abc%2F", "https://acct.blob.core.windows.net/c?sv=2024&sig=***"),
    ("http://u@host:5000/path", "http://u@host:5000/path"),  # a user name alone is no secret
    ("sqlite:////abs/path/mlflow.db", "sqlite:////abs/path/mlflow.db"),
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
    ("/plain/path/token=x/mlflow.db", "/plain/path/token=x/mlflow.db"),  # not a URI
])
def test_redact_uri_masks_the_password_and_secret_query_values(uri, shown):
    assert redact_uri(uri) == shown
    assert redact_uri(shown) == shown  # idempotent


def test_strip_password_keeps_the_uri_usable_without_its_password():
    assert strip_password("http://alice:s3cret@mlflow:5000") == "http://alice@mlflow:5000"
    assert strip_password("postgresql://u:pw@db/m?password=x") == "postgresql://u@db/m?password=***"
    assert strip_password("sqlite:////a/b.db") == "sqlite:////a/b.db"


def test_redact_text_finds_every_uri_and_secret_named_value():
    text = f"""# mirror: https://mlflow.example/api?token={PLANTED}&x=1, or (http://bob:{PLANTED}@h:5000).
tracking:
  uri: postgresql://u:{PLANTED}@db.internal/mlflow  # the real one
store: {{root: s3://bucket/prefix, secret: {PLANTED}}}
password: {PLANTED}
api_key: "{PLANTED} with spaces"
export MLFLOW_TRACKING_PASSWORD={PLANTED}
AWS_SECRET_ACCESS_KEY='{PLANTED}'
{{"token": "{PLANTED}", "key": "a1b2", "tokenizer": "bert"}}
error: could not connect to mysql://root:{PLANTED}@10.0.0.1/db; retrying
"""
    out = redact_text(text)
    assert PLANTED not in out
    # what is no secret stays readable
    for kept in ("https://mlflow.example/api?token=***&x=1,", "(http://bob:***@h:5000).",
                 "postgresql://u:***@db.internal/mlflow  # the real one", "s3://bucket/prefix",
                 '"key": "a1b2"', '"tokenizer": "bert"', "mysql://root:***@10.0.0.1/db; retrying",
                 'password: "***"', 'secret: "***"}', 'api_key: "***"', "MLFLOW_TRACKING_PASSWORD=***",
                 "AWS_SECRET_ACCESS_KEY='***'"):
        assert kept in out, kept
    assert yaml.safe_load(redact_text("tracking:\n  uri: http://u:p@h\npassword: x\n")) == \
        {"tracking": {"uri": "http://u:***@h"}, "password": "***"}  # still YAML


@pytest.mark.parametrize("text", [
    "sqlite:////home/me/studies/mlflow.db",
    "store: /data/ddray-store\ntracking:\n  uri: sqlite:///mlflow.db\n",
    "stage key: 3f2a9c, tokenizer: bert, PWD=/home/me, max_tokens=5",
    "the token was refused; set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH)",
    "https://github.com/org/repo/blob/main/README.md#usage",
])
def test_redact_text_leaves_text_without_secrets_unchanged(text):
    assert redact_text(text) == text


def test_secret_names_and_structures():
    assert all(map(secret_name, ["password", "MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY", "token",
                                 "MLFLOW_TRACKING_TOKEN", "api_key", "dbPassword", "client_secret"]))
    assert not any(map(secret_name, ["key", "stage_key", "tokenizer", "name", "uri", "PWD", "author"]))
    data = {"tracking": {"uri": f"http://u:{PLANTED}@h"}, "password": PLANTED, "n": 3, "key": "k",
            "list": [f"https://h/?token={PLANTED}"]}
    out = redact_data(data)
    assert PLANTED not in json.dumps(out) and out["n"] == 3 and out["key"] == "k"


def test_the_trackers_names_delegate_to_the_one_redaction():
    from orchestrator.tracking.tracker import redact
    from orchestrator.tracking.tracker import redact_text as tracker_redact_text

    assert redact(f"http://u:{PLANTED}@h") == "http://u@h"  # stored and passed on: usable, the password by env
    assert tracker_redact_text(f"failed: https://h/?token={PLANTED}") == "failed: https://h/?token=***"
    # a URI whose password appears alone in an error (not as a URI) is masked too when the URI is given
    assert PLANTED not in tracker_redact_text(f"auth failed for password {PLANTED}", f"http://u:{PLANTED}@h")


# --- end to end: nothing a study writes carries a planted secret ------------------------------------------------

SPEC = {
    "version": 1,
    "name": "secrets",
    "tracking": {"uri": f"postgresql://ddray:{PLANTED}@db.internal:5432/mlflow?sslmode=require"},
    "store": {"root": f"s3://AKIAEXAMPLE:{PLANTED}@bucket/prefix?X-Amz-Security-Token={PLANTED}"},
    "datasets": [{"name": "d", "source": "digits", "bias": "colored", "aligned_ratios": [0.5]}],
    "ptm_pools": [{"name": "p", "dataset": "d", "architectures": [{"name": "convnet", "width": 8}], "epochs": 1}],
    "distillation": {"methods": ["random"], "ipc": [1], "iterations": 1, "batch_real": 8,
                     "arch": {"name": "convnet", "width": 8}, "guidance": ["none"]},
    "evaluation": {"architectures": [{"name": "convnet", "width": 8}], "repeats": 1, "epochs": 1, "checkpoints": 1},
}


def write_spec(path: Path) -> Path:
    path.write_text(f"# a mirror of the tracking server: https://mlflow.example/?token={PLANTED}\n"
                    f"# MLFLOW_TRACKING_PASSWORD={PLANTED}\n" + yaml.safe_dump(SPEC, sort_keys=False))
    return path


def files_holding(root: Path, secret: str, skip: tuple[Path, ...] = ()) -> list[str]:
    """Every file under `root` (but `skip`) whose bytes contain `secret`."""
    return sorted(str(f.relative_to(root)) for f in root.rglob("*")
                  if f.is_file() and f not in skip and secret.encode() in f.read_bytes())


def test_a_study_writes_the_planted_secret_nowhere(tmp_path, monkeypatch):
    """A real (tiny) study, inline, on a SQLite MLflow, from a spec carrying a password and tokens in its
    tracking URI, its store root and comments: no file in the store, the MLflow DB or its artifacts, and no
    event, holds them."""
    from mlflow.tracking import MlflowClient

    from orchestrator.execution.executors import InlineExecutor
    from orchestrator.execution.submit import submit_study
    from orchestrator.spec.loading import read_spec

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    spec_path = write_spec(tmp_path / "spec.yaml")
    spec, text = read_spec(spec_path)
    assert PLANTED in text  # the spec text as submitted carries it
    events: list = []
    uri = f"sqlite:///{tmp_path}/mlflow/m.db"  # --tracking-uri overrides the spec's (the old redaction's blind spot)
    outcome = submit_study(spec, text, store_root=str(tmp_path / "store"), tracking_uri=uri,
                           executor=InlineExecutor, on_event=events.append)
    assert outcome.state == "succeeded", outcome.errors
    assert (tmp_path / "mlflow" / "m.db").exists() and (tmp_path / "mlflow" / "mlartifacts").is_dir()

    assert files_holding(tmp_path, PLANTED, skip=(spec_path,)) == []
    assert PLANTED not in json.dumps(events, default=str)
    client = MlflowClient(uri)
    logged = Path(client.download_artifacts(outcome.parent_run_id, "spec.yaml", str(tmp_path / "dl")))
    shown = logged.read_text()
    assert PLANTED not in shown and "postgresql://ddray:***@db.internal:5432/mlflow" in shown
    assert "MLFLOW_TRACKING_PASSWORD=***" in shown


def test_the_job_upload_carries_a_redacted_spec(tmp_path):
    """The Ray job's working_dir (uploaded to and kept on the cluster) holds the spec redacted, and the same study."""
    from orchestrator.execution.jobs import prepare_job_dir
    from orchestrator.spec.loading import read_spec

    spec_path = write_spec(tmp_path / "spec.yaml")
    spec = read_spec(spec_path, anchored=False)[0]
    workdir = tmp_path / "job"
    workdir.mkdir()
    prepare_job_dir(spec_path, workdir, spec.study_id)
    assert (workdir / "spec.yaml").exists() and (workdir / "orchestrator" / "tracking" / "secrets.py").exists()
    assert files_holding(workdir, PLANTED) == []
    uploaded = read_spec(workdir / "spec.yaml", anchored=False)[0]
    assert uploaded.study_id == spec.study_id  # the cluster's driver runs the same study


def test_a_redaction_that_would_change_the_study_is_refused_for_a_job(tmp_path, monkeypatch):
    """Were a credential part of what the study computes, the cluster would run another study: one line instead."""
    from orchestrator.errors import UserError
    from orchestrator.execution import jobs
    from orchestrator.spec.loading import read_spec

    spec_path = write_spec(tmp_path / "spec.yaml")
    spec = read_spec(spec_path, anchored=False)[0]
    monkeypatch.setattr(jobs, "redact_text", lambda text: text.replace("name: secrets", "name: other"))
    workdir = tmp_path / "job"
    workdir.mkdir()
    with pytest.raises(UserError, match="credential"):
        jobs.prepare_job_dir(spec_path, workdir, spec.study_id)


def test_the_ui_passes_the_uri_by_environment_only():
    import click
    import mlflow.cli

    from orchestrator.tracking.ui import ui_command

    uri = f"postgresql://ddray:{PLANTED}@db.internal/mlflow"
    argv, env = ui_command(uri, 5123, environ={"PATH": "/usr/bin"})
    assert not any(PLANTED in a for a in argv) and "--backend-store-uri" not in argv
    assert argv[-4:] == ["--host", "127.0.0.1", "--port", "5123"]
    assert env["MLFLOW_BACKEND_STORE_URI"] == uri and env["PATH"] == "/usr/bin"
    # and `mlflow ui` (an alias of `mlflow server`) reads that variable for its backend store
    command = mlflow.cli.cli.get_command(click.Context(mlflow.cli.cli), "ui")
    option = next(p for p in command.params if p.name == "backend_store_uri")
    assert option.envvar == "MLFLOW_BACKEND_STORE_URI"


def test_ddray_ui_prints_only_the_redacted_uri(monkeypatch, capsys):
    import orchestrator
    from cli import main

    seen = {}
    monkeypatch.setattr(orchestrator, "check_ui", lambda uri, port: None, raising=False)
    monkeypatch.setattr(orchestrator, "serve_ui", lambda uri, port: seen.setdefault("uri", uri) and 0, raising=False)
    uri = f"http://ddray:{PLANTED}@mlflow.internal:5000/?token={PLANTED}"
    assert main.app(["ui", "--tracking-uri", uri, "--port", "5124"], standalone_mode=False) in (0, None)
    captured = capsys.readouterr()
    assert seen["uri"] == uri  # the server gets the real URI (through its environment)
    assert PLANTED not in captured.out + captured.err
    assert "http://ddray:***@mlflow.internal:5000/?token=***" in captured.err + captured.out


def test_stage_params_logged_to_mlflow_carry_no_credentials():
    from orchestrator.tracking.tracker import flatten

    params = flatten({"data": {"root": "s3://user:hunter2@bucket/data?X-Amz-Signature=abc123"}, "token": "s3cr3t",
                      "ipc": 10})
    text = json.dumps(params)
    assert "hunter2" not in text and "abc123" not in text and "s3cr3t" not in text
    assert params["ipc"] == "10" and params["data.root"].startswith("s3://")
