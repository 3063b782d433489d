"""The artifact store and leases on an object store (s3://, gs://, file://, memory:// ... through fsspec).

`ObjectStore` is a drop-in alternative to `orchestrator.storage.local.ArtifactStore` and `ObjectLeases` to
`orchestrator.storage.leases.Leases`; `open_store(root)` / `open_leases(store, owner)` pick one by the URL.
The layout under the URL mirrors the POSIX store:

    stages/<kind>/<key>/manifest.json            # the stage's one publication marker, written last
    stages/<kind>/<key>/.tmp-<host>-<pid>-<id>/  # one writer's files (the manifest names which one is live)
    attempts/<key>/<time>-<host>-<pid>-<id>.json # one object per execution of a stage
    leases/<name>.json, leases/<name>.json.break # who computes a stage now (ObjectLeases)
    quarantine/<key>-<time>-<id>/                # damaged copies (manifest and files), never read

Publication. An object store cannot rename a directory, so a writer uploads every file under its own
prefix `stages/<kind>/<key>/.tmp-<host>-<pid>-<id>/` and then creates `manifest.json` (sha256, size
and object path of every file, and the prefix) only if it is absent: `PutObject` with
`If-None-Match: *` on S3 (s3fs `pipe_file(mode="create")`; moto enforces it and answers 412), the
filesystem's own exclusive create elsewhere (`os.link` of a complete temp file on a local disk, which
fails if the name exists; `pipe_file(mode="create")` on other filesystems: atomic only where the
implementation makes it so, fsspec's default is check-then-write, so gs://, az://, ... are not
atomic). Every create is read back and counts as ours only if the stored bytes are ours, which also
resolves a race on a server that ignores the condition (the last writer's manifest is the one kept;
a writer whose read-back shows another prefix deletes its own files). The first writer wins; a later writer of the same key
keeps a complete copy and deletes its prefix; a damaged copy is quarantined first (by the caller
holding the stage's lease, as in the POSIX store). Files stay under the writer's prefix after
publication: a prefix the manifest does not name is garbage, removed by `clean_temp` once its writer
is gone (a dead pid on this host, or a day old).

Verification. `verify(full=False)` reads the manifest and lists the stage prefix once (one LIST,
not one request per file) to compare sizes; `full=True` also downloads every file and checks its
sha256 (the downloads go into the local cache, so the work is kept).

Local cache. Reads go through a per-node cache, by default `$DDRAY_CACHE/<hash of url>/`, else
`~/.cache/ddray/objects/<hash of url>/`:

    blobs/<sha[:2]>/<sha256>             # content-addressed copies, verified against the manifest on download
    stages/<kind>/<key>/<name>           # hard links to the blobs: what `stage_dir`/`path` return
    studies/<study_id>/                  # the study's log (see below)

A blob is downloaded once per node (a file lock serialises processes that want the same one) and
trusted for local paths while its size matches; `read_bytes` checksums the bytes it returns every
time, and a cached copy that fails is dropped and downloaded again. A file that fails its checksum
on download raises `CorruptArtifact(kind, key, ...)`. Written files are put in the cache too (the
writer has the bytes), so the next stage on the same node reads them without a download.

Study logs. `studies/<id>/events.jsonl` is appended to with O_APPEND and object stores cannot
append, so `study_dir(study_id)` is a LOCAL directory in the cache: the record, the event log and
the driver heartbeats of a study on an object store live on the node of the driver that ran it
(`ddray study status` finds them there, not on other machines).

Leases. `ObjectLeases` keeps `Leases`' semantics (see `orchestrator.storage.leases`: staleness by the
reader's own monotonic clock, a fencing token per acquire kept in `leases/<name>.fence`): create-if-absent
with the conditional PUT; a stale lease is taken over under a breaker object (itself created
conditionally) by a compare-and-swap (`If-Match: <etag of the stale lease>`), so two takers cannot both
replace it; renew overwrites with `If-Match` (a lease taken over meanwhile is not clobbered: it is lost);
release deletes with `If-Match` (only if still ours); the fence is raised by compare-and-swap too. On a
local disk the compare-and-swap runs under an flock of the leases directory, on memory:// under a lock
of this process (memory:// is one process's). Backends safe for concurrent drivers: s3:// (a server
that enforces If-None-Match / If-Match: AWS S3, moto, recent MinIO), a POSIX path (`Leases`: a local
disk, or NFS where flock works across clients), file:// through fsspec on one machine's disk. Other fsspec filesystems (gs://, az://, ...) have no
conditional writes here (fsspec's `mode="create"` is check-then-write): `ObjectLeases` refuses them with
one line unless DDRAY_SINGLE_DRIVER=1 says only one driver uses the store. An S3 server that answers
501 to If-Match falls back to read-compare-write, which is not atomic.

Credentials come from the environment as each filesystem reads it: for S3 the standard `AWS_*`
variables, `AWS_ENDPOINT_URL` included (botocore reads it, so MinIO/moto/Ceph work without options).
The bucket must exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import fsspec
import fsspec.asyn

from orchestrator.errors import UserError
from orchestrator.storage.base import StoreReads
from orchestrator.storage.files import (
    HOST,
    MANIFEST,
    STALE_TEMP_S,
    CorruptArtifact,
    sha256_file,
    writer_gone,
    writer_here,
    writer_tag,
)
from orchestrator.storage.leases import (
    BREAKER_STALE_S,
    DEFAULT_TTL_S,
    LeaseBook,
    Owner,
    _int,
    check_fence,
    encode,
    unreadable_lease,
)

TEMP = ".tmp-"


FORCE_ENV = "DDRAY_OBJECT_STORE"  # "1": file:// URLs go through fsspec too (ObjectStore), not ArtifactStore


CACHE_ENV = "DDRAY_CACHE"


SINGLE_DRIVER_ENV = "DDRAY_SINGLE_DRIVER"  # "1": leases on a store without conditional writes (one driver only)


CREATE_RETRIES = 5  # S3 answers 409 ConditionalRequestConflict to concurrent conditional writes: retry


def _strip_slash(url: str) -> str:
    while url.endswith("/") and not url.endswith("://") and url != "/":
        url = url[:-1]
    return url


def _open_fs(url: str):
    local = urlsplit(url).scheme in ("", "file", "local")
    options = {"auto_mkdir": True} if local else {"use_listings_cache": False}  # listings must be fresh
    if urlsplit(url).scheme in ("s3", "s3a") and os.environ.get("AWS_ENDPOINT_URL"):
        # fsspec caches filesystems by their arguments: name the endpoint, so a changed AWS_ENDPOINT_URL
        # (another server, another test) gets its own client instead of a cached one for the old endpoint
        options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except TypeError:  # a filesystem that takes no such option
        fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/") or "/"


def default_cache_dir(url: str) -> Path:
    base = os.environ.get(CACHE_ENV) or "~/.cache/ddray/objects"
    return Path(base).expanduser() / hashlib.sha256(url.encode()).hexdigest()[:16]


def _error_code(exc: BaseException) -> str | None:
    """The S3 error code behind an s3fs exception (it keeps botocore's ClientError as the cause)."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 5:
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code"))
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


PRECONDITION = ("PreconditionFailed", "412")


CONFLICT = ("ConditionalRequestConflict", "409")


UNSUPPORTED = ("NotImplemented", "501")


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_IN_PROCESS = threading.RLock()  # memory://'s compare-and-swap: the filesystem is this process's


class _Objects:
    """get/put/create/replace/delete of small objects, plus listing, over one fsspec filesystem.

    `create` is exclusive (False when the object exists) and confirmed by reading it back;
    `replace`/`delete` with an etag act only if the object is still that version. S3: conditional
    requests (If-None-Match / If-Match). Local disk: os.link and an flock of the directory. memory://:
    the same under a lock of this process (it is one process's). Other filesystems: the filesystem's
    `mode="create"`, and read-compare-write (not atomic) for the rest (`conditional` is False).
    """

    def __init__(self, fs):
        self.fs = fs
        protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
        from fsspec.implementations.local import LocalFileSystem  # fsspec's local filesystem: only for file:// URLs

        self.kind = "s3" if {"s3", "s3a"} & set(protocols) else \
            "local" if isinstance(fs, LocalFileSystem) else "generic"
        self.protocol = str(protocols[0])
        self.in_process = "memory" in protocols  # fsspec's memory filesystem lives in this process only
        self.conditional = self.kind in ("s3", "local") or self.in_process  # atomic create and compare-and-swap
        self._s3_if_match = True  # cleared if the server says it has no conditional PUT/DELETE on If-Match

    # reading

    def get(self, path: str) -> tuple[bytes, str] | None:
        """(bytes, etag) of an object, None when absent."""
        try:
            if self.kind == "s3":
                return fsspec.asyn.sync(self.fs.loop, self._s3_get, path)
            if self.kind == "local":
                data = Path(path).read_bytes()
            else:
                data = self.fs.cat_file(path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        return data, _etag(data)

    async def _s3_get(self, path: str) -> tuple[bytes, str]:
        bucket, key, _ = self.fs.split_path(path)
        resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
        try:
            data = await resp["Body"].read()
        finally:
            resp["Body"].close()
        return data, resp["ETag"]

    def exists(self, path: str) -> bool:
        if self.kind == "local":
            return os.path.isfile(path)
        try:
            return self.fs.info(path)["type"] == "file"
        except FileNotFoundError:
            return False

    def find(self, prefix: str) -> dict[str, dict]:
        """Every object under `prefix` (one recursive listing): relative name -> info (size, mtime)."""
        try:
            found = self.fs.find(prefix, detail=True)
        except FileNotFoundError:
            return {}
        base = self.fs._strip_protocol(prefix).rstrip("/") + "/"
        out = {}
        for name, info in found.items():
            name = self.fs._strip_protocol(name)
            if name.startswith(base) and info.get("type", "file") == "file":
                out[name[len(base):]] = info
        return out

    def cat_many(self, paths: list[str]) -> dict[str, bytes]:
        """The objects among `paths` that exist, keyed as given (concurrent GETs on S3)."""
        if self.kind == "s3" and paths:
            async def gather():

                got = await asyncio.gather(*(self._s3_get(p) for p in paths), return_exceptions=True)
                for g in got:
                    if isinstance(g, BaseException) and not isinstance(g, FileNotFoundError):
                        raise g
                return got

            results = fsspec.asyn.sync(self.fs.loop, gather)
            return {p: r[0] for p, r in zip(paths, results) if not isinstance(r, BaseException)}
        return {p: got[0] for p in paths if (got := self.get(p)) is not None}

    # writing

    def put(self, path: str, data: bytes) -> None:
        if self.kind == "local":
            _write_local(Path(path), data, fsync=False)
        else:
            self.fs.pipe_file(path, data)

    def upload(self, files: dict[str, bytes]) -> None:
        """Many new objects at once (concurrently on S3); durable (fsync) on a local disk."""
        if self.kind == "local":
            for path, data in files.items():
                _write_local(Path(path), data, fsync=True, atomic=False)
        elif files:
            self.fs.pipe(files)

    def create(self, path: str, data: bytes) -> str | None:
        """Create the object only if absent; its etag when this call created it, else None."""
        if self.kind == "local":
            p = Path(path)
            tmp = p.with_name(f".{p.name}.new-{uuid.uuid4().hex[:8]}")
            _write_local(tmp, data, fsync=True, atomic=False)
            try:
                os.link(tmp, p)  # atomic, fails if the name exists, and the content is complete when it appears
            except FileExistsError:
                return None
            finally:
                tmp.unlink(missing_ok=True)
            return _etag(data)
        if self.in_process:
            with _IN_PROCESS:
                return self._create_generic(path, data)
        return self._create_generic(path, data)

    def _create_generic(self, path: str, data: bytes) -> str | None:
        """`mode="create"` (If-None-Match on S3), confirmed by reading the object back."""
        for attempt in range(CREATE_RETRIES):
            try:
                self.fs.pipe_file(path, data, mode="create")
                break
            except FileExistsError:
                return None
            except OSError as exc:
                code = _error_code(exc)
                if code in PRECONDITION:
                    return None
                if code in CONFLICT and attempt < CREATE_RETRIES - 1:
                    time.sleep(0.05 * 2 ** attempt)
                    continue
                raise
        got = self.get(path)  # read back: ours only if the stored bytes are ours
        return got[1] if got is not None and got[0] == data else None

    def _s3_if_match_call(self, op: str, path: str, etag: str, **kwargs) -> bool | None:
        """`op` on S3 with If-Match: True done, False the version changed, None the server lacks If-Match."""
        if not (self.kind == "s3" and self._s3_if_match):
            return None
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call_s3(op, Bucket=bucket, Key=key, IfMatch=etag, **kwargs)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            code = _error_code(exc)
            if code in PRECONDITION or code in CONFLICT:
                return False
            if code not in UNSUPPORTED:
                raise
            self._s3_if_match = False
            return None
        finally:
            self.fs.invalidate_cache(path)

    def replace(self, path: str, data: bytes, etag: str) -> bool:
        """Overwrite the object only if it is still version `etag`."""
        done = self._s3_if_match_call("put_object", path, etag, Body=data)
        return done if done is not None else self._if_version(path, etag, lambda: self.put(path, data))

    def delete(self, path: str, etag: str | None = None) -> bool:
        """Delete the object (only if it is still version `etag`, when given); True if this call deleted it."""
        if etag is None:
            self.rm(path)
            return True
        done = self._s3_if_match_call("delete_object", path, etag)
        return done if done is not None else self._if_version(path, etag, lambda: self.rm(path))

    def _if_version(self, path: str, etag: str, action) -> bool:
        """The compare-and-swap where the server has no conditional request: `action` under the local lock,
        only if the object is still version `etag` (atomic on one machine; see the module notes)."""
        with self._cas_lock(path):
            got = self.get(path)
            if got is None or got[1] != etag:
                return False
            action()
            return True

    @contextlib.contextmanager
    def _cas_lock(self, path: str) -> Iterator[None]:
        """Compare-and-swap on a local disk: under an flock of the object's directory (processes and threads)."""
        if self.in_process:
            with _IN_PROCESS:
                yield
            return
        if self.kind != "local":
            yield  # no lock available: read-compare-write, not atomic (see the module docstring)
            return
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def copy(self, src: str, dst: str) -> None:
        if self.kind == "local":
            Path(dst).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        else:
            self.fs.copy(src, dst)  # server-side on S3

    def rm(self, path: str, recursive: bool = False) -> None:
        if self.kind == "local":
            if os.path.isdir(path) and recursive:
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    os.unlink(path)
            return
        try:
            self.fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass

    def download(self, path: str, local: Path) -> None:
        if self.kind == "local":
            shutil.copyfile(path, local)
        else:
            self.fs.get_file(path, str(local))  # one streamed GET on S3

    def mtime(self, info: dict) -> float:
        for field in ("mtime", "LastModified", "created", "updated", "timeCreated"):
            value = info.get(field)
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, _dt.datetime):
                return value.timestamp()
            if isinstance(value, str):
                with contextlib.suppress(ValueError):
                    return _dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        return 0.0


def _write_local(path: Path, data: bytes, fsync: bool, atomic: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    target = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}") if atomic else path
    with open(target, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    if atomic:
        os.replace(target, path)


def _temp_name() -> str:
    return f"{TEMP}{writer_tag()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class ObjectStore(StoreReads):
    """`ArtifactStore`'s interface over an fsspec URL, with a local checksum-verified read cache."""

    def __init__(self, url: str, cache_dir: str | os.PathLike | None = None, cache_writes: bool = True):
        self.url = _strip_slash(str(url))
        self.root = self.url  # a string: shown as the URL (`str(store.root)`); not a local path
        self.fs, self.base = _open_fs(self.url)
        self.objects = _Objects(self.fs)
        self._cache_dir_arg = cache_dir
        self.cache = Path(cache_dir).expanduser().resolve() if cache_dir else default_cache_dir(self.url)
        self.cache_writes = cache_writes

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r}, cache_dir={str(self.cache)!r})"

    def __getstate__(self) -> dict:  # picklable (Ray): reopened from its URL in the other process
        return {"url": self.url, "cache_dir": self._cache_dir_arg, "cache_writes": self.cache_writes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["url"], state["cache_dir"], state["cache_writes"])

    # --- names ---------------------------------------------------------------------------------

    def _k(self, *parts: str) -> str:
        return "/".join((self.base.rstrip("/"), *parts))

    def _prefix(self, kind: str, key: str) -> str:
        return self._k("stages", kind, key)

    def _manifest_path(self, kind: str, key: str) -> str:
        return self._k("stages", kind, key, MANIFEST)

    def url_of(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)

    def _blob(self, sha: str) -> Path:
        return self.cache / "blobs" / sha[:2] / sha

    def _view(self, kind: str, key: str) -> Path:
        return self.cache / "stages" / kind / key

    def study_dir(self, study_id: str) -> Path:
        """A LOCAL directory (object stores cannot append to the study's event log): see the module docstring."""
        return self.studies_root() / study_id

    def studies_root(self) -> Path:
        return self.cache / "studies"

    def searches(self):
        """Where Tune keeps searches' experiment state: `searches/` under the bucket, through pyarrow's fsspec view."""
        from pyarrow.fs import FSSpecHandler, PyFileSystem  # pyarrow (Tune's storage layer) only where a search runs

        return f"{self.base.rstrip('/')}/searches", PyFileSystem(FSSpecHandler(self.fs))

    def search_progress_file(self, key: str) -> None:
        """None: the live view's search progress is kept for local stores only (no object per second)."""
        return None

    # --- writing -------------------------------------------------------------------------------

    def write_stage(self, kind: str, key: str, files: dict[str, bytes], meta: dict, fence: int | None = None) -> Path:
        """Upload the files under a fresh prefix, then publish them by creating the manifest (first writer wins);
        with `fence` (the fencing token the stage's computation holds), only if its lease still carries it."""
        name = _temp_name()
        tmp = self._k("stages", kind, key, name)
        published = False
        try:
            entries, uploads = {}, {}
            for fname, data in files.items():
                entries[fname] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                                  "object": f"{name}/{fname}"}
                uploads[f"{tmp}/{fname}"] = data
            self.objects.upload(uploads)
            manifest = {"kind": kind, "key": key, "created": time.time(), "files": entries, "meta": meta,
                        "prefix": name, "writer": {"host": HOST, "pid": os.getpid()}}
            body = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
            if fence is not None:
                lease = self.objects.get(self._k("leases", f"{key}.json"))
                check_fence(key, fence, lease[0] if lease is not None else None)
            published = self._publish(kind, key, name, body)
        except BaseException:
            if not published and not self._names_prefix(kind, key, name):
                self.objects.rm(tmp, recursive=True)
            raise
        if not published:
            self.objects.rm(tmp, recursive=True)  # a copy was published first: keep it
        if self.cache_writes:
            with contextlib.suppress(OSError):  # the cache is an optimisation: a full disk must not fail the stage
                for fname, data in files.items():
                    self._cache_blob(entries[fname]["sha256"], data)
        # the local copy of the published stage, from what is cached here (no download: stage_dir() fetches the rest)
        return self._materialize(kind, key, None, download=False)

    def _names_prefix(self, kind: str, key: str, name: str) -> bool:
        """The published manifest names this writer's prefix (after a create whose answer was lost, say)."""
        try:
            return (self.manifest(kind, key) or {}).get("prefix") == name
        except Exception:
            return True  # unknown: keep the files; clean_temp removes them if they turn out unreferenced

    def _publish(self, kind: str, key: str, name: str, body: bytes) -> bool:
        """True when this writer's manifest is the published one; False when an intact copy was there first."""
        current = self.manifest(kind, key)
        if current is not None:
            if current and not self.verify(kind, key, full=True):
                return False  # an identical stage (same key) was published first: keep it
            self.quarantine(kind, key)  # damaged; the caller holds the stage's lease
        if self.objects.create(self._manifest_path(kind, key), body) is not None:
            return True
        # published by another writer between the check and the create
        problems = self.verify(kind, key, full=True)
        if problems:
            raise CorruptArtifact(kind, key, "published by another writer meanwhile and damaged: "
                                  + "; ".join(problems))
        return False

    def _cache_blob(self, sha: str, data: bytes) -> None:
        blob = self._blob(sha)
        if blob.exists() and blob.stat().st_size == len(data):
            return
        _write_local(blob, data, fsync=False)

    def quarantine(self, kind: str, key: str) -> str | None:
        """Copy a damaged stage (manifest and files) to `quarantine/`, then unpublish it and delete its files."""
        mpath = self._manifest_path(kind, key)
        got = self.objects.get(mpath)
        if got is None:
            return None
        raw, etag = got
        dst = self._k("quarantine", f"{key}-{int(time.time())}-{uuid.uuid4().hex[:4]}")
        self.objects.put(f"{dst}/{MANIFEST}", raw)
        try:
            manifest = json.loads(raw)
            files = dict(manifest.get("files", {}))
            prefix = manifest.get("prefix")
        except (ValueError, AttributeError, TypeError):
            files, prefix = {}, None
        for fname, entry in files.items():
            with contextlib.suppress(FileNotFoundError, OSError):
                self.objects.copy(f"{self._prefix(kind, key)}/{entry.get('object', fname)}", f"{dst}/{fname}")
        if not self.objects.delete(mpath, etag):
            return None  # replaced or moved by another process meanwhile
        if isinstance(prefix, str) and prefix.startswith(TEMP) and "/" not in prefix:
            self.objects.rm(f"{self._prefix(kind, key)}/{prefix}", recursive=True)
        shutil.rmtree(self._view(kind, key), ignore_errors=True)
        return self.url_of(dst)

    def record_attempt(self, key: str) -> str:
        """One object per execution of a stage, written when it starts: executions are counted, not guessed."""
        path = self._k("attempts", key, f"{time.time():.6f}-{HOST}-{os.getpid()}-{uuid.uuid4().hex[:6]}.json")
        self.objects.put(path, json.dumps({"host": HOST, "pid": os.getpid(), "started": time.time()}).encode())
        return self.url_of(path)

    def attempts(self, key: str) -> int:
        return sum(1 for name in self.objects.find(self._k("attempts", key))
                   if "/" not in name and name.endswith(".json"))

    @staticmethod
    def _attempt_id(attempt: str | os.PathLike) -> str:
        return str(attempt).rstrip("/").rsplit("/", 1)[-1].removesuffix(".json")

    def attempt_log(self, key: str, attempt: str | os.PathLike) -> Path:
        """Where an attempt writes its log while it runs: a LOCAL file (objects cannot be appended to),
        uploaded beside the attempt by `publish_log`."""
        path = self.cache / "attempt-logs" / key / f"{self._attempt_id(attempt)}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def publish_log(self, key: str, attempt: str | os.PathLike) -> None:
        """Upload the attempt's local log to `attempts/<key>/<attempt>.log` (nothing if it wrote none)."""
        local = self.attempt_log(key, attempt)
        try:
            data = local.read_bytes()
        except FileNotFoundError:
            return
        self.objects.put(self._k("attempts", key, local.name), data)

    def stage_logs(self, key: str) -> list[tuple[str, str]]:
        """(attempt, log text) of every attempt of a stage whose log was published, oldest first."""
        names = sorted(n for n in self.objects.find(self._k("attempts", key)) if "/" not in n and n.endswith(".log"))
        found = self.objects.cat_many([self._k("attempts", key, n) for n in names])
        return [(n.removesuffix(".log"), found[p].decode(errors="replace"))
                for n in names if (p := self._k("attempts", key, n)) in found]

    def clean_temp(self, now: float | None = None) -> list[str]:
        """Remove writer prefixes no manifest names whose writer is gone: a dead pid here, or a day old elsewhere."""
        now = now or time.time()
        newest: dict[tuple[str, str, str], float] = {}
        for name, info in self.objects.find(self._k("stages")).items():  # one listing of the whole stage tree
            parts = name.split("/")
            if len(parts) >= 4 and parts[2].startswith(TEMP):
                group = (parts[0], parts[1], parts[2])
                newest[group] = max(newest.get(group, 0.0), self.objects.mtime(info))
        candidates = []
        for (kind, key, prefix), mtime in newest.items():
            if writer_gone(prefix) or (not writer_here(prefix) and now - mtime > STALE_TEMP_S):
                candidates.append((kind, key, prefix))
        paths = sorted({self._manifest_path(kind, key) for kind, key, _ in candidates})
        manifests = self.objects.cat_many(paths)
        removed = []
        for kind, key, prefix in candidates:
            raw = manifests.get(self._manifest_path(kind, key))
            if raw is not None:
                try:
                    live = json.loads(raw).get("prefix")
                except (ValueError, AttributeError):
                    continue  # unreadable manifest: which prefix it names is unknown; quarantine handles it
                if live == prefix:
                    continue  # the published copy
            path = self._k("stages", kind, key, prefix)
            self.objects.rm(path, recursive=True)
            removed.append(self.url_of(path))
        return removed

    # --- reading -------------------------------------------------------------------------------

    def manifest(self, kind: str, key: str) -> dict | None:
        got = self.objects.get(self._manifest_path(kind, key))
        if got is None:
            return None
        try:
            manifest = json.loads(got[0])
        except ValueError:
            return {}  # present but unreadable: damaged
        return manifest if isinstance(manifest, dict) else {}

    def verify(self, kind: str, key: str, full: bool = False) -> list[str]:
        """Problems with a stored stage; empty when it is complete (sizes from one listing; with `full` every sha256)."""
        manifest = self.manifest(kind, key)
        if not manifest or not isinstance(manifest.get("files"), dict):
            return ["manifest missing or unreadable"]
        listing = self.objects.find(self._prefix(kind, key))
        problems = []
        for name, entry in manifest["files"].items():
            info = listing.get(entry.get("object", name))
            if info is None:
                problems.append(f"{name}: missing")
                continue
            size = int(info.get("size", -1))
            if size != entry["bytes"]:
                problems.append(f"{name}: truncated ({size} of {entry['bytes']} bytes)")
            elif full:
                try:
                    self._fetch(kind, key, name, entry, force=True)
                except CorruptArtifact:
                    problems.append(f"{name}: checksum mismatch")
        return problems

    def is_complete(self, kind: str, key: str, full: bool = False) -> bool:
        return not self.verify(kind, key, full)

    def exists(self, kind: str, key: str) -> bool:
        """Something (complete or damaged) is published under this key: its manifest is there."""
        return self.objects.exists(self._manifest_path(kind, key))

    def stage_keys(self, kind: str) -> list[str]:
        """Keys of the published stages of one kind (one listing)."""
        return sorted(name.split("/")[0] for name in self.objects.find(self._k("stages", kind))
                      if name.count("/") == 1 and name.endswith("/" + MANIFEST))

    def _fetch(self, kind: str, key: str, name: str, entry: dict, force: bool = False) -> Path:
        """The cached blob of one file: downloaded (once per node) and verified against the manifest."""
        blob = self._blob(entry["sha256"])
        if not force and _size(blob) == entry["bytes"]:
            return blob
        with _file_lock(blob.with_name(blob.name + ".lock")):
            if not force and _size(blob) == entry["bytes"]:
                return blob  # another process of this node downloaded it meanwhile
            part = blob.with_name(f".{blob.name}.part-{os.getpid()}-{uuid.uuid4().hex[:6]}")
            try:
                try:
                    self.objects.download(f"{self._prefix(kind, key)}/{entry.get('object', name)}", part)
                except FileNotFoundError:
                    raise CorruptArtifact(kind, key, f"'{name}' is missing") from None
                if _size(part) != entry["bytes"] or sha256_file(part) != entry["sha256"]:
                    raise CorruptArtifact(kind, key, f"'{name}' fails its checksum")
                os.replace(part, blob)
            finally:
                part.unlink(missing_ok=True)
        return blob

    def _entry(self, kind: str, key: str, name: str) -> dict:
        manifest = self.manifest(kind, key)
        if not manifest or name not in manifest.get("files", {}):
            raise CorruptArtifact(kind, key, f"no stored file '{name}'")
        return manifest["files"][name]

    def read_bytes(self, kind: str, key: str, name: str) -> bytes:
        entry = self._entry(kind, key, name)
        for attempt in range(2):
            data = self._fetch(kind, key, name, entry).read_bytes()
            if hashlib.sha256(data).hexdigest() == entry["sha256"]:
                return data
            self._blob(entry["sha256"]).unlink(missing_ok=True)  # the cached copy is damaged: download again
        raise CorruptArtifact(kind, key, f"'{name}' fails its checksum")


    # --- local copies (MLflow artifact upload, the CLI) ------------------------------------------

    def path(self, kind: str, key: str, name: str) -> Path:
        """A local copy of one stored file (downloaded on demand); a path that does not exist if it can't be had."""
        view = self._view(kind, key) / name
        manifest = self.manifest(kind, key)
        entry = (manifest or {}).get("files", {}).get(name)
        if entry is None:
            return view
        self._link(kind, key, name, entry)
        return view

    def stage_dir(self, kind: str, key: str, names: list[str] | None = None) -> Path:
        """A local directory holding a copy of every file of the stage (downloaded on demand, once per node).

        `names` limits the downloads to those files (say the artifacts MLflow logs: the stage's large
        tensors then stay remote). Like the POSIX store's it does not raise: a file that is missing or
        fails its checksum is absent from it (reading it raises CorruptArtifact)."""
        return self._materialize(kind, key, names, download=True)

    def _materialize(self, kind: str, key: str, names: list[str] | None, download: bool) -> Path:
        view = self._view(kind, key)
        manifest = self.manifest(kind, key) or {}
        files = manifest.get("files", {}) if isinstance(manifest.get("files"), dict) else {}
        for name, entry in files.items():
            if names is None or name in names:
                self._link(kind, key, name, entry, download)
        if view.exists():
            for p in list(view.rglob("*")):
                rel = p.relative_to(view).as_posix()
                if p.is_file() and rel not in files:
                    p.unlink(missing_ok=True)  # left from an earlier copy of the stage
        return view

    def _link(self, kind: str, key: str, name: str, entry: dict, download: bool = True) -> None:
        view = self._view(kind, key) / name
        if not download and _size(self._blob(entry["sha256"])) != entry["bytes"]:
            return
        try:
            blob = self._fetch(kind, key, name, entry)
        except CorruptArtifact:
            view.unlink(missing_ok=True)
            return
        with contextlib.suppress(FileNotFoundError):
            if os.path.samefile(view, blob):
                return
        view.parent.mkdir(parents=True, exist_ok=True)
        tmp = view.with_name(f".{view.name}.link-{uuid.uuid4().hex[:6]}")
        try:
            os.link(blob, tmp)
        except OSError:  # no hard links here: a copy
            shutil.copyfile(blob, tmp)
        os.replace(tmp, view)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


CLAIM_RETRIES = 8  # raising the fence races only with a taker that judged this acquire's lease stale


def refuse_unconditional(objects: _Objects, url: str) -> None:
    """Leases need conditional writes: one line naming the backend where fsspec has none here."""
    if objects.conditional or os.environ.get(SINGLE_DRIVER_ENV, "") == "1":
        return
    raise UserError(f"store.root: {objects.protocol}:// has no conditional writes in this fsspec version; "
                    f"concurrent drivers need s3:// or a POSIX path ({SINGLE_DRIVER_ENV}=1 if only one driver "
                    f"uses {url})")


class ObjectLeases(LeaseBook):
    """Leases on an object store: conditional create, takeover under a breaker by compare-and-swap,
    renew and release by compare-and-swap, a fencing token raised by compare-and-swap on `<name>.fence`."""

    def __init__(self, store_url: str | ObjectStore, owner: Owner, ttl: float = DEFAULT_TTL_S):
        super().__init__(owner, ttl)
        if isinstance(store_url, ObjectStore):
            fs, base = store_url.fs, store_url.base
        else:
            fs, base = _open_fs(str(store_url))
        self.objects = _Objects(fs)
        refuse_unconditional(self.objects, str(getattr(store_url, "url", store_url)))
        self.dir = base.rstrip("/") + "/leases"

    def _path(self, name: str) -> str:
        return f"{self.dir}/{name}.json"

    def _fence_path(self, name: str) -> str:
        return f"{self.dir}/{name}.fence"

    def _read(self, path: str) -> tuple[dict | None, str | None]:
        """(lease, etag): both None when absent; an unreadable lease reads as a placeholder of its version."""
        got = self.objects.get(path)
        if got is None:
            return None, None
        try:
            info = json.loads(got[0])
        except ValueError:
            info = None
        return (info if isinstance(info, dict) else unreadable_lease(got[1])), got[1]

    def _read_fence(self, name: str) -> tuple[int, str | None]:
        got = self.objects.get(self._fence_path(name))
        if got is None:
            return 0, None
        try:
            return int(got[0].strip() or 0), got[1]
        except ValueError:
            return 0, got[1]

    def holder(self, name: str) -> dict | None:
        return self._read(self._path(name))[0]

    def _acquire(self, name: str) -> dict | None:
        """Create the lease (the fence read first: its token), else take it over if stale; then raise the fence."""
        path = self._path(name)
        fence, fence_etag = self._read_fence(name)
        new = self._body(fence + 1)
        if self.objects.create(path, encode(new)) is None:
            info, etag = self._read(path)
            if etag is None or not self.stale(name, info):
                return None  # held (or released this instant: the next try creates it)
            new["token"] = max(new["token"], _int(info.get("token")) + 1)
            if not self._take_over(name, new):
                return None
        return self._claim(name, new, fence, fence_etag)

    def _claim(self, name: str, new: dict, fence: int, fence_etag: str | None) -> dict | None:
        """Record the new lease's token in the fence, which only ever grows (compare-and-swap); if another
        acquire recorded a token as large meanwhile, take the next one (rewriting our lease first)."""
        path = self._fence_path(name)
        for _ in range(CLAIM_RETRIES):
            if fence >= new["token"]:
                bumped = {**new, "token": fence + 1}
                if not self._replace_mine(name, new, bumped):
                    return None  # taken over meanwhile
                new = bumped
            data = str(new["token"]).encode()
            done = self.objects.create(path, data) is not None if fence_etag is None \
                else self.objects.replace(path, data, fence_etag)
            if done:
                return new
            fence, fence_etag = self._read_fence(name)
        self._release(name, new)
        return None

    def _take_over(self, name: str, new: dict) -> bool:
        """Replace a stale lease, under the breaker object; False if someone else is breaking or won it.
        A breaker left by a taker that died is removed once it has stayed the same for BREAKER_STALE_S
        by this process's monotonic clock."""
        path = self._path(name)
        breaker = path + ".break"
        mine = self.objects.create(breaker, json.dumps(
            {"driver": self.owner.driver, "token": uuid.uuid4().hex}).encode())
        if mine is None:
            got = self.objects.get(breaker)
            if got is not None and self.watch.unchanged_for(f"{name}.break", got[1]) >= BREAKER_STALE_S:
                self.objects.delete(breaker, got[1])  # that breaker only, not a newer one
                self.watch.forget(f"{name}.break")
            return False
        try:
            info, etag = self._read(path)  # re-read under the breaker: still stale?
            if not self.stale(name, info):
                return False
            new["token"] = max(new["token"], _int((info or {}).get("token")) + 1)
            if etag is None:
                return self.objects.create(path, encode(new)) is not None  # released meanwhile
            return self.objects.replace(path, encode(new), etag)  # only the version judged stale
        finally:
            self.objects.delete(breaker, mine)

    def _replace_mine(self, name: str, mine: dict | None, new: dict) -> bool:
        path = self._path(name)
        info, etag = self._read(path)
        return etag is not None and self._same(info, mine) and self.objects.replace(path, encode(new), etag)

    def _renew(self, name: str, mine: dict | None) -> dict | None:
        path = self._path(name)
        info, etag = self._read(path)
        if etag is None or not self._same(info, mine):
            return None
        new = {**info, "renewals": _int(info.get("renewals")) + 1, "ttl": self.ttl}
        return new if self.objects.replace(path, encode(new), etag) else None

    def _release(self, name: str, mine: dict | None) -> None:
        path = self._path(name)
        info, etag = self._read(path)
        if etag is not None and self._same(info, mine):
            self.objects.delete(path, etag)

    def _beat_path(self, driver: str) -> str:
        return f"{self.dir}/drivers/{driver}.json"

    def beat_of(self, driver: str) -> dict | None:
        got = self.objects.get(self._beat_path(driver))
        if got is None:
            return None
        try:
            info = json.loads(got[0])
        except ValueError:
            return None
        return info if isinstance(info, dict) else None

    def _write_beat(self, body: dict) -> None:
        self.objects.put(self._beat_path(self.owner.driver), encode(body))  # only its driver writes it: no condition

    def _drop_beat(self) -> None:
        got = self.objects.get(self._beat_path(self.owner.driver))
        if got is not None:
            self.objects.delete(self._beat_path(self.owner.driver), got[1])
