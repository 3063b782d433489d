"""`open_store(root)` and `open_leases(store, owner)`: the local backend for a path, the object backend for
a URL (s3://, gs://, ... or file:// with DDRAY_OBJECT_STORE=1).
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from orchestrator.storage.leases import DEFAULT_TTL_S, Leases, Owner
from orchestrator.storage.local import ArtifactStore
from orchestrator.storage.objects import FORCE_ENV, ObjectLeases, ObjectStore


def is_url(root: Any) -> bool:
    return isinstance(root, str) and "://" in root


def open_store(root: str | os.PathLike, cache_dir: str | None = None) -> ArtifactStore | "ObjectStore":
    """The store for a `store.root` / `--store` value: a plain path or `file:///path` is the POSIX
    `ArtifactStore` (unless DDRAY_OBJECT_STORE=1); any other URL (s3://, gs://, ...) an `ObjectStore`."""
    if isinstance(root, (ArtifactStore, ObjectStore)):
        return root
    if not is_url(root):
        return ArtifactStore(root)
    parts = urlsplit(root)
    if parts.scheme in ("file", "local") and not parts.netloc and os.environ.get(FORCE_ENV, "") != "1":
        return ArtifactStore(root.split("://", 1)[1])
    return ObjectStore(root, cache_dir)


def open_leases(store: ArtifactStore | "ObjectStore" | str, owner: Owner,
                ttl: float = DEFAULT_TTL_S) -> Leases | "ObjectLeases":
    """The leases that go with a store: `Leases` beside an ArtifactStore, `ObjectLeases` beside an ObjectStore.
    A backend without conditional writes (gs://, az://, ... in this fsspec) raises UserError, one line
    naming it, unless DDRAY_SINGLE_DRIVER=1 (see `orchestrator.storage.objects`)."""
    store = open_store(store) if isinstance(store, (str, os.PathLike)) else store
    if isinstance(store, ObjectStore):
        return ObjectLeases(store, owner, ttl)
    return Leases(store.root, owner, ttl)
