"""Metrics of the binary classifier, checked by hand and against scikit-learn as an oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from shiftguard.errors import ShiftGuardError
from shiftguard.metrics import (
    MetricInputError,
    auroc,
    binary_report,
    bootstrap_ci,
    choose_threshold,
    expected_calibration_error,
    reliability_curve,
    roc_curve,
    sensitivity_specificity,
)


def test_auroc_tiny_example_by_hand() -> None:
    # positives 0.4, 0.8; negatives 0.1, 0.4, 0.5 -> pairs (pos, neg):
    # 0.4: beats 0.1 (1), ties 0.4 (1/2), loses 0.5 (0); 0.8 beats all (3) -> 4.5 / 6
    assert auroc([1, 1, 0, 0, 0], [0.4, 0.8, 0.1, 0.4, 0.5]) == pytest.approx(0.75)


def test_auroc_all_tied_scores_give_half() -> None:
    assert auroc([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3]) == 0.5


def test_auroc_perfect_and_inverse_rankings() -> None:
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
    assert auroc(y, s) == 1.0
    assert auroc(y, -s) == 0.0


def test_auroc_one_class_is_nan_not_error() -> None:
    assert math.isnan(auroc([1, 1, 1], [0.1, 0.5, 0.9]))
    assert math.isnan(auroc([0, 0], [0.1, 0.5]))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_on_random_data(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.normal(size=500) + y, 1)  # rounding makes many ties
    assert abs(auroc(y, s) - roc_auc_score(y, s)) < 1e-12


def test_roc_curve_matches_sklearn() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300), 2)
    fpr, tpr, thr = roc_curve(y, s)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])
    assert thr[0] == np.inf
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(y, s), abs=1e-12)


def test_roc_curve_one_class_raises_typed_error() -> None:
    with pytest.raises(MetricInputError, match="both classes"):
        roc_curve([1, 1], [0.2, 0.3])


@pytest.mark.parametrize(
    ("y", "s", "match"),
    [
        ([0, 1, 2], [0.1, 0.2, 0.3], "0/1"),
        ([0, 1], [0.1, 0.2, 0.3], "entries"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
        ([0, 1], [0.1, float("nan")], "non-finite"),
    ],
)
def test_malformed_inputs_raise_typed_error(y: list, s: list, match: str) -> None:
    with pytest.raises(MetricInputError, match=match) as info:
        auroc(y, s)
    assert isinstance(info.value, ShiftGuardError)


def test_sensitivity_specificity_counted_by_hand() -> None:
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0]
    s = [0.9, 0.6, 0.5, 0.2, 0.7, 0.5, 0.3, 0.1, 0.0]
    # >= 0.5: positives 0.9, 0.6, 0.5 (TP=3, FN=1); negatives 0.7, 0.5 predicted positive (FP=2, TN=3)
    sens, spec = sensitivity_specificity(y, s, 0.5)
    assert sens == pytest.approx(3 / 4)
    assert spec == pytest.approx(3 / 5)
    assert math.isnan(sensitivity_specificity([0, 0], [0.1, 0.9], 0.5)[0])


def test_choose_threshold_youden_on_constructed_case() -> None:
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    s = [0.1, 0.2, 0.3, 0.65, 0.4, 0.7, 0.8, 0.9]
    # thresholds 0.9, 0.8, 0.7: J = 1/4, 2/4, 3/4; 0.65: 3/4 - 1/4; 0.4: 1 - 1/4 = 3/4 (tie, lower)
    assert choose_threshold(y, s) == 0.7


def test_choose_threshold_sensitivity_and_specificity_targets() -> None:
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    s = [0.1, 0.2, 0.3, 0.65, 0.4, 0.7, 0.8, 0.9]
    assert choose_threshold(y, s, "sensitivity@0.9") == 0.4  # the only point with sens = 1
    assert choose_threshold(y, s, "sensitivity@0.5") == 0.8
    assert choose_threshold(y, s, "specificity@1.0") == 0.7
    assert choose_threshold(y, s, "specificity@0.75") == 0.4
    t = choose_threshold(y, s, "sensitivity@0.9")
    assert sensitivity_specificity(y, s, t)[0] >= 0.9


@pytest.mark.parametrize("rule", ["f1", "sensitivity@1.5", "sensitivity0.9", "recall@0.9"])
def test_choose_threshold_unknown_rule(rule: str) -> None:
    with pytest.raises(MetricInputError, match="rule"):
        choose_threshold([0, 1], [0.1, 0.9], rule)


def test_ece_two_bins_by_hand() -> None:
    y = [0, 0, 1, 1, 1, 0]
    p = [0.1, 0.3, 0.2, 0.6, 0.8, 0.7]
    # bin [0, .5): p mean 0.2, freq 1/3, n=3; bin [.5, 1]: p mean 0.7, freq 2/3, n=3
    expected = 0.5 * abs(0.2 - 1 / 3) + 0.5 * abs(0.7 - 2 / 3)
    assert expected_calibration_error(y, p, n_bins=2) == pytest.approx(expected)
    curve = reliability_curve(y, p, n_bins=2)
    np.testing.assert_allclose(curve.mean_predicted, [0.2, 0.7])
    np.testing.assert_allclose(curve.observed_frequency, [1 / 3, 2 / 3])
    assert curve.counts.tolist() == [3, 3]
    np.testing.assert_allclose(curve.bin_edges, [0.0, 0.5, 1.0])


def test_reliability_curve_empty_bins_and_edges() -> None:
    curve = reliability_curve([1, 0], [1.0, 0.0], n_bins=4)
    assert curve.counts.tolist() == [1, 0, 0, 1]  # p = 1.0 falls in the last bin
    assert math.isnan(curve.mean_predicted[1])


def test_ece_quantile_bins_have_equal_counts() -> None:
    rng = np.random.default_rng(0)
    p = rng.random(1000)
    y = rng.random(1000) < p  # perfectly calibrated in expectation
    curve = reliability_curve(y, p, n_bins=10, strategy="quantile")
    assert curve.counts.tolist() == [100] * 10
    assert expected_calibration_error(y, p, strategy="quantile") < 0.06
    assert expected_calibration_error(y, np.clip(p + 0.3, 0, 1)) > 0.2


def test_ece_rejects_non_probabilities_and_bad_strategy() -> None:
    with pytest.raises(MetricInputError, match=r"\[0, 1\]"):
        expected_calibration_error([0, 1], [-0.5, 2.0])
    with pytest.raises(MetricInputError, match="strategy"):
        expected_calibration_error([0, 1], [0.1, 0.9], strategy="kmeans")


def _binormal(rng: np.random.Generator, n_pos: int, n_neg: int, d: float) -> tuple:
    y = np.r_[np.ones(n_pos, dtype=int), np.zeros(n_neg, dtype=int)]
    s = np.r_[rng.normal(d, 1, n_pos), rng.normal(0, 1, n_neg)]
    return y, s


def test_bootstrap_ci_covers_true_auroc() -> None:
    d = 1.0
    true_auc = norm.cdf(d / math.sqrt(2))
    rng = np.random.default_rng(2024)
    reps, covered = 200, 0
    for i in range(reps):
        y, s = _binormal(rng, 60, 90, d)
        _, low, high = bootstrap_ci(auroc, y, s, n_boot=200, seed=i)
        covered += low <= true_auc <= high
    assert 0.88 * reps <= covered <= 0.99 * reps


def test_bootstrap_ci_is_deterministic_and_brackets_point() -> None:
    y, s = _binormal(np.random.default_rng(1), 40, 60, 1.0)
    a = bootstrap_ci(auroc, y, s, n_boot=300, seed=7)
    b = bootstrap_ci(auroc, y, s, n_boot=300, seed=7)
    c = bootstrap_ci(auroc, y, s, n_boot=300, seed=8)
    assert a == b
    assert a != c
    assert a[1] <= a[0] <= a[2]


def test_bootstrap_ci_generic_metric_matches_vectorised_auroc() -> None:
    y, s = _binormal(np.random.default_rng(5), 30, 30, 0.5)
    fast = bootstrap_ci(auroc, y, s, n_boot=100, seed=3)
    slow = bootstrap_ci(lambda yy, ss: auroc(yy, ss), y, s, n_boot=100, seed=3)
    assert fast == pytest.approx(slow, abs=1e-12)


def test_bootstrap_ci_stratified_keeps_class_counts() -> None:
    y = np.r_[np.ones(3, dtype=int), np.zeros(50, dtype=int)]
    s = np.random.default_rng(0).random(53)
    seen: list[int] = []

    def count_pos(yy: np.ndarray, ss: np.ndarray) -> float:
        seen.append(int(yy.sum()))
        return auroc(yy, ss)

    _, low, high = bootstrap_ci(count_pos, y, s, n_boot=50, seed=0)
    assert set(seen) == {3}
    assert not math.isnan(low) and not math.isnan(high)


def test_bootstrap_ci_rejects_bad_options() -> None:
    with pytest.raises(MetricInputError, match="n_boot"):
        bootstrap_ci(auroc, [0, 1], [0.1, 0.2], n_boot=0)
    with pytest.raises(MetricInputError, match="alpha"):
        bootstrap_ci(auroc, [0, 1], [0.1, 0.2], alpha=1.5)


def test_binary_report_fields_and_consistency() -> None:
    rng = np.random.default_rng(11)
    y, s = _binormal(rng, 50, 150, 1.5)
    p = 1 / (1 + np.exp(-s))
    report = binary_report(y, p, threshold=0.6, n_boot=200, seed=0)
    assert report["n"] == 200 and report["n_positive"] == 50
    assert report["auroc"]["value"] == pytest.approx(roc_auc_score(y, p))  # type: ignore[index]
    sens, spec = sensitivity_specificity(y, p, 0.6)
    assert report["sensitivity"]["value"] == sens  # type: ignore[index]
    assert report["specificity"]["value"] == spec  # type: ignore[index]
    assert report["ece"]["value"] == pytest.approx(expected_calibration_error(y, p))  # type: ignore[index]
    for m in ("auroc", "sensitivity", "specificity", "ece"):
        entry = report[m]
        assert entry["low"] <= entry["value"] <= entry["high"]  # type: ignore[index]
    assert report == binary_report(y, p, threshold=0.6, n_boot=200, seed=0)
