"""The root of ShiftGuard's typed errors.

Every error a user can meet derives from :class:`ShiftGuardError`; its message names the input, what
is wrong with it, and what to do. The command line prints such errors without a traceback (exit 2);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class ShiftGuardError(Exception):
    """An input (file, series, config key, table) that ShiftGuard cannot accept, and why."""
