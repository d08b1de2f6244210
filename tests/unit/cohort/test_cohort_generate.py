"""The generated cohort, on tiny grids: determinism, DICOM geometry and storage, lesions, side tables."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml
from dciodvfy_check import assert_dciodvfy_clean
from pydicom.pixels import get_encoder
from scipy import ndimage as ndi

from shiftguard.cohort import (
    TRANSFER_SYNTAXES,
    CohortSummary,
    OutputDirectoryError,
    UnsupportedTransferSyntaxError,
    run,
)
from shiftguard.cohort import writer as cohort_writer
from shiftguard.cohort.demographics import sample_subjects
from shiftguard.cohort.generate import generate_subjects
from shiftguard.cohort.geometry import LPS_TO_RAS
from shiftguard.cohort.render import render_subject
from shiftguard.cohort.tables import config_digest
from shiftguard.config.schema import CohortConfig
from shiftguard.errors import CohortError

DEFAULT = Path(__file__).resolve().parents[3] / "conf" / "cohort" / "default.yaml"


def tiny_config(matrix: int = 32, n_slices: int = 12, **update: Any) -> CohortConfig:
    """The default cohort with one subject per site on ``matrix``^2 x ``n_slices`` grids that keep
    each scanner's field of view, orientation, tilt, sequence and storage. Every other site has the
    finding, starting with the first."""
    raw = yaml.safe_load(DEFAULT.read_text(encoding="utf-8"))
    base = CohortConfig(**raw)
    raw["n_subjects"] = len(raw["sites"])
    raw["scanners"] = {
        name: profile.resized(matrix, n_slices).model_dump()
        for name, profile in base.scanners.items()
    }
    for i, site in enumerate(raw["sites"]):
        site["prevalence"] = 1.0 if i % 2 == 0 else 0.0
        site["weight"] = 1.0
    raw.update(update)
    return CohortConfig(**raw)


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def read_series(folder: Path) -> list[pydicom.Dataset]:
    dss = [pydicom.dcmread(p) for p in folder.glob("*.dcm")]
    return sorted(dss, key=lambda d: int(d.InstanceNumber))


def series_folders(root: Path) -> dict[str, Path]:
    """PatientID -> the (single) series folder."""
    out = {}
    for patient in sorted((root / "dicom").iterdir()):
        (series,) = list(patient.iterdir())
        out[patient.name] = series
    return out


def dicom_affine(dss: list[pydicom.Dataset]) -> np.ndarray:
    """``(4, 4)`` LPS affine of voxel ``(k, r, c)`` rebuilt from IOP, IPP and PixelSpacing."""
    iop = np.array(dss[0].ImageOrientationPatient, dtype=float)
    row_dir, col_dir = iop[:3], iop[3:]
    row_sp, col_sp = (float(v) for v in dss[0].PixelSpacing)
    ipp0 = np.array(dss[0].ImagePositionPatient, dtype=float)
    ipp1 = np.array(dss[1].ImagePositionPatient, dtype=float)
    aff = np.eye(4)
    aff[:3, 0] = ipp1 - ipp0
    aff[:3, 1] = col_dir * row_sp
    aff[:3, 2] = row_dir * col_sp
    aff[:3, 3] = ipp0
    return aff


@pytest.fixture(scope="module")
def cfg() -> CohortConfig:
    return tiny_config()


@pytest.fixture(scope="module")
def cohort(cfg: CohortConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("cohort") / "out"
    summary = run(cfg, out, workers=1, progress=False)
    assert isinstance(summary, CohortSummary)
    n = len(cfg.sites)
    assert summary.n_subjects == n and summary.n_positive == (n + 1) // 2
    assert summary.n_files == 12 * n
    assert summary.per_site == {s.name: 1 for s in cfg.sites}
    yield out


def test_same_seed_is_byte_identical_whatever_the_workers(
    cfg: CohortConfig, cohort: Path, tmp_path: Path
) -> None:
    again = run(cfg, tmp_path / "again", workers=2, progress=False)
    assert again.n_files == 12 * len(cfg.sites)
    assert tree_digest(tmp_path / "again") == tree_digest(cohort)


def test_another_seed_gives_other_bytes(cfg: CohortConfig, cohort: Path, tmp_path: Path) -> None:
    other = cfg.model_copy(update={"seed": cfg.seed + 1})
    run(other, tmp_path / "other", workers=1, progress=False)
    assert tree_digest(tmp_path / "other") != tree_digest(cohort)
    a = read_series(next(iter(series_folders(cohort).values())))
    b = read_series(next(iter(series_folders(tmp_path / "other").values())))
    assert not np.array_equal(a[5].pixel_array, b[5].pixel_array)
    assert a[5].StudyInstanceUID != b[5].StudyInstanceUID


def test_chosen_subjects_are_the_bytes_the_whole_run_writes(
    cfg: CohortConfig, cohort: Path, tmp_path: Path
) -> None:
    results = generate_subjects(cfg, tmp_path, [2, 0])
    assert [r.index for r in results] == [2, 0] and all(r.n_files == 12 for r in results)
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert {p.parts[1] for p in written if p.parts[0] == "dicom"} == {"SG0001", "SG0003"}
    assert not (tmp_path / "cohort.json").exists()
    for rel in written:
        assert (tmp_path / rel).read_bytes() == (cohort / rel).read_bytes(), rel
    with pytest.raises(CohortError, match=r"indices \[99\] are outside the cohort's 0\.\.6"):
        generate_subjects(cfg, tmp_path / "bad", [1, 99])


def test_a_rerun_replaces_the_previous_cohort(
    cfg: CohortConfig, cohort: Path, tmp_path: Path
) -> None:
    out = tmp_path / "rerun"
    shutil.copytree(cohort, out)
    (out / "dicom" / "stale.txt").write_text("from an older run")
    (out / "notes.md").write_text("not ours")
    run(cfg, out, workers=1, progress=False)
    assert not (out / "dicom" / "stale.txt").exists()
    assert (out / "notes.md").read_text() == "not ours"
    (out / "notes.md").unlink()
    assert tree_digest(out) == tree_digest(cohort)


def test_a_folder_with_foreign_dicom_is_refused(cfg: CohortConfig, tmp_path: Path) -> None:
    (tmp_path / "dicom").mkdir()
    with pytest.raises(OutputDirectoryError, match=r"no cohort\.json"):
        run(cfg, tmp_path, workers=1, progress=False)


def test_geometry_round_trips_through_the_files(cfg: CohortConfig, cohort: Path) -> None:
    plans = {p.patient_id: p for p in sample_subjects(cfg)}
    seen = set()
    for pid, folder in series_folders(cohort).items():
        profile = cfg.scanners[plans[pid].scanner]
        dss = read_series(folder)
        assert len(dss) == profile.n_slices
        aff = dicom_affine(dss)
        iop = np.array(dss[0].ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        # slices are stacked along the normal, SpacingBetweenSlices apart
        step = aff[:3, 0]
        assert np.linalg.norm(step) == pytest.approx(float(dss[0].SpacingBetweenSlices), abs=1e-4)
        np.testing.assert_allclose(step / np.linalg.norm(step), normal, atol=1e-5)
        for k, ds in enumerate(dss):
            ipp = np.array(ds.ImagePositionPatient, dtype=float)
            np.testing.assert_allclose(ipp, (aff @ [k, 0, 0, 1])[:3], atol=1e-4)
            assert float(ds.SliceLocation) == pytest.approx(float(ipp @ normal), abs=1e-4)
        assert float(dss[0].SliceThickness) == pytest.approx(profile.slice_thickness, abs=1e-5)
        assert [float(v) for v in dss[0].PixelSpacing] == pytest.approx(list(profile.pixel_spacing))
        tilt = math.degrees(math.acos(min(1.0, abs(normal[2]))))
        if profile.orientation == "sagittal":
            assert abs(normal[0]) == pytest.approx(1.0, abs=1e-9)
            seen.add("sagittal")
        elif profile.orientation == "axial":
            assert tilt == pytest.approx(profile.tilt_deg, abs=1e-3)
            assert normal[0] == pytest.approx(0.0, abs=1e-9)
            seen.add("oblique" if profile.tilt_deg else "axial")
        # the mask's NIfTI affine is the same grid, in RAS, axes (C, R, K)
        img = nib.load(cohort / "ground_truth" / "masks" / f"{pid}.nii.gz")
        assert img.shape == (profile.matrix[1], profile.matrix[0], profile.n_slices)
        expected = LPS_TO_RAS @ aff[:, [2, 1, 0, 3]]
        np.testing.assert_allclose(img.affine, expected, atol=1e-4)
        # the grid's centre is near the brain (head positioning adds a few mm)
        centre = aff @ [
            (profile.n_slices - 1) / 2,
            (profile.matrix[0] - 1) / 2,
            (profile.matrix[1] - 1) / 2,
            1,
        ]
        assert np.linalg.norm(centre[:3] - [0.0, 17.0, 17.0]) < 1.0
    assert seen == {"axial", "oblique", "sagittal"}


def test_stored_values_decode_to_the_physical_range(cfg: CohortConfig, cohort: Path) -> None:
    plans = {p.patient_id: p for p in sample_subjects(cfg)}
    for pid, folder in series_folders(cohort).items():
        plan = plans[pid]
        profile = cfg.scanners[plan.scanner]
        dss = read_series(folder)
        ds = dss[0]
        assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[profile.transfer_syntax]
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (
            16,
            profile.bits_stored,
            profile.bits_stored - 1,
            0,
        )
        assert float(ds.RescaleSlope) == profile.rescale_slope
        stored = np.stack([d.pixel_array for d in dss])
        assert stored.dtype == np.uint16 and stored.max() <= 2**profile.bits_stored - 1
        physical = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        # what the files hold is exactly what was rendered, and white matter ~ intensity_scale
        series = render_subject(cfg, plan, with_tissue=True)
        np.testing.assert_array_equal(stored, series.stored)
        np.testing.assert_allclose(physical, series.physical, atol=profile.rescale_slope / 2 + 1e-3)
        assert series.wm is not None
        wm = physical[series.wm > 0.9]
        assert wm.size > 20
        assert np.median(wm) == pytest.approx(profile.intensity_scale, rel=0.25), pid
        assert stored.max() < 2**profile.bits_stored - 1  # nothing clipped at the top
        # the headers carry the parameters the pixels were made with
        assert float(ds.RepetitionTime) == pytest.approx(profile.repetition_time)
        assert float(ds.EchoTime) == pytest.approx(profile.echo_time)
        assert float(ds.FlipAngle) == pytest.approx(profile.flip_angle)
        assert float(ds.MagneticFieldStrength) == pytest.approx(profile.field_strength)
        assert ds.MRAcquisitionType == profile.acquisition_type
        assert ds.InPlanePhaseEncodingDirection == profile.phase_encoding_direction
        assert float(ds.PixelBandwidth) == pytest.approx(profile.pixel_bandwidth)
        if profile.sequence in ("ir_gre", "flair"):
            assert float(ds.InversionTime) == pytest.approx(profile.inversion_time)
            assert "IR" in ds.ScanningSequence
        else:
            assert "InversionTime" not in ds
        acq = [int(v) for v in ds.AcquisitionMatrix]
        assert sorted(v for v in acq if v) == sorted(profile.acquired)
        assert (ds.PatientSex, ds.PatientAge) == (plan.sex, f"{plan.age:03d}Y")
        assert ds.InstitutionName == plan.site and ds.Manufacturer == profile.manufacturer


def test_side_tables_match_the_files(cfg: CohortConfig, cohort: Path) -> None:
    with (cohort / "ris" / "verified_diagnoses.csv").open(newline="") as fh:
        ris = list(csv.DictReader(fh))
    assert [r["patient_id"] for r in ris] == [f"SG{i:04d}" for i in range(1, len(cfg.sites) + 1)]
    folders = series_folders(cohort)
    for row in ris:
        uids = {
            (d.StudyInstanceUID, d.AccessionNumber, d.PatientID)
            for d in (
                pydicom.dcmread(p, stop_before_pixels=True)
                for p in folders[row["patient_id"]].glob("*.dcm")
            )
        }
        assert uids == {(row["study_instance_uid"], row["accession_number"], row["patient_id"])}
        assert row["finding_label"] == {"0": "no finding", "1": "focal lesion"}[row["finding"]]
        mask = np.asarray(
            nib.load(cohort / "ground_truth" / "masks" / f"{row['patient_id']}.nii.gz").dataobj
        )
        assert mask.dtype == np.uint8
        assert bool(mask.any()) == (row["finding"] == "1")
    with (cohort / "ground_truth" / "lesions.csv").open(newline="") as fh:
        lesions = list(csv.DictReader(fh))
    assert [r["patient_id"] for r in lesions] == [
        r["patient_id"] for r in ris if r["finding"] == "1"
    ]
    raw = (cohort / "ris" / "verified_diagnoses.csv").read_bytes()
    assert b"\r" not in raw and raw.endswith(b"\n")
    meta = json.loads((cohort / "cohort.json").read_text())
    assert meta["config_sha256"] == config_digest(cfg) and meta["seed"] == cfg.seed
    assert list(meta) == sorted(meta)
    # masks are gzip with mtime 0 (deterministic bytes)
    head = (cohort / "ground_truth" / "masks" / "SG0001.nii.gz").read_bytes()[:10]
    assert head[4:8] == b"\0\0\0\0"
    assert gzip.decompress((cohort / "ground_truth" / "masks" / "SG0001.nii.gz").read_bytes())[:4]


def test_legacy_lesion_lies_in_tissue_and_changes_intensity_in_its_direction() -> None:
    cfg = tiny_config(
        matrix=64,
        n_slices=32,
        rendering="legacy",
        lesion={"radius_mm": (6.0, 9.0), "contrast": (0.4, 0.6)},
    )
    signs = set()
    for plan in sample_subjects(cfg):
        if not plan.finding:
            continue
        with_lesion = render_subject(cfg, plan, with_tissue=True)
        without = render_subject(cfg, plan, with_lesion=False)
        lesion, mask = with_lesion.lesion, with_lesion.mask.astype(bool)
        assert lesion is not None and mask.sum() >= 4
        assert with_lesion.brain is not None
        # inside grey + white matter, not skull or CSF
        assert np.mean(with_lesion.brain[mask]) > 0.8 and with_lesion.brain[mask].min() > 0.4
        ratio = with_lesion.physical[mask].mean() / without.physical[mask].mean()
        expected = 1.0 + lesion.sign * lesion.contrast
        assert (ratio - 1.0) * lesion.sign > 0.5 * lesion.contrast
        assert abs(ratio - expected) < 0.5 * lesion.contrast
        # away from the lesion the two renders are the same (same noise, same anatomy)
        far = ~ndi.binary_dilation(mask, iterations=3)
        np.testing.assert_allclose(
            with_lesion.physical[far], without.physical[far], rtol=1e-5, atol=1e-3
        )
        signs.add(lesion.sign)
    assert signs  # at least one positive subject was checked


def test_lesion_is_a_tissue_whose_contrast_follows_its_relaxation_on_each_scanner() -> None:
    cfg = tiny_config(matrix=64, n_slices=32, lesion={"radius_mm": (7.0, 9.0)})
    checked = 0
    for plan in sample_subjects(cfg):
        if not plan.finding:
            continue
        with_lesion = render_subject(cfg, plan, with_tissue=True)
        without = render_subject(cfg, plan, with_lesion=False)
        mask = with_lesion.mask.astype(bool)
        assert with_lesion.lesion_tissue is not None and mask.sum() >= 4
        assert with_lesion.brain is not None and with_lesion.labels is not None
        # inside grey + white matter, and labelled lesion exactly where the mask is
        assert np.mean(with_lesion.brain[mask]) > 0.8
        np.testing.assert_array_equal(with_lesion.labels == 9, mask)
        contrast = with_lesion.lesion_tissue["contrast"]  # against the subject's white matter
        ratio = with_lesion.physical[mask].mean() / without.physical[mask].mean()
        if abs(contrast) > 0.1:
            assert (ratio - 1.0) * contrast > 0, (plan.scanner, ratio, contrast)
        # away from the lesion only ringing and partial Fourier spread it: tiny differences
        far = ~ndi.binary_dilation(mask, iterations=4)
        scale = cfg.scanners[plan.scanner].intensity_scale
        diff = np.abs(with_lesion.physical[far] - without.physical[far])
        assert np.percentile(diff, 99) < 0.02 * scale, plan.scanner
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("name", sorted(TRANSFER_SYNTAXES))
def test_each_transfer_syntax_encodes_losslessly_or_fails_clearly(
    name: str, cfg: CohortConfig, tmp_path: Path
) -> None:
    profile = cfg.scanners["vantage_15t"].model_copy(update={"transfer_syntax": name})
    uid = TRANSFER_SYNTAXES[name]
    installed = not uid.is_compressed or any(
        p in get_encoder(uid).available_plugins for p in cohort_writer.PLUGIN_PREFERENCE[uid]
    )
    if not installed:
        with pytest.raises(UnsupportedTransferSyntaxError, match=r"scanners\.vantage_15t\."):
            cohort_writer.check_transfer_syntax("vantage_15t", profile)
        return
    plugin = cohort_writer.check_transfer_syntax("vantage_15t", profile)
    plan = dataclasses.replace(sample_subjects(cfg)[0], scanner="vantage_15t")
    series = render_subject(cfg, plan)
    uids = cohort_writer.series_uids("digest", cfg.seed, plan.patient_id)
    paths = cohort_writer.write_series(
        plan, profile, series.geometry, series.stored, uids, tmp_path, plugin
    )
    for k, path in enumerate(paths[:3]):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[name]
        np.testing.assert_array_equal(ds.pixel_array, series.stored[k])


def test_spliced_files_are_the_bytes_dcmwrite_writes(
    cfg: CohortConfig, cohort: Path, tmp_path: Path
) -> None:
    """Uncompressed slices are spliced from elements encoded once per series; each file must be
    what pydicom's dcmwrite writes for the slice's whole dataset (every scanner of the cohort)."""
    for plan in sample_subjects(cfg):
        profile = cfg.scanners[plan.scanner]
        if profile.transfer_syntax != "explicit_vr_little_endian":
            continue
        folder = next((cohort / "dicom" / plan.patient_id).iterdir())
        for path in sorted(folder.glob("*.dcm"))[:3]:
            ds = pydicom.dcmread(path)
            rebuilt = pydicom.Dataset()
            rebuilt.file_meta = pydicom.dataset.FileMetaDataset()
            for keyword in (
                "MediaStorageSOPClassUID",
                "MediaStorageSOPInstanceUID",
                "TransferSyntaxUID",
                "ImplementationVersionName",
            ):
                setattr(rebuilt.file_meta, keyword, ds.file_meta[keyword].value)
            for element in ds:
                rebuilt.add(element)
            written = tmp_path / f"{plan.patient_id}-{path.name}"
            pydicom.dcmwrite(written, rebuilt, enforce_file_format=True)
            assert written.read_bytes() == path.read_bytes(), (plan.scanner, path.name)


def test_jpeg2000_on_a_too_small_matrix_fails_with_the_reason() -> None:
    profile = (
        tiny_config()
        .scanners["signa_15t"]
        .model_copy(update={"transfer_syntax": "jpeg2000_lossless", "matrix": (16, 64)})
    )
    with pytest.raises(UnsupportedTransferSyntaxError, match=r"signa_15t.*at least 32 x 32"):
        cohort_writer.check_transfer_syntax("signa_15t", profile)


def test_an_unknown_transfer_syntax_names_the_profile() -> None:
    cfg = tiny_config()
    bad = cfg.scanners["skyra_3t"].model_construct(
        **{**cfg.scanners["skyra_3t"].__dict__, "transfer_syntax": "jpeg_xl_lossless"}
    )
    with pytest.raises(
        UnsupportedTransferSyntaxError, match=r"cohort\.scanners\.skyra_3t.*jpeg_xl"
    ):
        cohort_writer.check_transfer_syntax("skyra_3t", bad)


def test_a_missing_encoder_fails_before_anything_is_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    class NoEncoder:
        is_available = False
        available_plugins: tuple[str, ...] = ()
        missing_dependencies = ("pylibjpeg-rle - not installed",)

    monkeypatch.setattr(cohort_writer, "get_encoder", lambda uid: NoEncoder())
    with pytest.raises(UnsupportedTransferSyntaxError, match=r"vantage_15t.*rle_lossless") as info:
        run(tiny_config(), tmp_path / "out", workers=1, progress=False)
    assert "explicit_vr_little_endian" in str(info.value)
    assert not (tmp_path / "out").exists()


#: the only warnings the synthetic MR images may draw, by their exact text. They imitate what
#: scanners send, not what ShiftGuard sends to a PACS: like many real MR scanners (and so that
#: ingest is tested on it) every profile writes Rescale Slope/Intercept/Type, which the MR Image
#: IOD does not define, making each image a Standard Extended SOP Class (PS3.4 B.1.3): legal DICOM
#: that dciodvfy rightly warns about. Removing them would also change every cohort byte.
MR_SCANNER_WARNINGS = frozenset(
    {
        "Warning - Attribute is not present in standard DICOM IOD - (0x0028,0x1052) DS Rescale "
        "Intercept",
        "Warning - Attribute is not present in standard DICOM IOD - (0x0028,0x1053) DS Rescale Slope",
        "Warning - Attribute is not present in standard DICOM IOD - (0x0028,0x1054) LO Rescale Type",
        "Warning - Dicom dataset contains attributes not present in standard DICOM IOD - this is a "
        "Standard Extended SOP Class",
    }
)


@pytest.mark.peers("dciodvfy")
def test_files_pass_dciodvfy_without_errors_or_other_warnings(cohort: Path) -> None:
    for folder in series_folders(cohort).values():
        path = sorted(folder.glob("*.dcm"))[3]
        report = assert_dciodvfy_clean(path, iod="MRImage", allowed_warnings=MR_SCANNER_WARNINGS)
        assert set(report.warnings) == MR_SCANNER_WARNINGS  # none of the allowed ones is stale
