"""The edge runner's numpy preprocessing held to the training pipeline's MONAI preprocessing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from shiftguard.config import IngestConfig, TrainConfig, validate
from shiftguard.data.canonical import canonical_volume
from shiftguard.data.volume import write_nifti
from shiftguard.dicom.scan import list_files, scan_files
from shiftguard.dicom.series import group_series
from shiftguard.edge.infer import sigmoid
from shiftguard.edge.preprocess import area_resize, percentiles, preprocess, scale_percentiles
from shiftguard.export.stage import _training_batch, onnx_logits, preprocessing_spec


@pytest.mark.parametrize(
    ("shape_in", "shape_out"),
    [((24, 28, 24), (12, 14, 12)), ((37, 50, 29), (16, 21, 13)), ((10, 9, 8), (15, 4, 8))],
)
def test_area_resize_matches_torch_area_interpolation(shape_in: tuple, shape_out: tuple) -> None:
    x = np.random.default_rng(0).random(shape_in, dtype=np.float32) * 1000
    expected = F.interpolate(torch.from_numpy(x)[None, None], size=shape_out, mode="area")[0, 0]
    got = area_resize(x, shape_out)
    assert got.shape == shape_out and got.dtype == np.float32
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-6 * 1000)


def test_scale_percentiles_matches_monai() -> None:
    from monai.transforms import ScaleIntensityRangePercentiles

    x = np.random.default_rng(1).gamma(2.0, 300.0, (20, 22, 18)).astype(np.float32)
    expected = ScaleIntensityRangePercentiles(1.0, 99.0, 0.0, 1.0, clip=False)(x[None])[0]
    np.testing.assert_allclose(scale_percentiles(x, 1.0, 99.0), np.asarray(expected), atol=1e-6)
    assert not scale_percentiles(np.full((3, 3, 3), 5.0), 1, 99).any()  # constant: all zeros


def _draw(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    if kind == "normal":
        return rng.normal(size=n).astype(np.float32)
    if kind == "few levels":  # long runs of ties everywhere
        return rng.integers(0, 5, size=n).astype(np.float32)
    if kind == "background":  # most values one constant, like the air around a head
        return np.where(rng.random(n) < 0.6, 0.0, rng.gamma(2.0, 300.0, n)).astype(np.float32)
    if kind == "sorted":  # the worst case for an evenly strided sample
        return np.sort(rng.gamma(2.0, 300.0, n)).astype(np.float32)
    return (rng.integers(0, 1000, size=n) * 0.37).astype(np.float32)


@pytest.mark.parametrize("kind", ["normal", "few levels", "background", "sorted", "quantised"])
def test_percentiles_are_numpys_bit_for_bit(kind: str) -> None:
    rng = np.random.default_rng(
        ["normal", "few levels", "background", "sorted", "quantised"].index(kind)
    )
    for trial in range(60):
        n = int(rng.integers(1, 200_000)) if trial % 4 else int(rng.integers(8_000, 9_000))
        x = _draw(rng, kind, n)
        qs = [1.0, 99.0] if trial % 3 == 0 else sorted(rng.uniform(0, 100, 2).tolist())
        if trial % 7 == 0:
            qs = [0.0, 100.0]
        expected = np.percentile(x, qs)
        got = percentiles(x, qs)
        assert got.dtype == expected.dtype and np.array_equal(got, expected), (trial, n, qs)
        assert scale_percentiles(x, *qs).tobytes() == _scale_by_numpy(x, *qs).tobytes()


def _scale_by_numpy(x: np.ndarray, lower: float, upper: float) -> np.ndarray:
    lo, hi = np.percentile(x, [lower, upper])
    return ((x - lo) / (hi - lo)).astype(np.float32) if hi != lo else (x - lo).astype(np.float32)


def test_percentiles_of_a_volume_in_any_memory_order_and_with_non_finite_values() -> None:
    x = np.random.default_rng(3).gamma(2.0, 300.0, (40, 48, 40)).astype(np.float32)
    for volume in (x, np.asfortranarray(x), x[:, ::-1, :], x.astype(np.float64)):
        assert np.array_equal(percentiles(volume, [1, 99]), np.percentile(volume, [1, 99]))
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[5, 6, 7] = bad
        np.testing.assert_array_equal(percentiles(y, [1, 99]), np.percentile(y, [1, 99]))


def _series_volumes(cohort: Path, tiny: dict[str, Any]) -> list[np.ndarray]:
    rules = validate("ingest", tiny["ingest"], IngestConfig)
    headers, _ = scan_files(list_files(cohort))
    return [canonical_volume(group, rules)[1].array for group in group_series(headers)]


@pytest.mark.parametrize("input_shape", [None, (12, 14, 12)])
def test_dicom_to_model_input_matches_training_and_onnx_matches_torch(
    cohort: Path, tiny: dict[str, Any], tmp_path: Path, network: Any, input_shape: Any
) -> None:
    """From the same DICOM series: the edge path (canonical volume -> numpy preprocessing) and the
    training path (ingest's NIfTI -> MONAI) agree within 1e-5; ONNX and PyTorch within 1e-4."""
    ingest = validate("ingest", tiny["ingest"], IngestConfig)
    train = validate("train", {**tiny["train"], "input_shape": input_shape}, TrainConfig)
    spec = preprocessing_spec(ingest, train, input_shape or ingest.shape)
    volumes = _series_volumes(cohort, tiny)
    assert len(volumes) == 3
    paths = []
    for i, volume in enumerate(volumes):
        paths.append(tmp_path / f"{i}.nii")
        write_nifti(paths[-1], volume, np.eye(4))
    training = _training_batch(paths, train)
    edge = np.concatenate([preprocess(v, spec) for v in volumes])
    assert edge.shape == training.shape == (3, 1, *(input_shape or ingest.shape))
    assert float(np.max(np.abs(edge - training))) < 1e-5

    from shiftguard.export.stage import export_onnx

    onnx = export_onnx(network, torch.from_numpy(edge[:1]))
    with torch.no_grad():
        expected = network(torch.from_numpy(training)).numpy()
    got = onnx_logits(onnx, edge)
    assert float(np.max(np.abs(sigmoid(got) - sigmoid(expected)))) < 1e-4
    assert float(np.max(np.abs(got - expected))) < 1e-4


def test_percentiles_of_a_large_volume_do_not_partition_all_of_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x = np.random.default_rng(4).gamma(2.0, 300.0, (80, 96, 80)).astype(np.float32)
    x[:20] = 0.0  # a background of ties
    expected = np.percentile(x, [1, 99])

    def whole_array(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("np.percentile was called on the whole volume")

    monkeypatch.setattr(np, "percentile", whole_array)
    assert np.array_equal(percentiles(x, [1, 99]), expected)
