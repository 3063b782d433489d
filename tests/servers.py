"""Real servers the slow tests start on 127.0.0.1: moto's S3, an MLflow server, a Ray head with token auth.

Each is a context manager that starts the process on free ports, waits until it
answers, and stops it (and what it started) at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout=300, every=0.05, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def moto_s3(log_dir: Path, bucket: str):
    """moto's standalone S3 server, AWS_* pointing at it, `bucket` created; yields its endpoint and log."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    port = free_port()
    log = Path(log_dir) / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"moto server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.1)
        with pytest.MonkeyPatch.context() as mp:
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_CONFIG_FILE"):
                mp.delenv(name, raising=False)
            mp.setenv("AWS_ENDPOINT_URL", endpoint)
            mp.setenv("AWS_ACCESS_KEY_ID", "testing")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
            mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
            import fsspec

            fsspec.filesystem("s3", skip_instance_cache=True).mkdir(bucket)
            yield {"endpoint": endpoint, "log": log, "bucket": bucket}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def kill_tree(pid: int) -> None:
    import psutil

    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    for p in [*parent.children(recursive=True), parent]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@contextmanager
def ray_head(token: str, num_cpus: int = 2):
    """`ray start --head` on 127.0.0.1 with token auth, its own temp dir and free ports; yields the
    Jobs API address. Job drivers find this venv's python first on PATH (as a cluster image would)."""
    import psutil

    temp = Path(tempfile.mkdtemp(prefix="ddr-ray-", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    ports = [free_port() for _ in range(6)]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={ports[0]}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={ports[1]}", f"--dashboard-agent-listen-port={ports[2]}",
           f"--dashboard-agent-grpc-port={ports[3]}", f"--runtime-env-agent-port={ports[4]}",
           f"--metrics-export-port={ports[5]}", f"--num-cpus={num_cpus}", "--include-dashboard=true",
           "--disable-usage-stats", f"--temp-dir={temp}"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    address = f"http://127.0.0.1:{ports[1]}"

    def jobs_ready() -> bool:
        request = urllib.request.Request(address + "/api/jobs/", headers={"Authorization": f"Bearer {token}"})
        try:
            return urllib.request.urlopen(request, timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(jobs_ready, timeout=120, every=0.5, what="the Ray Jobs API")
        yield address
    finally:
        for p in psutil.process_iter(["cmdline"]):
            if str(temp) in " ".join(p.info["cmdline"] or []):
                kill_tree(p.pid)
        shutil.rmtree(temp, ignore_errors=True)


@contextmanager
def mlflow_server(db: str, port: int | None = None):
    """`mlflow server` on `port` (default: a free one) over the `db` backend; yields (its http URI, the process)."""
    port = port or free_port()
    work = Path(tempfile.mkdtemp(prefix="ddray-mlflow-"))  # its artifacts, never in the checkout
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", db, "--host",
                             "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--artifacts-destination", str(work / "mlartifacts")],
                            cwd=work, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)

    def answers() -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(answers, timeout=120, every=0.5, what="the MLflow server")
        yield f"http://127.0.0.1:{port}", proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(work, ignore_errors=True)


def _postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)  # Debian keeps them here
    return next((str(v / name) for v in versions if (v / name).exists()), None)


@contextmanager
def postgres_server():
    """A throwaway PostgreSQL cluster on 127.0.0.1 (Debian's postgresql: initdb + pg_ctl in a temp dir, run as
    the `postgres` user when this process is root, since PostgreSQL refuses root); yields its SQLAlchemy URI."""
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.fail("PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run installs it)")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    base = Path(tempfile.mkdtemp(prefix="ddray-pg-"))  # under /tmp: pytest's own dirs are closed to other users
    data, sock = base / "pgdata", base / "pgsock"
    sock.mkdir(exist_ok=True)
    if as_user:
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
    port = free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    log = base / "postgres.log"
    if as_user:
        log.touch()
        shutil.chown(log, "postgres")
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
                    f"-h 127.0.0.1 -p {port} -k {sock}", "start"], check=True, capture_output=True)
    try:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE mlflow")
        conn.close()
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"  # as deploy/mlflow selects the driver
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
