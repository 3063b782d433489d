"""Files of a store: checksums, tensors as bytes, atomic writes (temp + rename + fsync), who wrote a temp
name (process identity), and the error a damaged stage raises.

Process identity. A pid means something only inside one PID namespace of one boot of one kernel: two
containers sharing a hostname (a pod's, or `--uts=host`) each have their own pid 7, and a pid is reused
after a reboot or once its process ends. So a process is named by its *place* (hostname + boot id + PID
namespace, `PLACE`), its pid and its start time (clock ticks since boot, /proc/<pid>/stat field 22), and
it is judged dead only when it is provably so: the same place, and no process with that pid, or one that
started at another time. Anything else (another place, a platform without /proc) is "cannot tell".
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"


HOST = socket.gethostname()


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]": the same inode is the same namespace
    except OSError:
        return ""


def start_time(pid: int) -> str:
    """When process `pid` started (clock ticks since boot), "" when unknown."""
    stat = _read(f"/proc/{pid}/stat")
    try:  # the command name (field 2) may hold spaces and parentheses: split after its last ")"
        return stat.rsplit(")", 1)[1].split()[19]
    except IndexError:
        return ""


BOOT_ID = _read("/proc/sys/kernel/random/boot_id")
# where pids are comparable: this host, this boot, this PID namespace (a short digest keeps names short)
PLACE = f"{HOST}.{hashlib.sha256(f'{BOOT_ID}|{_pid_namespace()}'.encode()).hexdigest()[:10]}" \
    if BOOT_ID else HOST
START = start_time(os.getpid())


STALE_TEMP_S = 24 * 3600  # a temp dir of another host is removed only once it is this old


class CorruptArtifact(RuntimeError):
    """A stored stage failed verification; `kind`/`key` name it so the driver can rebuild it."""

    def __init__(self, kind: str, key: str, problem: str):
        super().__init__(f"{kind} {key}: {problem}")
        self.kind, self.key = kind, key

    def __reduce__(self):  # picklable across Ray with its attributes
        return (CorruptArtifact, (self.kind, self.key, str(self).split(": ", 1)[1]))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, buf)
    return buf.getvalue()


def atomic_write_bytes(path: Path, data: bytes, fsync: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any, fsync: bool = True) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), fsync)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_dead(place: str, pid: int, started: str = "") -> bool:
    """True only when provably dead: the process's place is this one (host, boot, PID namespace) and no
    process has its pid, or the one that has it started at another time (the pid was reused)."""
    if not place or place != PLACE or pid <= 0:
        return False
    if not pid_alive(pid):
        return True
    return bool(started) and bool(START) and start_time(pid) not in ("", started)


def writer_tag() -> str:
    """This process in a temp name: `<place>-<pid>-<start>` (`writer_of` reads it back)."""
    return f"{PLACE}-{os.getpid()}-{START or 0}"


def writer_of(name: str) -> tuple[str | None, int | None, str]:
    """(place, pid, start time) from a temp name `...tmp-<place>-<pid>-<start>-<id>` (a local temp dir or an
    object prefix); (None, None, "") when it names none."""
    try:
        rest = name.split(".tmp-", 1)[1]
        place, pid, started, _ = rest.rsplit("-", 3)
        return place, int(pid), "" if started == "0" else started
    except (IndexError, ValueError):
        return None, None, ""


def writer_gone(name: str) -> bool:
    """The process that wrote temp name `name` is provably dead (see `process_dead`)."""
    place, pid, started = writer_of(name)
    return place is not None and pid is not None and process_dead(place, pid, started)


def writer_here(name: str) -> bool:
    """Temp name `name` was written in this place (its writer's liveness can be told from here)."""
    return writer_of(name)[0] == PLACE
