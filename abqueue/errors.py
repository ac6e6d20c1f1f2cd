"""The one base of every error a user can fix. The `abq` command prints an AbqError as one line
naming the problem and the fix, and exits 2; anything else is a bug, printed with its traceback
(exit 1), so it gets reported instead of passing for a user mistake."""

from __future__ import annotations


class AbqError(Exception):
    """A problem the user can fix; its message names the problem and the fix."""


class UsageError(AbqError, ValueError):
    """A flag, an argument or an input file that cannot be used as given."""
