from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from shiftguard.augment.params import SimParams
from shiftguard.augment.profiles import bias_coefficient_count, draw, scaled_ranges
from shiftguard.config import ConfigError, compose, compose_section, validate, validate_all
from shiftguard.config.schema import AugmentConfig, ScannerSimProfile

SHAPE = (32, 28, 24)
REAL_SHIFTS = {"low_field", "thick_slice", "motion_prone", "legacy_vendor", "rf_spike"}


@pytest.fixture(scope="module")
def augment(conf_dir: Path) -> AugmentConfig:
    return compose_section("augment", AugmentConfig, conf_dir=conf_dir)


def _scanner_options(conf_dir: Path) -> list[str]:
    return sorted(p.stem for p in (conf_dir / "scanner_sim").glob("*.yaml"))


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def test_every_scanner_profile_composes_and_validates(conf_dir: Path) -> None:
    # conf/scanner_sim/ is not a top-level section (it is composed into augment.profiles), so the
    # config test's loop over SCHEMAS does not see it: compose each option on its own here.
    options = _scanner_options(conf_dir)
    assert set(options) >= REAL_SHIFTS
    for option in options:
        data = compose([f"+scanner_sim={option}"], conf_dir)["scanner_sim"]
        profile = validate(f"scanner_sim.{option}", data, ScannerSimProfile)
        assert profile.description.strip()
        assert any(getattr(profile, name) is not None for name in SimParams.__dataclass_fields__)


def test_default_augment_composes_every_scanner_profile(
    conf_dir: Path, augment: AugmentConfig
) -> None:
    options = _scanner_options(conf_dir)
    assert sorted(augment.profiles) == options
    assert sorted(augment.robustness.profiles) == options
    assert augment.robustness.severities == [0, 1, 2, 3, 4]
    assert augment.enabled and 0 < augment.probability <= 1
    for option in options:  # the composed profile is the file, unchanged
        alone = compose([f"+scanner_sim={option}"], conf_dir)["scanner_sim"]
        assert augment.profiles[option] == ScannerSimProfile.model_validate(alone)


def test_augment_none_disables_training_augmentation_but_keeps_the_robustness_sets(
    conf_dir: Path, augment: AugmentConfig
) -> None:
    config = compose(["augment=none"], conf_dir)  # what `dvc exp run -S augment=none` composes
    none = validate_all(config)["augment"]
    assert isinstance(none, AugmentConfig)
    assert not none.enabled
    assert none.robustness == augment.robustness
    assert none.profiles == augment.profiles


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("augment.severity=[-1,2]", "augment.severity.0"),
        ("augment.severity=[1,5]", "augment.severity.1"),
        ("augment.severity=[3,1]", "augment.severity"),
        ("augment.robustness.severities=[0,1,5]", "augment.robustness.severities.2"),
        ("augment.robustness.severities=[-1,0]", "augment.robustness.severities.0"),
        ("+augment.profile_weights.nonexistent=1.0", "augment.profile_weights"),
        ("augment.robustness.profiles=[low_field,nonexistent]", "augment.robustness.profiles"),
        ("augment.profiles.low_field.noise.std=[0.2,0.1]", "augment.profiles.low_field.noise.std"),
        ("augment.profiles.low_field.noise.std=[-0.1,0.1]", "augment.profiles.low_field.noise.std"),
        (
            "augment.profiles.motion_prone.motion.degrees=[5,-5]",
            "augment.profiles.motion_prone.motion.degrees",
        ),
        (
            "augment.profiles.thick_slice.anisotropy.downsampling=[0.5,2]",
            "augment.profiles.thick_slice.anisotropy.downsampling",
        ),
        (
            "augment.profiles.motion_prone.ghosting.axes=[3]",
            "augment.profiles.motion_prone.ghosting.axes",
        ),
        ("augment.probability=1.5", "augment.probability"),
        ("augment.backend=cuda", "augment.backend"),
        ("+augment.profiles.low_field.noize.std=[0,1]", "augment.profiles.low_field.noize"),
    ],
)
def test_bad_augment_values_fail_at_load_time_naming_the_key(
    conf_dir: Path, override: str, names: str
) -> None:
    with pytest.raises(ConfigError) as info:
        compose_section("augment", AugmentConfig, [override], conf_dir)
    assert names in str(info.value)
    if "nonexistent" in override:
        assert "'nonexistent'" in str(info.value)


def test_a_reversed_range_in_a_scanner_file_names_the_profile_key(conf_dir: Path) -> None:
    data = compose(["+scanner_sim=low_field", "scanner_sim.noise.std=[0.3,0.1]"], conf_dir)[
        "scanner_sim"
    ]
    with pytest.raises(ConfigError, match=r"scanner_sim\.low_field\.noise\.std: .*minimum 0\.3"):
        validate("scanner_sim.low_field", data, ScannerSimProfile)


def test_robustness_profiles_must_be_in_the_catalogue_even_when_disabled(conf_dir: Path) -> None:
    base = compose(["augment=none"], conf_dir)["augment"]
    empty = {**base, "profiles": {}, "profile_weights": {}}
    with pytest.raises(ConfigError, match=r"augment\.robustness\.profiles: unknown .*'low_field'"):
        validate("augment", empty, AugmentConfig)


def test_all_zero_weights_fail_only_when_augmentation_is_enabled(conf_dir: Path) -> None:
    base = compose(conf_dir=conf_dir)["augment"]
    zero = {**base, "profile_weights": dict.fromkeys(base["profiles"], 0.0)}
    with pytest.raises(ConfigError, match=r"augment\.profile_weights: at least one weight"):
        validate("augment", zero, AugmentConfig)
    assert not validate("augment", {**zero, "enabled": False}, AugmentConfig).enabled


# --------------------------------------------------------------------------------------------------
# Severity scaling
# --------------------------------------------------------------------------------------------------


def test_severity_4_is_the_profile_as_written(augment: AugmentConfig) -> None:
    for profile in augment.profiles.values():
        assert scaled_ranges(profile, 4) == profile


def test_severity_scales_each_end_towards_the_identity(augment: AugmentConfig) -> None:
    low = augment.profiles["low_field"]
    assert low.noise is not None and low.blur is not None
    half = scaled_ranges(low, 2)
    assert half.noise is not None and half.blur is not None and half.bias_field is not None
    assert half.noise.std == pytest.approx((low.noise.std[0] / 2, low.noise.std[1] / 2))
    assert half.blur.std == pytest.approx((low.blur.std[0] / 2, low.blur.std[1] / 2))
    assert half.noise.rician == low.noise.rician
    assert half.bias_field.order == low.bias_field.order  # type: ignore[union-attr]

    thick = augment.profiles["thick_slice"]  # down-sampling: identity 1
    assert thick.anisotropy is not None
    lo, hi = thick.anisotropy.downsampling
    quarter = scaled_ranges(thick, 1).anisotropy
    assert quarter is not None
    assert quarter.downsampling == pytest.approx((1 + (lo - 1) / 4, 1 + (hi - 1) / 4))
    assert scaled_ranges(thick, 0).anisotropy.downsampling == (1.0, 1.0)  # type: ignore[union-attr]

    motion = augment.profiles["motion_prone"]  # signed ranges shrink symmetrically
    assert motion.motion is not None
    m1 = scaled_ranges(motion, 1).motion
    assert m1 is not None
    assert m1.degrees == pytest.approx((motion.motion.degrees[0] / 4, motion.motion.degrees[1] / 4))


def test_counts_scale_round_half_up_and_stay_at_least_one() -> None:
    profile = ScannerSimProfile.model_validate(
        {
            "description": "counts",
            "ghosting": {"num_ghosts": [2, 10], "intensity": [0.2, 0.6]},
            "spike": {"num_spikes": [1, 1], "intensity": [0.5, 1.0]},
        }
    )
    ghosts = [scaled_ranges(profile, s).ghosting.num_ghosts for s in range(5)]  # type: ignore[union-attr]
    assert ghosts == [(0, 0), (1, 3), (1, 5), (2, 8), (2, 10)]
    spikes = [scaled_ranges(profile, s).spike.num_spikes for s in range(5)]  # type: ignore[union-attr]
    assert spikes == [(0, 0), (1, 1), (1, 1), (1, 1), (1, 1)]


@pytest.mark.parametrize("severity", [-1, 5, 2.5, True])
def test_a_severity_outside_0_to_4_is_refused(augment: AugmentConfig, severity: int) -> None:
    profile = augment.profiles["low_field"]
    with pytest.raises(ValueError, match="severity must be an integer from 0 to 4"):
        draw(profile, severity, np.random.default_rng(0), SHAPE)
    with pytest.raises(ValueError, match="severity"):
        scaled_ranges(profile, severity)


# --------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------


def test_severity_0_draws_the_identity(augment: AugmentConfig) -> None:
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    for profile in augment.profiles.values():
        params = draw(profile, 0, rng, SHAPE)
        assert params == SimParams()
        assert params.is_identity()
    assert rng.bit_generator.state == state  # nothing drawn


def _inside(value: float, bounds: tuple[float, float]) -> bool:
    return bounds[0] - 1e-12 <= value <= bounds[1] + 1e-12


def _check_within(params: SimParams, r: ScannerSimProfile) -> None:
    for name in SimParams.__dataclass_fields__:
        assert (getattr(params, name) is None) == (getattr(r, name) is None), name
    if params.motion is not None and r.motion is not None:
        m = params.motion
        n = len(m.times)
        assert _inside(n, r.motion.num_transforms)
        assert len(m.degrees) == len(m.translation) == n
        assert all(_inside(v, r.motion.degrees) for triple in m.degrees for v in triple)
        assert all(_inside(v, r.motion.translation) for triple in m.translation for v in triple)
        assert list(m.times) == sorted(m.times) and all(0 < t < 1 for t in m.times)
    if params.ghosting is not None and r.ghosting is not None:
        g = params.ghosting
        assert _inside(g.num_ghosts, r.ghosting.num_ghosts) and g.num_ghosts >= 1
        assert g.axis in r.ghosting.axes
        assert _inside(g.intensity, r.ghosting.intensity)
        assert g.restore == r.ghosting.restore
    if params.spike is not None and r.spike is not None:
        positions = np.asarray(params.spike.positions)
        assert _inside(len(positions), r.spike.num_spikes) and len(positions) >= 1
        assert positions.shape[1] == 3 and ((positions >= 0) & (positions < 1)).all()
        centre = np.asarray(SHAPE) // 2
        indices = np.floor(positions * np.asarray(SHAPE)).astype(int)
        assert not (indices == centre).all(axis=1).any(), "a spike on the k-space centre"
        assert _inside(params.spike.intensity, r.spike.intensity)
    if params.blur is not None and r.blur is not None:
        assert len(params.blur.std_mm) == 3
        assert all(_inside(v, r.blur.std) for v in params.blur.std_mm)
    if params.anisotropy is not None and r.anisotropy is not None:
        assert params.anisotropy.axis in r.anisotropy.axes
        assert _inside(params.anisotropy.downsampling, r.anisotropy.downsampling)
    if params.bias_field is not None and r.bias_field is not None:
        b = params.bias_field
        assert b.order == r.bias_field.order
        assert len(b.coefficients) == bias_coefficient_count(b.order)
        assert max(abs(c) for c in b.coefficients) <= r.bias_field.coefficients[1] + 1e-12
    if params.noise is not None and r.noise is not None:
        assert _inside(params.noise.std, r.noise.std)
        assert params.noise.rician == r.noise.rician
        assert isinstance(params.noise.seed, int) and 0 <= params.noise.seed < 2**31
    if params.gamma is not None and r.gamma is not None:
        assert _inside(math.log(params.gamma), r.gamma.log_gamma)
    if params.scale is not None and r.scale is not None:
        assert _inside(math.log(params.scale), r.scale.log_scale)


@pytest.mark.parametrize("severity", [1, 2, 3, 4])
def test_drawn_parameters_lie_within_the_scaled_ranges(
    augment: AugmentConfig, severity: int
) -> None:
    rng = np.random.default_rng(severity)
    for profile in augment.profiles.values():
        ranges = scaled_ranges(profile, severity)
        for _ in range(150):
            _check_within(draw(profile, severity, rng, SHAPE), ranges)


def test_draws_spread_over_the_range_not_only_its_ends(augment: AugmentConfig) -> None:
    profile = augment.profiles["low_field"]
    assert profile.noise is not None
    lo, hi = scaled_ranges(profile, 3).noise.std  # type: ignore[union-attr]
    rng = np.random.default_rng(1)
    stds = np.array([draw(profile, 3, rng, SHAPE).noise.std for _ in range(300)])  # type: ignore[union-attr]
    assert stds.min() < lo + 0.1 * (hi - lo) and stds.max() > hi - 0.1 * (hi - lo)
    assert abs(stds.mean() - (lo + hi) / 2) < 0.1 * (hi - lo)
    bias = augment.profiles["high_field_3t"]
    signs = np.concatenate(
        [draw(bias, 4, rng, SHAPE).bias_field.coefficients for _ in range(50)]  # type: ignore[union-attr]
    )
    assert (signs < 0).any() and (signs > 0).any()


def test_same_generator_state_draws_the_same_parameters(augment: AugmentConfig) -> None:
    for profile in augment.profiles.values():
        a = draw(profile, 3, np.random.default_rng(7), SHAPE)
        b = draw(profile, 3, np.random.default_rng(7), SHAPE)
        c = draw(profile, 3, np.random.default_rng(8), SHAPE)
        assert a == b
        assert a != c


def test_every_random_number_comes_from_the_given_generator(augment: AugmentConfig) -> None:
    import torch

    np.random.seed(0)
    torch.manual_seed(0)
    untouched = (np.random.random(), float(torch.rand(1)))
    np.random.seed(0)
    torch.manual_seed(0)
    first = [draw(p, 4, np.random.default_rng(3), SHAPE) for p in augment.profiles.values()]
    assert (np.random.random(), float(torch.rand(1))) == untouched  # global streams not consumed
    np.random.seed(1)
    torch.manual_seed(1)
    again = [draw(p, 4, np.random.default_rng(3), SHAPE) for p in augment.profiles.values()]
    assert first == again


def test_drawn_parameters_are_plain_json(augment: AugmentConfig) -> None:
    import json

    for profile in augment.profiles.values():
        record = draw(profile, 4, np.random.default_rng(0), SHAPE).to_dict()
        assert json.loads(json.dumps(record)) is not None
