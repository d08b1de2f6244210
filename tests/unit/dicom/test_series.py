"""Series validation and assembly: order from positions, gaps, duplicates, geometry, pixels."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from shiftguard.dicom.scan import iter_files, scan_files
from shiftguard.dicom.series import (
    LPS_TO_RAS,
    SeriesGroup,
    deduplicate,
    group_series,
    load_series,
    orientation_label,
    validate_series,
)
from shiftguard.dicom.testing import (
    SeriesSpec,
    make_datasets,
    phantom,
    save_dataset,
    slice_positions,
    write_series,
)
from shiftguard.errors import InvalidSeriesError, PixelDecodeError


def _groups(folder: Path) -> list[SeriesGroup]:
    headers, issues = scan_files(iter_files(folder))
    assert issues == []
    return group_series(headers)


def _only_group(folder: Path) -> SeriesGroup:
    (group,) = _groups(folder)
    return group


def _expected_xyz(spec: SeriesSpec, stored: np.ndarray | None = None) -> np.ndarray:
    """What assembly must produce: (X=cols, Y=rows, Z=slices) float32 values."""
    stored = phantom(spec) if stored is None else stored
    return stored.astype(np.float32).transpose(2, 1, 0)


# --------------------------------------------------------------------------------------------------
# Ordering
# --------------------------------------------------------------------------------------------------


def test_shuffled_file_names_are_ordered_by_position(tmp_path: Path) -> None:
    spec = SeriesSpec()
    names = [f"{n:03d}.dcm" for n in random.Random(1).sample(range(100), spec.n_slices)]
    write_series(tmp_path, spec, name=lambda k: names[k])
    volume, notes = load_series(_only_group(tmp_path))
    assert notes == []
    np.testing.assert_array_equal(volume.array, _expected_xyz(spec))


def test_reversed_acquisition_order(tmp_path: Path) -> None:
    # Slices written from the top down: file 0 is the highest slice.
    spec = SeriesSpec(origin=(-10.0, -12.0, 30.0), slice_spacing=-2.0)
    write_series(tmp_path, spec)
    volume, _ = load_series(_only_group(tmp_path))
    # Assembly runs along +normal, so the volume is the stack reversed and starts at the bottom.
    np.testing.assert_array_equal(volume.array, _expected_xyz(spec)[:, :, ::-1])
    lowest = slice_positions(spec)[-1]
    np.testing.assert_allclose(volume.geometry.affine_lps[:3, 3], lowest)
    assert volume.geometry.slice_spacing == pytest.approx(2.0)


def test_lying_instance_numbers_are_ignored(tmp_path: Path) -> None:
    spec = SeriesSpec()
    datasets = make_datasets(spec)
    lies = random.Random(3).sample(range(1, 1 + spec.n_slices), spec.n_slices)
    for ds, lie in zip(datasets, lies, strict=True):
        ds.InstanceNumber = lie
        save_dataset(ds, tmp_path / f"{lie:04d}.dcm")  # names follow the lie too
    volume, _ = load_series(_only_group(tmp_path))
    np.testing.assert_array_equal(volume.array, _expected_xyz(spec))


# --------------------------------------------------------------------------------------------------
# Rejections
# --------------------------------------------------------------------------------------------------


def test_missing_slice_rejects_the_series_with_positions(tmp_path: Path) -> None:
    spec = SeriesSpec(n_slices=12, origin=(0.0, 0.0, 0.0), slice_spacing=2.5)
    paths = write_series(tmp_path, spec)
    paths[5].unlink()  # the slice at 12.5 mm
    group = _only_group(tmp_path)
    with pytest.raises(InvalidSeriesError) as err:
        validate_series(group)
    assert err.value.code == "missing_slice"
    assert "missing slice(s) between positions 10.000 and 15.000 mm" in err.value.reason
    assert "1 slice(s) missing" in err.value.reason
    assert err.value.fix
    assert set(err.value.files) == {str(p) for p in paths if p.exists()}


def test_irregular_spacing_is_not_called_a_missing_slice(tmp_path: Path) -> None:
    spec = SeriesSpec(n_slices=8, origin=(0.0, 0.0, 0.0), slice_spacing=2.0)
    datasets = make_datasets(spec)
    datasets[4].ImagePositionPatient = [0.0, 0.0, 8.7]  # 2.0 mm nominal, 0.7 mm off
    for k, ds in enumerate(datasets):
        save_dataset(ds, tmp_path / f"{k}.dcm")
    with pytest.raises(InvalidSeriesError) as err:
        validate_series(_only_group(tmp_path))
    assert err.value.code == "irregular_spacing"


def test_duplicated_position_of_different_instances_is_rejected(tmp_path: Path) -> None:
    spec = SeriesSpec(n_slices=6)
    datasets = make_datasets(spec)
    extra = make_datasets(spec)[2]  # another instance (new SOPInstanceUID) at slice 2's position
    extra.SeriesInstanceUID = spec.series_uid
    for k, ds in enumerate([*datasets, extra]):
        save_dataset(ds, tmp_path / f"{k}.dcm")
    with pytest.raises(InvalidSeriesError) as err:
        load_series(_only_group(tmp_path))
    assert err.value.code == "duplicate_position"
    assert "duplicated slice position" in err.value.reason


def test_exact_duplicate_instance_is_deduplicated_and_reported(tmp_path: Path) -> None:
    spec = SeriesSpec(n_slices=6)
    paths = write_series(tmp_path / "a", spec)
    copy = tmp_path / "b" / "copy_of_slice_3.dcm"
    copy.parent.mkdir()
    copy.write_bytes(paths[3].read_bytes())
    group = _only_group(tmp_path)
    assert len(group.headers) == 7
    volume, notes = load_series(group)
    np.testing.assert_array_equal(volume.array, _expected_xyz(spec))
    assert len(notes) == 1
    note = notes[0]
    assert (note.level, note.code, note.path) == ("file", "duplicate_instance", str(copy))
    assert str(paths[3]) in note.reason


def test_same_uid_with_different_geometry_is_a_conflict(tmp_path: Path) -> None:
    spec = SeriesSpec(n_slices=4)
    datasets = make_datasets(spec)
    for k, ds in enumerate(datasets):
        save_dataset(ds, tmp_path / f"{k}.dcm")
    datasets[1].ImagePositionPatient = [0.0, 0.0, 99.0]
    save_dataset(datasets[1], tmp_path / "edited.dcm")
    with pytest.raises(InvalidSeriesError) as err:
        deduplicate(_only_group(tmp_path))
    assert err.value.code == "conflicting_duplicate_uid"


def test_mixed_series_in_one_folder_are_split_by_uid(tmp_path: Path) -> None:
    axial = SeriesSpec(n_slices=5)
    sagittal = SeriesSpec(
        n_slices=7, iop=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0), study_uid=axial.study_uid
    )
    write_series(tmp_path, axial, name=lambda k: f"x{2 * k}.dcm")
    write_series(tmp_path, sagittal, name=lambda k: f"x{2 * k + 1}.dcm")
    groups = _groups(tmp_path)
    assert sorted(len(g.headers) for g in groups) == [5, 7]
    for group in groups:
        spec = axial if group.series_uid == axial.series_uid else sagittal
        volume, _ = load_series(group)
        np.testing.assert_array_equal(volume.array, _expected_xyz(spec))


def test_one_uid_with_two_geometries_is_rejected_not_guessed(tmp_path: Path) -> None:
    spec = SeriesSpec(n_slices=6)
    localizer = SeriesSpec(
        n_slices=1, iop=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0), series_uid=spec.series_uid,
        study_uid=spec.study_uid, frame_of_reference_uid=spec.frame_of_reference_uid,
    )  # fmt: skip
    write_series(tmp_path, spec)
    write_series(tmp_path, localizer, name=lambda k: "localizer.dcm")
    with pytest.raises(InvalidSeriesError) as err:
        validate_series(_only_group(tmp_path))
    assert err.value.code == "mixed_geometry"
    assert "6 slice(s) axial" in err.value.reason and "1 slice(s) sagittal" in err.value.reason


def test_too_few_slices(tmp_path: Path) -> None:
    write_series(tmp_path, SeriesSpec(n_slices=3))
    with pytest.raises(InvalidSeriesError) as err:
        validate_series(_only_group(tmp_path), min_slices=8)
    assert err.value.code == "too_few_slices"
    assert "min_slices = 8" in err.value.reason


def test_modality_not_ingested(tmp_path: Path) -> None:
    write_series(tmp_path, SeriesSpec(modality="CT"))
    with pytest.raises(InvalidSeriesError) as err:
        validate_series(_only_group(tmp_path), modalities=["MR"])
    assert err.value.code == "unsupported_modality"
    validate_series(_only_group(tmp_path), modalities=["MR", "CT"])


def test_positions_off_a_line_are_rejected(tmp_path: Path) -> None:
    spec = SeriesSpec(n_slices=6, origin=(0.0, 0.0, 0.0))
    datasets = make_datasets(spec)
    datasets[3].ImagePositionPatient = [5.0, 0.0, 6.0]  # right z, shifted 5 mm in x
    for k, ds in enumerate(datasets):
        save_dataset(ds, tmp_path / f"{k}.dcm")
    with pytest.raises(InvalidSeriesError) as err:
        validate_series(_only_group(tmp_path))
    assert err.value.code == "inconsistent_positions"


# --------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------


def _rotation_x(deg: float) -> np.ndarray:
    t = np.radians(deg)
    return np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])


def test_oblique_affine_maps_every_voxel_to_its_dicom_position(tmp_path: Path) -> None:
    rot = _rotation_x(17.0) @ np.array(
        [[np.cos(0.3), -np.sin(0.3), 0], [np.sin(0.3), np.cos(0.3), 0], [0, 0, 1]]
    )
    iop = tuple(float(v) for v in np.concatenate([rot[:, 0], rot[:, 1]]))
    spec = SeriesSpec(iop=iop, pixel_spacing=(0.9, 1.3), slice_spacing=2.2)  # type: ignore[arg-type]
    write_series(tmp_path, spec)
    volume, _ = load_series(_only_group(tmp_path))
    geometry = volume.geometry
    label, tilt = orientation_label(geometry.normal)
    assert label == "axial oblique" and tilt > 2
    positions = slice_positions(spec)
    row_dir, col_dir = rot[:, 0], rot[:, 1]
    for i, j, k in [(0, 0, 0), (3, 5, 2), (spec.cols - 1, spec.rows - 1, spec.n_slices - 1)]:
        # DICOM: pixel (row j, column i) of slice k lies at IPP_k + i*col_spacing*row_dir + j*...
        lps = (
            positions[k] + i * spec.pixel_spacing[1] * row_dir + j * spec.pixel_spacing[0] * col_dir
        )
        ras = lps * np.array([-1, -1, 1])
        np.testing.assert_allclose((volume.affine @ [i, j, k, 1])[:3], ras, atol=1e-4)
    np.testing.assert_allclose(volume.affine, LPS_TO_RAS @ geometry.affine_lps)


def test_sagittal_geometry(tmp_path: Path) -> None:
    # Rows run anterior->posterior (+y), columns run head->feet (-z): normal along -x (right).
    spec = SeriesSpec(iop=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0), origin=(-20.0, -30.0, 40.0))
    write_series(tmp_path, spec)
    volume, _ = load_series(_only_group(tmp_path))
    assert volume.geometry.orientation == "sagittal"
    assert volume.geometry.tilt_deg == 0.0
    # Voxel (0, 0, k) is the first pixel of slice k, at increasing position along the normal.
    first = (volume.affine @ [0, 0, 0, 1])[:3]
    positions = slice_positions(spec)
    lowest = positions[np.argmin(positions @ spec.normal)]
    np.testing.assert_allclose(first, lowest * [-1, -1, 1], atol=1e-6)
    np.testing.assert_array_equal(volume.array.shape, (spec.cols, spec.rows, spec.n_slices))


def test_gantry_tilt_shear_is_kept_in_the_affine(tmp_path: Path) -> None:
    # Positions step along z and drift in y (CT gantry tilt): the slice normal stays z.
    spec = SeriesSpec(n_slices=6, origin=(0.0, 0.0, 0.0), modality="CT")
    datasets = make_datasets(spec)
    for k, ds in enumerate(datasets):
        ds.ImagePositionPatient = [0.0, 0.5 * k, 2.0 * k]
        save_dataset(ds, tmp_path / f"{k}.dcm")
    volume, _ = load_series(_only_group(tmp_path))
    np.testing.assert_allclose(volume.geometry.affine_lps[:3, 2], [0.0, 0.5, 2.0])
    assert volume.geometry.shear_deg == pytest.approx(np.degrees(np.arctan(0.25)), abs=1e-6)


# --------------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------------


def test_rescale_is_applied_per_slice(tmp_path: Path) -> None:
    slopes = [0.5, 1.0, 2.0, 1.5, 3.0]
    intercepts = [-100.0, 0.0, 10.0, 0.0, -1024.0]
    spec = SeriesSpec(n_slices=5, rescale_slope=slopes, rescale_intercept=intercepts)
    write_series(tmp_path, spec)
    volume, _ = load_series(_only_group(tmp_path))
    expected = phantom(spec).astype(np.float64) * np.array(slopes)[:, None, None]
    expected += np.array(intercepts)[:, None, None]
    np.testing.assert_allclose(volume.array, expected.transpose(2, 1, 0), rtol=1e-6)
    assert volume.array.dtype == np.float32


def test_a_series_longer_than_one_read_chunk_is_assembled_whole(tmp_path: Path) -> None:
    """Slices are read a chunk at a time into the float32 volume (the stored values never all
    sit beside it); a series of more than two chunks, with per-slice rescale and signed 12-bit
    values, is the same volume as one read would give."""
    from shiftguard.dicom.series import ASSEMBLE_CHUNK

    n = 2 * ASSEMBLE_CHUNK + 5
    slopes = [1.0 + (k % 3) / 2 for k in range(n)]
    spec = SeriesSpec(n_slices=n, signed=True, bits_stored=12, rescale_slope=slopes,
                      rescale_intercept=-1024.0)  # fmt: skip
    write_series(tmp_path, spec)
    volume, _ = load_series(_only_group(tmp_path))
    expected = phantom(spec).astype(np.float64) * np.array(slopes)[:, None, None] - 1024.0
    np.testing.assert_allclose(volume.array, expected.transpose(2, 1, 0), rtol=1e-6)
    assert volume.array.shape == (spec.cols, spec.rows, n)


def test_signed_data_with_unused_high_bits_is_sign_extended(tmp_path: Path) -> None:
    spec = SeriesSpec(n_slices=3, signed=True, bits_stored=12)
    stored = phantom(spec) - 300  # some negative values
    raw = stored.copy()
    raw[raw < 0] &= 0x0FFF  # as a writer that leaves the unused high bits clear would store them
    paths = write_series(tmp_path, spec, stored=raw)
    volume, _ = load_series(_only_group(tmp_path))
    np.testing.assert_array_equal(volume.array, stored.astype(np.float32).transpose(2, 1, 0))
    np.testing.assert_array_equal(pydicom.dcmread(paths[0]).pixel_array, stored[0])


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
@pytest.mark.parametrize("signed", [False, True])
def test_compressed_series_decode_to_the_uncompressed_values(
    tmp_path: Path, syntax: str, signed: bool
) -> None:
    spec = SeriesSpec(rows=32, cols=36, n_slices=4, signed=signed, bits_stored=12)
    stored = phantom(spec) - (500 if signed else 0)
    write_series(tmp_path / "raw", spec, stored=stored)
    write_series(tmp_path / "packed", spec, stored=stored, transfer_syntax=syntax)
    raw, _ = load_series(_only_group(tmp_path / "raw"))
    packed_group = _only_group(tmp_path / "packed")
    assert {h.transfer_syntax for h in packed_group.headers} == {syntax}
    packed, _ = load_series(packed_group)
    np.testing.assert_array_equal(packed.array, raw.array)


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_padded.dcm",
    ],
)
def test_bundled_variants_decode_like_mr_small(
    copy_bundled: Callable[..., Path], name: str
) -> None:
    folder = copy_bundled("MR_small.dcm", folder="ref")
    reference, _ = load_series(_only_group(folder), min_slices=1)
    variant = _only_group(copy_bundled(name, folder="variant"))
    with pytest.raises(InvalidSeriesError, match=r"fewer than ingest\.min_slices"):
        validate_series(variant, min_slices=2)
    volume, _ = load_series(variant, min_slices=1)
    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_allclose(volume.affine, reference.affine)


def test_undecodable_pixels_name_the_file(tmp_path: Path) -> None:
    spec = SeriesSpec(rows=32, cols=32, n_slices=4)
    paths = write_series(tmp_path, spec, transfer_syntax=JPEGLSLossless)
    raw = bytearray(paths[2].read_bytes())
    start = raw.index(b"\xff\xd8")  # JPEG-LS start of image inside the fragment
    raw[start + 20 : start + 60] = b"\xff" * 40
    paths[2].write_bytes(bytes(raw))
    with pytest.raises(PixelDecodeError) as err:
        load_series(_only_group(tmp_path))
    assert err.value.code == "pixel_decode_failed"
    assert str(paths[2]) in err.value.reason
    assert err.value.files == (str(paths[2]),)


# --------------------------------------------------------------------------------------------------
# Enhanced multi-frame
# --------------------------------------------------------------------------------------------------


def _enhanced_mr(spec: SeriesSpec, stored: np.ndarray) -> Dataset:
    frames = make_datasets(spec, stored)
    positions = [list(f.ImagePositionPatient) for f in frames]
    ds = frames[0]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ds.NumberOfFrames = spec.n_slices
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        delattr(ds, keyword)
    del ds.RescaleSlope
    del ds.RescaleIntercept
    shared = Dataset()
    orientation = Dataset()
    orientation.ImageOrientationPatient = list(spec.iop)
    shared.PlaneOrientationSequence = Sequence([orientation])
    measures = Dataset()
    measures.PixelSpacing = list(spec.pixel_spacing)
    measures.SliceThickness = spec.slice_spacing
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k in range(len(frames)):
        item = Dataset()
        position = Dataset()
        position.ImagePositionPatient = positions[k]
        item.PlanePositionSequence = Sequence([position])
        rescale = Dataset()
        rescale.RescaleSlope = k + 1
        rescale.RescaleIntercept = 0
        item.PixelValueTransformationSequence = Sequence([rescale])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    return ds


def test_enhanced_multiframe_uses_per_frame_positions(tmp_path: Path) -> None:
    spec = SeriesSpec(n_slices=5)
    stored = phantom(spec)
    order = [3, 0, 4, 1, 2]  # frames stored out of spatial order
    ds = _enhanced_mr(spec, stored)
    items = list(ds.PerFrameFunctionalGroupsSequence)
    ds.PerFrameFunctionalGroupsSequence = Sequence([items[k] for k in order])
    ds.PixelData = np.ascontiguousarray(stored[order]).tobytes()
    save_dataset(ds, tmp_path / "enhanced.dcm")
    group = _only_group(tmp_path)
    assert len(group.headers) == 5 and {h.frame for h in group.headers} == set(range(5))
    volume, _ = load_series(group)
    slopes = np.arange(1, 6, dtype=np.float32)  # frame k (spatial) has slope k + 1
    expected = stored.astype(np.float32) * slopes[:, None, None]
    np.testing.assert_array_equal(volume.array, expected.transpose(2, 1, 0))


def test_multiframe_without_positions_is_quarantined(tmp_path: Path) -> None:
    spec = SeriesSpec(n_slices=3)
    ds = make_datasets(spec)[0]
    ds.NumberOfFrames = 3
    ds.PixelData = np.ascontiguousarray(phantom(spec)).tobytes()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    save_dataset(ds, tmp_path / "legacy_mf.dcm")
    headers, issues = scan_files([tmp_path / "legacy_mf.dcm"])
    assert headers == []
    assert issues[0].code == "multiframe_no_geometry"
