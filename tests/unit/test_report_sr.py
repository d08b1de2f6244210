"""The tests' report SRs (tests/report_sr.py): valid Comprehensive SRs, and nothing written for
what is not a report."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from dciodvfy_check import assert_dciodvfy_clean
from report_sr import study, write_report_sr


@pytest.mark.peers("dciodvfy")
@pytest.mark.parametrize("finding", [0, 1])
def test_a_written_report_is_a_valid_comprehensive_sr(tmp_path: Path, finding: int) -> None:
    image = pydicom.dcmread(study(tmp_path / "img", "20240301", "P1")[0])
    write_report_sr(image, finding, "Smith^Jane", "2024-03-02T09:30:00Z", tmp_path / "r.dcm")
    # no error, no warning, exit status 0, checked as a Comprehensive SR
    assert_dciodvfy_clean(tmp_path / "r.dcm", iod="ComprehensiveSR")


def test_write_report_sr_refuses_what_is_not_a_report(tmp_path: Path) -> None:
    image = pydicom.dcmread(study(tmp_path / "img", "20240301", "P1")[0])
    with pytest.raises(ValueError, match="finding 2"):
        write_report_sr(image, 2, "Smith^Jane", "2024-03-02", tmp_path / "r")
    with pytest.raises(ValueError, match="signed_at 'yesterday'"):
        write_report_sr(image, 1, "Smith^Jane", "yesterday", tmp_path / "r")
    del image.StudyInstanceUID
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        write_report_sr(image, 1, "Smith^Jane", "2024-03-02", tmp_path / "r")
    assert not (tmp_path / "r").exists()
