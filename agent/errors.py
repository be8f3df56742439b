"""Errors shown to operators: what failed, where, and a hint."""

from __future__ import annotations


class DabbaError(Exception):
    """An error with a message for the operator and an optional hint.

    The CLI prints ``error: <message>`` and ``hint: <hint>`` and exits 1;
    no traceback, since the message already names what and where.
    """

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        return self.args[0]
