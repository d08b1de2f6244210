"""Verified radiologist reports from the PACS itself: DICOM SR documents found by C-FIND and
retrieved by C-MOVE (or C-GET), read into the same :class:`~shiftguard.shadow.diagnoses.Diagnosis`
rows as the RIS exports.

A report counts when it is a structured report (SR) whose ``VerificationFlag`` is ``VERIFIED``:
the reader is the verifying observer, the time is the verification time (in UTC), and the finding
is a CODE content item *Finding* (DCM 121071) at the top level of the document whose value is
*Present* (SCT 52101004) or *Absent* (SCT 2667000). Unverified SRs, such as ShiftGuard's own AI
results, are skipped and counted; a verified SR that cannot be read is a :class:`Problem` naming its
SOP Instance UID.

The query is standard (Study Root, hierarchical): a STUDY-level C-FIND (``ModalitiesInStudy`` SR,
the ``since`` date range, the study UIDs asked for), then a SERIES-level C-FIND per study for its SR
series, then one C-MOVE (or C-GET) per SR series. For C-MOVE the PACS must know this AE title at
the address and port where :func:`fetch_reports` listens.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.coding import Code
from pydicom.uid import (
    ComprehensiveSRStorage,
    ExplicitVRLittleEndian,
    KeyObjectSelectionDocumentStorage,
    generate_uid,
)

from shiftguard.dicom.uid import is_uid
from shiftguard.errors import PacsError
from shiftguard.shadow.diagnoses import Diagnosis, Problem, parse_time

logger = logging.getLogger(__name__)

SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
#: series number of the reports written by :func:`write_report_sr`
REPORT_SERIES_NUMBER = 9801
NOT_VERIFIED = "not a verified report"

REPORT_TITLE = Code("18748-4", "LN", "Diagnostic imaging report")
FINDING = Code("121071", "DCM", "Finding")
IMPRESSION = Code("121073", "DCM", "Impression")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("2667000", "SCT", "Absent")
#: (scheme, value) -> finding; SCT 272519000 "Absence findings" is what pydicom calls Absent
FINDING_VALUES = {
    ("SCT", "52101004"): 1,
    ("SCT", "2667000"): 0,
    ("SCT", "272519000"): 0,
}

#: patient and study attributes a report copies from an instance of its study (type 2 when empty)
COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
)
_TYPE3 = {"PatientAge"}

_DT = re.compile(
    r"^(?P<y>\d{4})(?P<mo>\d{2})?(?P<d>\d{2})?(?P<h>\d{2})?(?P<mi>\d{2})?(?P<s>\d{2})?"
    r"(?:\.(?P<f>\d{1,6}))?(?P<tz>[+-]\d{4})?$"
)
_AE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash
_PENDING = (0xFF00, 0xFF01)
_FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve Information Model - FIND
_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"  # ... - MOVE
_GET = "1.2.840.10008.5.1.4.1.2.2.3"  # ... - GET
_CHUNK = 50  # study UIDs per C-FIND


@dataclass(frozen=True)
class Pacs:
    """A PACS's DICOM address: the AE title it answers to, its host and its port."""

    host: str
    port: int
    ae_title: str

    def __post_init__(self) -> None:
        if not self.host or any(c.isspace() for c in self.host):
            raise PacsError(f"PACS {self}: host {self.host!r} is empty or has spaces")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise PacsError(f"PACS {self}: port {self.port!r} is not a number")
        if not 1 <= self.port <= 65535:
            raise PacsError(f"PACS {self}: port {self.port} is outside 1-65535")
        _check_ae(self.ae_title, f"PACS {self}")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


def parse_pacs(text: str) -> Pacs:
    """A PACS address written ``AE_TITLE@host:port``.

    >>> parse_pacs("ORTHANC@127.0.0.1:4242")
    Pacs(host='127.0.0.1', port=4242, ae_title='ORTHANC')
    >>> parse_pacs("PACS@[::1]:104").host
    '::1'

    Raises:
        PacsError: the text is not ``AE_TITLE@host:port``, or a part of it is invalid.
    """
    raw = text.strip()
    expected = "expected AE_TITLE@host:port, e.g. ORTHANC@127.0.0.1:4242"
    ae_title, at, address = raw.rpartition("@")
    if not at:
        raise PacsError(f"PACS address {text!r} has no AE title: {expected}")
    bracketed = re.fullmatch(r"\[([^\]]+)\]:(.*)", address)
    if bracketed:
        host, port = bracketed.groups()
    else:
        host, colon, port = address.rpartition(":")
        if not colon or ":" in host:
            raise PacsError(f"PACS address {text!r} has no port: {expected}")
    if not port.isdigit():
        raise PacsError(f"PACS address {text!r}: port {port!r} is not a number; {expected}")
    _check_ae(ae_title, f"PACS address {text!r}")
    try:
        return Pacs(host, int(port), ae_title)
    except PacsError as exc:
        raise PacsError(f"PACS address {text!r}: {exc}") from None


def _check_ae(ae_title: str, where: str) -> None:
    if not _AE.match(ae_title) or not ae_title.strip():
        raise PacsError(
            f"{where}: AE title {ae_title!r} must be 1-16 printable ASCII characters, "
            "not all spaces, without a backslash"
        )


# ---------------------------------------------------------------------------------------------
# writing and reading a report


def write_report_sr(
    source: Dataset,
    finding: int,
    reader: str,
    signed_at: str | datetime,
    path: Path | str,
    *,
    text: str | None = None,
    organization: str = "Radiology",
) -> Dataset:
    """Write a verified radiologist report (Comprehensive SR) for the study of ``source``.

    The document is a new series in the study of ``source`` (patient and study attributes copied
    from it, ``source`` listed as the evidence): a CONTAINER *Diagnostic imaging report* (LOINC
    18748-4) holding the CODE item *Finding* (DCM 121071) = *Present* (SCT 52101004) or *Absent*
    (SCT 2667000) and the TEXT item *Impression* (DCM 121073). It is COMPLETE and VERIFIED by
    ``reader`` at ``signed_at``.

    Args:
        source: Any instance of the study reported on.
        finding: 1 when the finding is present, 0 when absent.
        reader: The verifying radiologist (a DICOM person name, e.g. ``Smith^Jane``).
        signed_at: When the report was signed: ISO-8601 (any offset; none means UTC), a DICOM
            date, or a ``datetime`` (naive means UTC).
        path: The file to write (folders are created).
        text: The impression; default a sentence naming the finding.
        organization: The verifying organization.

    Returns:
        The written dataset.

    Raises:
        ValueError: ``finding`` is not 0 or 1, ``signed_at`` is not a time, ``reader`` is empty, or
            ``source`` has no valid StudyInstanceUID.
    """
    if finding not in (0, 1):
        raise ValueError(f"finding {finding!r}: expected 0 (absent) or 1 (present)")
    if not reader.strip():
        raise ValueError("reader is empty: a verified report names its verifying observer")
    study_uid = str(source.get("StudyInstanceUID", ""))
    if not is_uid(study_uid):
        raise ValueError(f"source: StudyInstanceUID {study_uid!r} is not a DICOM UID")
    signed = _utc(signed_at)

    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComprehensiveSRStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = ComprehensiveSRStorage
    ds.SOPInstanceUID = sop_uid
    ds.TimezoneOffsetFromUTC = "+0000"
    for keyword in COPIED:
        if keyword in source:
            element = source[keyword]
            ds.add_new(element.tag, element.VR, element.value)
        elif keyword not in _TYPE3:
            setattr(ds, keyword, "")
    ds.Modality = "SR"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = REPORT_SERIES_NUMBER
    ds.SeriesDescription = "Radiologist report"
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence()
    ds.Manufacturer = "ShiftGuard"
    ds.InstanceNumber = 1
    ds.ContentDate = signed.strftime("%Y%m%d")
    ds.ContentTime = signed.strftime("%H%M%S")
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "VERIFIED"
    observer = Dataset()
    observer.VerifyingObserverName = reader.strip()
    observer.VerifyingObserverIdentificationCodeSequence = DicomSequence()
    observer.VerifyingOrganization = organization
    observer.VerificationDateTime = signed.strftime("%Y%m%d%H%M%S+0000")
    ds.VerifyingObserverSequence = DicomSequence([observer])
    ds.PerformedProcedureCodeSequence = DicomSequence()
    if all(k in source for k in ("SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")):
        ds.CurrentRequestedProcedureEvidenceSequence = DicomSequence([_evidence(source)])

    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = DicomSequence([_code(REPORT_TITLE)])
    ds.ContinuityOfContent = "SEPARATE"
    value = PRESENT if finding else ABSENT
    finding_item = _item("CODE", FINDING)
    finding_item.ConceptCodeSequence = DicomSequence([_code(value)])
    impression = _item("TEXT", IMPRESSION)
    impression.TextValue = text if text is not None else _default_text(finding)
    ds.ContentSequence = DicomSequence([finding_item, impression])

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def _utc(value: str | datetime) -> datetime:
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return aware.astimezone(UTC).replace(microsecond=0)
    iso = parse_time(str(value))
    if iso is None:
        raise ValueError(f"signed_at {value!r}: expected an ISO-8601 time or a DICOM date")
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def _default_text(finding: int) -> str:
    return "Finding present." if finding else "No finding."


def _code(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _item(value_type: str, concept: Code) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = value_type
    item.ConceptNameCodeSequence = DicomSequence([_code(concept)])
    return item


def _evidence(source: Dataset) -> Dataset:
    instance = Dataset()
    instance.ReferencedSOPClassUID = source.SOPClassUID
    instance.ReferencedSOPInstanceUID = source.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = source.SeriesInstanceUID
    series.ReferencedSOPSequence = DicomSequence([instance])
    study = Dataset()
    study.StudyInstanceUID = source.StudyInstanceUID
    study.ReferencedSeriesSequence = DicomSequence([series])
    return study


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


def write_jsonl(diagnoses: Iterable[Diagnosis], path: Path | str) -> Path:
    """Write diagnoses as JSON lines that :func:`~shiftguard.shadow.diagnoses.read_diagnoses`
    reads back (keys ``study_uid``, ``finding``, ``reader``, ``reported_at``, and ``source``, where
    the diagnosis came from)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps(
            {
                "study_uid": d.study_uid,
                "finding": d.finding,
                "reader": d.reader,
                "reported_at": d.reported_at,
                "source": d.source,
            }
        )
        for d in diagnoses
    ]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# the network


@dataclass
class FetchStats:
    """What one :func:`fetch_reports` found."""

    series_found: int = 0  # SR series matching the query
    instances_retrieved: int = 0
    verified_reports: int = 0
    skipped_unverified: int = 0  # SRs not VERIFIED (AI results, drafts)
    problems: int = 0  # verified-looking SRs that could not be read, and retrieval failures


def fetch_reports(
    pacs: Pacs,
    *,
    ae_title: str = "SHIFTGUARD",
    retrieve: Literal["move", "get"] = "move",
    move_port: int | None = None,
    move_host: str = "127.0.0.1",
    since: str | None = None,
    studies: Iterable[str] | None = None,
    timeout: float = 30.0,
) -> tuple[list[Diagnosis], list[Problem], FetchStats]:
    """The verified reports stored in ``pacs``, as diagnoses (see the module docstring).

    Args:
        pacs: The PACS to ask.
        ae_title: Our AE title (calling AE, and the C-MOVE destination).
        retrieve: ``"move"`` (C-MOVE to a storage SCP started here for the call) or ``"get"``
            (C-GET on the query's association).
        move_port: For ``"move"``: the port to listen on, the one the PACS has for ``ae_title``.
        move_host: For ``"move"``: the address to listen on (``"0.0.0.0"`` for a remote PACS).
        since: Only studies of this date or later (``YYYYMMDD`` or ``YYYY-MM-DD``).
        studies: Only these Study Instance UIDs.
        timeout: Seconds to wait for the connection and for each answer.

    Returns:
        The diagnoses (source ``pacs:<PACS AE>/<SOP Instance UID>``), the problems (a verified
        report that cannot be read, a series only partly retrieved), and the counts.

    Raises:
        PacsError: a bad argument, the PACS unreachable, the association rejected or aborted,
            or a query or retrieval refused (for C-MOVE, most often because the PACS does not
            know AE ``ae_title`` at ``move_host:move_port``).
    """
    from pynetdicom import AE, build_role, evt

    _check_ae(ae_title, "our AE title")
    if retrieve not in ("move", "get"):
        raise PacsError(f"retrieve {retrieve!r}: expected 'move' (C-MOVE) or 'get' (C-GET)")
    date_range = f"{_dicom_date(since)}-" if since else ""
    wanted = _study_uids(studies)

    ae = AE(ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.add_requested_context(_FIND)
    received: dict[str, Dataset] = {}
    lock = threading.Lock()

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with lock:
            received[str(ds.SOPInstanceUID)] = ds
        return 0x0000

    handlers: list[Any] = [(evt.EVT_C_STORE, on_store)]
    roles = []
    server = None
    if retrieve == "move":
        if move_port is None:
            raise PacsError(
                f"C-MOVE from {pacs} needs move_port: the port at which {pacs.ae_title} knows AE "
                f"{ae_title!r} (or use retrieve='get')"
            )
        ae.add_requested_context(_MOVE)
        for cx in _sr_contexts():
            ae.add_supported_context(cx.abstract_syntax, cx.transfer_syntax)
        try:
            server = ae.start_server((move_host, move_port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise PacsError(
                f"cannot listen on {move_host}:{move_port} for C-MOVE from {pacs}: "
                f"{exc.strerror or exc}"
            ) from exc
    else:
        ae.add_requested_context(_GET)
        for cx in _sr_contexts():
            ae.add_requested_context(cx.abstract_syntax, cx.transfer_syntax)
            roles.append(build_role(cx.abstract_syntax, scp_role=True))

    problems: list[Problem] = []
    stats = FetchStats()
    asked: set[str] = set()
    try:
        assoc = _associate(ae, pacs, ae_title, roles, handlers if retrieve == "get" else [])
        try:
            query = _Query(assoc, pacs, ae_title)
            for study_uid in query.studies(date_range, wanted):
                for series_uid in query.sr_series(study_uid):
                    stats.series_found += 1
                    asked.add(series_uid)
                    problem = query.retrieve(
                        study_uid, series_uid, retrieve, f"{move_host}:{move_port}"
                    )
                    if problem is not None:
                        problems.append(problem)
        finally:
            if assoc.is_established:
                assoc.release()
    finally:
        if server is not None:
            server.shutdown()

    diagnoses = []
    for sop_uid, ds in sorted(received.items()):
        if str(ds.get("SeriesInstanceUID", "")) not in asked:
            logger.warning("%s sent %s, from a series not asked for; ignored", pacs, sop_uid)
            continue
        stats.instances_retrieved += 1
        source = f"pacs:{pacs.ae_title}/{sop_uid}"
        diagnosis, reason = report_to_diagnosis(ds, source)
        if diagnosis is not None:
            diagnoses.append(diagnosis)
            stats.verified_reports += 1
        elif reason == NOT_VERIFIED:
            stats.skipped_unverified += 1
        else:
            problems.append(Problem(source, reason or "unreadable report"))
    stats.problems = len(problems)
    logger.info(
        "%s: %d SR series, %d instances, %d verified reports, %d unverified skipped, %d problems",
        pacs,
        stats.series_found,
        stats.instances_retrieved,
        stats.verified_reports,
        stats.skipped_unverified,
        stats.problems,
    )
    return diagnoses, problems, stats


def _sr_contexts() -> list[Any]:
    """pynetdicom's storage presentation contexts for the SR storage SOP classes (not KOS)."""
    from pynetdicom import StoragePresentationContexts

    return [
        cx
        for cx in StoragePresentationContexts
        if str(cx.abstract_syntax).startswith(SR_CLASS_PREFIX)
        and cx.abstract_syntax != KeyObjectSelectionDocumentStorage
    ]


def _dicom_date(text: str) -> str:
    raw = text.strip()
    for fmt in ("%Y%m%d", "%Y-%m-%d"):
        try:
            return datetime.strptime(raw, fmt).strftime("%Y%m%d")
        except ValueError:
            continue
    raise PacsError(f"since {text!r}: expected a date, YYYYMMDD or YYYY-MM-DD")


def _study_uids(studies: Iterable[str] | None) -> list[str] | None:
    if studies is None:
        return None
    uids = sorted({str(s).strip() for s in studies})
    bad = [u for u in uids if not is_uid(u)]
    if bad:
        raise PacsError(f"studies: {', '.join(map(repr, bad[:5]))} not DICOM UIDs")
    return uids


def _associate(ae: Any, pacs: Pacs, ae_title: str, roles: list[Any], handlers: list[Any]) -> Any:
    """An established association with ``pacs``, or a :class:`PacsError` saying why not."""
    from pynetdicom import evt

    answer: list[Any] = []

    def on_acse(event: Any) -> None:
        answer.append(event.primitive)

    assoc = ae.associate(
        pacs.host,
        pacs.port,
        ae_title=pacs.ae_title,
        ext_neg=roles or None,
        evt_handlers=[*handlers, (evt.EVT_ACSE_RECV, on_acse)],
    )
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        reply = next((p for p in answer if hasattr(p, "reason_str")), None)
        why = f": {reply.reason_str} ({reply.source_str})" if reply is not None else ""
        raise PacsError(
            f"PACS {pacs} rejected the association from AE {ae_title!r}{why}; check the PACS's "
            "AE title and that it accepts this calling AE"
        )
    try:  # what the connection itself says
        with socket.create_connection((pacs.host, pacs.port), timeout=ae.connection_timeout):
            pass
    except OSError as exc:
        raise PacsError(
            f"cannot reach PACS {pacs}: {exc.strerror or exc}; check the host and port and that "
            "the PACS is running"
        ) from exc
    raise PacsError(
        f"PACS {pacs} accepted the connection but no association (aborted, or no answer within "
        "the timeout); check that it speaks DICOM on this port"
    )


class _Query:
    """The C-FIND and retrieval requests on one association."""

    def __init__(self, assoc: Any, pacs: Pacs, ae_title: str) -> None:
        self.assoc, self.pacs, self.ae_title = assoc, pacs, ae_title
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        for uid, what in ((_FIND, "C-FIND"), (_MOVE, "C-MOVE"), (_GET, "C-GET")):
            requested = any(str(c.abstract_syntax) == uid for c in assoc.ae.requested_contexts)
            if requested and uid not in accepted:
                raise PacsError(
                    f"PACS {pacs} does not offer Study Root {what}"
                    + (" (try C-GET)" if what == "C-MOVE" else "")
                    + (" (try C-MOVE)" if what == "C-GET" else "")
                )

    def studies(self, date_range: str, wanted: list[str] | None) -> list[str]:
        """The studies with SR series, in the date range, among ``wanted`` (all when ``None``)."""
        chunks: Sequence[list[str] | None] = (
            [wanted[i : i + _CHUNK] for i in range(0, len(wanted), _CHUNK)]
            if wanted is not None
            else [None]
        )
        found: set[str] = set()
        for chunk in chunks:
            q = Dataset()
            q.QueryRetrieveLevel = "STUDY"
            q.StudyInstanceUID = chunk or ""
            q.StudyDate = date_range
            q.ModalitiesInStudy = "SR"
            for answer in self._find(q, "the studies"):
                uid = str(answer.get("StudyInstanceUID", ""))
                if is_uid(uid) and (wanted is None or uid in wanted):
                    found.add(uid)
        return sorted(found)

    def sr_series(self, study_uid: str) -> list[str]:
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = ""
        q.Modality = "SR"
        found = set()
        for answer in self._find(q, f"the SR series of study {study_uid}"):
            uid = str(answer.get("SeriesInstanceUID", ""))
            if is_uid(uid) and str(answer.get("Modality", "SR")) == "SR":
                found.add(uid)
        return sorted(found)

    def _find(self, query: Dataset, what: str) -> Iterator[Dataset]:
        responses = self.assoc.send_c_find(query, _FIND)
        for status, identifier in self._statuses(responses, f"C-FIND for {what}"):
            code = int(status.Status)
            if code in _PENDING:
                if identifier is not None:
                    yield identifier
            elif code != 0x0000:
                raise PacsError(
                    f"PACS {self.pacs} refused the C-FIND for {what} from AE {self.ae_title!r}: "
                    f"{_describe(status, 'find')}"
                )

    def retrieve(
        self, study_uid: str, series_uid: str, how: str, destination: str
    ) -> Problem | None:
        """Retrieve one series; a :class:`Problem` when only some instances came."""
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = series_uid
        if how == "move":
            responses = self.assoc.send_c_move(q, self.ae_title, _MOVE)
            what = f"C-MOVE of series {series_uid}"
        else:
            responses = self.assoc.send_c_get(q, _GET)
            what = f"C-GET of series {series_uid}"
        final = None
        for status, _ in self._statuses(responses, what):
            if int(status.Status) not in _PENDING:
                final = status
        if final is None:
            raise PacsError(f"PACS {self.pacs} ended the {what} without a final status")
        code = int(final.Status)
        if code == 0x0000:
            return None
        failed = int(final.get("NumberOfFailedSuboperations", 0) or 0)
        done = int(final.get("NumberOfCompletedSuboperations", 0) or 0)
        source = f"pacs:{self.pacs.ae_title}/series {series_uid}"
        if code == 0xB000 or (code & 0xF000) == 0xB000:
            return Problem(
                source, f"{what}: {failed} of {failed + done} instances could not be retrieved"
            )
        if how == "move" and code == 0xA801:
            raise PacsError(
                f"PACS {self.pacs} does not know the C-MOVE destination: it must know AE "
                f"{self.ae_title!r} at {destination} (add it to the PACS's DICOM modalities)"
            )
        hint = (
            f"; the PACS must know AE {self.ae_title!r} at {destination} and be able to reach it"
            if how == "move"
            else ""
        )
        raise PacsError(f"PACS {self.pacs} failed the {what}: {_describe(final, how)}{hint}")

    def _statuses(self, responses: Iterable[Any], what: str) -> Iterator[tuple[Any, Any]]:
        """The responses; a :class:`PacsError` when one is missing (pynetdicom then yields an
        empty status: the PACS aborted the association, or the timeout passed)."""
        timeout = float(self.assoc.dimse_timeout or 0)
        start = time.monotonic()
        for status, identifier in responses:
            if "Status" not in status:
                if timeout and time.monotonic() - start >= 0.9 * timeout:
                    raise PacsError(
                        f"PACS {self.pacs} did not answer the {what} within {timeout:g} s"
                    )
                raise PacsError(
                    f"PACS {self.pacs} aborted the association at the {what} from AE "
                    f"{self.ae_title!r}; a PACS does this (Orthanc does) when it does not know "
                    f"the calling AE: the PACS must know AE {self.ae_title!r} as a DICOM "
                    "modality allowed to query and retrieve"
                )
            yield status, identifier
            start = time.monotonic()


def _describe(status: Dataset, service: str) -> str:
    from pynetdicom.status import (
        QR_FIND_SERVICE_CLASS_STATUS,
        QR_GET_SERVICE_CLASS_STATUS,
        QR_MOVE_SERVICE_CLASS_STATUS,
    )

    table: dict[int, tuple[str, str]] = {
        "find": QR_FIND_SERVICE_CLASS_STATUS,
        "move": QR_MOVE_SERVICE_CLASS_STATUS,
        "get": QR_GET_SERVICE_CLASS_STATUS,
    }[service]
    code = int(status.Status)
    meaning = table.get(code, ("", "unknown status"))[1] or "unknown status"
    comment = str(status.get("ErrorComment", "") or "").strip()
    return f"status 0x{code:04X} ({meaning})" + (f", {comment!r}" if comment else "")
