from __future__ import annotations

import itertools
import json
import sys
import types
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, list_data_collate
from monai.transforms import Compose

from shiftguard.augment.params import Anisotropy, Noise, SimParams
from shiftguard.augment.profiles import draw
from shiftguard.augment.transforms import (
    BackendUnavailableError,
    RandScannerSimd,
    ScannerSim,
    ScannerSimd,
    apply_function,
)
from shiftguard.config import compose_section
from shiftguard.config.schema import AugmentConfig

SPACING = (2.0, 2.0, 2.0)
SHAPE = (32, 32, 32)


def _fast_available() -> bool:
    try:
        apply_function("fast")
    except BackendUnavailableError:
        return False
    return True


FAST = _fast_available()
BACKENDS = ["torchio", "fast"] if FAST else ["torchio"]


@pytest.fixture(scope="module")
def augment(conf_dir: Path) -> AugmentConfig:
    return compose_section("augment", AugmentConfig, conf_dir=conf_dir)


@pytest.fixture(scope="module")
def phantom() -> np.ndarray:
    """``(1, 32, 32, 32)`` head-like phantom: a bright shell, a darker core, a small lesion."""
    grid = np.stack(np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in SHAPE), indexing="ij"))
    radius = np.sqrt((grid**2).sum(0))
    volume = 0.8 * (radius < 13) + 0.4 * (radius < 8)
    volume += 0.3 * (np.sqrt(((grid - np.array([4, -3, 2])[:, None, None, None]) ** 2).sum(0)) < 3)
    return volume[None].astype(np.float32)


def _sample(volume: np.ndarray) -> dict[str, Any]:
    label = (volume > 1.0).astype(np.uint8)
    return {"image": volume.copy(), "label": label, "id": "sub-01"}


# --------------------------------------------------------------------------------------------------
# ScannerSim
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_parameters_return_the_input_exactly(phantom: np.ndarray, backend: str) -> None:
    out = ScannerSim(SimParams(), SPACING, backend)(phantom)  # type: ignore[arg-type]
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert torch.equal(out, torch.from_numpy(phantom))
    tensor = torch.from_numpy(phantom)
    again = ScannerSim(SimParams(), None, backend)(tensor)  # type: ignore[arg-type]
    assert torch.equal(again, tensor) and again.data_ptr() != tensor.data_ptr()  # a copy


@pytest.mark.parametrize("backend", BACKENDS)
def test_scanner_sim_is_deterministic_and_changes_the_image(
    augment: AugmentConfig, phantom: np.ndarray, backend: str
) -> None:
    for name, profile in augment.profiles.items():
        params = draw(profile, 3, np.random.default_rng(0), SHAPE)
        sim = ScannerSim(params, SPACING, backend)  # type: ignore[arg-type]
        a, b = sim(phantom), sim(torch.from_numpy(phantom))
        assert a.shape == phantom.shape and a.dtype == torch.float32
        assert torch.isfinite(a).all(), name
        assert torch.equal(a, b), name
        assert not torch.allclose(a, torch.from_numpy(phantom), atol=1e-3), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_scanner_sim_leaves_torchs_global_generator_alone(
    augment: AugmentConfig, phantom: np.ndarray, backend: str
) -> None:
    """Dropout draws from torch's global generator. TorchIO's transforms draw from it too (their
    probability check): the fast path's slice-thickness tables, computed once per new geometry, did,
    so a second training run in one process differed from the first."""
    if FAST:  # the tables of a geometry seen before come from a cache
        import shiftguard.augment.fast

        shiftguard.augment.fast._anisotropy_tables.cache_clear()
    thick = SimParams(anisotropy=Anisotropy(axis=2, downsampling=2.37))
    drawn = [draw(p, 4, np.random.default_rng(1), SHAPE) for p in augment.profiles.values()]
    for params in [thick, *drawn]:
        state = torch.random.get_rng_state()
        ScannerSim(params, SPACING, backend)(phantom)  # type: ignore[arg-type]
        assert torch.equal(torch.random.get_rng_state(), state), params


def test_scanner_sim_keeps_a_metatensor_and_reads_its_spacing(phantom: np.ndarray) -> None:
    affine = torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0], dtype=torch.float64))
    image = MetaTensor(torch.from_numpy(phantom), affine=affine, meta={"filename_or_obj": "x.nii"})
    params = SimParams(noise=Noise(std=0.05, seed=1))
    out = ScannerSim(params, backend="torchio")(image)
    assert isinstance(out, MetaTensor)
    assert torch.equal(out.affine, affine) and out.meta["filename_or_obj"] == "x.nii"
    expected = ScannerSim(params, (2.0, 2.0, 3.0), backend="torchio")(phantom)
    assert torch.equal(out.as_tensor(), expected)


def test_scanner_sim_refuses_a_volume_without_channels_or_spacing(phantom: np.ndarray) -> None:
    params = SimParams(scale=2.0)
    with pytest.raises(ValueError, match=r"\(C, X, Y, Z\)"):
        ScannerSim(params, SPACING, "torchio")(phantom[0])
    with pytest.raises(ValueError, match="spacing is unknown"):
        ScannerSim(params, None, "torchio")(phantom)
    with pytest.raises(ValueError, match="backend"):
        ScannerSim(params, SPACING, "cuda")  # type: ignore[arg-type]


@pytest.fixture
def without_fast(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """``import shiftguard.augment.fast`` fails as if the module were not there."""
    apply_function.cache_clear()
    monkeypatch.setitem(sys.modules, "shiftguard.augment.fast", None)
    yield monkeypatch
    apply_function.cache_clear()


def test_the_fast_backend_fails_clearly_only_when_used(
    phantom: np.ndarray, without_fast: pytest.MonkeyPatch
) -> None:
    sim = ScannerSim(SimParams(scale=2.0), SPACING, "fast")  # constructing is fine
    assert torch.equal(ScannerSim(SimParams(), SPACING, "fast")(phantom), torch.from_numpy(phantom))
    with pytest.raises(BackendUnavailableError, match="backend='torchio'"):
        sim(phantom)
    without_fast.setitem(sys.modules, "shiftguard.augment.fast", types.ModuleType("fast"))
    with pytest.raises(BackendUnavailableError, match="has no apply_fast"):
        sim(phantom)
    assert torch.equal(
        ScannerSim(SimParams(scale=2.0), SPACING, "torchio")(phantom),
        torch.from_numpy(phantom) * 2,
    )


# --------------------------------------------------------------------------------------------------
# RandScannerSimd
# --------------------------------------------------------------------------------------------------


def _rand(augment: AugmentConfig, backend: str = "torchio", **kwargs: object) -> RandScannerSimd:
    options: dict[str, object] = {
        "weights": augment.profile_weights,
        "severity_range": (1, 4),
        "prob": 1.0,
        "spacing": SPACING,
        "backend": backend,
    }
    options.update(kwargs)
    return RandScannerSimd(["image"], augment.profiles, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_output_different_seed_different_output(
    augment: AugmentConfig, phantom: np.ndarray, backend: str
) -> None:
    def run(seed: int) -> list[dict[str, Any]]:
        pipeline = Compose([_rand(augment, backend)])
        pipeline.set_random_state(seed=seed)
        return [pipeline(_sample(phantom)) for _ in range(3)]

    first, again, other = run(0), run(0), run(1)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["image"], b["image"])
        assert a["scanner_sim"] == b["scanner_sim"]
    assert any(not torch.equal(a["image"], c["image"]) for a, c in zip(first, other, strict=True))
    assert [s["scanner_sim"] for s in first] != [s["scanner_sim"] for s in other]
    # consecutive calls draw afresh
    assert len({json.dumps(s["scanner_sim"], sort_keys=True) for s in first}) == 3


def test_only_listed_keys_change_and_the_draw_is_recorded(
    augment: AugmentConfig, phantom: np.ndarray
) -> None:
    sample = _sample(phantom)
    transform = _rand(augment).set_random_state(seed=3)
    out = transform(sample)
    assert out["label"] is sample["label"] and out["id"] == "sub-01"
    assert sample["image"] is not out["image"] and np.array_equal(sample["image"], phantom)
    record = out["scanner_sim"]
    assert record["applied"] is True
    assert record["profile"] in augment.profiles and 1 <= record["severity"] <= 4
    params = json.loads(record["params"])
    assert set(params) == set(SimParams.__dataclass_fields__)
    # the recorded parameters are the ones drawn from the seed taken from R, and were applied
    rng = np.random.default_rng(transform.seed)
    again = draw(augment.profiles[record["profile"]], record["severity"], rng, SHAPE)
    assert json.dumps(again.to_dict(), sort_keys=True) == record["params"]
    expected = ScannerSim(again, SPACING, "torchio")(phantom)
    assert torch.equal(out["image"], expected)


def test_severity_0_is_the_identity(augment: AugmentConfig, phantom: np.ndarray) -> None:
    transform = _rand(augment, severity_range=(0, 0)).set_random_state(seed=0)
    for _ in range(len(augment.profiles)):
        out = transform(_sample(phantom))
        assert torch.equal(out["image"], torch.from_numpy(phantom))
        assert out["scanner_sim"]["applied"] and out["scanner_sim"]["severity"] == 0
        assert json.loads(out["scanner_sim"]["params"]) == SimParams().to_dict()


def test_prob_decides_per_sample_whether_to_apply(
    augment: AugmentConfig, phantom: np.ndarray
) -> None:
    never = _rand(augment, prob=0.0).set_random_state(seed=0)
    out = never(_sample(phantom))
    assert torch.equal(torch.as_tensor(out["image"]), torch.from_numpy(phantom))
    assert out["scanner_sim"] == {
        "applied": False,
        "profile": "",
        "severity": 0,
        "params": json.dumps(SimParams().to_dict(), sort_keys=True),
    }
    half = _rand(augment, prob=0.5).set_random_state(seed=0)
    applied = []
    for _ in range(400):
        half.randomize()
        applied.append(half._do_transform)
    assert 0.4 < np.mean(applied) < 0.6


def test_profiles_and_severities_are_drawn_by_their_weights(augment: AugmentConfig) -> None:
    transform = _rand(
        augment,
        weights={"low_field": 3.0, "rf_spike": 1.0, "thick_slice": 0.0},
        severity_range=(2, 3),
    ).set_random_state(seed=0)
    profiles: Counter[str] = Counter()
    severities: Counter[int] = Counter()
    for _ in range(2000):
        transform.randomize()
        profiles[transform.profile] += 1
        severities[transform.severity] += 1
    assert set(profiles) == {"low_field", "rf_spike"}
    assert 0.7 < profiles["low_field"] / 2000 < 0.8
    assert set(severities) == {2, 3} and 0.45 < severities[2] / 2000 < 0.55
    uniform = _rand(augment, weights=None).set_random_state(seed=0)
    seen = set()
    for _ in range(200):
        uniform.randomize()
        seen.add(uniform.profile)
    assert seen == set(augment.profiles)


def test_bad_arguments_are_refused(augment: AugmentConfig) -> None:
    with pytest.raises(ValueError, match="unknown profile"):
        _rand(augment, weights={"nonexistent": 1.0})
    with pytest.raises(ValueError, match="severity_range"):
        _rand(augment, severity_range=(0, 5))
    with pytest.raises(ValueError, match="severity_range"):
        _rand(augment, severity_range=(3, 1))
    with pytest.raises(ValueError, match="nothing to draw"):
        _rand(augment, weights=dict.fromkeys(augment.profiles, 0.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_higher_severity_deviates_more_from_the_input(
    augment: AugmentConfig, phantom: np.ndarray, backend: str
) -> None:
    reference = torch.from_numpy(phantom)
    for name, profile in augment.profiles.items():
        deviation = []
        for severity in range(5):
            errors = []
            for seed in range(4):  # the same seeds at every severity: a paired comparison
                params = draw(profile, severity, np.random.default_rng(seed), SHAPE)
                out = ScannerSim(params, SPACING, backend)(phantom)  # type: ignore[arg-type]
                errors.append(float((out - reference).abs().mean()))
            deviation.append(np.mean(errors))
        assert deviation[0] == 0.0, name
        assert all(b > a for a, b in itertools.pairwise(deviation)), (name, deviation)


def test_spacing_comes_from_the_data_when_asked(
    augment: AugmentConfig, phantom: np.ndarray
) -> None:
    params = draw(augment.profiles["low_field"], 4, np.random.default_rng(0), SHAPE)
    sample = {**_sample(phantom), "spacing": np.array([2.0, 2.0, 3.0])}
    out = ScannerSimd(["image"], params, spacing_key="spacing", backend="torchio")(sample)
    assert torch.equal(out["image"], ScannerSim(params, (2.0, 2.0, 3.0), "torchio")(phantom))
    assert out["label"] is sample["label"]
    with pytest.raises(KeyError, match="spacing_key"):
        ScannerSimd(["image"], params, spacing_key="pixdim", backend="torchio")(sample)
    rand = _rand(augment, spacing=None, spacing_key="spacing").set_random_state(seed=0)
    assert rand(sample)["scanner_sim"]["applied"]


def test_from_config_follows_the_augment_section(
    conf_dir: Path, augment: AugmentConfig, phantom: np.ndarray
) -> None:
    cfg = augment.model_copy(update={"backend": "torchio"})
    transform = RandScannerSimd.from_config(["image"], cfg, spacing=SPACING)
    assert transform.prob == cfg.probability and transform.severity_range == cfg.severity
    assert set(transform.names) == {n for n, w in cfg.profile_weights.items() if w > 0}
    assert transform.sim_backend == "torchio"
    assert transform.set_random_state(seed=0)(_sample(phantom))["scanner_sim"]["params"]

    none = compose_section("augment", AugmentConfig, ["augment=none"], conf_dir)
    disabled = RandScannerSimd.from_config(["image"], none, spacing=SPACING).set_random_state(0)
    for _ in range(5):
        out = disabled(_sample(phantom))
        assert not out["scanner_sim"]["applied"]
        assert torch.equal(torch.as_tensor(out["image"]), torch.from_numpy(phantom))


def test_records_collate_into_a_batch(augment: AugmentConfig, phantom: np.ndarray) -> None:
    transform = _rand(augment, prob=0.5).set_random_state(seed=0)
    samples = [transform(_sample(phantom)) for _ in range(4)]
    for s in samples:
        s["image"] = torch.as_tensor(s["image"])
    batch = list_data_collate(samples)
    assert batch["image"].shape == (4, *phantom.shape)
    assert len(batch["scanner_sim"]["profile"]) == 4
    assert batch["scanner_sim"]["severity"].shape == (4,)
