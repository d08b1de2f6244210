"""The scored sets a design names, built once: generated, ingested, split, and then left alone."""

from __future__ import annotations

import csv
from pathlib import Path

from shiftguard.config.schema import DesignConfig
from shiftguard.experiment.prepare import prepare

TINY = ["experiment=tiny", "cohort.n_subjects=8"]


def _splits(folder: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    with (folder / "split" / "dataset.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            counts[row["split"]] = counts.get(row["split"], 0) + 1
    return counts


def test_a_designs_sets_are_built_once_and_split_by_role(tmp_path: Path) -> None:
    design = DesignConfig(name="t", epochs=1, cohorts=str(tmp_path / "cohorts"))
    first = prepare(design, workers=1, progress=False, overrides=TINY)
    assert [(s.role, s.cohort, s.built) for s in first] == [
        ("holdout", "holdout", True),
        ("external", "external", True),
    ]
    holdout, external = (s.folder for s in first)
    assert Path(design.holdout) == holdout / "split" / "dataset.csv"
    assert Path(design.external_ingest) == external / "ingest"
    # the hold-out: half chooses the operating point, half is only scored; nothing to train on
    assert set(_splits(holdout)) == {"val", "test"} and sum(_splits(holdout).values()) == 8
    assert _splits(external) == {"external": 8}  # every unseen-scanner series is scored
    stamp = (external / "split" / "dataset.csv").stat().st_mtime_ns
    again = prepare(design, workers=1, progress=False, overrides=TINY)
    assert [s.built for s in again] == [False, False]
    assert (external / "split" / "dataset.csv").stat().st_mtime_ns == stamp


def test_a_half_built_set_is_rebuilt(tmp_path: Path) -> None:
    design = DesignConfig(name="t", epochs=1, cohorts=str(tmp_path), external_cohort="holdout")
    leftover = tmp_path / "holdout" / "data" / "dicom" / "partial.dcm"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"interrupted")
    built = prepare(design, workers=1, progress=False, overrides=TINY)
    assert [s.built for s in built] == [True, False]  # one cohort, named twice, built once
    assert not leftover.exists() and (tmp_path / "holdout" / "split" / "dataset.csv").is_file()
