from __future__ import annotations

import csv
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from shiftguard.config import DataConfig, SplitConfig
from shiftguard.data.identifiers import Pseudonymizer
from shiftguard.data.labels import LabelFileError
from shiftguard.data.split import SplitInputError, TooFewLabelledError, allocate, assign, run

SITES = ["A", "B", "C"]


def make_manifest(n_patients: int = 120, seed: int = 0) -> tuple[list[dict[str, str]], dict]:
    """Patients with 1-3 series each at sites A-C, plus an external scanner 'X'; findings by site."""
    rng = np.random.default_rng(seed)
    rows, diagnoses = [], {}
    for p in range(n_patients):
        site = "X" if p % 10 == 0 else SITES[p % 3]
        finding = int(rng.random() < {"A": 0.6, "B": 0.2, "C": 0.4, "X": 0.4}[site])
        study = f"1.2.{p}"
        diagnoses[study] = finding
        for s in range(1 + p % 3):
            rows.append(
                {
                    "series_key": f"k{p:04d}{s}",
                    "patient_id": f"P{p:04d}",
                    "study_uid": study,
                    "site": site,
                    "scanner_model": "Xscan" if site == "X" else f"model-{site}",
                }
            )
    return rows, diagnoses


CFG = SplitConfig(external={"column": "scanner_model", "values": ["Xscan"]})


def test_allocate_keeps_each_stratum_and_the_total_balanced() -> None:
    fractions = [0.7, 0.15, 0.15]
    counts = [13, 2, 7, 1, 1, 40, 3]
    alloc = np.array(allocate(counts, fractions))
    assert alloc.sum(axis=1).tolist() == counts
    expected = np.outer(counts, fractions)
    assert np.all(np.abs(alloc - expected) < 1 + 1e-9)
    assert np.all(np.abs(alloc.sum(axis=0) - np.sum(expected, axis=0)) <= 1 + 1e-9)


def test_no_patient_is_in_two_splits_and_every_series_is_assigned() -> None:
    manifest, diagnoses = make_manifest()
    rows, summary = assign(manifest, diagnoses, CFG)
    assert len(rows) == len(manifest)
    splits_of = defaultdict(set)
    for r in rows:
        splits_of[r["patient_id"]].add(r["split"])
    assert all(len(s) == 1 for s in splits_of.values())
    assert sum(summary.series.values()) == len(manifest)


def test_external_scanner_series_are_only_in_the_external_set() -> None:
    manifest, diagnoses = make_manifest()
    rows, summary = assign(manifest, diagnoses, CFG)
    for r in rows:
        assert (r["split"] == "external") == (r["scanner_model"] == "Xscan")
    assert summary.patients["external"] == 12


def test_a_patient_seen_on_the_external_scanner_goes_wholly_external() -> None:
    manifest, diagnoses = make_manifest(30)
    manifest.append({**manifest[1], "series_key": "extra", "scanner_model": "Xscan"})
    rows, summary = assign(manifest, diagnoses, CFG)
    patient = manifest[1]["patient_id"]
    assert {r["split"] for r in rows if r["patient_id"] == patient} == {"external"}
    assert summary.moved_to_external == sum(
        1 for r in manifest if r["patient_id"] == patient and r["scanner_model"] != "Xscan"
    )


def test_split_is_stratified_on_finding_and_site() -> None:
    manifest, diagnoses = make_manifest(600)
    rows, _ = assign(manifest, diagnoses, CFG)
    patients = {r["patient_id"]: r for r in rows if r["split"] != "external"}
    by_split = Counter(r["split"] for r in patients.values())
    total = sum(by_split.values())
    assert by_split["train"] / total == pytest.approx(0.7, abs=0.01)
    for site in SITES:
        for split in ("train", "val", "test"):
            group = [r for r in patients.values() if r["site"] == site and r["split"] == split]
            every = [r for r in patients.values() if r["site"] == site]
            prevalence = np.mean([int(r["finding"]) for r in group])
            overall = np.mean([int(r["finding"]) for r in every])
            assert prevalence == pytest.approx(overall, abs=0.05), (site, split)


def test_same_seed_same_split_other_seed_other_split() -> None:
    manifest, diagnoses = make_manifest()
    first = [r["split"] for r in assign(manifest, diagnoses, CFG)[0]]
    again = [r["split"] for r in assign(manifest, diagnoses, CFG)[0]]
    other = [
        r["split"] for r in assign(manifest, diagnoses, CFG.model_copy(update={"seed": 99}))[0]
    ]
    assert first == again
    assert first != other


def test_series_without_verified_diagnosis_are_kept_as_unlabelled() -> None:
    manifest, diagnoses = make_manifest(40)
    dropped = manifest[4]["study_uid"]
    del diagnoses[dropped]
    rows, summary = assign(manifest, diagnoses, CFG)
    unlabelled = [r for r in rows if r["split"] == "unlabelled"]
    assert unlabelled and all(r["study_uid"] == dropped and r["finding"] == "" for r in unlabelled)
    assert summary.series["unlabelled"] == len(unlabelled)


def test_unknown_columns_are_named() -> None:
    manifest, diagnoses = make_manifest(20)
    with pytest.raises(SplitInputError, match="no column 'vendor'"):
        assign(manifest, diagnoses, CFG.model_copy(update={"stratify_on": ["vendor"]}))
    bad = SplitConfig.model_validate(
        {**CFG.model_dump(), "external": {"column": "nope", "values": ["x"]}}
    )
    with pytest.raises(SplitInputError, match=r"split\.external\.column"):
        assign(manifest, diagnoses, bad)


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def data_config(labels: Path, **update: object) -> DataConfig:
    base = {
        "name": "site",
        "dicom": "dicom",
        "labels": str(labels),
        "ground_truth": str(labels),
        "key": "study_uid",
        "columns": {"study_uid": "study_instance_uid", "finding": "finding", "reader": "reader"},
        "identifiers": "keep",
    }
    return DataConfig.model_validate({**base, **update})


def run_split(tmp_path: Path, cfg: SplitConfig = CFG, **data: object) -> tuple:
    return run(
        cfg,
        data_config(tmp_path / "ris.csv", **data),
        tmp_path / "manifest.csv",
        tmp_path / "out",
        tmp_path / "reports" / "labels.csv",
    )


def test_run_joins_the_ris_table_and_writes_every_row(tmp_path: Path) -> None:
    manifest, diagnoses = make_manifest(50)
    write_csv(tmp_path / "manifest.csv", manifest)
    ris = [
        {"study_instance_uid": k, "finding": str(v), "reader": "r"} for k, v in diagnoses.items()
    ]
    write_csv(tmp_path / "ris.csv", ris)
    summary, _ = run_split(tmp_path)
    with (tmp_path / "out" / "dataset.csv").open() as fh:
        out = list(csv.DictReader(fh))
    assert len(out) == len(manifest)
    assert {r["series_key"] for r in out} == {r["series_key"] for r in manifest}
    assert all(r["finding"] == str(diagnoses[r["study_uid"]]) for r in out)
    metrics = summary.to_metrics()
    assert metrics["series"]["external"] == summary.series["external"] > 0
    assert metrics["labels"]["labelled"] == len(diagnoses)
    with (tmp_path / "out" / "diagnoses.csv").open() as fh:
        verified = list(csv.DictReader(fh))
    assert {(r["study_instance_uid"], r["finding"]) for r in verified} == {
        (k, str(v)) for k, v in diagnoses.items()
    }


def test_bad_and_conflicting_findings_are_reported_and_left_unlabelled(tmp_path: Path) -> None:
    manifest, diagnoses = make_manifest(40)
    write_csv(tmp_path / "manifest.csv", manifest)
    rows = [
        {"study_instance_uid": k, "finding": str(v), "reader": "r"} for k, v in diagnoses.items()
    ]
    flipped = str(1 - diagnoses["1.2.1"])
    extra = [
        {"study_instance_uid": "1.2.2", "finding": "maybe", "reader": "r"},
        {"study_instance_uid": "1.2.1", "finding": flipped, "reader": "s"},
        {"study_instance_uid": "9.9.9", "finding": "1", "reader": "r"},
    ]
    write_csv(tmp_path / "ris.csv", [*rows, *extra])
    _, joined = run_split(tmp_path)
    with (tmp_path / "reports" / "labels.csv").open() as fh:
        report = list(csv.DictReader(fh))
    by_status = defaultdict(list)
    for row in report:
        by_status[row["status"]].append(row)
    n = len(rows)
    assert [r["label_row"] for r in by_status["unreadable_finding"]] == [f"ris.csv:{n + 2}"]
    [conflict] = by_status["conflicting_labels"]
    assert conflict["study_uid"] == "1.2.1" and f"ris.csv:{n + 3}" in conflict["detail"]
    assert [r["key"] for r in by_status["label_without_study"]] == ["9.9.9"]
    assert all(r["action"] for s, rs in by_status.items() if s != "labelled" for r in rs)
    assert "1.2.1" not in joined.findings and joined.findings["1.2.2"] == diagnoses["1.2.2"]
    with (tmp_path / "out" / "dataset.csv").open() as fh:
        out = {r["study_uid"]: r for r in csv.DictReader(fh)}
    assert out["1.2.1"]["split"] in {"unlabelled", "external"} and out["1.2.1"]["finding"] == ""


def test_a_mapped_column_the_file_lacks_is_named(tmp_path: Path) -> None:
    manifest, _ = make_manifest(5)
    write_csv(tmp_path / "manifest.csv", manifest)
    write_csv(tmp_path / "ris.csv", [{"study": "x", "finding": "1"}])
    with pytest.raises(LabelFileError, match=r"'study_instance_uid' \(data\.columns\.study_uid\)"):
        run_split(tmp_path)


def test_too_few_labelled_studies_fail_naming_the_counts(tmp_path: Path) -> None:
    manifest, diagnoses = make_manifest(30)
    write_csv(tmp_path / "manifest.csv", manifest)
    few = [{"study_instance_uid": k, "finding": "0", "reader": "r"} for k in list(diagnoses)[:4]]
    write_csv(tmp_path / "ris.csv", few)
    with pytest.raises(TooFewLabelledError, match="labelled studies remain") as err:
        run_split(tmp_path)
    assert "train has 0 positive" in str(err.value)
    assert (tmp_path / "reports" / "labels.csv").is_file()  # the report explains it


@pytest.mark.parametrize(
    ("external", "expected"),
    [
        ({"column": "field_strength", "values": [3]}, {"3.0"}),
        ({"column": "field_strength", "values": ["1.5"]}, {"1.5"}),
        ({"date_from": "2021-07"}, {"202107", "20220101"}),
        ({"date_to": "2021-06-30"}, {"20210630", "20200101"}),
    ],
)
def test_external_set_by_any_header_field_or_a_date_range(
    external: dict, expected: set[str]
) -> None:
    manifest, diagnoses = make_manifest(40)
    strengths, dates = ["3.0", "1.5"], ["20200101", "20210630", "202107", "20220101"]
    for row in manifest:
        p = int(row["patient_id"][1:])
        row["field_strength"] = strengths[p % 2]
        row["study_date"] = dates[p % 4]
    column = "field_strength" if "column" in external else "study_date"
    rows, summary = assign(manifest, diagnoses, SplitConfig(external=external))
    assert {r[column] for r in rows if r["split"] == "external"} == expected
    assert summary.series["external"] == sum(r[column] in expected for r in manifest)


def test_external_patients_from_a_list_file_are_pseudonymized_like_the_manifest(
    tmp_path: Path,
) -> None:
    ids = Pseudonymizer(bytes(range(32)))
    manifest, diagnoses = make_manifest(20)
    for row in manifest:
        row["patient_id"] = ids.patient(row["patient_id"])
    (tmp_path / "external.txt").write_text("# held out by the site\nP0003\nP0004\n")
    cfg = SplitConfig(
        external={"column": "patient_id", "values_file": str(tmp_path / "external.txt")}
    )
    rows, _ = assign(manifest, diagnoses, cfg, ids)
    assert {r["patient_id"] for r in rows if r["split"] == "external"} == {
        ids.patient("P0003"),
        ids.patient("P0004"),
    }
