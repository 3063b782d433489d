"""Files of a store: checksums, tensors as bytes, atomic writes (temp + rename + fsync), the writer of a temp
name, and the error a damaged stage raises.
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


def writer_of(name: str) -> tuple[str | None, int | None]:
    """(host, pid) from a temp name `...tmp-<host>-<pid>-<id>` (a local temp dir or an object prefix; None when it names none)."""
    try:
        rest = name.split(".tmp-", 1)[1]
        host, pid, _ = rest.rsplit("-", 2)
        return host, int(pid)
    except (IndexError, ValueError):
        return None, None
