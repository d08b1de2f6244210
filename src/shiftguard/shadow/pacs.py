"""A PACS's address, and the verified radiologist reports it holds: DICOM SR documents found by
C-FIND and retrieved by C-MOVE (or C-GET), or found by QIDO-RS and retrieved by WADO-RS from a
DICOMweb server (:func:`fetch_reports_dicomweb`), each read by
:func:`~shiftguard.shadow.sr.report_to_diagnosis` into the same
:class:`~shiftguard.shadow.diagnoses.Diagnosis` rows as the RIS exports.

Which SRs count (verified, with a Present or Absent *Finding*) is :mod:`shiftguard.shadow.sr`'s
business: unverified SRs, such as ShiftGuard's own AI results, are skipped and counted; a verified
SR that cannot be read is a :class:`~shiftguard.shadow.diagnoses.Problem` naming its SOP Instance
UID.

The query is standard (Study Root, hierarchical): a STUDY-level C-FIND (``ModalitiesInStudy`` SR,
the ``since`` date range, the study UIDs asked for), then a SERIES-level C-FIND per study for its SR
series, then one C-MOVE (or C-GET) per SR series. For C-MOVE the PACS must know this AE title at
the address and port where :func:`fetch_reports` listens.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydicom.dataset import Dataset
from pydicom.uid import KeyObjectSelectionDocumentStorage

from shiftguard.dicom.uid import is_uid
from shiftguard.errors import PacsError
from shiftguard.shadow.diagnoses import Diagnosis, Problem
from shiftguard.shadow.sr import NOT_VERIFIED, SR_CLASS_PREFIX, report_to_diagnosis

logger = logging.getLogger(__name__)

_AE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash
_PENDING = (0xFF00, 0xFF01)
_FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve Information Model - FIND
_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"  # ... - MOVE
_GET = "1.2.840.10008.5.1.4.1.2.2.3"  # ... - GET
_CHUNK = 50  # study UIDs per C-FIND
QIDO_PAGE = 200  # results per QIDO-RS request


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

    diagnoses = _read_reports(received, asked, f"pacs:{pacs.ae_title}", str(pacs), stats, problems)
    return diagnoses, problems, stats


def _read_reports(
    received: dict[str, Dataset],
    asked: set[str],
    prefix: str,
    where: str,
    stats: FetchStats,
    problems: list[Problem],
) -> list[Diagnosis]:
    """The verified reports among ``received`` (SOP Instance UID -> SR) from the series
    ``asked`` for, as diagnoses sourced ``<prefix>/<SOP Instance UID>``; counts into ``stats``,
    unreadable ones into ``problems``."""
    diagnoses = []
    for sop_uid, ds in sorted(received.items()):
        if str(ds.get("SeriesInstanceUID", "")) not in asked:
            logger.warning("%s sent %s, from a series not asked for; ignored", where, sop_uid)
            continue
        stats.instances_retrieved += 1
        source = f"{prefix}/{sop_uid}"
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
        where,
        stats.series_found,
        stats.instances_retrieved,
        stats.verified_reports,
        stats.skipped_unverified,
        stats.problems,
    )
    return diagnoses


def fetch_reports_dicomweb(
    url: str,
    *,
    token_env: str | None = None,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    since: str | None = None,
    studies: Iterable[str] | None = None,
) -> tuple[list[Diagnosis], list[Problem], FetchStats]:
    """The verified reports a DICOMweb server holds, as diagnoses: the same query as
    :func:`fetch_reports` by QIDO-RS (studies with ``ModalitiesInStudy`` SR and the ``since``
    date range, or the ``studies`` asked for; then each one's SR series) and WADO-RS (each SR
    series' instances), with the DICOMweb client of the edge (a bearer token from
    ``token_env``, a client certificate, the server checked against ``ca``).

    Returns:
        As :func:`fetch_reports`; sources ``dicomweb:<host[:port]>/<SOP Instance UID>``.

    Raises:
        PacsError: a bad argument, the server unreachable, or a request refused.
    """
    from urllib.parse import urlsplit

    import requests

    from shiftguard.edge.dicomweb import client_for
    from shiftguard.errors import CollectorAddressError, TlsConfigError

    date_range = f"{_dicom_date(since)}-" if since else ""
    wanted = _study_uids(studies)
    try:
        client = client_for(url, token_env, ca, cert, key, "--dicomweb url")
    except (CollectorAddressError, TlsConfigError) as exc:
        raise PacsError(str(exc)) from None
    where = url.rstrip("/")

    def uids(search: Any, tag: str, **kwargs: Any) -> list[str]:
        """Every UID ``tag`` a QIDO-RS search finds, page by page (``limit``/``offset``); a
        server that ignores ``offset`` (its page brings nothing new) ends the paging."""
        seen: dict[str, None] = {}
        offset = 0
        while True:
            page = search(**kwargs, limit=QIDO_PAGE, offset=offset)
            new = [
                str(item[tag]["Value"][0])
                for item in page
                if item.get(tag, {}).get("Value") and str(item[tag]["Value"][0]) not in seen
            ]
            seen.update(dict.fromkeys(new))
            if len(page) < QIDO_PAGE or not new:
                return list(seen)
            offset += len(page)

    stats = FetchStats()
    problems: list[Problem] = []
    received: dict[str, Dataset] = {}
    asked: set[str] = set()
    step = "QIDO-RS studies"
    try:
        study_uids: list[str] = []
        for uid in [None] if wanted is None else wanted:  # QIDO-RS matches one UID a query
            filters = {"ModalitiesInStudy": "SR"}
            if date_range:
                filters["StudyDate"] = date_range
            if uid:
                filters["StudyInstanceUID"] = uid
            study_uids += uids(client.search_for_studies, "0020000D", search_filters=filters)
        for study_uid in sorted(set(study_uids)):
            step = f"QIDO-RS series of study {study_uid}"
            found = uids(
                client.search_for_series, "0020000E", study_instance_uid=study_uid,
                search_filters={"Modality": "SR"},
            )  # fmt: skip
            for series_uid in found:
                stats.series_found += 1
                asked.add(series_uid)
                step = f"WADO-RS series {series_uid}"
                for ds in client.retrieve_series(study_uid, series_uid):
                    received[str(ds.SOPInstanceUID)] = ds
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise PacsError(f"DICOMweb {where}: {step}: HTTP {status}") from None
    except (requests.RequestException, OSError) as exc:
        raise PacsError(f"cannot reach DICOMweb {where}: {step}: {exc}") from None
    prefix = f"dicomweb:{urlsplit(url).netloc}"
    diagnoses = _read_reports(received, asked, prefix, f"DICOMweb {where}", stats, problems)
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
