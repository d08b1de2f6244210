from __future__ import annotations

import csv
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from shiftguard.config import SplitConfig
from shiftguard.data.split import SplitInputError, allocate, assign, run

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
    bad = SplitConfig.model_validate({**CFG.model_dump(), "external": {"column": "nope"}})
    with pytest.raises(SplitInputError, match=r"split\.external\.column"):
        assign(manifest, diagnoses, bad)


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_run_joins_the_ris_table_and_writes_every_row(tmp_path: Path) -> None:
    manifest, diagnoses = make_manifest(50)
    write_csv(tmp_path / "manifest.csv", manifest)
    ris = [
        {"study_instance_uid": k, "finding": str(v), "reader": "r"} for k, v in diagnoses.items()
    ]
    write_csv(tmp_path / "ris.csv", ris)
    summary = run(CFG, tmp_path / "manifest.csv", tmp_path / "ris.csv", tmp_path / "out")
    with (tmp_path / "out" / "dataset.csv").open() as fh:
        out = list(csv.DictReader(fh))
    assert len(out) == len(manifest)
    assert {r["series_key"] for r in out} == {r["series_key"] for r in manifest}
    assert all(r["finding"] == str(diagnoses[r["study_uid"]]) for r in out)
    metrics = summary.to_metrics()
    assert metrics["series"]["external"] == summary.series["external"] > 0


def test_run_names_the_ris_row_with_a_bad_or_conflicting_finding(tmp_path: Path) -> None:
    manifest, diagnoses = make_manifest(5)
    write_csv(tmp_path / "manifest.csv", manifest)
    rows = [{"study_instance_uid": k, "finding": str(v)} for k, v in diagnoses.items()]
    write_csv(tmp_path / "ris.csv", [*rows, {"study_instance_uid": "1.2.0", "finding": "maybe"}])
    with pytest.raises(SplitInputError, match=r"ris\.csv:7: finding must be 0/1"):
        run(CFG, tmp_path / "manifest.csv", tmp_path / "ris.csv", tmp_path / "out")
    flipped = str(1 - diagnoses["1.2.0"])
    write_csv(tmp_path / "ris.csv", [*rows, {"study_instance_uid": "1.2.0", "finding": flipped}])
    with pytest.raises(SplitInputError, match="conflicting verified findings"):
        run(CFG, tmp_path / "manifest.csv", tmp_path / "ris.csv", tmp_path / "out")
    write_csv(tmp_path / "ris.csv", [{"study": "x"}])
    with pytest.raises(SplitInputError, match=r"missing column\(s\) \['study_instance_uid'"):
        run(CFG, tmp_path / "manifest.csv", tmp_path / "ris.csv", tmp_path / "out")
