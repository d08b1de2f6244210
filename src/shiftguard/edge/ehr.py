"""Results as EHR messages: HL7 v2.5.1 ORU^R01 (and an ORM^O01 or OMI^O23 priority update) and
FHIR R4 ``DiagnosticReport`` + ``Observation`` (and a ``ServiceRequest.priority`` update).

What a message says is read from the result's SR (the patient and study attributes it copied
from the images: Patient ID and its issuer, name, birth date, sex, accession number, Study
Instance UID, the order numbers of its Referenced Request Sequence) and from the result (finding
present or absent at the bundle's operating threshold, the probability, the threshold, the
algorithm's name and version). The result is the algorithm's, unverified by a physician: HL7's
result status is ``P`` (preliminary) and FHIR's ``preliminary``, as the SR itself is neither
final nor verified.

**Urgency.** A result is *urgent* when the finding is present and its probability is at least
``edge.urgency_threshold`` (unset: never). An urgent result carries priority ``S`` (stat) in the
ORU's TQ1-9 and is delivered first by every destination's queue (a DIMSE one sends it with
C-STORE priority HIGH); a destination with ``priority_update`` also sends, once per study, an
order message that raises the study's priority on the worklist: HL7 ORM^O01 or OMI^O23 with
order control ``XO`` (change order) and priority ``S`` in ORC-7 / OBR-27 (ORM) or TQ1-9 (OMI), or
FHIR: the ``ServiceRequest`` whose identifier is the accession number gets ``priority: stat``.

**Exactly once.** Every message has a deterministic identity: the HL7 control ID (MSH-10) and
the FHIR resource ids derive from the result's SR instance UID (or the study's, for a priority
update), so a message that is sent again (its acknowledgement was lost, or the service was
killed between the receiver's acknowledgement and the queue's record of it) is the same message
with the same ID: an HL7 receiver discards a repeated control ID, and a FHIR ``PUT`` of the same
resource id changes nothing.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "HL7_VERSION",
    "ResultFacts",
    "StudyFacts",
    "control_id",
    "escape",
    "fhir_id",
    "fhir_priority_update",
    "fhir_report",
    "hl7_order_priority",
    "hl7_oru",
    "study_facts",
]

HL7_VERSION = "2.5.1"
SENDING_APPLICATION = "SHIFTGUARD"
#: what the result is about, as the SR codes it (SNOMED CT; DICOM; LOINC)
FINDING = ("52988006", "Lesion", "SCT")
PRESENT = ("52101004", "Present", "SCT")
ABSENT = ("272519000", "Absent", "SCT")
PROBABILITY = ("122157", "Probability", "DCM")
THRESHOLD = ("122411", "Threshold Value", "DCM")
ALGORITHM_NAME = ("111001", "Algorithm Name", "DCM")
ALGORITHM_VERSION = ("111003", "Algorithm Version", "DCM")
STUDY_UID = ("110180", "Study Instance UID", "DCM")
PROCEDURE = ("24590-2", "MR Brain", "LN")
SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "LN": "http://loinc.org",
}
#: DICOM sex -> HL7 table 0001 / FHIR administrative gender
SEX_HL7 = {"M": "M", "F": "F", "O": "O"}
SEX_FHIR = {"M": "male", "F": "female", "O": "other"}


@dataclass(frozen=True)
class StudyFacts:
    """The patient and study a result is about, as its SR carries them."""

    study_uid: str
    patient_id: str = ""
    issuer: str = ""  # Issuer of Patient ID (the assigning authority)
    patient_name: str = ""  # DICOM PN: family^given^middle^prefix^suffix
    birth_date: str = ""  # YYYYMMDD
    sex: str = ""  # M, F, O or empty
    accession: str = ""
    study_datetime: str = ""  # YYYYMMDDHHMMSS, or shorter
    placer_order: str = ""
    filler_order: str = ""


@dataclass(frozen=True)
class ResultFacts:
    """One series' result, and the names a message refers to it by."""

    series_uid: str
    sr_uid: str  # the result's SR instance: the messages' identity derives from it
    probability: float
    threshold: float
    model: str
    model_version: str
    urgent: bool = False

    @property
    def positive(self) -> bool:
        return self.probability >= self.threshold


def study_facts(sr_path: str | Path) -> StudyFacts:
    """The :class:`StudyFacts` of the SR at ``sr_path`` (pixel-free: the header only)."""
    import pydicom

    ds = pydicom.dcmread(sr_path, stop_before_pixels=True)

    def text(keyword: str, source: Any = ds) -> str:
        value = source.get(keyword, "")
        return "" if value is None else str(value).strip()

    placer = filler = ""
    for item in ds.get("ReferencedRequestSequence", []):
        placer = placer or text("PlacerOrderNumberImagingServiceRequest", item)
        filler = filler or text("FillerOrderNumberImagingServiceRequest", item)
    return StudyFacts(
        study_uid=text("StudyInstanceUID"),
        patient_id=text("PatientID"),
        issuer=text("IssuerOfPatientID"),
        patient_name=text("PatientName"),
        birth_date=text("PatientBirthDate"),
        sex=text("PatientSex").upper(),
        accession=text("AccessionNumber"),
        study_datetime=(text("StudyDate") + text("StudyTime").split(".")[0])[:14],
        placer_order=placer,
        filler_order=filler,
    )


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def control_id(key: str) -> str:
    """The HL7 message control ID (MSH-10, at most 20 characters) of the message ``key``: the
    same key, the same ID.

    >>> control_id("ORU^R01:2.25.1") == control_id("ORU^R01:2.25.1"), len(control_id("x"))
    (True, 20)
    """
    return "SG" + _digest(key)[:18].upper()


def fhir_id(kind: str, uid: str) -> str:
    """A FHIR resource id (``[A-Za-z0-9.-]{1,64}``) for the ``kind`` resource of ``uid``.

    >>> fhir_id("report", "2.25.1") == fhir_id("report", "2.25.1") != fhir_id("obs", "2.25.1")
    True
    """
    return f"sg-{_digest(kind, uid)[:40]}"


# -------------------------------------------------------------------------------------------------
# HL7 v2
# -------------------------------------------------------------------------------------------------

_ESCAPES = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "~": "\\R\\", "&": "\\T\\"}


def escape(text: str) -> str:
    """``text`` as an HL7 v2 field component: the delimiters escaped, line breaks as ``\\.br\\``.

    >>> escape("a|b^c~d\\\\e&f")
    'a\\\\F\\\\b\\\\S\\\\c\\\\R\\\\d\\\\E\\\\e\\\\T\\\\f'
    """
    out = "".join(_ESCAPES.get(c, c) for c in str(text))
    return out.replace("\r\n", "\\.br\\").replace("\n", "\\.br\\").replace("\r", "\\.br\\")


def _cwe(code: tuple[str, str, str]) -> str:
    return "^".join(escape(c) for c in code)


def _segment(name: str, fields: dict[int, str]) -> str:
    """The segment ``name`` with ``fields`` by their number (1-based), the rest empty, no trailing
    empty fields.

    >>> _segment("TQ1", {1: "1", 9: "S^Stat^HL70485"})
    'TQ1|1||||||||S^Stat^HL70485'
    """
    return "|".join([name] + [fields.get(k, "") for k in range(1, max(fields) + 1)]).rstrip("|")


def _stamp(now: float) -> str:
    return time.strftime("%Y%m%d%H%M%S+0000", time.gmtime(now))


def _msh(
    message_type: str,
    key: str,
    site: str,
    receiving: tuple[str, str],
    now: float,
) -> str:
    structure = {"ORU^R01": "ORU_R01", "ORM^O01": "ORM_O01", "OMI^O23": "OMI_O23"}[message_type]
    fields = [
        "MSH", "^~\\&", SENDING_APPLICATION, escape(site), escape(receiving[0]),
        escape(receiving[1]), _stamp(now), "", f"{message_type}^{structure}", control_id(key),
        "P", HL7_VERSION, "", "", "", "", "", "UNICODE UTF-8",
    ]  # fmt: skip
    return "|".join(fields)


def _pid(study: StudyFacts) -> str:
    patient_id = escape(study.patient_id)
    if study.issuer:
        patient_id += f"^^^{escape(study.issuer)}"
    # DICOM PN family^given^middle^prefix^suffix -> XPN family^given^middle^suffix^prefix
    pn = (study.patient_name.split("=")[0].split("^") + [""] * 5)[:5]
    name = "^".join(escape(p) for p in (pn[0], pn[1], pn[2], pn[4], pn[3])).rstrip("^")
    sex = SEX_HL7.get(study.sex, "U")
    return "|".join(["PID", "1", "", patient_id, "", name, "", study.birth_date, sex])


def _orders(study: StudyFacts) -> tuple[str, str]:
    """Placer and filler order numbers: the SR's, else the accession number as the filler's
    (the RIS that fills a radiology order numbers it by accession)."""
    return escape(study.placer_order), escape(study.filler_order or study.accession)


def hl7_oru(
    study: StudyFacts,
    result: ResultFacts,
    site: str,
    receiving: tuple[str, str] = ("", ""),
    now: float | None = None,
) -> str:
    """The ORU^R01 of one result (segments separated by carriage returns, no MLLP framing).

    Segments: MSH; PID (Patient ID with its issuer, name, birth date, sex); ORC ``RE``; OBR
    (placer and filler order numbers, the procedure, the study's time, the accession number in
    OBR-18, result status ``P``); TQ1 with priority ``S`` (urgent) or ``R``; OBX: the finding
    (present/absent, abnormal flag ``A`` when present), the probability, the threshold, the
    algorithm's name and version, the Study Instance UID.
    """
    now = time.time() if now is None else now
    placer, filler = _orders(study)
    priority = "S^Stat^HL70485" if result.urgent else "R^Routine^HL70485"
    value = PRESENT if result.positive else ABSENT
    flag = "A" if result.positive else "N"
    observed = study.study_datetime
    reported = _stamp(now)
    obx = [
        ("CWE", FINDING, _cwe(value), "", flag),
        ("NM", PROBABILITY, f"{result.probability:.6g}", "1^no units^UCUM", ""),
        ("NM", THRESHOLD, f"{result.threshold:.6g}", "1^no units^UCUM", ""),
        ("ST", ALGORITHM_NAME, escape(result.model), "", ""),
        ("ST", ALGORITHM_VERSION, escape(result.model_version), "", ""),
        ("ST", STUDY_UID, escape(study.study_uid), "", ""),
    ]
    obr = {1: "1", 2: placer, 3: filler, 4: _cwe(PROCEDURE), 7: observed,
           18: escape(study.accession), 22: reported, 24: "MR", 25: "P"}  # fmt: skip
    segments = [
        _msh("ORU^R01", f"ORU^R01:{result.sr_uid}", site, receiving, now),
        _pid(study),
        _segment("ORC", {1: "RE", 2: placer, 3: filler, 5: "CM"}),
        _segment("OBR", obr),
        _segment("TQ1", {1: "1", 9: priority}),
    ]
    method = escape(f"{result.model} {result.model_version}")
    for k, (kind, code, val, unit, abnormal) in enumerate(obx, start=1):
        fields = {1: str(k), 2: kind, 3: _cwe(code), 5: val, 6: unit, 8: abnormal, 11: "P",
                  14: observed, 17: method}  # fmt: skip
        segments.append(_segment("OBX", fields))
    return "\r".join(segments) + "\r"


def hl7_order_priority(
    message_type: str,
    study: StudyFacts,
    site: str,
    receiving: tuple[str, str] = ("", ""),
    now: float | None = None,
) -> str:
    """An order change (``XO``) that sets the study's priority to stat: ORM^O01 (priority in
    ORC-7 and OBR-27, component 6) or OMI^O23 (TQ1-9; IPC with the accession number and Study
    Instance UID, the requested procedure and step identified by the accession number too)."""
    if message_type not in ("ORM^O01", "OMI^O23"):
        raise ValueError(f"{message_type}: expected ORM^O01 or OMI^O23")
    now = time.time() if now is None else now
    placer, filler = _orders(study)
    accession = escape(study.accession)
    legacy_tq = "^^^^^S" if message_type == "ORM^O01" else ""  # TQ priority, component 6
    segments = [
        _msh(message_type, f"{message_type}:{study.study_uid}", site, receiving, now),
        _pid(study),
        _segment("ORC", {1: "XO", 2: placer, 3: filler, 7: legacy_tq}),
    ]
    if message_type == "OMI^O23":
        segments.append(_segment("TQ1", {1: "1", 9: "S^Stat^HL70485"}))
    segments.append(
        _segment(
            "OBR",
            {1: "1", 2: placer, 3: filler, 4: _cwe(PROCEDURE), 18: accession, 27: legacy_tq},
        )
    )
    if message_type == "OMI^O23":
        uid = escape(study.study_uid)
        segments.append(
            _segment("IPC", {1: accession, 2: accession, 3: uid, 4: accession, 5: "MR"})
        )
    return "\r".join(segments) + "\r"


# -------------------------------------------------------------------------------------------------
# FHIR R4
# -------------------------------------------------------------------------------------------------


def _coding(code: tuple[str, str, str]) -> dict[str, str]:
    return {"system": SYSTEMS[code[2]], "code": code[0], "display": code[1]}


def _fhir_datetime(value: str) -> str | None:
    """DICOM DA+TM (YYYYMMDD[HHMMSS]) as a FHIR dateTime, or None when it is not one."""
    if len(value) >= 8 and value[:8].isdigit():
        date = f"{value[:4]}-{value[4:6]}-{value[6:8]}"
        if len(value) >= 12 and value[8:12].isdigit():
            seconds = value[12:14] if len(value) >= 14 and value[12:14].isdigit() else "00"
            return f"{date}T{value[8:10]}:{value[10:12]}:{seconds}Z"
        return date
    return None


def _patient_reference(study: StudyFacts) -> dict[str, Any]:
    identifier: dict[str, Any] = {"value": study.patient_id or "unknown"}
    if study.issuer:
        identifier["assigner"] = {"display": study.issuer}
    return {"identifier": identifier, "display": study.patient_name.replace("^", " ").strip()}


def _accession_identifier(study: StudyFacts) -> dict[str, Any]:
    return {
        "type": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]
        },
        "value": study.accession,
    }


def fhir_report(
    study: StudyFacts, result: ResultFacts, site: str, now: float | None = None
) -> dict[str, Any]:
    """A FHIR R4 transaction ``Bundle`` that PUTs the result's ``Observation`` and the
    ``DiagnosticReport`` citing it, both with ids derived from the SR instance UID.

    The report names the ``ImagingStudy`` by its identifier (``urn:oid:<Study Instance UID>``,
    as FHIR's ImagingStudy does), the order by the accession number (``basedOn``), the patient by
    Patient ID; the observation holds the finding (present/absent, interpretation ``A`` or
    ``N``), the probability as its value, the threshold as a component, the algorithm as its
    method and device; priority shows as an ``urgent`` note and category."""
    now = time.time() if now is None else now
    issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    obs_id, report_id = fhir_id("observation", result.sr_uid), fhir_id("report", result.sr_uid)
    value = PRESENT if result.positive else ABSENT
    algorithm = f"{result.model} {result.model_version}"
    subject = _patient_reference(study)
    imaging = {
        "type": "ImagingStudy",
        "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{study.study_uid}"},
    }
    effective = _fhir_datetime(study.study_datetime)
    sr = {"system": "urn:dicom:uid", "value": f"urn:oid:{result.sr_uid}"}
    interpretation = {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                "code": "A" if result.positive else "N",
                "display": "Abnormal" if result.positive else "Normal",
            }
        ]
    }
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "id": obs_id,
        "identifier": [sr],
        "status": "preliminary",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "imaging",
                    }
                ]
            }
        ],
        "code": {"coding": [_coding(FINDING)], "text": "Lesion (AI finding)"},
        "subject": subject,
        "issued": issued,
        "valueCodeableConcept": {"coding": [_coding(value)]},
        "interpretation": [interpretation],
        "method": {"text": algorithm},
        "device": {"display": algorithm},
        "derivedFrom": [imaging],
        "component": [
            {
                "code": {"coding": [_coding(PROBABILITY)]},
                "valueQuantity": {
                    "value": round(result.probability, 6),
                    "unit": "1",
                    "system": "http://unitsofmeasure.org",
                    "code": "1",
                },
            },
            {
                "code": {"coding": [_coding(THRESHOLD)]},
                "valueQuantity": {
                    "value": round(result.threshold, 6),
                    "unit": "1",
                    "system": "http://unitsofmeasure.org",
                    "code": "1",
                },
            },
        ],
    }
    if result.urgent:
        observation["note"] = [{"text": "urgent: finding above the site's urgency threshold"}]
    conclusion = (
        f"{algorithm}: lesion {'present' if result.positive else 'absent'} "
        f"(probability {result.probability:.3f}, threshold {result.threshold:.3f})"
        + ("; urgent" if result.urgent else "")
        + ". Preliminary, not verified by a physician."
    )
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": report_id,
        "identifier": [sr],
        "status": "preliminary",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}
        ],
        "code": {"coding": [_coding(PROCEDURE)]},
        "subject": subject,
        "issued": issued,
        "performer": [{"display": f"{SENDING_APPLICATION} at {site}"}],
        "result": [{"reference": f"Observation/{obs_id}"}],
        "imagingStudy": [imaging],
        "conclusion": conclusion,
    }
    if study.accession:
        report["basedOn"] = [{"type": "ServiceRequest", "identifier": _accession_identifier(study)}]
    if effective is not None:
        observation["effectiveDateTime"] = effective
        report["effectiveDateTime"] = effective
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"Observation/{obs_id}",
                "resource": observation,
                "request": {"method": "PUT", "url": f"Observation/{obs_id}"},
            },
            {
                "fullUrl": f"DiagnosticReport/{report_id}",
                "resource": report,
                "request": {"method": "PUT", "url": f"DiagnosticReport/{report_id}"},
            },
        ],
    }


def fhir_priority_update(study: StudyFacts) -> dict[str, Any]:
    """What the FHIR sender does to raise the study's order to stat: find the ``ServiceRequest``
    whose identifier is the accession number and set its ``priority`` (see
    :meth:`shiftguard.edge.fhir.FhirClient.raise_priority`)."""
    return {
        "action": "raise-priority",
        "accession": study.accession,
        "study_uid": study.study_uid,
        "priority": "stat",
    }


def facts_of(row: dict[str, Any], urgent: bool) -> ResultFacts:
    """A result row of :meth:`~shiftguard.edge.predict.Predictor.predict_files` as facts."""
    return ResultFacts(
        series_uid=str(row["series_uid"]),
        sr_uid=str(row["sr_uid"]),
        probability=float(row["probability"]),
        threshold=float(row["threshold"]),
        model=str(row["model"]),
        model_version=str(row["model_version"]),
        urgent=urgent,
    )
