"""Ingest end to end: manifest, quarantine, volumes, accounting, determinism."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from peers_plugin import peer_missing
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.uid import RLELossless

from shiftguard.config.schema import IngestConfig
from shiftguard.data.canonical import parse_patient_age, series_key
from shiftguard.data.ingest import MANIFEST_COLUMNS, QUARANTINE_COLUMNS, IngestSummary, run
from shiftguard.dicom.testing import SeriesSpec, make_datasets, save_dataset, write_series

SMALL = IngestConfig(spacing=(2.0, 2.0, 2.0), shape=(12, 14, 16), min_slices=4)


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _bundled(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        peer_missing(f"pydicom test file {name} is not bundled")
    return Path(str(path))


def _check_accounting(summary: IngestSummary, out: Path) -> None:
    manifest = _read(out / "manifest.csv")
    quarantine = _read(out / "quarantine.csv")
    assert summary.files_seen == summary.files_accepted + summary.files_quarantined
    assert summary.files_accepted == sum(int(r["n_files"]) for r in manifest)
    assert summary.files_quarantined == sum(int(r["n_files"]) for r in quarantine)
    assert summary.series_accepted == len(manifest)
    assert summary.series_rejected == sum(r["level"] == "series" for r in quarantine)
    assert all(r["code"] != "internal_error" for r in quarantine)
    assert all(r["reason"] and r["fix"] for r in quarantine)


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, SeriesSpec]]:
    """A small hospital export: good and bad series, junk, an index file, a non-image."""
    root = tmp_path / "dicom"
    specs = {
        "axial": SeriesSpec(n_slices=8, patient_id="P1"),
        "sagittal": SeriesSpec(
            n_slices=6,
            rows=14,
            cols=10,
            iop=(0.0, 1.0, 0.0, 0.0871557, 0.0, -0.996195),  # normal 5 degrees off L-R
            patient_id="P2",
            patient_age="",
            rescale_slope=[1.0, 1.0, 2.0, 2.0, 0.5, 0.5],
        ),
        "gap": SeriesSpec(n_slices=9, patient_id="P3"),
        "short": SeriesSpec(n_slices=2, patient_id="P4"),
        "rle": SeriesSpec(n_slices=5, patient_id="P5", modality="CT"),
    }
    paths = write_series(root / "P1" / "s1", specs["axial"])
    write_series(root / "P2" / "sag", specs["sagittal"], name=lambda k: f"{9 - k}")
    gap = write_series(root / "P3" / "s1", specs["gap"])
    gap[4].unlink()
    write_series(root / "P4" / "loc", specs["short"])
    write_series(root / "P5" / "ct", specs["rle"], transfer_syntax=RLELossless)
    (root / "copies").mkdir()
    shutil.copy(paths[2], root / "copies" / "again.dcm")  # the same instance stored twice
    (root / "notes.txt").write_text("exported by PACS\n")
    shutil.copy(_bundled("dicomdirtests/DICOMDIR"), root / "DICOMDIR")
    shutil.copy(_bundled("rtplan.dcm"), root / "P1" / "plan.dcm")
    return root, specs


def test_ingest_end_to_end(tmp_path: Path, tree: tuple[Path, dict[str, SeriesSpec]]) -> None:
    root, specs = tree
    out = tmp_path / "out"
    summary = run(SMALL, root, out, workers=1, progress=False)
    manifest = _read(out / "manifest.csv")
    quarantine = _read(out / "quarantine.csv")
    _check_accounting(summary, out)
    assert list(manifest[0]) == list(MANIFEST_COLUMNS)
    assert list(quarantine[0]) == list(QUARANTINE_COLUMNS)

    assert [r["patient_id"] for r in manifest] == ["P1", "P2", "P5"]
    by_patient = {r["patient_id"]: r for r in manifest}
    axial, sagittal, ct = by_patient["P1"], by_patient["P2"], by_patient["P5"]
    assert axial["series_key"] == series_key(specs["axial"].series_uid)
    assert axial["volume_path"] == f"volumes/{axial['series_key']}.nii"
    assert (axial["n_slices"], axial["n_files"], axial["orientation"]) == ("8", "8", "axial")
    assert (axial["patient_age"], axial["site"], axial["scanner_model"]) == (
        "45",
        "Test Hospital",
        "Phantom 3T",
    )
    assert (axial["rows"], axial["cols"], axial["pixel_spacing_col"]) == ("16", "12", "1.25")
    assert float(axial["slice_spacing"]) == pytest.approx(2.0)
    assert sagittal["orientation"] == "sagittal oblique"
    assert float(sagittal["tilt_deg"]) == pytest.approx(5.0, abs=1e-3)
    assert sagittal["patient_age"] == "45"  # from birth date 1979-01-01 and study date 2024-01-31
    assert ct["transfer_syntax"] == RLELossless and ct["modality"] == "CT"
    for row in manifest:
        img = nib.load(out / row["volume_path"])
        assert img.shape == SMALL.shape
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        np.testing.assert_allclose(np.diag(img.affine)[:3], SMALL.spacing)
        data = np.asanyarray(img.dataobj)
        assert data.dtype == np.float32
        assert float(row["max"]) <= data.max() + 1e-3
        assert 0 < float(row["foreground_fraction"]) <= 1

    codes = {(r["path"], r["code"]) for r in quarantine}
    assert ("P3/s1", "missing_slice") in codes
    assert ("P4/loc", "too_few_slices") in codes
    assert ("copies/again.dcm", "duplicate_instance") in codes
    assert ("notes.txt", "not_dicom") in codes
    assert ("DICOMDIR", "dicomdir") in codes
    assert ("P1/plan.dcm", "not_image") in codes
    gap_row = next(r for r in quarantine if r["code"] == "missing_slice")
    assert gap_row["level"] == "series" and gap_row["n_files"] == "8"
    assert gap_row["series_uid"] == specs["gap"].series_uid
    assert "between positions" in gap_row["reason"]
    assert quarantine == sorted(quarantine, key=lambda r: (r["path"], r["level"], r["series_uid"]))
    assert sorted(p.name for p in (out / "volumes").iterdir()) == sorted(
        f"{r['series_key']}.nii" for r in manifest
    )
    metrics = summary.to_metrics()
    assert metrics["series_accepted"] == 3
    assert metrics["quarantine"]["missing_slice"] == 1
    assert metrics["files_seen"] == 8 + 6 + 8 + 2 + 5 + 4


@pytest.mark.integration
def test_output_does_not_depend_on_the_worker_count(
    tmp_path: Path, tree: tuple[Path, dict[str, SeriesSpec]]
) -> None:
    root, _ = tree
    one = run(SMALL, root, tmp_path / "one", workers=1, progress=False)
    two = run(SMALL, root, tmp_path / "two", workers=2, progress=True)
    assert (one.files_accepted, one.files_quarantined) == (
        two.files_accepted,
        two.files_quarantined,
    )
    for name in ("manifest.csv", "quarantine.csv"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    volumes = sorted((tmp_path / "one" / "volumes").iterdir())
    assert volumes
    for path in volumes:
        assert path.read_bytes() == (tmp_path / "two" / "volumes" / path.name).read_bytes()


def test_dicomdir_tree(tmp_path: Path) -> None:
    root = tmp_path / "media"
    shutil.copytree(_bundled("dicomdirtests/DICOMDIR").parent, root)
    out = tmp_path / "out"
    summary = run(IngestConfig(min_slices=3), root, out, workers=1, progress=False)
    _check_accounting(summary, out)
    quarantine = _read(out / "quarantine.csv")
    index_files = [r["path"] for r in quarantine if r["code"] == "dicomdir"]
    assert "DICOMDIR" in index_files and "TINY_ALPHA/DICOMDIR" in index_files
    assert all(r["level"] == "file" for r in quarantine if r["code"] == "dicomdir")
    codes = {r["code"] for r in quarantine}
    assert {"unsupported_modality", "missing_slice", "mixed_geometry", "no_pixel_data"} <= codes
    manifest = _read(out / "manifest.csv")
    assert [r["n_slices"] for r in manifest] == ["5"]  # the 5-slice CT series 98892001/CT5N
    assert summary.files_seen == len([p for p in root.rglob("*") if p.is_file()])


def test_every_bundled_pydicom_file_is_accounted_for(tmp_path: Path) -> None:
    root = tmp_path / "all"
    root.mkdir()
    for i, path in enumerate(sorted(get_testdata_files())):
        if "dicomdirtests" not in path:
            shutil.copy(path, root / f"{i:03d}_{Path(path).name}")
    out = tmp_path / "out"
    summary = run(IngestConfig(min_slices=1), root, out, workers=1, progress=False)
    _check_accounting(summary, out)
    manifest = _read(out / "manifest.csv")
    descriptions = {r["series_uid"] for r in manifest}
    assert summary.series_accepted >= 5 and descriptions  # MR_small and its variants, CT_small, ...
    quarantine = _read(out / "quarantine.csv")
    by_name = {Path(r["path"]).name.split("_", 1)[-1]: r["code"] for r in quarantine}
    assert by_name["MR_truncated.dcm"] == "truncated"
    assert by_name["rtplan.dcm"] == "not_image"


def test_empty_input(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    summary = run(SMALL, tmp_path / "in", tmp_path / "out", workers=None, progress=False)
    assert (summary.files_seen, summary.series_accepted, summary.files_quarantined) == (0, 0, 0)
    assert _read(tmp_path / "out" / "manifest.csv") == []
    assert (tmp_path / "out" / "quarantine.csv").read_text().startswith("path,level,")


def test_missing_input_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(SMALL, tmp_path / "nope", tmp_path / "out", progress=False)


def test_rerun_replaces_stale_volumes(tmp_path: Path) -> None:
    root = tmp_path / "in"
    first, second = SeriesSpec(n_slices=5), SeriesSpec(n_slices=5)
    write_series(root / "a", first)
    run(SMALL, root, tmp_path / "out", workers=1, progress=False)
    shutil.rmtree(root / "a")
    write_series(root / "b", second)
    run(SMALL, root, tmp_path / "out", workers=1, progress=False)
    assert [p.name for p in (tmp_path / "out" / "volumes").iterdir()] == [
        f"{series_key(second.series_uid)}.nii"
    ]


def test_series_uid_in_two_studies_is_rejected(tmp_path: Path) -> None:
    spec = SeriesSpec(n_slices=5)
    write_series(tmp_path / "in" / "a", spec)
    other = make_datasets(SeriesSpec(n_slices=5, series_uid=spec.series_uid))
    for k, ds in enumerate(other):
        save_dataset(ds, tmp_path / "in" / "b" / f"{k}.dcm")
    summary = run(SMALL, tmp_path / "in", tmp_path / "out", workers=1, progress=False)
    assert summary.series_accepted == 0
    assert summary.quarantine_codes == {"series_uid_conflict": 2}


@pytest.mark.parametrize(
    ("age", "birth", "study", "years"),
    [
        ("063Y", "", "", 63.0),
        ("006M", "", "", 0.5),
        ("026W", "", "", pytest.approx(0.498, abs=1e-3)),
        ("010D", "", "", pytest.approx(0.027, abs=1e-3)),
        ("", "19600615", "20200614", 59.0),
        ("", "19600615", "20200615", 60.0),
        ("", "", "20200101", None),
        ("garbage", "nodate", "20200101", None),
    ],
)
def test_parse_patient_age(age: str, birth: str, study: str, years: object) -> None:
    assert parse_patient_age(age, birth, study) == years


def test_series_key_is_short_and_stable() -> None:
    assert series_key("1.2.3") == series_key("1.2.3") != series_key("1.2.4")
    assert len(series_key("1.2.3")) == 16 and int(series_key("1.2.3"), 16) >= 0


def test_output_folder_inside_the_input_is_not_scanned(tmp_path: Path) -> None:
    root = tmp_path / "in"
    write_series(root / "a", SeriesSpec(n_slices=5))
    first = run(SMALL, root, root / "derived", workers=1, progress=False)
    second = run(SMALL, root, root / "derived", workers=1, progress=False)
    assert first.files_seen == second.files_seen == 5
    assert second.files_quarantined == 0


_CRASHING_INGEST = """
import dataclasses, json, os, sys
import shiftguard.data.canonical as canonical_module
import shiftguard.dicom.scan as scan_module
from shiftguard.config.schema import IngestConfig
from shiftguard.data.ingest import run

root, out, bad_uid = sys.argv[1], sys.argv[2], sys.argv[3]
validate, read = canonical_module.validate_series, scan_module.read_headers

def validate_or_die(group, **kwargs):
    if group.series_uid == bad_uid:
        os._exit(3)  # what a segfaulting decoder looks like from the parent
    return validate(group, **kwargs)

def read_or_die(path):
    if str(path).endswith("x2.dcm"):
        os._exit(3)
    return read(path)

# patched before the pool forks (this process has one thread), so the workers inherit the patches
canonical_module.validate_series = validate_or_die
scan_module.read_headers = read_or_die
config = IngestConfig(spacing=(2.0, 2.0, 2.0), shape=(12, 14, 16), min_slices=4)
summary = run(config, root, out, workers=2, progress=False)
print(json.dumps(dataclasses.asdict(summary)))
"""


@pytest.mark.integration
def test_a_worker_crash_is_reported_not_fatal(tmp_path: Path) -> None:
    # In a fresh interpreter: the pool forks only from a process with one thread (else it spawns,
    # and spawned workers would not inherit the patches), which a test runner's process that ran
    # other tests before cannot promise.
    import json
    import multiprocessing
    import subprocess
    import sys

    if "fork" not in multiprocessing.get_all_start_methods():
        peer_missing("needs fork-started worker processes (this platform has none)")
    root = tmp_path / "in"
    good, bad = SeriesSpec(n_slices=5), SeriesSpec(n_slices=6)
    write_series(root / "good", good)
    write_series(root / "bad", bad)
    write_series(root / "cursed", SeriesSpec(n_slices=4), name=lambda k: f"x{k}.dcm")
    done = subprocess.run(
        [sys.executable, "-c", _CRASHING_INGEST, str(root), str(tmp_path / "out"), bad.series_uid],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = IngestSummary(**json.loads(done.stdout.strip().splitlines()[-1]))
    _check_accounting(summary, tmp_path / "out")
    quarantine = {r["code"]: r for r in _read(tmp_path / "out" / "quarantine.csv")}
    assert quarantine["decoder_crashed"]["series_uid"] == bad.series_uid
    assert quarantine["reader_crashed"]["path"] == "cursed/x2.dcm"
    manifest = _read(tmp_path / "out" / "manifest.csv")
    assert [r["series_uid"] for r in manifest] == [good.series_uid]


def test_undecodable_slice_quarantines_the_whole_series(tmp_path: Path) -> None:
    from pydicom.uid import JPEGLSLossless

    spec = SeriesSpec(rows=32, cols=32, n_slices=5)
    paths = write_series(tmp_path / "in" / "s", spec, transfer_syntax=JPEGLSLossless)
    raw = bytearray(paths[3].read_bytes())
    start = raw.index(b"\xff\xd8")
    raw[start + 20 : start + 60] = b"\xff" * 40
    paths[3].write_bytes(bytes(raw))
    summary = run(SMALL, tmp_path / "in", tmp_path / "out", workers=1, progress=False)
    _check_accounting(summary, tmp_path / "out")
    (row,) = _read(tmp_path / "out" / "quarantine.csv")
    assert (row["code"], row["level"], row["n_files"]) == ("pixel_decode_failed", "series", "5")
    assert "s/IM0003.dcm" in row["reason"] and str(tmp_path) not in row["reason"]
