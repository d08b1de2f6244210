"""Clinical-size studies for the edge benchmarks, generated, deterministic, never committed.

A real study is far larger than the demo's (96 x 96 x 54 slices, 1 MB): a head CT is 512 x 512 by
200-600 slices, a thin-slice series 1,000-2,000. This helper makes such a study from one of the
demo cohort's series so the default model still reads it: the same anatomy and field of view,
resampled (trilinear) to ``rows x columns x slices`` 16-bit slices, with seeded Rician-like noise
so neighbouring slices differ, written as uncompressed Explicit VR Little Endian MR images with a
consistent geometry (pixel spacing and slice positions shrunk to keep the field of view) and UIDs
derived from the source, the size and the seed: the same arguments give the same bytes.

    python benchmarks/clinical_study.py --slices 300 --out /tmp/ct-size     # about 150 MB
    python benchmarks/clinical_study.py --slices 1200 --out /tmp/thin       # about 600 MB
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

ROWS = COLUMNS = 512
SLICE_BYTES = ROWS * COLUMNS * 2


def slices_for(megabytes: float, rows: int = ROWS, columns: int = COLUMNS) -> int:
    """How many 16-bit ``rows x columns`` slices make about ``megabytes`` MiB of pixel data."""
    return max(1, round(megabytes * 2**20 / (rows * columns * 2)))


def _uid(*parts: object) -> str:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _resize_plane(plane: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Bilinear resize of one ``(R, C)`` slice to ``(rows, columns)`` (pixel centres aligned)."""
    r = (np.arange(rows) + 0.5) * plane.shape[0] / rows - 0.5
    c = (np.arange(columns) + 0.5) * plane.shape[1] / columns - 0.5
    r0 = np.clip(np.floor(r).astype(int), 0, plane.shape[0] - 1)
    c0 = np.clip(np.floor(c).astype(int), 0, plane.shape[1] - 1)
    r1, c1 = np.minimum(r0 + 1, plane.shape[0] - 1), np.minimum(c0 + 1, plane.shape[1] - 1)
    fr, fc = np.clip(r - r0, 0, 1)[:, None], np.clip(c - c0, 0, 1)[None, :]
    top = plane[r0][:, c0] * (1 - fc) + plane[r0][:, c1] * fc
    bottom = plane[r1][:, c0] * (1 - fc) + plane[r1][:, c1] * fc
    return top * (1 - fr) + bottom * fr


def write_study(
    source: Path,
    out: Path,
    slices: int,
    rows: int = ROWS,
    columns: int = COLUMNS,
    seed: int = 0,
) -> list[Path]:
    """Write a ``rows x columns x slices`` version of the series in ``source`` to ``out``.

    Args:
        source: a folder holding one axial series (the demo cohort's study folders do).
        out: the folder to write ``0001.dcm``... into (created).
        slices, rows, columns: the study's size.
        seed: the noise's seed; with the source and the size it decides the UIDs too.

    Returns:
        The files written, in slice order.
    """
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian

    files = sorted(Path(source).rglob("*.dcm"))
    headers = [pydicom.dcmread(f) for f in files]
    normal = np.cross(
        np.array(headers[0].ImageOrientationPatient[:3], float),
        np.array(headers[0].ImageOrientationPatient[3:], float),
    )
    headers.sort(key=lambda h: float(np.dot(normal, np.array(h.ImagePositionPatient, float))))
    volume = np.stack([h.pixel_array.astype(np.float32) for h in headers])  # (Z, R, C)
    first = headers[0]
    positions = np.array([h.ImagePositionPatient for h in headers], float)
    step = float(np.linalg.norm(positions[-1] - positions[0])) / max(len(headers) - 1, 1)
    extent = step * len(headers)  # the slab the source covers, mm
    spacing = [float(v) * first.Rows / rows for v in first.PixelSpacing]
    thickness = extent / slices
    study_uid = _uid(first.StudyInstanceUID, rows, columns, slices, seed)
    series_uid = _uid(study_uid, "series")
    rng = np.random.default_rng([seed, slices, rows, columns])
    top = positions[0] - normal * step / 2  # the slab's edge
    out.mkdir(parents=True, exist_ok=True)
    written = []
    z_source = (np.arange(slices) + 0.5) * len(headers) / slices - 0.5
    for k in range(slices):
        z0 = int(np.clip(np.floor(z_source[k]), 0, len(headers) - 1))
        z1 = min(z0 + 1, len(headers) - 1)
        f = float(np.clip(z_source[k] - z0, 0, 1))
        plane = _resize_plane(volume[z0] * (1 - f) + volume[z1] * f, rows, columns)
        noise = rng.normal(0.0, 8.0, size=(2, rows, columns)).astype(np.float32)
        plane = np.hypot(plane + noise[0], noise[1])  # magnitude of complex Gaussian noise
        pixels = np.clip(np.rint(plane), 0, 65535).astype(np.uint16)
        ds = pydicom.dcmread(files[0])
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = _uid(series_uid, k)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.Rows, ds.Columns = rows, columns
        ds.PixelSpacing = [f"{v:.6g}" for v in spacing]
        ds.SliceThickness = f"{thickness:.6g}"
        ds.SpacingBetweenSlices = f"{thickness:.6g}"
        position = top + normal * thickness * (k + 0.5)
        ds.ImagePositionPatient = [f"{v:.6g}" for v in position]
        ds.SliceLocation = f"{float(np.dot(normal, position)):.6g}"
        ds.InstanceNumber = k + 1
        ds.SeriesDescription = f"{first.get('SeriesDescription', 'T1')} {rows}x{columns}x{slices}"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = pixels.tobytes()
        for keyword in ("WindowCenter", "WindowWidth"):
            if keyword in ds:
                delattr(ds, keyword)
        path = out / f"{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=None,
                        help="a series folder (default: the first study of data/dicom)")  # fmt: skip
    parser.add_argument("--slices", type=int, required=True)
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--columns", type=int, default=COLUMNS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    source = args.source or sorted(Path("data/dicom").glob("*/*"))[0]
    files = write_study(source, args.out, args.slices, args.rows, args.columns, args.seed)
    size = sum(p.stat().st_size for p in files)
    print(
        f"{len(files)} slices of {args.rows} x {args.columns}, {size / 2**20:.0f} MiB in {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
