"""DICOM unique identifiers (VR UI): the rules of PS3.5 section 9.1, checked before a UID is used.

A UID that arrives over the network or in a file can be anything; ShiftGuard checks it before it
names a file or folder, a query key or a database row. The rules: at most 64 characters; one or
more components separated by single dots; each component digits only, without a leading zero
unless it is ``0`` itself.

>>> is_uid("1.2.840.10008.5.1.4.1.1.4"), is_uid("1.2..3"), is_uid("1.02"), is_uid("..")
(True, False, False, False)
"""

from __future__ import annotations

import re

from shiftguard.errors import InvalidUidError

MAX_LENGTH = 64
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def is_uid(text: str) -> bool:
    """Whether ``text`` is a valid DICOM UID (PS3.5 9.1)."""
    return len(text) <= MAX_LENGTH and _UID.fullmatch(text) is not None


def check_uid(text: str, what: str) -> str:
    """``text`` itself when it is a valid DICOM UID.

    Args:
        text: the value, as received.
        what: what it is, for the message, e.g. ``"StudyInstanceUID"``.

    Raises:
        InvalidUidError: naming ``what``, the value (shortened) and the rule it breaks.
    """
    if is_uid(text):
        return text
    shown = text if len(text) <= 80 else text[:77] + "..."
    if len(text) > MAX_LENGTH:
        rule = f"longer than {MAX_LENGTH} characters"
    elif not text:
        rule = "empty"
    else:
        rule = "not dot-separated numbers without leading zeros"
    raise InvalidUidError(f"{what} {shown!r} is not a DICOM UID ({rule}; PS3.5 9.1)")
