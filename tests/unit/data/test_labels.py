"""Label files in the formats sites export, and the join that accounts for every study and row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shiftguard.config import DataConfig
from shiftguard.data.identifiers import Pseudonymizer
from shiftguard.data.labels import LabelFileError, join, read_labels

ROWS = [("RAD1", "yes", "F"), ("RAD2", "no", "M"), ("RAD3", "Yes", "")]


def config(**update: object) -> DataConfig:
    base = {
        "name": "site", "dicom": "d", "labels": "l", "ground_truth": "l",
        "key": "accession_number", "identifiers": "keep",
        "columns": {"accession_number": "Acc", "finding": "Lesion", "patient_sex": "Sex"},
    }  # fmt: skip
    return DataConfig.model_validate({**base, **update})


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".txt", ".json", ".jsonl"])
def test_every_text_format_reads_the_same_rows_with_their_line(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"labels{suffix}"
    records = [{"Acc": a, "Lesion": f, "Sex": s} for a, f, s in ROWS]
    if suffix == ".json":
        path.write_text(json.dumps({"records": records}))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    else:
        sep = {".csv": ",", ".tsv": "\t", ".txt": ";"}[suffix]
        path.write_text("\n".join(sep.join(r) for r in [("Acc", "Lesion", "Sex"), *ROWS]) + "\n")
    rows = read_labels(path)
    assert [r.values for r in rows] == records
    first = 2 if suffix in (".csv", ".tsv", ".txt") else 1
    assert [r.where for r in rows] == [f"{path.name}:{first + i}" for i in range(3)]


def test_a_folder_of_batches_is_read_in_order_and_a_bad_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("Acc,Lesion\nRAD1,yes\n")
    (tmp_path / "b.csv").write_text("Acc,Lesion\nRAD2,no\n")
    assert [r.where for r in read_labels(tmp_path)] == ["a.csv:2", "b.csv:2"]
    (tmp_path / "c.csv").write_text("Acc,Lesion\nRAD3,no,extra\n")
    with pytest.raises(LabelFileError, match=r"c\.csv:2: more cells"):
        read_labels(tmp_path)
    with pytest.raises(LabelFileError, match="no such label file"):
        read_labels(tmp_path / "missing.csv")


def manifest(ids: Pseudonymizer) -> list[dict[str, str]]:
    return [
        {"study_uid": f"1.2.{i}", "patient_id": ids.patient(f"MRN{i}"),
         "accession_number": ids.accession(f"RAD{i}"), "study_date": ids.study_date("20210304")}
        for i in (1, 2, 3, 4)
    ]  # fmt: skip


@pytest.mark.parametrize("key", [None, bytes(range(32))])
def test_the_join_pseudonymizes_the_label_key_like_the_manifest(
    tmp_path: Path, key: bytes | None
) -> None:
    ids = Pseudonymizer(key)
    path = tmp_path / "labels.csv"
    path.write_text("Acc,Lesion,Sex\nRAD1,yes,F\nRAD2,no,M\nRAD2,no,M\nRAD3,maybe,\nRAD9,no,F\n")
    result = join(manifest(ids), read_labels(path), config(), ids)
    assert result.findings == {"1.2.1": 1, "1.2.2": 0}
    assert result.demographics["1.2.1"] == {"patient_sex": "F"}
    status = {(r["status"], r["label_row"] or r["study_uid"]) for r in result.report}
    assert status >= {
        ("duplicate_label", "labels.csv:4"),
        ("unreadable_finding", "labels.csv:5"),
        ("label_without_study", "labels.csv:6"),
        ("unlabelled", "1.2.4"),
    }
    orphan = next(r for r in result.report if r["status"] == "label_without_study")
    assert orphan["key"] == ids.accession("RAD9")  # never the raw number when pseudonymized


def test_patient_and_date_join_reads_iso_dates(tmp_path: Path) -> None:
    ids = Pseudonymizer(None)
    rows = manifest(ids)
    for i, row in enumerate(rows):
        row["study_date"] = f"2021030{i + 1}"
    path = tmp_path / "labels.csv"
    path.write_text(
        "MRN,Date,Lesion\nMRN1,2021-03-01,1\nMRN2,2021-03-02 10:00,0\nMRN3,03/03/2021,1\n"
    )
    cfg = config(key="patient_id+study_date",
                 columns={"patient_id": "MRN", "study_date": "Date", "finding": "Lesion"})  # fmt: skip
    result = join(rows, read_labels(path), cfg, ids)
    assert result.findings == {"1.2.1": 1, "1.2.2": 0}
    assert [r["label_row"] for r in result.report if r["status"] == "missing_key"] == [
        "labels.csv:4"
    ]
