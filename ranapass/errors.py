"""The error every user-facing mistake raises: the CLI prints its message in one line and exits with 2."""

from __future__ import annotations

__all__ = ["RanapassError"]


class RanapassError(ValueError):
    """Bad input or a file that cannot be used: the message says what is wrong and what to do.

    A ``ValueError`` so that callers who catch the built-in keep working.
    """
