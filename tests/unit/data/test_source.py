"""`data init`'s proposal: the key and finding columns found from the values, not the names."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from shiftguard.data.labels import LabelRow
from shiftguard.data.source import DataSourceError, DicomInventory, StudyInfo, propose


def inventory() -> DicomInventory:
    inv = DicomInventory(root=Path("export"))
    for i in range(10):
        uid = f"1.2.{i}"
        inv.studies[uid] = StudyInfo(uid, f"MRN{i}", f"RAD{i}", f"2021030{i % 9 + 1}",
                                     Counter({f"1.3.{i}": 20}))  # fmt: skip
    return inv


def rows(cells: list[dict[str, str]]) -> list[LabelRow]:
    return [LabelRow(c, "labels.csv", n) for n, c in enumerate(cells, start=2)]


def test_the_key_and_finding_are_found_from_the_values() -> None:
    labels = rows([{"X1": f"RAD{i}", "Col B": "pos" if i % 2 else "neg", "Geschlecht": "F"}
                   for i in range(8)] + [{"X1": "RAD77", "Col B": "neg", "Geschlecht": "M"}])  # fmt: skip
    proposal = propose(inventory(), labels)
    assert proposal.key == "accession_number"
    assert proposal.columns.accession_number == "X1" and proposal.columns.finding == "Col B"
    assert (proposal.positive, proposal.negative) == (["pos"], ["neg"])
    assert proposal.counts["labelled"] == 8 and proposal.counts["unlabelled"] == 2
    assert proposal.counts["label_without_study"] == 1
    assert proposal.match_rates["accession_number"] == pytest.approx(8 / 9, abs=1e-3)


def test_patient_and_date_when_nothing_else_matches() -> None:
    labels = rows([{"pid": f"MRN{i}", "exam": f"2021-03-0{i % 9 + 1}", "result": "1" if i < 3 else "0"}
                   for i in range(10)])  # fmt: skip
    proposal = propose(inventory(), labels)
    assert proposal.key == "patient_id+study_date"
    assert (proposal.columns.patient_id, proposal.columns.study_date) == ("pid", "exam")
    assert proposal.counts["labelled"] == 10


def test_unknown_finding_values_and_foreign_labels_are_explained() -> None:
    odd = rows([{"uid": f"1.2.{i}", "verdict": "lesion" if i % 2 else "clear"} for i in range(10)])
    with pytest.raises(DataSourceError, match=r"--positive VALUE"):
        propose(inventory(), odd)
    given = propose(inventory(), odd, {"positive": ["lesion"], "finding": "verdict"})
    assert (given.positive, given.negative) == (["lesion"], ["clear"])
    foreign = rows([{"acc": f"OTHER{i}", "finding": "0"} for i in range(5)])
    with pytest.raises(DataSourceError, match="belongs to this export"):
        propose(inventory(), foreign)
