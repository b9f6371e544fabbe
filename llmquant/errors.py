"""How a bad-input error is shown: one line, never a traceback."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A problem with the user's input, reported as one line (the CLI exits with code 2)."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name if the message is empty)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]
