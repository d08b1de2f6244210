"""The dciodvfy check counts warnings and reads the exit status: objects the old check (keep the
lines starting with ``Error``) passed are reported."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from dciodvfy_check import assert_dciodvfy_clean, dciodvfy, parse_output
from report_sr import write_report_sr

from shiftguard.dicom.testing import SeriesSpec, make_datasets, save_dataset

needs_dciodvfy = pytest.mark.peers("dciodvfy")

#: what dciodvfy says about a Comprehensive SR carrying Rescale Slope (not in the SR's IOD)
RESCALE_WARNINGS = (
    "Warning - Attribute is not present in standard DICOM IOD - (0x0028,0x1053) DS Rescale Slope",
    "Warning - Dicom dataset contains attributes not present in standard DICOM IOD - this is a "
    "Standard Extended SOP Class",
)


def _old_check(output: str) -> list[str]:
    """The check these tests replaced: only the lines starting with ``Error``."""
    return [line for line in output.splitlines() if line.startswith("Error")]


@pytest.fixture
def report_sr(tmp_path: Path) -> Path:
    """A verified report SR as the tests write it (tests/report_sr.py)."""
    ds = make_datasets(SeriesSpec(rows=4, cols=4, n_slices=1, patient_id="P1"))[0]
    ds.StudyDate, ds.StudyID = "20240301", "1"
    image = pydicom.dcmread(save_dataset(ds, tmp_path / "image.dcm"))
    path = tmp_path / "report.dcm"
    write_report_sr(image, 1, "Smith^Jane", "2024-03-02T09:30:00Z", path)
    return path


def test_output_is_sorted_into_iods_errors_and_warnings() -> None:
    output = (
        "Comprehensive3DSR\n"
        "Error - Missing attribute Type 1 Required Element=<CompletionFlag> Module=<X>\n"
        "Warning - Unrecognized defined term <AXIAL> for value 3 of attribute <Image Type> \n"
        "\n"
    )
    report = parse_output("a.dcm", output, 1)
    assert report.iods == ("Comprehensive3DSR",)
    assert report.errors == (
        "Error - Missing attribute Type 1 Required Element=<CompletionFlag> Module=<X>",
    )
    assert report.warnings == (
        "Warning - Unrecognized defined term <AXIAL> for value 3 of attribute <Image Type>",
    )
    assert report.problems() == [*report.errors, "exit status 1", *report.warnings]


def test_warnings_alone_and_a_failing_exit_status_are_problems() -> None:
    warned = parse_output("a.dcm", "SCImage\nWarning - something odd\n", 0)
    assert not warned.clean and warned.problems() == ["Warning - something odd"]
    assert warned.problems(allowed_warnings={"Warning - something odd"}) == []
    silent_failure = parse_output("b.dcm", "SCImage\n", 2)
    assert not silent_failure.clean and silent_failure.problems() == ["exit status 2"]
    unknown = parse_output("c.dcm", "SCImage\nsomething dciodvfy never said before\n", 0)
    assert unknown.errors == ("something dciodvfy never said before",) and not unknown.clean


@needs_dciodvfy
def test_a_clean_object_passes(report_sr: Path) -> None:
    report = assert_dciodvfy_clean(report_sr, iod="ComprehensiveSR")
    assert report.clean and report.returncode == 0
    assert report.errors == report.warnings == ()


@needs_dciodvfy
def test_a_warning_the_old_check_passed_is_reported(report_sr: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(report_sr)
    ds.RescaleSlope = "1"  # not part of the Comprehensive SR IOD: a warning, exit status 0
    ds.save_as(tmp_path / "warned.dcm", enforce_file_format=True)
    report = dciodvfy(tmp_path / "warned.dcm")
    assert _old_check(report.output) == [] and report.returncode == 0  # the old check passed it
    assert report.errors == ()
    assert report.warnings == RESCALE_WARNINGS
    assert not report.clean
    with pytest.raises(AssertionError, match="Rescale Slope"):
        assert_dciodvfy_clean(tmp_path / "warned.dcm")
    with pytest.raises(AssertionError, match="Standard Extended SOP Class"):
        assert_dciodvfy_clean(tmp_path / "warned.dcm", allowed_warnings=RESCALE_WARNINGS[:1])
    assert_dciodvfy_clean(tmp_path / "warned.dcm", allowed_warnings=RESCALE_WARNINGS)


@needs_dciodvfy
def test_a_file_dciodvfy_cannot_open_is_reported(tmp_path: Path) -> None:
    report = dciodvfy(tmp_path / "absent.dcm")
    assert _old_check(report.output) == []  # the old check passed it: dciodvfy aborts instead
    assert report.returncode != 0 and report.iods == ()
    assert any(line.startswith("Abort") and "absent.dcm" in line for line in report.errors)
    assert not report.clean


@needs_dciodvfy
def test_an_error_is_reported_with_the_exit_status(report_sr: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(report_sr)
    del ds.CompletionFlag  # type 1 in SR Document General
    ds.save_as(tmp_path / "broken.dcm", enforce_file_format=True)
    report = dciodvfy(tmp_path / "broken.dcm")
    assert report.returncode != 0
    assert any("CompletionFlag" in e for e in report.errors)
    assert f"exit status {report.returncode}" in report.problems()
    with pytest.raises(AssertionError, match="CompletionFlag"):
        assert_dciodvfy_clean(tmp_path / "broken.dcm")
