"""One-line messages: never cut mid-word."""

from orchestrator.errors import UserError, first_line


def test_first_line_cuts_at_a_word_boundary_with_an_ellipsis():
    text = "cannot connect to the cluster because the head node refused the connection again\nsecond line"
    assert first_line(text, 40) == "cannot connect to the cluster because…"
    assert first_line("short\nmore") == "short" and first_line("") == ""
    assert first_line("x" * 50, 10) == "x" * 10 + "…"  # one long word: cut where it must


def test_user_error_keeps_its_non_empty_lines():
    assert UserError("a", "", "b").lines == ["a", "b"]
