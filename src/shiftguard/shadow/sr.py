"""Radiologist reports stored as DICOM structured reports (SR), read into the same
:class:`~shiftguard.shadow.diagnoses.Diagnosis` rows as the RIS exports.

A report counts when it is a structured report (SR) whose ``VerificationFlag`` is ``VERIFIED``:
the reader is the verifying observer, the time is the verification time (in UTC), and the finding
is a CODE content item *Finding* (DCM 121071) at the top level of the document whose value is
*Present* (SCT 52101004) or *Absent* (SCT 2667000). Unverified SRs, such as ShiftGuard's own AI
results, are told apart by :data:`NOT_VERIFIED`; a verified SR that cannot be read gets a reason
naming what is wrong with it. :func:`~shiftguard.shadow.pacs.fetch_reports` finds and retrieves the
SRs in a PACS and reads each with :func:`report_to_diagnosis`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from shiftguard.dicom.uid import is_uid
from shiftguard.shadow.diagnoses import Diagnosis

#: the SOP Class UIDs of the SR storage classes start with this
SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
#: :func:`report_to_diagnosis`'s reason for an SR that is not verified (an AI result, a draft)
NOT_VERIFIED = "not a verified report"

#: the concept name of the CODE item holding the finding
FINDING = Code("121071", "DCM", "Finding")
#: the finding's value when present
PRESENT = Code("52101004", "SCT", "Present")
#: the finding's value when absent
ABSENT = Code("2667000", "SCT", "Absent")
#: (scheme, value) -> finding; SCT 272519000 "Absence findings" is what pydicom calls Absent
FINDING_VALUES = {
    ("SCT", "52101004"): 1,
    ("SCT", "2667000"): 0,
    ("SCT", "272519000"): 0,
}

_DT = re.compile(
    r"^(?P<y>\d{4})(?P<mo>\d{2})?(?P<d>\d{2})?(?P<h>\d{2})?(?P<mi>\d{2})?(?P<s>\d{2})?"
    r"(?:\.(?P<f>\d{1,6}))?(?P<tz>[+-]\d{4})?$"
)


def parse_dt(text: str, offset: str | None = None) -> str | None:
    """A DICOM DT (``YYYY[MM[DD[HH[MM[SS[.F]]]]]][&ZZXX]``) as ``YYYY-MM-DDTHH:MM:SSZ``.

    A value without its own offset is read at ``offset`` (the dataset's TimezoneOffsetFromUTC,
    ``+HHMM``/``-HHMM``), else as UTC. Fractions of a second are dropped. ``None`` when the text is
    not a DT.

    >>> parse_dt("20240105093000.25+0100")
    '2024-01-05T08:30:00Z'
    >>> parse_dt("20240105")
    '2024-01-05T00:00:00Z'
    >>> parse_dt("202401050930", offset="-0500")
    '2024-01-05T14:30:00Z'
    >>> parse_dt("2024-01-05") is None
    True
    """
    m = _DT.match(text.strip())
    if m is None or (m["f"] and not m["s"]):
        return None
    zone = _zone(m["tz"] or offset or "+0000")
    if zone is None:
        return None
    try:
        value = datetime(
            int(m["y"]),
            int(m["mo"] or 1),
            int(m["d"] or 1),
            int(m["h"] or 0),
            int(m["mi"] or 0),
            int(m["s"] or 0),
            tzinfo=zone,
        )
    except ValueError:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _zone(text: str) -> timezone | None:
    m = re.fullmatch(r"([+-])(\d{2})(\d{2})", text.strip())
    if m is None or int(m[2]) > 14 or int(m[3]) > 59:
        return None
    minutes = int(m[2]) * 60 + int(m[3])
    return timezone(timedelta(minutes=-minutes if m[1] == "-" else minutes))


def report_to_diagnosis(ds: Dataset, source: str) -> tuple[Diagnosis | None, str | None]:
    """One SR document as a :class:`Diagnosis`, or the reason it is not one.

    The reason is exactly :data:`NOT_VERIFIED` for an SR whose VerificationFlag is not
    ``VERIFIED`` (an AI result, a draft): callers skip those rather than report them. Other
    reasons describe a document that cannot be read as a verified diagnosis.

    When several observers verified the document, the latest verification counts.
    """
    sop_class = str(ds.get("SOPClassUID", ""))
    if not sop_class.startswith(SR_CLASS_PREFIX) or ds.get("Modality", "SR") != "SR":
        return None, f"not a structured report (SOP class {sop_class or 'missing'})"
    if str(ds.get("VerificationFlag", "")).strip().upper() != "VERIFIED":
        return None, NOT_VERIFIED
    study_uid = str(ds.get("StudyInstanceUID", "")).strip()
    if not study_uid:
        return None, "no StudyInstanceUID"
    if not is_uid(study_uid):
        return None, f"StudyInstanceUID {study_uid[:70]!r} is not a DICOM UID"
    finding, problem = _finding(ds)
    if finding is None:
        return None, problem
    offset = ds.get("TimezoneOffsetFromUTC")
    signatures = []
    for observer in ds.get("VerifyingObserverSequence") or []:
        raw = str(observer.get("VerificationDateTime") or "").strip()
        if not raw:
            continue
        when = parse_dt(raw, str(offset) if offset else None)
        if when is None:
            return None, f"VerificationDateTime {raw!r} is not a DICOM date-time"
        reader = str(observer.get("VerifyingObserverName") or "").strip() or "unknown"
        signatures.append((when, reader))
    if not signatures:
        return None, "no verification time (VerifyingObserverSequence > VerificationDateTime)"
    when, reader = max(signatures)
    return Diagnosis(study_uid, when, reader, finding, source), None


def _finding(ds: Dataset) -> tuple[int | None, str | None]:
    """The finding of a report's top-level content, or the reason there is none."""
    codes = [i for i in ds.get("ContentSequence") or [] if i.get("ValueType") == "CODE"]
    named = [i for i in codes if _key(i, "ConceptNameCodeSequence") == _key_of(FINDING)]
    if named:
        values = [_key(i, "ConceptCodeSequence") for i in named]
    else:  # a finding written under another concept name, with the same value codes
        values = [k for i in codes if (k := _key(i, "ConceptCodeSequence")) in FINDING_VALUES]
    if not values:
        return None, "no Finding (DCM 121071) CODE item at the top level of the content"
    findings = set()
    for value in values:
        if value not in FINDING_VALUES:
            scheme, code = value or ("", "")
            return None, (
                f"Finding value {scheme} {code or '(none)'} is neither Present (SCT 52101004) "
                "nor Absent (SCT 2667000)"
            )
        findings.add(FINDING_VALUES[value])
    if len(findings) > 1:
        return None, "Finding items disagree (both Present and Absent)"
    return findings.pop(), None


def _key(item: Dataset, sequence: str) -> tuple[str, str] | None:
    codes = item.get(sequence) or []
    if len(codes) != 1:
        return None
    scheme = str(codes[0].get("CodingSchemeDesignator", "")).strip().upper()
    value = str(codes[0].get("CodeValue", "")).strip()
    return ("SCT" if scheme == "SRT" else scheme), value


def _key_of(code: Code) -> tuple[str, str]:
    return code.scheme_designator, code.value
