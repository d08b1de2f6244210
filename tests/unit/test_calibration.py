"""The calibration maps: each recovers a known miscalibration, keeps the ranking, and survives its
JSON round trip (the bundle's ``calibration.json``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shiftguard.calibration import IDENTITY, METHODS, Calibration, fit_calibration, logit
from shiftguard.errors import MetricInputError
from shiftguard.metrics import auroc, expected_calibration_error


def _overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(0.5 z - 1) and a network that reports sigmoid(z): overconfident
    and too positive."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    y = rng.random(n) < 1.0 / (1.0 + np.exp(-(0.5 * z - 1.0)))
    return y.astype(int), 1.0 / (1.0 + np.exp(-z))


def test_platt_recovers_slope_and_intercept_and_fixes_ece_out_of_sample() -> None:
    y, p = _overconfident(4000, 0)
    cal = fit_calibration("platt", y, p)
    assert cal.a == pytest.approx(0.5, abs=0.05)
    assert cal.b == pytest.approx(-1.0, abs=0.1)
    y2, p2 = _overconfident(4000, 1)  # fresh cases: not the ones it was fitted on
    before = expected_calibration_error(y2, p2)
    after = expected_calibration_error(y2, cal.apply(p2))
    assert before > 0.15 and after < 0.03


def test_temperature_fixes_confidence_but_not_a_shifted_intercept() -> None:
    y, p = _overconfident(4000, 0)
    temp = fit_calibration("temperature", y, p)
    platt = fit_calibration("platt", y, p)
    assert temp.b == 0.0 and temp.parameters["temperature"] > 1.0  # softens the logits
    y2, p2 = _overconfident(4000, 1)
    assert expected_calibration_error(y2, platt.apply(p2)) < expected_calibration_error(
        y2, temp.apply(p2)
    )


@pytest.mark.parametrize("method", ["platt", "temperature"])
def test_parametric_maps_keep_the_ranking(method: str) -> None:
    y, p = _overconfident(500, 2)
    cal = fit_calibration(method, y, p)
    q = cal.apply(p)
    assert auroc(y, q) == pytest.approx(auroc(y, p))
    order = np.argsort(p)
    assert np.all(np.diff(q[order]) >= 0)


def test_isotonic_is_monotone_matches_pav_and_clips_beyond_the_knots() -> None:
    y = np.array([0, 1, 0, 0, 1, 1, 0, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    cal = fit_calibration("isotonic", y, p)
    q = cal.apply(p)
    # pool adjacent violators by hand: [0], [1, 0, 0] -> 1/3, then [1], [1], [0]: the 0 violates,
    # [1, 0] -> 1/2 still violates the [1] before it, so [1, 1, 0] -> 2/3; the last [1] stays
    assert np.all(np.diff(q) >= -1e-12)
    assert q[0] == pytest.approx(0.0)
    assert q[1:4] == pytest.approx([1 / 3] * 3)
    assert q[4:7] == pytest.approx([2 / 3] * 3)
    assert q[7] == pytest.approx(1.0)
    assert cal.apply_one(0.01) == pytest.approx(q[0])  # constant below the first knot
    assert cal.apply_one(0.99) == pytest.approx(q[-1])


def test_isotonic_pools_equal_scores_first() -> None:
    cal = fit_calibration("isotonic", [0, 1, 1, 0], [0.5, 0.5, 0.9, 0.9])
    assert cal.apply([0.5, 0.9]).tolist() == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize("method", METHODS)
def test_json_round_trip(method: str) -> None:
    y, p = _overconfident(300, 3)
    cal = fit_calibration(method, y, p)
    again = Calibration.from_json(json.loads(json.dumps(cal.to_json())))
    assert again == cal
    assert np.array_equal(again.apply(p), cal.apply(p))


def test_one_class_gives_the_identity_with_a_note() -> None:
    cal = fit_calibration("platt", [1, 1, 1], [0.2, 0.5, 0.9])
    assert cal.method == "none" and cal.notes and "one class" in cal.notes[0]
    assert cal.apply([0.3]).tolist() == [0.3]


def test_anti_informative_set_keeps_the_map_increasing() -> None:
    y = np.array([1, 1, 1, 0, 0, 0])
    p = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    cal = fit_calibration("platt", y, p)
    assert cal.a > 0 and cal.notes and "chance" in cal.notes[0]


def test_bad_input_is_named() -> None:
    with pytest.raises(MetricInputError, match="unknown"):
        fit_calibration("beta", [0, 1], [0.2, 0.8])
    with pytest.raises(MetricInputError, match=r"\[0, 1\]"):
        fit_calibration("platt", [0, 1], [0.2, 1.8])
    with pytest.raises(MetricInputError, match="0/1"):
        fit_calibration("platt", [0, 2], [0.2, 0.8])
    with pytest.raises(MetricInputError, match=r"calibration\.json: not a"):
        Calibration.from_json({"method": "platt"})
    with pytest.raises(MetricInputError, match="unusable"):
        Calibration.from_json({"format": "shiftguard-calibration", "method": "platt", "a": "x"})
    with pytest.raises(MetricInputError, match="finite"):
        Calibration("platt", a=float("nan"))


def test_identity_and_logit_edges() -> None:
    assert IDENTITY.apply([0.0, 1.0]).tolist() == [0.0, 1.0]
    assert np.isfinite(logit([0.0, 1.0])).all()
