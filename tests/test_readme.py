"""Every command of the README's "Using it" block, run as written, in order, in a fresh directory
holding a copy of `configs/` (the quickstart's fresh-machine command is its `study submit` line).

Placeholders are filled with what the earlier commands made (STUDY_A, STAGE, ...); of `a|b|c` the
first is run; optional `[...]` parts are run too. Each command must exit 0. Real digits, a real
local Ray, SQLite MLflow; slow (about 6 minutes)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.request

import pytest
import torch

from orchestrator.storage.local import ArtifactStore
from tests.servers import wait_for
from tests.test_faults import ROOT, env

pytestmark = pytest.mark.slow

README = ROOT / "README.md"


def readme_commands() -> list[str]:
    """The `ddray ...` lines of the "Using it" block, continuations joined, comments dropped."""
    block = README.read_text().split("## Using it", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [re.sub(r"\s+#\s.*$", "", line).strip() for line in joined.splitlines()]
    return [line for line in lines if line]


def as_run(line: str, fill: dict[str, str]) -> list[str]:
    """A README line as argv: optional groups kept, the first of alternatives, placeholders filled."""
    argv = []
    for token in shlex.split(line):
        if token.startswith("[") or token.endswith("]") and "[" not in token:
            token = token.strip("[]")  # an optional part, e.g. [--json] or [--tail N]
        token = token.split("|", 1)[0] if re.fullmatch(r"[\w.-]+(\|[\w.-]+)+", token) else token
        argv.append(fill.get(token, token))
    assert argv[0] == "ddray", line
    return argv[1:]


def run(argv: list[str], cwd, timeout=900) -> subprocess.CompletedProcess:
    """One command in its own session, so whatever Ray processes it leaves can be reaped."""
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", *argv], cwd=cwd, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def serve_and_stop(argv: list[str], cwd) -> None:
    """`ddray ui`: it serves the study's runs on 127.0.0.1:5000 until SIGTERM, then exits 0."""
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", *argv], cwd=cwd, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = "http://127.0.0.1:5000/ajax-api/2.0/mlflow/experiments/search?max_results=10"

    def answer():
        try:
            return urllib.request.urlopen(url, timeout=2).read().decode()
        except OSError:
            return None
    try:
        assert "ddray/quickstart" in wait_for(answer, timeout=120, every=0.5, what="ddray ui on :5000")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_every_command_of_the_readme_runs_as_written(tmp_path):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    fill = {"STUDY_A": "quickstart", "STUDY_B": "cmnist-dd-smoke", "STUDY": "quickstart", "N": "5"}
    ran = []
    for line in readme_commands():
        argv = as_run(line, fill)
        if argv[:2] == ["study", "logs"] and "STAGE" in argv:  # a stage of the study: the first the status lists
            status = json.loads(run(["study", "status", "quickstart", "--json"], tmp_path).stdout)
            fill["STAGE"] = next(iter(status["stages"]))
            argv = as_run(line, fill)
        if argv[0] == "evaluate":  # the set "made elsewhere": shaped as the smoke study's own, any pixels
            status = json.loads(run(["study", "status", "cmnist-dd-smoke", "--json"], tmp_path).stdout)
            key = next(k for k, st in status["stages"].items() if st["kind"] == "distill")
            own = ArtifactStore(tmp_path / "ddray-store").read_tensors("distill", key, "synthetic.pt")
            torch.save({"images": torch.rand_like(own["images"]), "labels": own["labels"]}, tmp_path / "set.pt")
        if argv[0] == "ui":
            serve_and_stop(argv, tmp_path)
            ran.append(argv)
            continue
        r = run(argv, tmp_path)
        assert r.returncode == 0, f"`{line}` exited {r.returncode}: {r.stderr[-3000:]}"
        if "--json" in argv:
            json.loads(r.stdout.strip().splitlines()[-1])  # its last line is JSON
        ran.append(argv)
    assert [a[:2] for a in ran if a[0] == "study"].count(["study", "submit"]) == 2 and ran[-1][0] == "ui"
    assert {"report.md", "report.html"} <= {p.name for p in (tmp_path / "report").iterdir()}
    assert (tmp_path / "grid.png").stat().st_size > 0
    # the quickstart's paths are relative to its file: from another directory, the same study, all stored
    again = run(["study", "submit", "quickstart.yaml", "--json"], tmp_path / "configs")
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert again.returncode == 0 and summary["study_id"].startswith("quickstart-")
    assert summary["stages"]["executed"] == 0 and summary["stages"]["cached"] == summary["stages"]["total"]
    status = json.loads(run(["study", "status", "quickstart", "--json"], tmp_path).stdout)
    assert status["store"] == str(tmp_path / "ddray-store")
    assert status["tracking_uri"] == f"sqlite:///{tmp_path}/mlflow.db"
    # MLflow's artifacts went beside its database, not into whichever directory ddray ran in
    assert (tmp_path / "mlartifacts").is_dir() and not list(tmp_path.rglob("mlruns"))
    assert not (tmp_path / "configs" / "ddray-store").exists()
