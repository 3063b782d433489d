"""The MLflow UI on a study's tracking URI: a supervised `mlflow ui` process bound to 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from orchestrator.errors import UserError
from orchestrator.spec.paths import sqlite_file
from orchestrator.tracking.tracker import redact


def check_ui(uri: str, port: int) -> None:
    """The database exists and the port is free: a busy port is the user's to resolve, not a server that dies."""
    db = sqlite_file(uri)
    if db is not None and not db.exists():
        raise UserError(f"tracking uri '{redact(uri)}': no such database (run a study first)")
    with socket.socket() as probe:
        # busy means something listens: connections a previous server closed (TIME_WAIT, a minute) do not
        # count, as they do not for the server itself (uvicorn sets SO_REUSEADDR too)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise UserError(f"--port: 127.0.0.1:{port} is in use (choose another with --port)") from None


def serve_ui(uri: str, port: int) -> int:
    """Run `mlflow ui` until it exits or this process gets SIGTERM/SIGINT; the exit code to return (0 if stopped)."""
    check_ui(uri, port)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(cmd, start_new_session=True)  # its own group: stopping it stops its workers

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
