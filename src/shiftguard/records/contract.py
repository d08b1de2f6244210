"""The feature record's contract: what a record must hold for a collector to take it, checked on
the edge before a record enters the spool and on the collector before it is stored.

A record (built by :func:`shiftguard.records.features.make_record`) is one JSON object: the envelope
fields (:data:`~shiftguard.records.features.ENVELOPE`) and every feature of the schema. The route
the shipper posts to and the collector serves is here too. Standard library only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from shiftguard.errors import InvalidRecordError
from shiftguard.records.features import BY_NAME, ENVELOPE, FEATURE_NAMES, SCHEMA_VERSION

#: the longest categorical feature value a record may carry (what ``features._category`` keeps)
MAX_CATEGORY = 64
#: the longest ``bundle`` or ``bundle_version`` a record may carry
MAX_ENVELOPE_TEXT = 128
RECORD_ID = re.compile(r"[0-9a-f]{32}")
SITE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
FIELDS = (*ENVELOPE, *FEATURE_NAMES)
NUMERICAL = tuple(n for n in FEATURE_NAMES if BY_NAME[n].kind == "numerical")
CATEGORICAL = tuple(n for n in FEATURE_NAMES if BY_NAME[n].kind == "categorical")
RECORDS_ROUTE = "/v1/records"
#: where an edge POSTs its heartbeat, and where the fleet's latest ones are read (GET)
HEARTBEATS_ROUTE = "/v1/heartbeats"
FLEET_ROUTE = "/v1/fleet"


def validate_record(record: Any) -> list[str]:
    """Every problem of one record, each naming its field; an empty list for a valid record.

    A record is a JSON object with exactly the envelope fields (:data:`ENVELOPE`) and the features
    (:data:`FEATURE_NAMES`): numerical features a finite number or null, categorical ones a string
    of at most 64 characters.

    >>> for problem in validate_record({"schema": 2, "snr": "abc", "patient_name": "X"})[-3:]:
    ...     print(problem)
    unknown field 'patient_name'
    schema 2: this collector reads schema 1
    snr: expected a number or null, got 'abc'
    >>> validate_record([1, 2])
    ['record: expected a JSON object, got list']
    """
    if not isinstance(record, Mapping):
        return [f"record: expected a JSON object, got {type(record).__name__}"]
    problems = [f"missing field '{name}'" for name in FIELDS if name not in record]
    problems += [
        f"unknown field {_show(k)}" for k in record if k not in BY_NAME and k not in ENVELOPE
    ]
    for name in FIELDS:
        if name in record:
            problem = _field_problem(name, record[name])
            if problem:
                problems.append(problem)
    return problems


def _field_problem(name: str, value: Any) -> str | None:
    if name == "record_id":
        if not (isinstance(value, str) and RECORD_ID.fullmatch(value)):
            return f"record_id: expected 32 lowercase hexadecimal characters, got {_show(value)}"
    elif name == "schema":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"schema: expected an integer, got {_show(value)}"
        if value != SCHEMA_VERSION:
            return f"schema {value}: this collector reads schema {SCHEMA_VERSION}"
    elif name == "site":
        if not (isinstance(value, str) and SITE.fullmatch(value)):
            return f"site: expected 1-64 characters of A-Z a-z 0-9 _ . -, got {_show(value)}"
    elif name in ("bundle", "bundle_version"):
        if not isinstance(value, str) or not 0 < len(value) <= MAX_ENVELOPE_TEXT:
            return (
                f"{name}: expected a string of 1-{MAX_ENVELOPE_TEXT} characters, got {_show(value)}"
            )
    elif name == "processed_at":
        if not _is_utc_timestamp(value):
            return (
                "processed_at: expected an ISO-8601 UTC timestamp such as "
                f"'2026-11-28T10:04:16Z', got {_show(value)}"
            )
    elif BY_NAME[name].kind == "numerical":
        if value is not None and not _is_finite_number(value):
            return f"{name}: expected a number or null, got {_show(value)}"
    elif not isinstance(value, str):
        return f"{name}: expected a string, got {_show(value)}"
    elif len(value) > MAX_CATEGORY:
        return f"{name}: expected at most {MAX_CATEGORY} characters, got {len(value)}"
    return None


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond a float's range
        return False


def _is_utc_timestamp(value: Any) -> bool:
    if not isinstance(value, str) or "T" not in value.upper():
        return False
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return False
    return moment.utcoffset() == timedelta(0)


def _show(value: Any, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def check_records(records: Sequence[Any], what: str) -> None:
    problems = {i: p for i, r in enumerate(records) if (p := validate_record(r))}
    if problems:
        raise InvalidRecordError(problems, what)
