"""Verified radiologist reports (Comprehensive SR) for the tests: the documents a PACS holds and
:func:`shiftguard.shadow.sr.report_to_diagnosis` reads, written for the study of an image, and a
small study to write them for.

ShiftGuard itself never writes a radiologist's report; the tests that fetch reports from a PACS
(tests/unit/shadow/test_pacs.py) store these there, and tests/unit/test_report_sr.py holds them
to dciodvfy.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.coding import Code
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian, generate_uid

from shiftguard.dicom.testing import SeriesSpec, make_datasets, save_dataset
from shiftguard.dicom.uid import is_uid
from shiftguard.shadow.diagnoses import parse_time
from shiftguard.shadow.sr import ABSENT, FINDING, PRESENT

#: series number of the reports written by :func:`write_report_sr`
REPORT_SERIES_NUMBER = 9801
REPORT_TITLE = Code("18748-4", "LN", "Diagnostic imaging report")
IMPRESSION = Code("121073", "DCM", "Impression")

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


def study(folder: Path, study_date: str, patient: str) -> list[Path]:
    """Two small MR images (4x4 pixels) of a new study dated ``study_date``, written to
    ``folder``; their paths."""
    spec = SeriesSpec(rows=4, cols=4, n_slices=2, patient_id=patient)
    paths = []
    for k, ds in enumerate(make_datasets(spec)):
        ds.StudyDate = study_date
        ds.StudyID = "1"
        paths.append(save_dataset(ds, folder / f"IM{k}.dcm"))
    return paths


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
