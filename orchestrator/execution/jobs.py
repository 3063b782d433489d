"""Studies as Ray jobs: `ddray study submit SPEC --address http://HEAD:8265` runs the driver on the cluster.

The laptop-side command submits the study's driver (`ddray study submit` itself,
with `--events`) through the Jobs API, with the spec and this checkout's code
(`distill_core`, `orchestrator`, `cli`) in the job's working_dir, then follows
the job's log: the driver prints every event as a `ddray-event {...}` line,
which feeds the same live view and ends with the same `--json` summary as a
local submit. Closing the laptop leaves the study running; `status`, `logs`
and `cancel` reattach by study id. A submit of a study whose job is still
pending or running attaches to it instead of starting a second one
(submission ids are `ddray-<study id>[-<n>]`).

Token authentication (Ray 2.60, `RAY_AUTH_MODE=token`): the token is read as
Ray reads it (`RAY_AUTH_TOKEN`, then `RAY_AUTH_TOKEN_PATH`, then
`~/.ray/auth_token`) and sent as `Authorization: Bearer` on every call. A
missing or wrong token, an unreachable head or a head running another Ray
version is one line, exit 2. A token bound for a non-loopback `http://` address is
sent unencrypted: one warning per process says so (`plain_http_warning`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable
from urllib.error import HTTPError
from urllib.parse import urlsplit

from orchestrator.errors import UserError, first_line
from orchestrator.execution.ray_session import check_reachable
from orchestrator.spec.loading import read_spec
from orchestrator.spec.paths import is_relative_sqlite
from orchestrator.reporting.progress import StudyProgress
from orchestrator.tracking.secrets import redact_text, redact_uri

AGENT_WAIT_S = 60.0  # how long a submit waits for a freshly started head's job agent


EVENT_PREFIX = "ddray-event "


ACTIVE = ("PENDING", "RUNNING")


POLL_S = 1.0


class LogLines:
    """A job's log as it arrives in chunks: each whole line fed once, in order, to the event handler;
    `seen` counts the characters consumed, so a re-read of the whole log resumes after them."""

    def __init__(self, on_event: Callable[[dict], None], keep: int = 20):
        self.on_event, self.keep = on_event, keep
        self.seen = 0
        self.partial = ""
        self.summary: dict | None = None
        self.tail: list[str] = []

    def feed(self, chunk: str) -> None:
        self.seen += len(chunk)
        *whole, self.partial = (self.partial + chunk).split("\n")
        for line in whole:
            self._line(line)

    def catch_up(self, log: str) -> None:
        """The whole log as read now: feed only what this has not seen yet."""
        if len(log) > self.seen:
            self.feed(log[self.seen:])

    def flush(self) -> None:
        if self.partial:
            self._line(self.partial)
            self.partial = ""

    def _line(self, line: str) -> None:
        line = line.rstrip("\r")
        self.tail = [*self.tail[-(self.keep - 1):], line]
        if line.startswith(EVENT_PREFIX):
            self.on_event(json.loads(line[len(EVENT_PREFIX):]))
        elif line.startswith("{") and '"study_id"' in line:
            try:
                self.summary = json.loads(line)
            except json.JSONDecodeError:
                pass


def is_jobs_address(address: str | None) -> bool:
    return bool(address) and address.startswith(("http://", "https://"))


def ray_token() -> str | None:
    """The cluster token, looked up as Ray does."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            return Path(path).expanduser().read_text().strip()
        except OSError as exc:
            raise UserError(f"RAY_AUTH_TOKEN_PATH: cannot read '{path}' ({exc.strerror})") from None
    default = Path.home() / ".ray" / "auth_token"
    return default.read_text().strip() if default.exists() else None


def plain_http_warning(address: str, token: str | None) -> str | None:
    """The warning for a token sent over plain HTTP to a non-loopback host, else None."""
    if not token:
        return None
    try:
        parts = urlsplit(address)
        host, port = parts.hostname or "", parts.port
    except ValueError:  # a malformed port: the connection fails later with its own message
        return None
    if parts.scheme != "http" or host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:  # 127.0.0.0/8, ::1
            return None
    except ValueError:
        pass  # a host name
    shown = f"[{host}]" if ":" in host else host  # host and port only: never the address's userinfo
    shown += f":{port}" if port else ""
    return (f"ray: the Ray token is sent unencrypted to {shown} (http://); "
            "use https:// or a tunnel (kubectl port-forward, ssh -L)")


_warned_plain_http = False  # once per process: status/logs loops must not repeat it


def warn_plain_http(address: str, token: str | None) -> bool:
    """Tell the user once per process that the token goes out unencrypted; True when this call warned."""
    global _warned_plain_http
    message = plain_http_warning(address, token)
    if message is None or _warned_plain_http:
        return False
    _warned_plain_http = True
    # stderr reaches a CLI user whatever the logging setup. The logger gets it too where the
    # application configured one: without handlers, logging's last resort would print it a second time.
    print(f"warning: {message}", file=sys.stderr)
    logger = logging.getLogger("ddray")
    if logger.hasHandlers():
        logger.warning(message)
    return True


class Cluster:
    """A Ray head's Jobs API, checked before use: reachable, the token accepted, the same Ray version."""

    def __init__(self, address: str):
        import ray  # Ray: imported where it is used (planning and `validate` start without it)
        from ray.exceptions import (
            AuthenticationError,  # Ray: imported where it is used (planning and `validate` start without it)
        )
        from ray.job_submission import (
            JobSubmissionClient,  # Ray: imported where it is used (planning and `validate` start without it)
        )


        self.address = address.rstrip("/")
        self.shown = redact_uri(self.address)  # what messages name: never a password or token of the address
        check_reachable(self.address)
        token = ray_token()
        warn_plain_http(self.address, token)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            self.client = JobSubmissionClient(self.address, headers=self.headers)
            version = self._get("/api/version").get("ray_version")
        except AuthenticationError as exc:
            reason = "the token was refused" if "invalid" in str(exc).lower() or "forbidden" in str(exc).lower() \
                else "it needs a token"
            raise UserError(f"ray: the cluster at {self.shown} requires authentication and {reason}: set "
                            "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) to its token") from None
        except (ConnectionError, OSError, RuntimeError, ValueError) as exc:
            raise UserError(f"ray: cannot use the Jobs API at {self.shown} ({redact_text(first_line(exc))})") from None
        if version and version != ray.__version__:
            raise UserError(f"ray: the cluster at {self.shown} runs Ray {version}; this ddray uses Ray "
                            f"{ray.__version__} (the versions must match)")

    def _get(self, path: str) -> dict:

        from ray.exceptions import (
            AuthenticationError,  # Ray: imported where it is used (planning and `validate` start without it)
        )

        request = urllib.request.Request(self.address + path, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read() or b"{}")
        except HTTPError as exc:
            if exc.code in (401, 403):
                raise AuthenticationError("Forbidden: invalid" if exc.code == 403 else "Unauthorized") from None
            raise

    # --- jobs of a study --------------------------------------------------------------------------

    def jobs_of(self, study_id: str) -> list:
        """The study's jobs, oldest first; `study_id` may be the id, an id prefix or the study's name."""
        def matches(meta: dict) -> bool:
            sid = meta.get("ddray_study_id", "")
            return bool(sid) and (sid == study_id or sid.startswith(study_id) or meta.get("ddray_study_name") == study_id)
        jobs = [j for j in self.client.list_jobs() if matches(j.metadata or {})]
        if len({(j.metadata or {})["ddray_study_id"] for j in jobs}) > 1:
            ids = sorted({(j.metadata or {})["ddray_study_id"] for j in jobs})
            raise UserError(f"study id '{study_id}' is ambiguous on the cluster: {', '.join(ids)}")
        return sorted(jobs, key=lambda j: j.start_time or 0)

    def latest(self, study_id: str):
        jobs = self.jobs_of(study_id)
        if not jobs:
            raise UserError(f"study '{study_id}': no job of it on the cluster at {self.shown}")
        return jobs[-1]

    def submit(self, study_id: str, name: str, spec_path: Path, args: list[str]) -> tuple[str, bool]:
        """(submission id, attached): a running job of the study is attached to, else a new one starts."""
        jobs = [j for j in self.jobs_of(study_id) if (j.metadata or {}).get("ddray_study_id") == study_id]
        active = [j for j in jobs if str(j.status) in ACTIVE or getattr(j.status, "value", "") in ACTIVE]
        if active:
            return active[-1].submission_id, True
        submission_id = f"ddray-{study_id}" + (f"-{len(jobs) + 1}" if jobs else "")
        workdir = Path(tempfile.mkdtemp(prefix="ddray-job-"))
        try:
            profile = args[args.index("--profile") + 1] if "--profile" in args[:-1] else None
            prepare_job_dir(spec_path, workdir, study_id, profile)
            entrypoint = " ".join(["python", "-m", "cli.main", "study", "submit", "spec.yaml", "--json", "--events",
                                   *map(_quote, args)])
            deadline = time.time() + AGENT_WAIT_S
            while True:
                try:
                    self.client.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                                           runtime_env={"working_dir": str(workdir)},
                                           metadata={"ddray_study_id": study_id, "ddray_study_name": name},
                                           entrypoint_num_cpus=0)
                    break
                except RuntimeError as exc:
                    if "already exists" in str(exc):
                        return submission_id, True  # another submit won the race: follow its job
                    # a head that has just started has no job agent yet: Ray answers "try again later"
                    if "No available agent" in str(exc) and time.time() < deadline:
                        time.sleep(2.0)
                        continue
                    raise UserError(f"ray: the cluster refused the job ({redact_text(first_line(exc))})") from None
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return submission_id, False

    def follow(self, submission_id: str, on_event: Callable[[dict], None]) -> dict:
        """Feed the job's events to `on_event` until it ends; return the driver's JSON summary (or the job's state).

        The log is streamed (`tail_job_logs`, a websocket carrying the output as it is written), so
        following costs what the job prints, not the whole log once a second. If the stream breaks, the
        log is read again and only what follows the characters already seen is used, then streaming
        resumes (skipping, on the new connection, what was seen)."""
        lines = LogLines(on_event)
        while True:
            try:
                asyncio.run(self._tail(submission_id, lines))
            except Exception:  # the websocket broke (a head restart, a proxy timeout): catch up, then stream again
                time.sleep(POLL_S)
                lines.catch_up(self.client.get_job_logs(submission_id))
            status = str(getattr(self.client.get_job_status(submission_id), "value", ""))
            if status not in ACTIVE:
                lines.catch_up(self.client.get_job_logs(submission_id))  # whatever the stream had not delivered
                lines.flush()
                break
        return lines.summary or {"state": "failed", "job_status": status, "job_log_tail": "\n".join(lines.tail)}

    async def _tail(self, submission_id: str, lines: "LogLines") -> None:
        skip = lines.seen  # Ray's tail starts at the log's first byte on every connection: skip what was seen
        async for chunk in self.client.tail_job_logs(submission_id):
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            chunk, skip = chunk[skip:], 0
            lines.feed(chunk)

    def status(self, study_id: str) -> dict:
        job = self.latest(study_id)
        events = [json.loads(line[len(EVENT_PREFIX):]) for line in self.client.get_job_logs(job.submission_id).splitlines()
                  if line.startswith(EVENT_PREFIX)]
        progress = StudyProgress()
        for e in events:
            if e["type"] == "start":
                progress.start(e["counts"])
            elif e["type"] == "stage":
                progress.stage(e["key"], e["state"], kind=e.get("kind"), label=e.get("label"))

        end = next((e for e in reversed(events) if e["type"] == "end"), None)
        state = end["state"] if end else {"PENDING": "pending", "RUNNING": "running"}.get(
            str(getattr(job.status, "value", job.status)), "failed")
        return {"study_id": study_id, "state": state, "job": job.submission_id,
                "job_status": str(getattr(job.status, "value", job.status)),
                "counts": progress.state_counts(), "tally": progress.tally, "stages": progress.stages}

    def logs(self, study_id: str) -> str:
        return self.client.get_job_logs(self.latest(study_id).submission_id)

    def cancel(self, study_id: str) -> str:
        job = self.latest(study_id)
        self.client.stop_job(job.submission_id)
        return job.submission_id


def prepare_job_dir(spec_path: Path, workdir: Path, study_id: str | None = None, profile: str | None = None) -> Path:
    """The job's working_dir (uploaded to the cluster and kept there): `spec.yaml`, the spec with every
    credential redacted (`secrets.redact_text`: URI passwords, query tokens, secret-named values), and this
    checkout's code. The cluster's driver takes credentials from its own environment
    (MLFLOW_TRACKING_USERNAME/PASSWORD, MLFLOW_TRACKING_TOKEN, AWS_*), never from the upload.

    A credential in a field that defines the study (its id would differ once redacted) is refused: one line."""
    text = Path(spec_path).read_text()
    redacted = redact_text(text)
    (workdir / "spec.yaml").write_text(redacted)
    if redacted != text and study_id is not None:
        try:
            same = read_spec(workdir / "spec.yaml", profile, anchored=False)[0].study_id == study_id
        except UserError:
            same = False
        if not same:
            raise UserError(f"{spec_path}: a credential in the spec is part of what the study computes (a dataset "
                            "source?); a study on a cluster takes credentials from its environment, not the spec")
    for package in ("distill_core", "orchestrator", "cli"):  # this checkout's code travels with the job
        source = Path(__import__(package).__file__).parent
        shutil.copytree(source, workdir / package, ignore=shutil.ignore_patterns("__pycache__"))
    return workdir


def _quote(arg: str) -> str:

    return shlex.quote(arg)


def check_cluster_paths(store_root: str, tracking_uri: str) -> None:
    """What a driver on the cluster writes must be somewhere every node (and the user) can reach."""
    if "://" not in store_root and not Path(store_root).is_absolute():
        raise UserError(f"store.root: '{redact_uri(store_root)}' is relative; a study on a cluster needs a path "
                        "every node mounts (e.g. /store) or an object store URL (--store s3://bucket/prefix)")
    if is_relative_sqlite(tracking_uri):
        raise UserError(f"tracking.uri: '{redact_uri(tracking_uri)}' is a relative SQLite path; a study on a "
                        "cluster needs an absolute path on its shared storage or a tracking server "
                        "(--tracking-uri http://...)")
