"""Verified diagnoses from RIS exports: formats, malformed rows with line numbers, batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shiftguard.shadow.diagnoses import (
    Diagnosis,
    DiagnosisBook,
    DiagnosisFileError,
    parse_time,
    read_diagnoses,
    write_diagnoses,
)

REPO = Path(__file__).resolve().parents[3]


def test_the_cohorts_ris_export_reads_whole(tmp_path: Path) -> None:
    import pydicom

    from shiftguard.cohort import generate
    from shiftguard.config import CohortConfig, compose, validate

    cfg = compose(["experiment=tiny", "cohort.n_subjects=12"], conf_dir=REPO / "conf")["cohort"]
    generate.run(validate("cohort", cfg, CohortConfig), tmp_path, workers=1, progress=False)
    diagnoses, problems = read_diagnoses(tmp_path / "ris" / "verified_diagnoses.csv")
    assert problems == [] and {d.finding for d in diagnoses} == {0, 1}
    assert all(d.reported_at.endswith("Z") for d in diagnoses)
    studies = {
        pydicom.dcmread(next(study.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
        for study in (tmp_path / "dicom").glob("*/*")
    }
    assert {d.study_uid for d in diagnoses} == studies  # one verdict per study in the cohort


def test_csv_and_json_lines_give_the_same_diagnoses(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text(
        "StudyInstanceUID,Finding,Reader,Report Date\n"
        "1.2.3,positive,dr_a,20240105\n"
        "1.2.4,no,dr_b,2024-01-06T09:30:00+01:00\n"
    )
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"study_uid": "1.2.3", "finding": 1, "reader": "dr_a", "time": "20240105"})
        + "\n"
        + json.dumps(
            {
                "study_uid": "1.2.4",
                "finding": False,
                "reader": "dr_b",
                "reported_at": "2024-01-06T08:30:00Z",
            }
        )
        + "\n"
    )
    from_csv, _ = read_diagnoses(tmp_path / "a.csv")
    from_json, _ = read_diagnoses(tmp_path / "a.jsonl")
    assert from_csv == from_json  # sources (file:line) are not compared
    assert [(d.study_uid, d.finding) for d in from_csv] == [("1.2.3", 1), ("1.2.4", 0)]
    assert from_csv[1].reported_at == "2024-01-06T08:30:00Z"  # converted to UTC


def test_malformed_rows_are_reported_with_their_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "ris.csv"
    path.write_text(
        "study_uid,finding,reader,report_date\n"
        "1.2.3,1,dr_a,20240105\n"
        ",1,dr_a,20240105\n"
        "1.2.x,1,dr_a,20240105\n"
        "1.2.5,maybe,dr_a,20240105\n"
        "1.2.6,0,dr_a,last tuesday\n"
        "1.2.7,0,dr_a,20240105,extra\n"
        "1.2.8,0,dr_a,20240105\n"
    )
    diagnoses, problems = read_diagnoses(path)
    assert [d.study_uid for d in diagnoses] == ["1.2.3", "1.2.8"]
    assert [str(p) for p in problems] == [
        "ris.csv:3: no study UID",
        "ris.csv:4: study UID '1.2.x' is not a DICOM UID",
        "ris.csv:5: finding 'maybe': expected 0/1, yes/no, positive/negative",
        "ris.csv:6: report time 'last tuesday': expected ISO-8601 or YYYYMMDD",
        "ris.csv:7: more fields than the header has",
    ]
    lines = tmp_path / "ris.jsonl"
    lines.write_text('{"study_uid": "1.2.3", "finding": 1, "time": "20240105"}\n{oops\n[1, 2]\n')
    _, problems = read_diagnoses(lines)
    assert [p.source for p in problems] == ["ris.jsonl:2", "ris.jsonl:3"]
    assert "not JSON" in problems[0].message and "not a JSON object" in problems[1].message


def test_files_that_cannot_be_read_are_named(tmp_path: Path) -> None:
    with pytest.raises(DiagnosisFileError, match="no such diagnosis file"):
        read_diagnoses(tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text("\n")
    with pytest.raises(DiagnosisFileError, match="empty"):
        read_diagnoses(tmp_path / "empty.csv")
    (tmp_path / "other.csv").write_text("patient,finding\nA,1\n")
    with pytest.raises(DiagnosisFileError, match="no study UID column"):
        read_diagnoses(tmp_path / "other.csv")


def test_batches_in_any_order_give_the_same_verdicts_as_one_batch(tmp_path: Path) -> None:
    rows = [
        "1.1,0,dr_a,20240101", "1.2,1,dr_a,20240101", "1.3,0,dr_b,20240102",
        "1.1,1,dr_c,20240103",  # a later, amended report: it counts
        "1.2,1,dr_a,20240101",  # the same report again
        "1.3,1,dr_a,20240102",  # same day, another reader: the tie is broken by name
    ]  # fmt: skip
    header = "study_uid,finding,reader,report_date\n"
    (tmp_path / "all.csv").write_text(header + "\n".join(rows) + "\n")
    one = DiagnosisBook()
    one.add_file(tmp_path / "all.csv")
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        book = DiagnosisBook()
        chunks = [rows[0:2], rows[2:4], rows[4:6]]
        for i in order:
            (tmp_path / f"b{i}.csv").write_text(header + "\n".join(chunks[i]) + "\n")
            book.add_file(tmp_path / f"b{i}.csv")
        assert book.verdicts() == one.verdicts() == {"1.1": 1, "1.2": 1, "1.3": 0}
        assert book.disagreements() == one.disagreements() == ["1.1", "1.3"]
    assert len(one.reports["1.2"]) == 1


def test_report_times() -> None:
    assert parse_time("20240105") == "2024-01-05T00:00:00Z"
    assert parse_time("2024-01-05T10:00:00-05:00") == "2024-01-05T15:00:00Z"
    assert parse_time("2024-13-05") is None


def test_diagnoses_round_trip_through_json_lines(tmp_path: Path) -> None:
    diagnoses = [
        Diagnosis("1.2.3", "2024-03-02T09:30:00Z", "Smith^Jane", 1, "pacs:ORTHANC/1.2.3.4"),
        Diagnosis("1.2.4", "2024-03-03T00:00:00Z", "Müller^Jörg", 0, "pacs:ORTHANC/1.2.4.5"),
    ]
    path = write_diagnoses(diagnoses, tmp_path / "out" / "pacs.jsonl")
    back, problems = read_diagnoses(path)
    assert problems == []
    assert back == diagnoses
    assert [d.reader for d in back] == ["Smith^Jane", "Müller^Jörg"]
    assert [d.source for d in back] == ["pacs.jsonl:1", "pacs.jsonl:2"]
