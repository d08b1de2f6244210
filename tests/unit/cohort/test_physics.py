"""MR physics of the cohort: signal equations against textbook values, field dependence, and the
k-space acquisition's ringing, partial Fourier, noise level and noise texture."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from shiftguard.cohort import kspace, physics
from shiftguard.cohort.demographics import sample_subjects
from shiftguard.cohort.render import render_subject
from shiftguard.config.schema import CohortConfig, ScannerProfile

DEFAULT = Path(__file__).resolve().parents[3] / "conf" / "cohort" / "default.yaml"


def default_cohort(**update: object) -> CohortConfig:
    raw = yaml.safe_load(DEFAULT.read_text(encoding="utf-8"))
    raw.update(update)
    return CohortConfig(**raw)


def one(value: float) -> np.ndarray:
    return np.array([value], dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# signal equations
# --------------------------------------------------------------------------------------------------


def test_spgr_peaks_at_the_ernst_angle_with_the_textbook_maximum() -> None:
    t1, tr = 900.0, 10.0
    e1 = math.exp(-tr / t1)
    flips = np.linspace(1.0, 40.0, 3901)
    signal = [
        float(physics.spgr(one(1), one(t1), one(1e9), tr=tr, te=0.0, flip_deg=f)[0]) for f in flips
    ]
    best = flips[int(np.argmax(signal))]
    assert best == pytest.approx(math.degrees(math.acos(e1)), abs=0.02)
    assert max(signal) == pytest.approx(math.sqrt((1 - e1) / (1 + e1)), rel=1e-6)
    # T2* decay at the echo time
    s0 = physics.spgr(one(1), one(t1), one(50.0), tr=tr, te=0.0, flip_deg=10.0)
    s5 = physics.spgr(one(1), one(t1), one(50.0), tr=tr, te=5.0, flip_deg=10.0)
    assert float(s5[0] / s0[0]) == pytest.approx(math.exp(-5.0 / 50.0))


def test_spin_echo_limits_and_inversion_recovery_null() -> None:
    pd, t1, t2 = one(0.8), one(1000.0), one(100.0)
    # long TR: proton density times T2 decay
    long_tr = physics.spin_echo(pd, t1, t2, tr=1e6, te=20.0)
    assert float(long_tr[0]) == pytest.approx(0.8 * math.exp(-0.2), rel=1e-9)
    # short TE: saturation recovery 1 - exp(-TR/T1)
    short_te = physics.spin_echo(pd, t1, t2, tr=500.0, te=1e-6)
    assert float(short_te[0]) == pytest.approx(0.8 * (1 - math.exp(-0.5)), rel=1e-6)
    # FLAIR nulls a tissue at TI = T1 ln(2 / (1 + exp(-TR/T1))), and is negative before it
    csf_t1, tr = 4300.0, 9000.0
    null = csf_t1 * math.log(2.0 / (1.0 + math.exp(-tr / csf_t1)))
    s = physics.inversion_recovery(one(1), one(csf_t1), one(2000.0), tr=tr, te=100.0, ti=null)
    assert abs(float(s[0])) < 1e-12
    before = physics.inversion_recovery(
        one(1), one(csf_t1), one(2000.0), tr=tr, te=100.0, ti=null - 200
    )
    assert float(before[0]) < 0


def test_ir_gre_with_tiny_flips_is_plain_inversion_recovery() -> None:
    t1, ti, shot = one(1000.0), 700.0, 2500.0
    s = physics.ir_gre(
        one(1),
        t1,
        one(1e9),
        ti=ti,
        te=0.0,
        flip_deg=0.001,
        readout_tr=5.0,
        shot_interval=shot,
        readouts=64,
    )
    e = math.exp(-shot / 1000.0)
    expected = 1 - 2 * math.exp(-ti / 1000.0) / (1 + e)  # steady state of invert-recover
    assert float(s[0]) / math.sin(math.radians(0.001)) == pytest.approx(expected, rel=1e-4)


def _bloch_ir_gre(t1: float, ti: float, flip: float, esp: float, shot: float, n: int) -> float:
    """Brute force: Mz stepped through many shots (0.1 ms steps) until the shots repeat."""
    dt = 0.1
    cos_a = math.cos(math.radians(flip))
    first = ti - (n // 2) * esp
    pulses = {round((first + i * esp) / dt): i for i in range(n)}
    steps = round(shot / dt)
    e = math.exp(-dt / t1)
    mz, seen = 1.0, 0.0
    for _ in range(40):
        mz = -mz
        for step in range(steps):
            if step in pulses:
                if pulses[step] == n // 2:
                    seen = mz
                mz *= cos_a
            mz = 1.0 + (mz - 1.0) * e
    return seen * math.sin(math.radians(flip))


@pytest.mark.parametrize("t1", [380.0, 890.0, 1300.0, 4300.0])
def test_ir_gre_steady_state_matches_a_brute_force_bloch_simulation(t1: float) -> None:
    args = {"ti": 900.0, "flip": 9.0, "esp": 7.0, "shot": 2300.0, "n": 100}
    closed = physics.ir_gre(
        one(1.0),
        one(t1),
        one(1e9),
        ti=args["ti"],
        te=0.0,
        flip_deg=args["flip"],
        readout_tr=args["esp"],
        shot_interval=args["shot"],
        readouts=int(args["n"]),
    )
    brute = _bloch_ir_gre(t1, args["ti"], args["flip"], args["esp"], args["shot"], int(args["n"]))
    assert float(closed[0]) == pytest.approx(brute, abs=2e-4)


def test_mprage_has_more_grey_white_contrast_than_spin_echo_and_inversion_time_drives_it() -> None:
    cfg = default_cohort()
    assert cfg.physics is not None

    def ratio(profile: ScannerProfile) -> float:
        t = physics.relaxation_at(cfg.physics, profile.field_strength)  # type: ignore[arg-type]
        s = np.abs(physics.sequence_signal(profile, t))
        return float(s[t.index("gm")] / s[t.index("wm")])

    mprage, spin_echo = cfg.scanners["skyra_3t"], cfg.scanners["echelon_15t"]
    assert 0.5 < ratio(mprage) < 0.75 < ratio(spin_echo) < 0.98
    # a later inversion time lets grey matter recover further: less T1 contrast
    later = mprage.model_copy(update={"inversion_time": 1100.0})
    assert ratio(later) > ratio(mprage)


def test_relaxation_follows_the_field() -> None:
    cfg = default_cohort()
    assert cfg.physics is not None
    low, mid, high = (physics.relaxation_at(cfg.physics, b) for b in (0.55, 1.5, 3.0))
    for name in ("gm", "wm"):
        i = low.index(name)
        assert low.t1[i] < mid.t1[i] < high.t1[i]
        assert mid.t1[i] == cfg.physics.tissues[name].t1_ms[0]
        assert low.t2s[i] > high.t2s[i]
    # T1 contrast between grey and white matter shrinks at low field (shorter, closer T1s)
    assert (
        low.t1[low.index("gm")] - low.t1[low.index("wm")]
        < high.t1[high.index("gm")] - high.t1[high.index("wm")]
    )


def test_a_train_that_does_not_fit_is_refused_by_the_config() -> None:
    cfg = default_cohort()
    raw = cfg.scanners["skyra_3t"].model_dump()
    with pytest.raises(ValueError, match="does not fit"):
        ScannerProfile(**{**raw, "inversion_time": 300.0})
    with pytest.raises(ValueError, match="repetition_time"):
        ScannerProfile(**{**raw, "repetition_time": 2000.0})


# --------------------------------------------------------------------------------------------------
# k-space acquisition
# --------------------------------------------------------------------------------------------------


def flat_profile(**update: object) -> ScannerProfile:
    base = {
        "manufacturer": "X",
        "model": "Y",
        "field_strength": 1.5,
        "matrix": (64, 64),
        "pixel_spacing": (2.0, 2.0),
        "slice_thickness": 2.0,
        "slice_spacing": 2.0,
        "n_slices": 8,
        "repetition_time": 10.0,
        "echo_time": 3.0,
    }
    return ScannerProfile(**{**base, **update})


def disc(shape: tuple[int, int, int], radius: float) -> np.ndarray:
    k, r, c = shape
    y, x = np.mgrid[:r, :c]
    inside = (y - r / 2 + 0.3) ** 2 + (x - c / 2 + 0.3) ** 2 < radius**2
    return np.repeat(inside[None].astype(np.float32), k, axis=0)


def test_truncation_rings_and_apodisation_suppresses_it() -> None:
    obj = disc((2, 256, 256), 70.0)  # 4x finer than the 64 matrix: sharp edge
    rng = np.random.default_rng(0)
    plain = kspace.acquire(obj, flat_profile(), rng, 0.0)
    hamming = kspace.acquire(obj, flat_profile(apodisation="hamming"), rng, 0.0)
    # Gibbs: about 9 % overshoot next to the edge without a filter, under 1 % with Hamming
    assert 1.05 < plain.max() < 1.14
    assert hamming.max() < 1.01
    # and the ringing is of the acquisition's frequency: a smaller acquisition matrix rings wider
    coarse = kspace.acquire(obj, flat_profile(acquisition_matrix=(32, 32)), rng, 0.0)
    line_plain, line_coarse = plain[0, 32, 32:], coarse[0, 32, 32:]
    first_peak = lambda line: int(np.argmax(line))  # noqa: E731 - distance of the overshoot from the centre
    assert first_peak(line_coarse) <= first_peak(line_plain)
    assert abs(line_coarse - 1)[:10].max() > abs(line_plain - 1)[:10].max()


def edge_width(profile: np.ndarray) -> int:
    """Samples between 10 % and 90 % of a rising edge."""
    p = (profile - profile.min()) / (profile.max() - profile.min())
    return int(np.argmax(p > 0.9) - np.argmax(p > 0.1))


def test_partial_fourier_blurs_along_the_phase_encoding_axis_only() -> None:
    obj = disc((1, 256, 256), 70.0)
    rng = np.random.default_rng(0)
    full = kspace.acquire(obj, flat_profile(phase_encoding_direction="ROW"), rng, 0.0)
    part = kspace.acquire(
        obj, flat_profile(phase_encoding_direction="ROW", partial_fourier=0.6), rng, 0.0
    )
    # ROW: phase encoding across columns (axis 2); the frequency axis (rows) is untouched
    row_full, row_part = full[0, 32, :34], part[0, 32, :34]
    col_full, col_part = full[0, :34, 32], part[0, :34, 32]
    assert edge_width(row_part) > edge_width(row_full)
    assert edge_width(col_part) == edge_width(col_full)
    assert np.abs(row_part - row_full).max() > 3 * np.abs(col_part - col_full).max()


def noise_in_flat_region(profile: ScannerProfile, sd: float, seed: int = 0) -> float:
    obj = np.ones((6, 2 * profile.matrix[0], 2 * profile.matrix[1]), dtype=np.float32)
    img = kspace.acquire(obj, profile, np.random.default_rng(seed), sd)
    return float(img[:, 8:-8, 8:-8].std())


def test_snr_scales_with_field_voxel_volume_and_sampling_time() -> None:
    cfg = default_cohort()
    assert cfg.physics is not None
    base = flat_profile(field_strength=1.5)

    def measured(profile: ScannerProfile) -> float:
        return noise_in_flat_region(profile, physics.noise_sd(profile, cfg.physics))  # type: ignore[arg-type]

    ref = measured(base)
    assert ref == pytest.approx(physics.noise_sd(base, cfg.physics), rel=0.05)
    assert ref / measured(base.model_copy(update={"field_strength": 3.0})) == pytest.approx(
        2.0, rel=0.05
    )
    thick = base.model_copy(update={"slice_thickness": 4.0, "slice_spacing": 4.0})
    assert ref / measured(thick) == pytest.approx(2.0, rel=0.05)
    assert ref / measured(base.model_copy(update={"averages": 4.0})) == pytest.approx(2.0, rel=0.05)
    wide = base.model_copy(update={"pixel_bandwidth": 800.0})
    assert measured(wide) / ref == pytest.approx(2.0, rel=0.05)


def lag_correlation(img: np.ndarray, axis: int) -> float:
    a = img - img.mean()
    b = np.roll(a, 1, axis=axis)
    return float((a * b).mean() / (a * a).mean())


def test_noise_texture_differs_between_vendors_reconstructions() -> None:
    """Zero-filling and a Fermi filter (GE) correlate neighbouring pixels' noise; a full matrix with
    no filter (Siemens) leaves it white; parallel imaging raises it in the centre."""
    obj = np.ones((6, 128, 128), dtype=np.float32)
    white = kspace.acquire(obj, flat_profile(), np.random.default_rng(1), 0.05)
    zip_fermi = kspace.acquire(
        obj,
        flat_profile(
            acquisition_matrix=(40, 64), apodisation="fermi", phase_encoding_direction="COL"
        ),
        np.random.default_rng(1),
        0.05,
    )
    w = white[:, 8:-8, 8:-8]
    z = zip_fermi[:, 8:-8, 8:-8]
    assert abs(lag_correlation(w, 1)) < 0.05 and abs(lag_correlation(w, 2)) < 0.05
    assert lag_correlation(z, 1) > 0.4  # along the zero-filled phase-encoding axis
    assert lag_correlation(z, 1) > lag_correlation(z, 2) + 0.2
    sense = kspace.acquire(
        obj, flat_profile(parallel_factor=2.0, g_factor_max=1.6), np.random.default_rng(1), 0.05
    )
    centre = sense[:, 26:38, 26:38].std()
    edge = sense[:, 2:10, 2:10].std()
    assert centre > 1.3 * edge
    assert edge == pytest.approx(math.sqrt(2.0) * w.std(), rel=0.15)


# --------------------------------------------------------------------------------------------------
# headers and pixels agree
# --------------------------------------------------------------------------------------------------


def test_changing_the_inversion_time_changes_rendered_contrast_as_the_equation_says() -> None:
    cfg = default_cohort(n_subjects=2)
    assert cfg.physics is not None
    quiet = cfg.physics.model_copy(update={"snr_constant": 1e9, "subject_variation": 0.0})
    base = cfg.scanners["skyra_3t"].model_copy(update={"bias_field": 0.0})
    plan = sample_subjects(cfg)[0]
    plan = plan.__class__(**{**plan.__dict__, "scanner": "skyra_3t", "finding": False})
    measured, predicted = [], []
    for ti in (700.0, 1100.0):
        profile = base.model_copy(update={"inversion_time": ti})
        run_cfg = cfg.model_copy(
            update={"physics": quiet, "scanners": {**cfg.scanners, "skyra_3t": profile}}
        )
        series = render_subject(run_cfg, plan, with_tissue=True)
        assert series.labels is not None and series.wm is not None and series.brain is not None
        wm = series.physical[series.wm > 0.97]
        gm = series.physical[(series.labels == 2) & (series.brain - series.wm > 0.97)]
        assert wm.size > 100 and gm.size > 30
        measured.append(float(np.median(gm) / np.median(wm)))
        t = physics.relaxation_at(quiet, profile.field_strength)
        s = np.abs(physics.sequence_signal(profile, t))
        predicted.append(float(s[t.index("gm")] / s[t.index("wm")]))
    assert measured[1] - measured[0] == pytest.approx(predicted[1] - predicted[0], abs=0.05)
    for m, p in zip(measured, predicted, strict=True):
        assert m == pytest.approx(p, abs=0.06)
