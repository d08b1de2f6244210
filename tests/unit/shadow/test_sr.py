"""A verified report SR read as a diagnosis (the tests' writer, tests/report_sr.py, writes the
documents), and what is not one says why; DICOM date-times."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from report_sr import study, write_report_sr

from shiftguard.shadow.diagnoses import Diagnosis
from shiftguard.shadow.sr import NOT_VERIFIED, parse_dt, report_to_diagnosis


def test_a_written_report_reads_back_as_the_diagnosis(tmp_path: Path) -> None:
    image = pydicom.dcmread(study(tmp_path / "img", "20240301", "P1")[0])
    written = write_report_sr(image, 1, "Smith^Jane", "2024-03-02T10:30:00+01:00", tmp_path / "a")
    read = pydicom.dcmread(tmp_path / "a")
    diagnosis, reason = report_to_diagnosis(read, "here")
    assert reason is None
    assert diagnosis == Diagnosis(image.StudyInstanceUID, "2024-03-02T09:30:00Z", "Smith^Jane", 1)
    assert diagnosis is not None and diagnosis.source == "here"
    assert read.PatientID == "P1" and read.StudyDate == "20240301" and read.Modality == "SR"
    assert read.SeriesInstanceUID != image.SeriesInstanceUID
    assert read.SOPInstanceUID == written.SOPInstanceUID != image.SOPInstanceUID
    assert read.VerifyingObserverSequence[0].VerificationDateTime == "20240302093000+0000"

    write_report_sr(image, 0, "Doe^John", "20240305", tmp_path / "b", text="Normal study.")
    diagnosis, _ = report_to_diagnosis(pydicom.dcmread(tmp_path / "b"), "")
    assert diagnosis == Diagnosis(image.StudyInstanceUID, "2024-03-05T00:00:00Z", "Doe^John", 0)
    assert pydicom.dcmread(tmp_path / "b").ContentSequence[1].TextValue == "Normal study."


def _report(tmp_path: Path, **changes: object) -> Dataset:
    image = pydicom.dcmread(study(tmp_path / "img", "20240301", "P1")[0])
    ds = write_report_sr(image, 1, "Smith^Jane", "2024-03-02T09:30:00Z", tmp_path / "r.dcm")
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def _code(value: str, scheme: str, meaning: str) -> DicomSequence:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return DicomSequence([item])


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # the bad values set on purpose
def test_what_is_not_a_verified_diagnosis_says_why(tmp_path: Path) -> None:
    def reason(ds: Dataset) -> str | None:
        diagnosis, why = report_to_diagnosis(ds, "x")
        assert (diagnosis is None) == (why is not None)
        return why

    image = pydicom.dcmread(study(tmp_path / "img", "20240301", "P1")[0])
    assert "not a structured report" in str(reason(image))
    assert reason(_report(tmp_path, VerificationFlag="UNVERIFIED")) == NOT_VERIFIED
    assert reason(_report(tmp_path, VerificationFlag=None)) == NOT_VERIFIED
    assert "not a DICOM UID" in str(reason(_report(tmp_path, StudyInstanceUID="1.2.x")))
    assert "no verification time" in str(reason(_report(tmp_path, VerifyingObserverSequence=None)))

    no_finding = _report(tmp_path)
    no_finding.ContentSequence = DicomSequence(no_finding.ContentSequence[1:])
    assert "no Finding (DCM 121071)" in str(reason(no_finding))

    indeterminate = _report(tmp_path)
    indeterminate.ContentSequence[0].ConceptCodeSequence = _code("82334004", "SCT", "Indeterm.")
    assert "SCT 82334004 is neither Present" in str(reason(indeterminate))

    bad_time = _report(tmp_path)
    bad_time.VerifyingObserverSequence[0].VerificationDateTime = "20241350"
    assert "VerificationDateTime '20241350'" in str(reason(bad_time))


def test_a_finding_under_another_name_and_several_verifiers_still_read(tmp_path: Path) -> None:
    ds = _report(tmp_path)
    ds.ContentSequence[0].ConceptNameCodeSequence = _code("F-01", "99LOCAL", "Lesion")
    later = Dataset()
    later.VerifyingObserverName = "Senior^Sam"
    later.VerifyingOrganization = "Radiology"
    later.VerificationDateTime = "20240303080000"  # no offset: the dataset's TimezoneOffsetFromUTC
    later.VerifyingObserverIdentificationCodeSequence = DicomSequence()
    ds.VerifyingObserverSequence.append(later)
    ds.TimezoneOffsetFromUTC = "+0200"
    diagnosis, _ = report_to_diagnosis(ds, "x")
    assert diagnosis == Diagnosis(ds.StudyInstanceUID, "2024-03-03T06:00:00Z", "Senior^Sam", 1)


@pytest.mark.parametrize(
    ("text", "offset", "expected"),
    [
        ("20240105093000.123456+0100", None, "2024-01-05T08:30:00Z"),
        ("20240105093000-0330", "+0500", "2024-01-05T13:00:00Z"),  # its own offset wins
        ("2024010509", "-0100", "2024-01-05T10:00:00Z"),
        ("20240105", None, "2024-01-05T00:00:00Z"),
        ("2024", None, "2024-01-01T00:00:00Z"),
        ("20240230", None, None),  # no such day
        ("202401050930.5", None, None),  # a fraction needs seconds
        ("20240105+2500", None, None),
        ("2024-01-05", None, None),
        ("", None, None),
    ],
)
def test_parse_dt(text: str, offset: str | None, expected: str | None) -> None:
    assert parse_dt(text, offset) == expected
