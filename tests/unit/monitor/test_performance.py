"""Label-free performance estimation (CBPE, density ratio) on constructed windows with known
realised performance."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit, logit

from shiftguard.errors import EstimationError, MetricInputError
from shiftguard.metrics import (
    auroc,
    auroc_batched,
    percentile_interval,
    sens_spec_batched,
    sensitivity_specificity,
)
from shiftguard.monitor.performance import (
    DOMAIN_FEATURES,
    METRICS,
    DensityRatioEstimator,
    PerformanceEstimator,
    cbpe,
    expected_auroc,
    weighted_auroc,
)
from shiftguard.records.features import BY_NAME

THRESHOLD = 0.3


def realised(y: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, float]:
    sens, spec = sensitivity_specificity(y, prob, threshold)
    return {
        "auroc": auroc(y, prob),
        "sensitivity": sens,
        "specificity": spec,
        "prevalence": y.mean(),
    }


# --------------------------------------------------------------------------------------------------
# CBPE


def test_cbpe_matches_the_realised_metrics_of_a_calibrated_model() -> None:
    rng = np.random.default_rng(0)
    prob = rng.beta(2, 5, 20_000)
    y = rng.random(prob.size) < prob  # calibrated by construction
    est = cbpe(prob, THRESHOLD, n_draws=200)
    truth = realised(y, prob, THRESHOLD)
    for name in ("auroc", "sensitivity", "specificity", "prevalence"):
        assert est.metrics[name].value == pytest.approx(truth[name], abs=0.015), name
        assert est.metrics[name].low <= truth[name] <= est.metrics[name].high, name
    rate = est.metrics["positive_rate"]
    assert rate.value == rate.low == rate.high == np.mean(prob >= THRESHOLD)
    assert (est.method, est.n, est.ess, est.supported) == ("cbpe", 20_000, None, True)


def test_cbpe_interval_covers_the_realised_metric_of_small_windows_about_95_percent() -> None:
    rng = np.random.default_rng(1)
    hits: dict[str, list[bool]] = {m: [] for m in ("auroc", "sensitivity", "specificity")}
    for k in range(400):
        prob = rng.beta(2, 3, 50)
        y = rng.random(50) < prob
        est = cbpe(prob, 0.4, n_draws=1000, seed=k)
        truth = realised(y, prob, 0.4)
        for name, hit in hits.items():
            if math.isfinite(truth[name]):
                hit.append(est.metrics[name].low <= truth[name] <= est.metrics[name].high)
    for name, hit in hits.items():
        assert len(hit) > 380, name
        assert 0.90 <= np.mean(hit) <= 0.99, (name, np.mean(hit))


def test_cbpe_interval_is_the_percentiles_of_the_realised_metrics_of_its_draws() -> None:
    """The draws' metrics come from three sums per draw; they equal ranking every draw (the draws
    of a small window are generated at once, so the same generator reproduces them)."""
    prob = np.round(np.random.default_rng(8).beta(2, 3, 40), 2)  # ties in the scores
    est = cbpe(prob, 0.4, n_draws=300, seed=9)
    y = np.random.default_rng(9).random((300, prob.size)) < prob
    sens, spec = sens_spec_batched(y, prob, 0.4)
    draws = {"auroc": auroc_batched(y, prob), "sensitivity": sens, "specificity": spec}
    draws["prevalence"] = y.mean(axis=1)
    for name, values in draws.items():
        low, high = percentile_interval(values, 0.05)
        assert (est.metrics[name].low, est.metrics[name].high) == pytest.approx((low, high))


def test_cbpe_is_biased_in_the_known_direction_under_label_shift() -> None:
    """Scores ``s | y ~ N(y, 1)``; ``p`` is the posterior calibrated at prevalence 0.2. A window
    with prevalence 0.5 and the same ``s | y``: ``p`` understates every study's chance of the
    finding, most for the low-``p`` studies where the missed findings sit, so CBPE
    underestimates the prevalence and the specificity and overestimates the sensitivity."""
    rng = np.random.default_rng(2)

    def window(prevalence: float) -> tuple[np.ndarray, np.ndarray]:
        y = rng.random(20_000) < prevalence
        score = rng.normal(y.astype(float), 1.0)
        return expit(logit(0.2) + score - 0.5), y

    prob, y = window(0.2)  # the calibration's own prevalence: no bias
    est, truth = cbpe(prob, THRESHOLD, n_draws=100), realised(y, prob, THRESHOLD)
    for name in ("prevalence", "sensitivity", "specificity"):
        assert est.metrics[name].value == pytest.approx(truth[name], abs=0.02), name

    prob, y = window(0.5)
    est, truth = cbpe(prob, THRESHOLD, n_draws=100), realised(y, prob, THRESHOLD)
    assert est.metrics["prevalence"].value < truth["prevalence"] - 0.2
    assert est.metrics["sensitivity"].value > truth["sensitivity"] + 0.05
    assert est.metrics["specificity"].value < truth["specificity"] - 0.05
    sens = est.metrics["sensitivity"]
    assert not sens.low <= truth["sensitivity"] <= sens.high  # the interval assumes calibration


def test_cbpe_gives_nan_where_a_metric_is_undefined_and_the_same_interval_for_a_seed() -> None:
    est = cbpe([0.0, 0.0, 0.0], 0.5, n_draws=50)  # no finding can occur
    assert math.isnan(est.metrics["sensitivity"].value)
    assert math.isnan(est.metrics["auroc"].value) and math.isnan(est.metrics["auroc"].low)
    assert est.metrics["specificity"].value == 1.0
    prob = np.random.default_rng(3).beta(2, 2, 60)
    assert cbpe(prob, 0.5, seed=4).to_dict() == cbpe(prob, 0.5, seed=4).to_dict()


# --------------------------------------------------------------------------------------------------
# pair sums


def brute_expected_auroc(p: np.ndarray, s: np.ndarray) -> float:
    num = den = 0.0
    for i in range(p.size):
        for j in range(p.size):
            if i != j:
                pair = p[i] * (1 - p[j])
                num += pair * ((s[i] > s[j]) + 0.5 * (s[i] == s[j]))
                den += pair
    return num / den if den > 0 else math.nan


def brute_weighted_auroc(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> float:
    num = den = 0.0
    for i in np.flatnonzero(y):
        for j in np.flatnonzero(~y):
            num += w[i] * w[j] * ((s[i] > s[j]) + 0.5 * (s[i] == s[j]))
            den += w[i] * w[j]
    return num / den if den > 0 else math.nan


@pytest.mark.parametrize("n", [2, 3, 8, 41])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_n_log_n_aurocs_equal_brute_force_with_ties(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = np.round(rng.random(n), 1)  # ties in p
    s = np.round(rng.random(n), 1)  # and in a separate score
    assert expected_auroc(p) == pytest.approx(brute_expected_auroc(p, p), nan_ok=True)
    assert expected_auroc(p, s) == pytest.approx(brute_expected_auroc(p, s), nan_ok=True)
    y = rng.random(n) < 0.5
    w = rng.exponential(1.0, n)
    assert weighted_auroc(y, s, w) == pytest.approx(brute_weighted_auroc(y, s, w), nan_ok=True)
    assert weighted_auroc(y, s, np.ones(n)) == pytest.approx(auroc(y, s), nan_ok=True)


# --------------------------------------------------------------------------------------------------
# density ratio


def test_density_ratio_corrects_a_covariate_shift_and_refuses_a_disjoint_window() -> None:
    """``x ~ N(0, 1)`` in the reference and ``N(1, 1)`` in the window, ``P(y | x)`` fixed and the
    model's probability equal to it. Sensitivity rises and specificity falls with ``x``, so the
    reference's own metrics are off for the window; the weighted ones are not."""
    rng = np.random.default_rng(5)
    n = 3000
    x_ref = rng.normal(0, 1, n)
    p_ref = expit(2 * x_ref - 1)
    y_ref = rng.random(n) < p_ref
    x_win = rng.normal(1, 1, n)
    p_win = expit(2 * x_win - 1)
    y_win = rng.random(n) < p_win
    plain, truth = realised(y_ref, p_ref, 0.5), realised(y_win, p_win, 0.5)
    dr = DensityRatioEstimator(x_ref[:, None], p_ref, y_ref.astype(int), 0.5, n_boot=100)
    est = dr.estimate(x_win[:, None], p_win)
    for name in ("sensitivity", "specificity", "prevalence"):
        assert abs(plain[name] - truth[name]) > 0.15, name  # the shift matters
        m = est.metrics[name]
        assert m.value == pytest.approx(truth[name], abs=0.04), name
        assert m.low < m.value < m.high, name
    assert est.metrics["auroc"].value == pytest.approx(truth["auroc"], abs=0.02)
    assert est.metrics["positive_rate"].value == np.mean(p_win >= 0.5)
    assert est.supported and est.reason == ""
    assert 0.2 * n < est.ess < 0.6 * n  # exp(-1) = 0.37 of the reference for a 1-sd shift
    w = dr.weights(x_win[:, None])
    assert w.mean() == pytest.approx(1.0) and w.max() <= 20.0 * 1.0 + 1e-9
    assert np.corrcoef(w, x_ref)[0, 1] > 0.5  # the window's side of the reference weighs more

    far = dr.estimate(rng.normal(8, 1, (200, 1)), np.full(200, 0.9))
    assert not far.supported
    assert "no support" in far.reason
    assert far.overlap is not None and far.overlap < 0.01


def test_density_ratio_reports_low_ess_and_a_constant_reference_column() -> None:
    rng = np.random.default_rng(6)
    x = np.c_[rng.normal(0, 1, 60), np.full(60, 1.5)]
    x[::7, 0] = np.nan  # imputed with the reference median
    p = rng.beta(2, 2, 60)
    y = (rng.random(60) < p).astype(int)
    dr = DensityRatioEstimator(x, p, y, 0.5, n_boot=0, min_ess=59.5, names=("snr", "tesla"))
    assert dr.columns.tolist() == [0]  # the constant column is dropped
    same = dr.estimate(np.c_[rng.normal(0, 1, 40), np.full(40, 1.5)], rng.beta(2, 2, 40))
    assert math.isnan(same.metrics["auroc"].low)  # n_boot=0: no interval
    assert not same.supported and "effective sample size" in same.reason
    relaxed = DensityRatioEstimator(x, p, y, 0.5, n_boot=0, names=("snr", "tesla"))
    new_value = relaxed.estimate(np.c_[rng.normal(0, 1, 40), np.full(40, 3.0)], np.full(40, 0.5))
    assert not new_value.supported and "tesla" in new_value.reason


def test_density_ratio_without_shift_keeps_the_reference_metrics() -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(0, 1, (400, 3))
    p = expit(x @ np.array([1.0, -0.5, 0.0]))
    y = rng.random(400) < p
    dr = DensityRatioEstimator(x, p, y.astype(int), 0.5, n_boot=50)
    est = dr.estimate(rng.normal(0, 1, (400, 3)), rng.random(400))
    ref = realised(y, p, 0.5)
    for name in ("auroc", "sensitivity", "specificity", "prevalence"):
        assert est.metrics[name].value == pytest.approx(ref[name], abs=0.02), name
    assert est.ess is not None and est.ess > 300 and est.supported


# --------------------------------------------------------------------------------------------------
# input errors


@pytest.mark.parametrize(
    ("prob", "threshold", "kwargs", "match"),
    [
        ([], 0.5, {}, "prob is empty"),
        ([0.2, 1.3], 0.5, {}, r"probabilities in \[0, 1\].*calibration map"),
        ([0.2, np.nan], 0.5, {}, "non-finite.*drop the studies"),
        ([[0.2, 0.3]], 0.5, {}, "1-D array"),
        ([0.2, 0.3], 1.5, {}, r"threshold must be a probability in \[0, 1\]"),
        ([0.2, 0.3], float("nan"), {}, "threshold"),
        ([0.2, 0.3], "0.5", {}, "threshold"),
        ([0.2, 0.3], 0.5, {"n_draws": 0}, "n_draws must be an integer >= 1"),
        ([0.2, 0.3], 0.5, {"alpha": 1.0}, r"alpha must lie in \(0, 1\)"),
    ],
)
def test_cbpe_rejects_bad_inputs_with_a_useful_message(
    prob: Any, threshold: Any, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(MetricInputError, match=match):
        cbpe(prob, threshold, **kwargs)


def test_the_density_ratio_and_pair_kernels_reject_bad_inputs() -> None:
    x, p = np.zeros((4, 1)) + np.arange(4)[:, None], np.full(4, 0.5)
    with pytest.raises(MetricInputError, match="needs both classes"):
        DensityRatioEstimator(x, p, [1, 1, 1, 1], 0.5)
    with pytest.raises(MetricInputError, match="0/1 labels, found \\[2\\]"):
        DensityRatioEstimator(x, p, [0, 1, 2, 1], 0.5)
    with pytest.raises(MetricInputError, match="one feature row, probability and label"):
        DensityRatioEstimator(x, p[:3], [0, 1, 0], 0.5)
    with pytest.raises(MetricInputError, match="l2 must be a finite number > 0"):
        DensityRatioEstimator(x, p, [0, 1, 0, 1], 0.5, l2=0.0)
    dr = DensityRatioEstimator(x, p, [0, 1, 0, 1], 0.5, n_boot=0)
    with pytest.raises(MetricInputError, match=r"2 feature column.*the reference has 1"):
        dr.estimate(np.zeros((3, 2)), np.full(3, 0.5))
    with pytest.raises(MetricInputError, match=r"infinite.*use nan"):
        dr.estimate(np.array([[np.inf]]), [0.5])
    with pytest.raises(MetricInputError, match="window_x has 3 rows and window_prob 2"):
        dr.estimate(np.zeros((3, 1)), [0.5, 0.5])
    with pytest.raises(MetricInputError, match="weight >= 0"):
        weighted_auroc([0, 1], [0.1, 0.2], [1.0, -1.0])


# --------------------------------------------------------------------------------------------------
# frames


def records(make_frame: Any, n: int, seed: int, **kwargs: Any) -> pd.DataFrame:
    """Feature records whose probability is calibrated on ``emb_0`` and ``snr``, with labels."""
    frame = make_frame(n, seed=seed, **kwargs)
    rng = np.random.default_rng(seed + 100)
    frame["probability"] = expit(1.5 * frame["emb_0"] + 0.5 * frame["snr"] - 0.5)
    frame["finding"] = (rng.random(n) < frame["probability"]).astype(float)
    return frame


@pytest.fixture(scope="module")
def reference(make_frame: Any) -> pd.DataFrame:
    frame = records(make_frame, 240, seed=0)
    frame["split"] = np.repeat(["train", "val", "test"], 80)
    frame.loc[frame.index[80:90], "finding"] = np.nan  # held out but not labelled
    return frame


def test_performance_estimator_uses_the_labelled_held_out_rows(
    reference: pd.DataFrame, make_frame: Any
) -> None:
    estimator = PerformanceEstimator(reference, THRESHOLD, n_boot=50, n_draws=200)
    assert estimator.n_labelled == 150  # 160 held out, 10 of them without a finding
    assert estimator.features == DOMAIN_FEATURES
    assert "probability" in DOMAIN_FEATURES and "snr" in DOMAIN_FEATURES
    assert all(BY_NAME[f].group != "metadata" for f in DOMAIN_FEATURES)
    assert all(BY_NAME[f].kind == "numerical" for f in DOMAIN_FEATURES)

    window = records(make_frame, 50, seed=1)
    window.loc[window.index[0], "probability"] = np.nan  # left out
    out = estimator.window(window)
    assert set(out) == {"cbpe", "density_ratio"}
    for est in out.values():
        assert est.n == 49 and tuple(est.metrics) == METRICS
        rate = np.mean(window["probability"].dropna() >= THRESHOLD)
        assert est.metrics["positive_rate"].value == pytest.approx(rate)
        json.dumps(est.to_dict(), allow_nan=False)
    assert out["density_ratio"].supported and out["density_ratio"].ess is not None

    shifted = estimator.window(records(make_frame, 50, seed=2, shift=6.0))
    assert not shifted["density_ratio"].supported


def test_performance_estimator_ignores_a_new_scanners_protocol_by_default(
    reference: pd.DataFrame, make_frame: Any
) -> None:
    window = records(make_frame, 50, seed=3)
    window["field_strength"] *= 2.0  # a new scanner: protocol values never seen, images alike
    window["repetition_time"] += 10.0
    default = PerformanceEstimator(reference, THRESHOLD, n_boot=0, n_draws=100)
    assert default.window(window)["density_ratio"].supported
    with_metadata = PerformanceEstimator(
        reference,
        THRESHOLD,
        [*DOMAIN_FEATURES, "field_strength", "repetition_time"],
        n_boot=0,
        n_draws=100,
    )
    assert not with_metadata.window(window)["density_ratio"].supported


def test_performance_estimator_rejects_references_it_cannot_use(reference: pd.DataFrame) -> None:
    with pytest.raises(EstimationError, match=r"lacks the column\(s\) \['finding'\]"):
        PerformanceEstimator(reference.drop(columns="finding"), THRESHOLD)
    only_train = reference.assign(split="train")
    with pytest.raises(EstimationError, match=r"0 held-out row.*at least 20"):
        PerformanceEstimator(only_train, THRESHOLD)
    one_class = reference.assign(finding=1.0)
    with pytest.raises(EstimationError, match="both classes"):
        PerformanceEstimator(one_class, THRESHOLD)
    bad = reference.copy()
    bad.loc[bad.index[100], "finding"] = 2
    with pytest.raises(EstimationError, match="other than 0/1"):
        PerformanceEstimator(bad, THRESHOLD)
    with pytest.raises(EstimationError, match=r"numerical features only.*scanner_model"):
        PerformanceEstimator(reference, THRESHOLD, ["snr", "scanner_model"])
    estimator = PerformanceEstimator(reference, THRESHOLD, ["snr"], n_boot=0)
    with pytest.raises(EstimationError, match=r"window lacks the column\(s\) \['snr'\]"):
        estimator.window(reference.drop(columns="snr"))
