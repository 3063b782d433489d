"""Where a relative path in a spec or on the command line points.

A path written in a spec file (`store.root`, a `sqlite:///` tracking URI, `datasets[].data_root`)
is relative to that file's directory, like an `include` in a build file: the same spec reaches the
same store, tracking DB and data from whichever directory ddray runs in. A path given on the
command line, or a default, is relative to the working directory, as any CLI's is. Either way the
driver records absolute paths, so follow-up commands and the UI reach them from anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

SQLITE = "sqlite:///"


def absolute_path(value: str, base: str | os.PathLike) -> str:
    """`value` made absolute against `base` (lexically: `..` is folded, symlinks are kept);
    a URL, `~/...` and an absolute path are returned as they are."""
    if "://" in value or Path(value).expanduser().is_absolute():
        return value
    return os.path.normpath(os.path.join(os.path.abspath(base), value))


def is_relative_sqlite(uri: str) -> bool:
    """sqlite:///x.db names x.db relative to the working directory; sqlite:////x.db is /x.db."""
    return uri.startswith(SQLITE) and not uri[len(SQLITE):].startswith(("/", "~")) \
        and uri[len(SQLITE):] not in ("", ":memory:")


def absolute_sqlite(uri: str, base: str | os.PathLike) -> str:
    """A relative SQLite tracking URI made absolute against `base`; any other URI unchanged."""
    if not is_relative_sqlite(uri):
        return uri
    return SQLITE + absolute_path(uri[len(SQLITE):], base)


def sqlite_file(uri: str) -> Path | None:
    """The database file a sqlite:/// URI names (None for any other URI)."""
    if not uri.startswith(SQLITE) or uri[len(SQLITE):] in ("", ":memory:"):
        return None
    return Path(uri[len(SQLITE):].split("?", 1)[0]).expanduser()


def anchor_spec_paths(data: dict, spec_dir: str | os.PathLike) -> dict:
    """The spec mapping `data` with the relative paths written in it made absolute against the
    directory of the spec file (values of the wrong type are left for validation to name)."""
    out = dict(data)
    store, tracking = out.get("store"), out.get("tracking")
    if isinstance(store, dict) and isinstance(store.get("root"), str):
        out["store"] = {**store, "root": absolute_path(store["root"], spec_dir)}
    if isinstance(tracking, dict) and isinstance(tracking.get("uri"), str):
        out["tracking"] = {**tracking, "uri": absolute_sqlite(tracking["uri"], spec_dir)}
    if isinstance(out.get("datasets"), list):
        out["datasets"] = [{**d, "data_root": absolute_path(d["data_root"], spec_dir)}
                           if isinstance(d, dict) and isinstance(d.get("data_root"), str) else d
                           for d in out["datasets"]]
    return out
