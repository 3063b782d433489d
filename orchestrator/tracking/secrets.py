"""The one redaction of credentials, applied to every URI and text ddray stores, uploads, logs or prints.

Pure functions (no MLflow, no I/O):
- `redact_uri(uri)`: `scheme://user:password@host` -> `scheme://user:***@host`, and the value of every query
  parameter whose name contains token, key, secret, password, passwd, signature or credential (or is `sig`,
  `pwd`, `auth`) -> `***`; anything else unchanged (a plain path or `sqlite:///...` stays as it is).
- `strip_password(uri)`: the URI without its password (`user@host`), query secrets masked: the form a URI is
  stored or passed in where it must stay usable, the password coming from the environment
  (MLFLOW_TRACKING_PASSWORD, PGPASSWORD, ...), never `***` sent as one.
- `redact_text(text)`: every URI-like substring (`scheme://...`) in arbitrary text redacted as above, and the
  value of every `key: value` / `key=value` whose key names a secret (password, token, secret,
  MLFLOW_TRACKING_PASSWORD, AWS_SECRET_ACCESS_KEY, api_key, ...) -> `***` (`"***"` after a colon, so that a
  redacted YAML spec still loads).
- `redact_data(obj)`: the same over the strings of a JSON-like structure (and values under secret-named keys).
"""

from __future__ import annotations

import re

MASK = "***"

# query parameter names: a name *containing* one of these is a secret (X-Amz-Signature, access_token, apikey, ...)
_QUERY_WORDS = ("token", "key", "secret", "password", "passwd", "signature", "credential")
_QUERY_EXACT = {"sig", "pwd", "auth", "pass"}

# `key: value` / `key=value` names: one of these as a whole word of the name (split on _ . -) or ending it
# (MLFLOW_TRACKING_PASSWORD, AWS_SECRET_ACCESS_KEY, dbPassword); not "tokenizer", not a stage "key"
_TEXT_WORDS = r"password|passwd|passphrase|token|secret|credentials?|signature|apikey|api[_-]?key|" \
              r"access[_-]?key|secret[_-]?key|private[_-]?key|session[_-]?key|auth"

_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
_TRAILING = ".,;:!?)]}>"

_NAME = r"[A-Za-z0-9_.\-]*"
_KEY_VALUE = re.compile(
    r"(?P<q>[\"']?)(?P<name>" + _NAME + r")(?P=q)(?P<sep>[ \t]*(?::[ \t]+|:$|=)[ \t]*)"
    r"(?P<value>\"[^\"\n]*\"|'[^'\n]*'|[^\s,;}\]\"'&]+)",
    re.MULTILINE)
_SECRET_NAME = re.compile(r"(?i)(?:^|[_.\-])(?:" + _TEXT_WORDS + r")(?:$|[_.\-])|(?:" + _TEXT_WORDS + r")$")


def secret_name(name: str) -> bool:
    """Whether a key/variable/field name names a secret (MLFLOW_TRACKING_PASSWORD, token, aws_secret_access_key)."""
    return bool(_SECRET_NAME.search(name))


def _secret_query_name(name: str) -> bool:
    low = name.lower()
    return low in _QUERY_EXACT or any(w in low for w in _QUERY_WORDS)


def _split_uri(uri: str):
    """(scheme://, userinfo or None, rest of authority, path, query or None, fragment or None) or None."""
    head, sep, tail = uri.partition("://")
    if not sep:
        return None
    end = len(tail)
    for ch in "/?#":
        i = tail.find(ch)
        if i != -1:
            end = min(end, i)
    authority, rest = tail[:end], tail[end:]
    userinfo, at, host = authority.rpartition("@")
    rest, hsep, fragment = rest.partition("#")
    path, qsep, query = rest.partition("?")
    return (head + sep, userinfo if at else None, host, path, query if qsep else None, fragment if hsep else None)


def _join(scheme, userinfo, host, path, query, fragment) -> str:
    return (scheme + (f"{userinfo}@" if userinfo is not None else "") + host + path
            + (f"?{query}" if query is not None else "") + (f"#{fragment}" if fragment is not None else ""))


def _mask_query(query: str) -> str:
    parts = re.split(r"([&;])", query)
    out = []
    for part in parts:
        name, eq, value = part.partition("=")
        out.append(f"{name}={MASK}" if eq and value and _secret_query_name(name) else part)
    return "".join(out)


def _redact(uri: str, drop: bool) -> str:
    parts = _split_uri(uri)
    if parts is None:
        return uri
    scheme, userinfo, host, path, query, fragment = parts
    if userinfo is not None and ":" in userinfo:
        user, _, password = userinfo.partition(":")
        if password:
            userinfo = user if drop else f"{user}:{MASK}"
    if query is not None:
        query = _mask_query(query)
    if fragment is not None and "=" in fragment:  # OAuth-style fragments carry tokens too (#access_token=...)
        fragment = _mask_query(fragment)
    return _join(scheme, userinfo, host, path, query, fragment)


def redact_uri(uri: str) -> str:
    """`uri` with its password shown as *** and secret query parameters' values as ***; otherwise unchanged."""
    return _redact(uri, drop=False) if isinstance(uri, str) else uri


def strip_password(uri: str) -> str:
    """`uri` without its password (still usable: credentials come from the environment), query secrets masked."""
    return _redact(uri, drop=True) if isinstance(uri, str) else uri


def _redact_uri_match(match: re.Match) -> str:
    text = match.group(0)
    stripped = text.rstrip(_TRAILING)
    return redact_uri(stripped) + text[len(stripped):]


def _redact_key_value(match: re.Match) -> str:
    if not secret_name(match.group("name")):
        return match.group(0)
    value = match.group("value")
    if value in (MASK, f'"{MASK}"', f"'{MASK}'") or "://" in value:
        return match.group(0)  # a URI value is redacted as a URI (its user name and host stay readable)
    quote = value[0] if value[:1] in "\"'" and len(value) > 1 and value[-1] == value[0] else ""
    if not quote and ":" in match.group("sep"):
        quote = '"'  # `key: ***` would be a YAML alias: the redacted spec must still load
    start, end = match.start("value") - match.start(0), match.end("value") - match.start(0)
    whole = match.group(0)
    return whole[:start] + f"{quote}{MASK}{quote}" + whole[end:]


def redact_text(text: str) -> str:
    """`text` (a YAML spec, a log or error line) with every URI redacted and every secret-named value masked."""
    if not isinstance(text, str) or not text:
        return text
    text = _URI.sub(_redact_uri_match, text)
    return _KEY_VALUE.sub(_redact_key_value, text)


def redact_data(obj):
    """A JSON-like structure with its strings redacted (`redact_text`) and values under secret-named keys masked."""
    if isinstance(obj, dict):
        return {k: (MASK if isinstance(k, str) and secret_name(k) and isinstance(v, str) and v else redact_data(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_data(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(redact_data(v) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj)
    return obj
