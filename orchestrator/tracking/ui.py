"""The MLflow UI on a study's tracking URI: a supervised `mlflow ui` process bound to 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from orchestrator.errors import UserError
from orchestrator.spec.paths import sqlite_file
from orchestrator.tracking.secrets import redact_uri


def check_ui(uri: str, port: int) -> None:
    """The database exists and the port is free: a busy port is the user's to resolve, not a server that dies."""
    db = sqlite_file(uri)
    if db is not None and not db.exists():
        raise UserError(f"tracking uri '{redact_uri(uri)}': no such database (run a study first)")
    with socket.socket() as probe:
        # busy means something listens: connections a previous server closed (TIME_WAIT, a minute) do not
        # count, as they do not for the server itself (uvicorn sets SO_REUSEADDR too)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise UserError(f"--port: 127.0.0.1:{port} is in use (choose another with --port)") from None


def ui_command(uri: str, port: int, environ: dict | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of the `mlflow ui` process: the backend store URI, which may carry a password, travels in
    the environment (`MLFLOW_BACKEND_STORE_URI`, which `mlflow ui`/`server` read), never on the command line
    (`ps` shows every user's argv)."""
    env = dict(os.environ if environ is None else environ)
    env["MLFLOW_BACKEND_STORE_URI"] = uri
    argv = [sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(port)]
    return argv, env


def serve_ui(uri: str, port: int) -> int:
    """Run `mlflow ui` until it exits or this process gets SIGTERM/SIGINT; the exit code to return (0 if stopped)."""
    check_ui(uri, port)
    cmd, env = ui_command(uri, port)
    server = subprocess.Popen(cmd, env=env, start_new_session=True)  # its own group: stopping it stops its workers

    def stop(signum, frame):
        try:
            os.killpg(server.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    code = server.wait()
    try:  # whatever is left of its group (uvicorn workers) goes with it
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return 0 if code in (0, -signal.SIGTERM) else code
