"""Signed Tune experiment state: a search resumes only from state that a driver holding the secret wrote.

Threat: a search resumes with `Tuner.restore` on `<store>/searches/<stage key>/`, and Tune unpickles
what it finds there (`tuner.pkl`, the searcher's state, cloudpickled values inside the experiment-state
JSON). The store is shared (a bucket, an NFS volume) and stage keys are predictable, so anyone who can
write there could plant a pickle and have it run as code in the search coordinator.

Defence: the coordinator signs the directory as Tune leaves it (periodically while Tune runs, and when
the run ends or is interrupted): HMAC-SHA256, keyed by a secret the store never sees, over the
directory's name and the sorted list of (relative path, sha256) of every file in it, written beside the
state as `ddray-state.sig` (JSON: the list and the HMAC). Before a restore the HMAC is checked with this
user's key and every file is hashed again; the state is restored only if the files are exactly the
signed ones (none added, removed or changed). Otherwise (no signature, another user's key, a changed
file) the caller deletes the state and starts the search afresh: slower, never unsafe. A fresh search
clears the directory first, so nothing planted before it starts is signed with its state.

The secret: `DDRAY_STATE_KEY` if set (set it alike on every node that may run a coordinator), else 32
random bytes in `$XDG_CONFIG_HOME/ddray/state.key` (`~/.config/ddray/state.key`), created once, atomically,
with mode 0600. A signer pickles without it (Tune pickles its callbacks into `tuner.pkl`).

Not signed: the signature itself and the live view's `ddray-progress.json` (JSON that ddray parses and
Tune never reads), with their temp files. Not covered: a file written into the directory while the
search runs is signed with the rest, and a swap between the check and Tune's read (milliseconds) is not
seen; anyone holding the key is trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path

from orchestrator.storage.base import SEARCH_PROGRESS

SIGNATURE = "ddray-state.sig"
KEY_ENV = "DDRAY_STATE_KEY"
KEY_BYTES = 32
_UNSIGNED = (SIGNATURE, SEARCH_PROGRESS)


def key_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(base):  # the XDG spec: a relative value is ignored
        base = os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "ddray" / "state.key"


def state_key() -> bytes:
    """The secret: `DDRAY_STATE_KEY`, else this user's key file (made on first use)."""
    env = os.environ.get(KEY_ENV)
    if env:
        return env.encode()
    path = key_path()
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = _create_key(path)
    if len(key) < KEY_BYTES:
        raise ValueError(f"{path} holds {len(key)} bytes, not a {KEY_BYTES}-byte key; remove it to make a new one")
    return key


def _create_key(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(KEY_BYTES))
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)  # complete when it appears, and exclusive: of two first drivers, one key wins
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_bytes()


def _local_fs(fs):
    if fs is not None:
        return fs
    from pyarrow.fs import LocalFileSystem  # Tune's storage layer: where a search runs

    return LocalFileSystem()


def _unsigned(rel: str) -> bool:
    return rel in _UNSIGNED or any(rel.startswith(f".{name}.tmp-") for name in _UNSIGNED)


def _files(fs, root: str) -> dict:
    """Relative path -> pyarrow FileInfo of every file under `root` that is signed."""
    from pyarrow.fs import FileSelector, FileType  # Tune's storage layer: where a search runs

    base = root.strip("/") + "/"
    out = {}
    for info in fs.get_file_info(FileSelector(root, recursive=True, allow_not_found=True)):
        path = info.path.strip("/")
        if info.type == FileType.File and path.startswith(base) and not _unsigned(rel := path[len(base):]):
            out[rel] = info
    return out


def _write_once(rel: str) -> bool:
    """A file in a trial's checkpoint directory: Tune writes it once and never rewrites it."""
    return any(part.startswith("checkpoint_") for part in rel.split("/")[:-1])


def _sha256(fs, info) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(info.path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _mac(key: bytes, name: str, files: list[list[str]]) -> str:
    # the directory's name is signed too: another search's signed state copied here does not verify
    message = json.dumps({"dir": name, "files": files}, separators=(",", ":"), sort_keys=True).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def verify(root: str, fs=None) -> str | None:
    """None when the state under `root` is exactly what this key signed; else why it is refused."""
    fs = _local_fs(fs)
    try:
        with fs.open_input_stream(f"{root}/{SIGNATURE}") as f:
            sig = json.loads(f.read())
        files = [[str(rel), str(digest)] for rel, digest in sig["files"]]
        mac = str(sig["hmac"])
    except FileNotFoundError:
        return "it has no signature"
    except (OSError, ValueError, KeyError, TypeError):
        return "its signature is unreadable"
    try:
        key = state_key()
    except (OSError, ValueError) as exc:
        return f"there is no state key to check it with ({exc})"
    if not hmac.compare_digest(_mac(key, Path(root).name, files), mac):
        return "its signature does not verify with this user's key (another user's driver, or an edited signature)"
    signed = dict(files)
    current = _files(fs, root)
    if set(current) != set(signed):
        odd = sorted(set(current) ^ set(signed))
        return f"its files are not the signed ones ({len(odd)} added or missing, e.g. {odd[0]})"
    for rel, info in current.items():
        if _sha256(fs, info) != signed[rel]:
            return f"{rel} changed since it was signed"
    return None


def remove_state(root: str, fs=None) -> None:
    """Delete a search's experiment directory (absent: nothing to do)."""
    with contextlib.suppress(FileNotFoundError):
        _local_fs(fs).delete_dir(root)


class Signer:
    """Writes `root`'s signature; `maybe_sign` at most every `every` seconds and only when a file changed.

    File hashes are kept between signatures: a file whose size and mtime are unchanged (or, where the
    filesystem gives no mtime, one in a trial's write-once `checkpoint_*` directory) is not read again.
    """

    def __init__(self, root: str, fs=None, every: float = 2.0):
        self.root, self.fs, self.every = root, fs, every
        self._last = float("-inf")
        self._signed: list | None = None  # the listing the last signature covered
        self._hashes: dict[str, tuple] = {}  # rel -> (size, mtime_ns, sha256)

    def __getstate__(self) -> dict:  # pickled with Tune's callbacks into tuner.pkl: no key, no cached state
        return {"root": self.root, "fs": self.fs, "every": self.every}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def maybe_sign(self, busy: bool = False) -> bool:
        now = time.monotonic()
        if busy or now - self._last < self.every:
            return False
        self._last = now
        return self.sign(only_if_changed=True)

    def sign(self, only_if_changed: bool = False) -> bool:
        """Sign the directory as it is now; False when there was nothing (new) to sign."""
        fs = _local_fs(self.fs)
        files = _files(fs, self.root)
        if not files:
            return False
        listing = sorted((rel, info.size, info.mtime_ns) for rel, info in files.items())
        if only_if_changed and listing == self._signed and all(m is not None for _, _, m in listing):
            return False
        hashes = {}
        for rel, info in files.items():
            cached = self._hashes.get(rel)
            fresh = cached is not None and cached[0] == info.size and (
                cached[1] == info.mtime_ns if info.mtime_ns is not None else _write_once(rel))
            hashes[rel] = (info.size, info.mtime_ns, cached[2] if fresh else _sha256(fs, info))
        self._hashes = hashes
        entries = sorted([rel, h[2]] for rel, h in hashes.items())
        body = json.dumps({"version": 1, "files": entries, "hmac": _mac(state_key(), Path(self.root).name, entries)})
        tmp = f"{self.root}/.{SIGNATURE}.tmp-{secrets.token_hex(4)}"
        with fs.open_output_stream(tmp) as f:
            f.write(body.encode())
        fs.move(tmp, f"{self.root}/{SIGNATURE}")  # a reader sees the old signature or the new one
        self._signed = listing
        return True
