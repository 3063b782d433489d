"""User-facing errors: one line, naming the field or resource, exit code 2."""


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
