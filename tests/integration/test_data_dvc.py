"""A fresh clone regenerates the cohort that data.dvc tracks (the README's first command relies on it
to leave `dvc status` clean).

Regenerating all 240 subjects (15,299 files) takes four minutes on two cores, a fifth of the suite.
Instead: ``tests/data/cohort-files.json.gz`` is DVC's own file list of the cohort (the ``.dir``
object, path and MD5 of every file); its MD5 must be data.dvc's, so it cannot go stale unnoticed.
Then one subject with and one without the finding from every scanner (14 subjects for the
seven scanners, each rendered independently of the others from the seed and its index) are
regenerated; every file they write must carry the MD5 the list holds, and no file of theirs in the
list may be missing. A change to
the renderer, the physics, the DICOM writer or the UIDs changes every subject's files, so a sample
that spans the scanners and both classes catches it; `make demo` regenerates and hashes them all.

When the cohort changes on purpose: regenerate it, ``dvc commit --force data.dvc``, then
``gzip -9n -c .dvc/cache/files/md5/<first 2>/<rest>.dir > tests/data/cohort-files.json.gz`` (the
MD5 of data.dvc without ``.dir``)."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest
import yaml

from shiftguard.cohort.demographics import sample_subjects
from shiftguard.cohort.generate import generate_subjects
from shiftguard.config import CohortConfig, compose_section

pytestmark = [pytest.mark.integration, pytest.mark.slow(seconds=60)]

REPO = Path(__file__).resolve().parents[2]
FILE_LIST = REPO / "tests" / "data" / "cohort-files.json.gz"


def _tracked() -> tuple[dict[str, str], dict[str, object]]:
    """data.dvc's entry and the committed file list, checked to be the list that entry names."""
    [out] = yaml.safe_load((REPO / "data.dvc").read_text())["outs"]
    raw = gzip.decompress(FILE_LIST.read_bytes())
    assert out["md5"] == hashlib.md5(raw).hexdigest() + ".dir", (
        f"{FILE_LIST.relative_to(REPO)} is not the file list data.dvc names: copy the .dir "
        "object of data.dvc's MD5 from the DVC cache (see this module's docstring)"
    )
    entries = json.loads(raw)
    assert len(entries) == out["nfiles"]
    return {e["relpath"]: e["md5"] for e in entries}, out


def test_the_committed_file_list_is_the_one_data_dvc_names() -> None:
    listed, _ = _tracked()
    cfg = compose_section("cohort", CohortConfig, conf_dir=REPO / "conf")
    plans = sample_subjects(cfg)
    subjects = {path.split("/")[1] for path in listed if path.startswith("dicom/")}
    assert subjects == {p.patient_id for p in plans}
    top = {"cohort.json", "ris/verified_diagnoses.csv", "ground_truth/lesions.csv"}
    assert top <= set(listed)
    positives = {p.patient_id for p in plans if p.finding}
    masks = {
        Path(p).stem.removesuffix(".nii") for p in listed if p.startswith("ground_truth/masks/")
    }
    assert masks == {p.patient_id for p in plans}  # a mask per subject, empty without the finding
    assert positives  # and the lesions table has a row each: checked against the bytes by make demo


def test_a_subject_per_scanner_and_class_regenerates_the_bytes_data_dvc_tracks(
    tmp_path: Path,
) -> None:
    listed, _ = _tracked()
    cfg = compose_section("cohort", CohortConfig, conf_dir=REPO / "conf")
    plans = sample_subjects(cfg)
    first: dict[tuple[str, bool], int] = {}
    for plan in plans:
        first.setdefault((plan.scanner, plan.finding), plan.index)
    scanners = {plan.scanner for plan in plans}
    assert {s for s, _ in first} == scanners and len(first) >= len(scanners) + 1
    chosen = sorted(first.values())
    results = generate_subjects(cfg, tmp_path, chosen)
    assert [r.index for r in results] == chosen

    written = {
        p.relative_to(tmp_path).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(tmp_path.rglob("*"))
        if p.is_file()
    }
    ids = {plans[i].patient_id for i in chosen}
    expected = {
        path: md5
        for path, md5 in listed.items()
        if (path.startswith("dicom/") and path.split("/")[1] in ids)
        or Path(path).name.removesuffix(".nii.gz") in ids
    }
    assert sum(r.n_files for r in results) == sum(p.startswith("dicom/") for p in expected)
    changed = sorted(p for p in expected if written.get(p) != expected[p])
    assert not changed, (
        f"{len(changed)} of the {len(expected)} files of subjects {sorted(ids)} differ from "
        f"data.dvc's (first: {changed[:3]}): the default cohort no longer matches data.dvc; "
        "regenerate it, `dvc commit --force data.dvc` and refresh the file list"
    )
    assert set(written) == set(expected)
