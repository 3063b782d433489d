"""User-facing errors: one line, naming the field or resource, exit code 2; "did you mean" for a wrong name."""

from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """Bad input or an unreachable resource. The CLI prints each line and exits 2."""

    def __init__(self, *lines: str):
        self.lines = [line for line in lines if line]
        super().__init__("\n".join(self.lines))


def first_line(text: object, limit: int = 160) -> str:
    """The first line of `text`, at most `limit` characters, cut at a word boundary (with an ellipsis)."""
    lines = str(text).strip().splitlines()
    line = lines[0] if lines else ""
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0]
    return (cut if len(cut) > limit // 2 else line[:limit]).rstrip(" ,;:") + "…"


def suggest(word: str, choices: Iterable[str], shown: int = 8) -> str:
    """" (did you mean 'x'?)", or the known choices (the first `shown` of them)."""
    choices = sorted(choices)
    close = difflib.get_close_matches(word, choices, n=1)
    if close:
        return f" (did you mean '{close[0]}'?)"
    more = f", ... {len(choices) - shown} more" if len(choices) > shown else ""
    return f" (known: {', '.join(choices[:shown])}{more})"
