#!/usr/bin/env python3
"""Start the MLflow tracking server behind its basic-auth app, configured from the environment.

Installed in the image of deploy/mlflow/Dockerfile as /usr/local/bin/ddray-mlflow-server and
used as the container command by deploy/mlflow/docker-compose.yml and deploy/mlflow/k8s.yaml.
Its arguments are passed on to `mlflow server`; `--app-name basic-auth` is always in force.

Every credential comes from the environment: a Kubernetes Secret, or deploy/mlflow/.env under
Docker Compose. Nothing secret is baked into the image or written into the manifests. At every
start the script

1. checks the variables below and exits with a message naming every one that is missing;
2. builds the PostgreSQL URIs (user and password URL-quoted, so any password works);
3. creates the auth database if it does not exist yet (users and permissions live in their own
   database, next to the tracking database, on the same PostgreSQL server);
4. writes the basic-auth config file (MLFLOW_AUTH_CONFIG_PATH) with mode 0600 into a
   directory only this user can read; it holds the auth database URI, and no admin password;
5. creates the optional non-admin account for ddray's Ray pods, or resets its password to the
   configured one (the Secret is the source of truth for that account);
6. execs `mlflow server --app-name basic-auth ...` with the tracking URI in
   MLFLOW_BACKEND_STORE_URI (not on the command line).

Environment:
  POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB   required: the tracking database
  POSTGRES_HOST (default postgres), POSTGRES_PORT (default 5432)
  MLFLOW_AUTH_DB                 auth database name (default <POSTGRES_DB>_auth)
  MLFLOW_AUTH_ADMIN_USERNAME     admin account (default admin)
  MLFLOW_AUTH_ADMIN_PASSWORD     required, at least 12 characters; MLflow reads it itself and
                                 uses it to create the admin account on the first start only
  MLFLOW_FLASK_SERVER_SECRET_KEY required: the auth app's CSRF key
  MLFLOW_AUTH_DEFAULT_PERMISSION READ (default), EDIT, MANAGE or NO_PERMISSIONS: what a user
                                 may do with experiments that nobody granted them
  MLFLOW_CLIENT_USERNAME, MLFLOW_CLIENT_PASSWORD
                                 optional, both or neither: ddray's non-admin account
  MLFLOW_AUTH_CONFIG_PATH        where the config goes (default /tmp/ddray-mlflow/basic_auth.ini)

`--check-config` validates the environment and prints the config file that would be written,
with the passwords masked, without touching any database.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from urllib.parse import quote

PROG = "ddray-mlflow-server"
APP_NAME = "basic-auth"
MIN_PASSWORD_LEN = 12  # MLflow's own rule for basic-auth passwords
PERMISSIONS = ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")
DEFAULT_CONFIG_PATH = "/tmp/ddray-mlflow/basic_auth.ini"
AUTH_FUNCTION = "mlflow.server.auth:authenticate_request_basic_auth"


class ConfigError(Exception):
    pass


def _get(env: dict, name: str, default: str = "") -> str:
    return (env.get(name) or default).strip()


def read_settings(env: dict) -> dict:
    """Validate the environment; raise ConfigError naming every problem at once."""
    problems = []
    missing = [
        n
        for n in (
            "POSTGRES_USER",
            "POSTGRES_PASSWORD",
            "POSTGRES_DB",
            "MLFLOW_AUTH_ADMIN_PASSWORD",
            "MLFLOW_FLASK_SERVER_SECRET_KEY",
        )
        if not _get(env, n)
    ]
    if missing:
        problems.append(
            "missing required environment variable(s): "
            + ", ".join(missing)
            + " (Kubernetes: the Secrets in deploy/README.md; Compose: deploy/mlflow/.env)"
        )
    s = {
        "pg_user": _get(env, "POSTGRES_USER"),
        "pg_password": _get(env, "POSTGRES_PASSWORD"),
        "pg_db": _get(env, "POSTGRES_DB"),
        "pg_host": _get(env, "POSTGRES_HOST", "postgres"),
        "pg_port": _get(env, "POSTGRES_PORT", "5432"),
        "admin_username": _get(env, "MLFLOW_AUTH_ADMIN_USERNAME", "admin"),
        "admin_password": _get(env, "MLFLOW_AUTH_ADMIN_PASSWORD"),
        "default_permission": _get(env, "MLFLOW_AUTH_DEFAULT_PERMISSION", "READ").upper(),
        "client_username": _get(env, "MLFLOW_CLIENT_USERNAME"),
        "client_password": _get(env, "MLFLOW_CLIENT_PASSWORD"),
        "config_path": _get(env, "MLFLOW_AUTH_CONFIG_PATH", DEFAULT_CONFIG_PATH),
    }
    s["auth_db"] = _get(env, "MLFLOW_AUTH_DB", f"{s['pg_db']}_auth" if s["pg_db"] else "")
    if not s["pg_port"].isdigit():
        problems.append(f"POSTGRES_PORT must be a number, got {s['pg_port']!r}")
    if s["admin_password"] and len(s["admin_password"]) < MIN_PASSWORD_LEN:
        problems.append(f"MLFLOW_AUTH_ADMIN_PASSWORD must be at least {MIN_PASSWORD_LEN} characters")
    if s["default_permission"] not in PERMISSIONS:
        problems.append(f"MLFLOW_AUTH_DEFAULT_PERMISSION must be one of {', '.join(PERMISSIONS)}")
    if bool(s["client_username"]) != bool(s["client_password"]):
        problems.append("set both MLFLOW_CLIENT_USERNAME and MLFLOW_CLIENT_PASSWORD, or neither")
    elif s["client_username"]:
        if s["client_username"] == s["admin_username"]:
            problems.append("MLFLOW_CLIENT_USERNAME must differ from the admin username")
        if len(s["client_password"]) < MIN_PASSWORD_LEN:
            problems.append(f"MLFLOW_CLIENT_PASSWORD must be at least {MIN_PASSWORD_LEN} characters")
    if s["auth_db"] and s["auth_db"] == s["pg_db"]:
        problems.append("MLFLOW_AUTH_DB must differ from POSTGRES_DB")
    if problems:
        raise ConfigError("; ".join(problems))
    return s


def postgres_uri(s: dict, database: str, *, mask: bool = False) -> str:
    secret = "***" if mask else quote(s["pg_password"], safe="")
    return (
        f"postgresql+psycopg2://{quote(s['pg_user'], safe='')}:{secret}"
        f"@{s['pg_host']}:{s['pg_port']}/{quote(database, safe='')}"
    )


def render_auth_config(s: dict, *, mask: bool = False) -> str:
    """The basic-auth ini. MLflow reads it with configparser's interpolation, so '%' is doubled.

    admin_password is left out on purpose: MLflow takes MLFLOW_AUTH_ADMIN_PASSWORD from the
    environment, so the admin password never lands in a file.
    """
    values = {
        "default_permission": s["default_permission"],
        "database_uri": postgres_uri(s, s["auth_db"], mask=mask),
        "admin_username": s["admin_username"],
        "authorization_function": AUTH_FUNCTION,
        "grant_default_workspace_access": "false",
    }
    lines = ["[mlflow]"] + [f"{k} = {v.replace('%', '%%')}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def write_private(path: Path, text: str) -> None:
    """Write text to path, readable by this user only (the file holds a database password)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.parent.stat().st_uid == os.getuid():  # not a mount point owned by someone else
        os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def ensure_auth_database(s: dict, timeout_s: float = 120.0) -> None:
    import psycopg2
    from psycopg2 import sql

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn = psycopg2.connect(
                host=s["pg_host"],
                port=int(s["pg_port"]),
                user=s["pg_user"],
                password=s["pg_password"],
                dbname=s["pg_db"],
                connect_timeout=5,
            )
            break
        except psycopg2.OperationalError as e:
            if "authentication failed" in str(e):
                raise ConfigError(f"PostgreSQL rejected user {s['pg_user']!r}: check POSTGRES_PASSWORD") from e
            if time.monotonic() > deadline:
                raise ConfigError(f"cannot reach PostgreSQL at {s['pg_host']}:{s['pg_port']}: {e}") from e
            print(f"{PROG}: waiting for PostgreSQL at {s['pg_host']}:{s['pg_port']} ...", file=sys.stderr)
            time.sleep(2)
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (s["auth_db"],))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(s["auth_db"])))
                print(f"{PROG}: created auth database {s['auth_db']!r}", file=sys.stderr)
    except psycopg2.Error as e:
        raise ConfigError(
            f"cannot create the auth database {s['auth_db']!r} as {s['pg_user']!r} ({str(e).strip()}); "
            "create it beforehand or give the user CREATEDB"
        ) from e
    finally:
        conn.close()


def ensure_client_user(s: dict) -> None:
    """Create ddray's non-admin account, or reset its password to the configured one."""
    if not s["client_username"]:
        return
    # Importing the auth package reads MLFLOW_AUTH_CONFIG_PATH, which main() has set by now.
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore()
    store.init_db(postgres_uri(s, s["auth_db"]))  # runs the auth schema migrations
    user, password = s["client_username"], s["client_password"]
    if not store.has_user(user):
        store.create_user(user, password, is_admin=False)
        print(f"{PROG}: created MLflow user {user!r}", file=sys.stderr)
    elif not store.authenticate_user(user, password):
        store.update_user(user, password=password)
        print(f"{PROG}: reset the password of MLflow user {user!r}", file=sys.stderr)


def server_args(argv: list[str]) -> list[str]:
    args = list(argv)
    if "--app-name" in args:
        i = args.index("--app-name")
        if i + 1 >= len(args) or args[i + 1] != APP_NAME:
            raise ConfigError(f"--app-name must be {APP_NAME}: this server never runs without auth")
    else:
        args = ["--app-name", APP_NAME, *args]
    return args


def main(argv: list[str]) -> int:
    check_only = "--check-config" in argv
    argv = [a for a in argv if a != "--check-config"]
    try:
        s = read_settings(dict(os.environ))
        args = server_args(argv)
        if check_only:
            print(render_auth_config(s, mask=True), end="")
            print(f"# MLFLOW_BACKEND_STORE_URI={postgres_uri(s, s['pg_db'], mask=True)}")
            print("# mlflow server " + " ".join(args))
            return 0
        config_path = Path(s["config_path"])
        ensure_auth_database(s)
        write_private(config_path, render_auth_config(s))
        os.environ["MLFLOW_AUTH_CONFIG_PATH"] = str(config_path)
        os.environ["MLFLOW_AUTH_ADMIN_USERNAME"] = s["admin_username"]
        os.environ["MLFLOW_BACKEND_STORE_URI"] = postgres_uri(s, s["pg_db"])
        ensure_client_user(s)
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp("mlflow", ["mlflow", "server", *args])
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
