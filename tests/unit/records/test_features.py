"""The PHI-free feature record: what each feature measures, and what never leaves the runner."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from shiftguard.dicom.scan import scan_files
from shiftguard.records.features import (
    FEATURE_NAMES,
    Projection,
    acquisition_features,
    image_features,
    make_record,
    output_features,
    record_id,
    segment_features,
)


def phantom(noise: float = 0.0, bias: float = 0.0, blur: bool = False, seed: int = 0) -> np.ndarray:
    """A textured ellipsoid (anatomy) on a dark background, with noise, a bias field, or blur."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in (40, 48, 40)), indexing="ij")
    texture = 1000.0 + 200.0 * np.sin(6 * np.pi * x) * np.sin(6 * np.pi * y)
    v = np.where(x**2 + y**2 + z**2 < 0.6, texture, 10.0) * (1 + bias * x)
    if blur:
        from scipy.ndimage import gaussian_filter

        v = gaussian_filter(v, 2.0)
    return (v + rng.normal(0, noise, v.shape)).astype(np.float32)


def test_image_indicators_respond_to_what_they_are_named_after() -> None:
    base = image_features(phantom(noise=5.0), None)
    noisy = image_features(phantom(noise=40.0), None)
    assert noisy["noise"] > 1.5 * base["noise"]  # edges respond too: it is an indicator
    flat = np.random.default_rng(2).normal(500.0, 20.0, (40, 48, 40)).astype(np.float32)
    stats = image_features(flat, None)
    assert stats["noise"] * (stats["p99"] - stats["p01"]) == pytest.approx(20.0, rel=0.1)
    biased = image_features(phantom(noise=5.0, bias=0.4), None)
    assert biased["bias_cv"] > 3 * base["bias_cv"]
    blurred = image_features(phantom(noise=5.0, blur=True), None)
    assert blurred["sharpness"] < 0.7 * base["sharpness"]
    for name in ("noise", "sharpness", "bias_cv"):  # scale-free: a vendor's intensity scale
        assert image_features(10 * phantom(noise=5.0), None)[name] == pytest.approx(base[name])


def test_outputs_entropy_and_the_fixed_projection() -> None:
    assert output_features(0.5, None)["entropy"] == pytest.approx(1.0)
    assert output_features(0.999, None)["entropy"] < 0.02
    assert output_features(0.3, None)["emb_0"] is None
    x = np.random.default_rng(1).normal(size=(60, 16)) @ np.diag(np.linspace(3, 0.1, 16))
    p = Projection.fit(x)
    assert np.allclose(p.components @ p.components.T, np.eye(len(p.components)), atol=1e-9)
    assert list(p.explained) == sorted(p.explained, reverse=True)
    again = Projection.from_json(json.loads(json.dumps(p.to_json())))
    assert np.allclose(again.project(x[0]), p.project(x[0]), atol=1e-6)
    assert np.allclose(Projection.fit(x).components, p.components)  # deterministic signs


def test_acquisition_reads_ct_kvp_and_kernel_and_segments_are_coarse() -> None:
    path = get_testdata_file("CT_small.dcm", download=False)
    [header], _ = scan_files([path])
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ct = acquisition_features(header, 1, ds)
    assert ct["kvp"] == 120.0 and ct["convolution_kernel"] == "STANDARD"
    assert acquisition_features(header, 1)["convolution_kernel"] == "unknown"
    segment = segment_features(header)
    assert set(segment) == {"age_band", "sex"}
    assert segment["sex"] in ("F", "M", "O", "unknown")


def test_a_record_carries_exactly_the_features_and_no_identifier() -> None:
    path = get_testdata_file("CT_small.dcm", download=False)
    ds = pydicom.dcmread(path)
    [header], _ = scan_files([path])
    features = {
        **acquisition_features(header, 1, ds),
        **image_features(ds.pixel_array.astype(np.float32)[:, :, None].repeat(4, axis=2), None),
        **output_features(0.7, np.arange(8.0)),
        **segment_features(header),
        "patient_name": str(ds.PatientName),  # anything else offered is dropped
    }
    key = b"k" * 32
    record = make_record(
        features, site="north", bundle="m", bundle_version="3",
        series_uid=str(ds.SeriesInstanceUID), processed_at="2026-11-28T10:00:00Z", record_key=key,
    )  # fmt: skip
    assert set(record) - set(FEATURE_NAMES) == {
        "record_id", "schema", "site", "bundle", "bundle_version", "processed_at",
    }  # fmt: skip
    text = json.dumps(record)
    for value in (ds.PatientName, ds.PatientID, ds.SeriesInstanceUID, ds.StudyInstanceUID,
                  ds.SOPInstanceUID, ds.get("StudyDate"), ds.get("InstitutionName")):  # fmt: skip
        if value and len(str(value)) > 3:
            assert str(value) not in text
    series = str(ds.SeriesInstanceUID)
    assert record["record_id"] == record_id(key, "north", "m", "3", series)
    assert record["record_id"] != record_id(key, "south", "m", "3", series)


def test_record_ids_are_keyed_so_whoever_holds_the_uids_cannot_link_them() -> None:
    """The id is an HMAC under the site's secret: stable for one key (the collector's
    de-duplication), unrelated under another, and not the plain hash anyone could recompute."""
    import hashlib

    series, a, b = "1.2.826.0.1.3680043.7", b"a" * 32, b"b" * 32
    assert record_id(a, "north", "m", "3", series) == record_id(a, "north", "m", "3", series)
    assert record_id(a, "north", "m", "3", series) != record_id(b, "north", "m", "3", series)
    for text in (series, f"shiftguard-record|north|m|3|{series}"):
        assert (
            record_id(a, "north", "m", "3", series)
            != hashlib.sha256(text.encode()).hexdigest()[:32]
        )
    with pytest.raises(ValueError, match="at least 16 bytes"):
        record_id(b"short", "north", "m", "3", series)
