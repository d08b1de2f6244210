"""The root of ShiftGuard's typed errors.

Every error a user can meet derives from :class:`ShiftGuardError`; its message names the input, what
is wrong with it, and what to do. The command line prints such errors without a traceback (exit 2),
and so a path it was given that is missing, unreadable or of the wrong kind (``FileNotFoundError``
and its kin, which carry the file's name); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager


class ShiftGuardError(Exception):
    """An input (file, series, config key, table) that ShiftGuard cannot accept, and why."""


class PortInUseError(ShiftGuardError):
    """A service cannot listen where its settings say: the port is taken or the address is not ours."""


@contextmanager
def listening(host: str, port: int, setting: str) -> Iterator[None]:
    """Turn a failure to bind ``host:port`` into a :class:`PortInUseError` naming ``setting``.

    Args:
        host: the listen address.
        port: the port.
        setting: where the user sets it, e.g. ``"edge.port"``.

    Raises:
        PortInUseError: the address is in use, not assigned to this machine, or needs privileges.
    """
    try:
        yield
    except PortInUseError:
        raise
    except OSError as exc:
        reasons = {
            errno.EADDRINUSE: "is in use by another process",
            errno.EADDRNOTAVAIL: "is not an address of this machine",
            errno.EACCES: "needs privileges (ports below 1024)",
        }
        reason = reasons.get(exc.errno or 0)  # asyncio rewords its bind error, keeps the errno
        if reason is None:
            raise
        raise PortInUseError(
            f"{host}:{port} {reason}: stop it or choose another ({setting})"
        ) from None


class EmptyInputError(ShiftGuardError, ValueError):
    """An input that exists but holds nothing to work on (no DICOM series, no rows)."""
