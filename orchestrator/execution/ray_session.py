"""The driver's Ray: connect to a cluster or start a local one (with the CPUs this process may use), and
check a cluster address answers before anything is written.
"""

from __future__ import annotations

import logging
import os
import socket

from orchestrator.errors import UserError, first_line
from orchestrator.tracking.secrets import redact_uri


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2/v1 CPU quota (containers)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = None
    try:
        text = open("/sys/fs/cgroup/cpu.max").read().split()
        if text[0] != "max":
            quota = int(text[0]) / int(text[1])
    except (OSError, IndexError, ValueError):
        try:
            q = int(open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read())
            p = int(open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read())
            quota = q / p if q > 0 and p > 0 else None
        except (OSError, ValueError):
            pass
    return max(1, min(n, int(quota))) if quota else max(1, n)


def ensure_ray(address: str | None, num_cpus: int | None) -> None:
    import ray  # Ray: imported where it is used (planning and `validate` start without it)


    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    try:
        if address:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        else:
            ray.init(address="local", num_cpus=num_cpus or available_cpus(), include_dashboard=False,
                     logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or "a local Ray"
        raise UserError(f"ray: cannot connect to cluster '{where}' ({first_line(exc)})") from None
    logging.getLogger("ray").setLevel(logging.WARNING)  # quiet start-up, then Ray's warnings reach the user


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a dead address: ray.init would otherwise retry for minutes."""

    target = address.split("://", 1)[-1]
    if address == "auto" or ":" not in target:
        return
    host, port = target.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise UserError(f"ray: cannot reach cluster '{redact_uri(address)}' ({exc.__class__.__name__}: {exc})") from None
