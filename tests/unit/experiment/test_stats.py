"""The experiment's paired statistics against their definitions, on constructed cases and by
simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shiftguard.experiment.stats import (
    PairedInputError,
    auroc_correlation,
    auroc_variance,
    cases_for_power,
    delong_per_run,
    paired_bootstrap,
    paired_difference_power,
    seed_case_bootstrap,
)
from shiftguard.metrics import auroc


def binormal(rng: np.random.Generator, n: int, prevalence: float, separations: list[float],
             rho: float) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Labels ``(n,)`` and scores ``(len(separations), n)``: each model's score is its separation
    times the label plus unit normal noise, the noises correlated ``rho`` between models."""
    y = rng.random(n) < prevalence
    k = len(separations)
    cov = np.full((k, k), rho) + (1 - rho) * np.eye(k)
    noise = rng.multivariate_normal(np.zeros(k), cov, size=n).T
    return y.astype(int), np.asarray(separations)[:, None] * y[None, :] + noise


def test_identical_arms_differ_by_nothing() -> None:
    rng = np.random.default_rng(1)
    y, s = binormal(rng, 80, 0.4, [1.5, 1.5, 1.5], 0.0)
    d = paired_bootstrap(y, s, s, 0.5, 0.5, n_boot=300)
    assert [x.metric for x in d] == ["auroc", "sensitivity", "specificity"]
    for x in d:
        assert x.diff == 0.0 and x.low == 0.0 and x.high == 0.0 and x.p == 1.0


def test_point_estimate_is_the_mean_over_seeds_of_each_pair() -> None:
    rng = np.random.default_rng(2)
    y, arm = binormal(rng, 60, 0.5, [2.0, 1.0, 0.5], 0.0)
    _, ref = binormal(rng, 60, 0.5, [0.5, 0.5, 0.5], 0.0)
    d = paired_bootstrap(y, arm, ref, n_boot=50)[0]
    per_seed = [auroc(y, arm[j]) - auroc(y, ref[j]) for j in range(3)]
    assert d.diff == pytest.approx(np.mean(per_seed))
    assert d.arm == pytest.approx(np.mean([auroc(y, a) for a in arm]))
    assert d.n_seeds == 3 and d.n_cases == 60


def test_sensitivity_and_specificity_use_each_runs_own_threshold() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([[0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9]] * 2)
    d = {x.metric: x for x in paired_bootstrap(y, s, s, [0.5, 0.35], [0.5, 0.5], n_boot=20)}
    # threshold 0.35 also calls the 0.4 positive and flags no more negatives than 0.5 does
    assert d["sensitivity"].arm == pytest.approx((0.75 + 1.0) / 2)
    assert d["sensitivity"].reference == pytest.approx(0.75)
    assert d["specificity"].arm == pytest.approx(0.75)


def test_a_clearly_better_arm_excludes_zero_and_a_null_one_does_not() -> None:
    rng = np.random.default_rng(3)
    y, s = binormal(rng, 300, 0.4, [2.5, 2.5, 2.5, 1.0, 1.0, 1.0], 0.3)
    better = paired_bootstrap(y, s[:3], s[3:], n_boot=500)[0]
    assert better.low > 0.1 and better.p < 0.01
    null = paired_bootstrap(y, s[3:], s[3:][::-1], n_boot=500)[0]
    assert null.low < 0 < null.high and null.p > 0.05


def test_seed_resampling_widens_the_interval_when_runs_disagree() -> None:
    """Cases alone would give a narrow interval around the mean; runs that disagree widely (one
    good, one useless) must leave it wide."""
    rng = np.random.default_rng(4)
    y, s = binormal(rng, 400, 0.5, [3.0, 0.0, 1.5], 0.0)
    agree = paired_bootstrap(y, s[[2, 2]], s[[1, 1]], n_boot=600)[0]
    disagree = paired_bootstrap(y, s[[0, 1]], s[[1, 1]], n_boot=600)[0]
    assert disagree.low < disagree.diff < disagree.high
    assert (disagree.high - disagree.low) > 2 * (agree.high - agree.low)


def test_delong_per_run_against_a_simulated_null_keeps_its_size() -> None:
    """Under no difference, p < 0.05 in about 5 % of runs (200 simulated runs: 1-11 %)."""
    rng = np.random.default_rng(5)
    rejected = 0
    for _ in range(200):
        y, s = binormal(rng, 120, 0.4, [1.5, 1.5], 0.5)
        rejected += delong_per_run(y, s[:1], s[1:])[0].p < 0.05
    assert 2 <= rejected <= 22


def test_hanley_mcneil_variance_matches_simulation() -> None:
    """The formula's standard error is within 15 % of the AUROC's spread over 400 samples."""
    rng = np.random.default_rng(6)
    separation = 1.466  # binormal AUROC Phi(1.466 / sqrt(2)) = 0.85
    aucs = []
    for _ in range(400):
        y, s = binormal(rng, 200, 0.4, [separation], 0.0)
        aucs.append(auroc(y, s[0]))
    n_pos, n_neg = 80, 120
    predicted = math.sqrt(auroc_variance(float(np.mean(aucs)), n_pos, n_neg))
    assert np.mean(aucs) == pytest.approx(0.85, abs=0.01)
    assert float(np.std(aucs)) == pytest.approx(predicted, rel=0.15)


def test_power_is_conservative_against_the_simulated_rejection_rate() -> None:
    """Two correlated models, AUROC 0.85 and about 0.90, 300 cases: the predicted power is at most
    DeLong's rejection rate over 250 simulated test sets (plus noise) and within 0.15 of it, with
    the correlation of the two AUROC estimates measured on the same simulation. Hanley and McNeil's
    exponential approximation overstates the variance of binormal scores a little (0.60 predicted
    against 0.70 rejected when this test was written), so a design sized with it errs safe."""
    rng = np.random.default_rng(7)
    n, prevalence = 300, 0.4
    a_ref, a_arm, rejected = [], [], 0
    for _ in range(250):
        y, s = binormal(rng, n, prevalence, [1.466, 1.812], 0.6)
        a_ref.append(auroc(y, s[0]))
        a_arm.append(auroc(y, s[1]))
        rejected += delong_per_run(y, s[1:], s[:1])[0].p < 0.05
    r = float(np.corrcoef(a_ref, a_arm)[0, 1])
    delta = float(np.mean(a_arm) - np.mean(a_ref))
    predicted = paired_difference_power(delta, float(np.mean(a_ref)), 120, 180, r)
    observed = rejected / 250
    assert predicted <= observed + 0.05
    assert observed - predicted < 0.15


def test_power_grows_with_cases_difference_and_correlation() -> None:
    base = paired_difference_power(0.05, 0.85, 100, 150, 0.5)
    assert paired_difference_power(0.05, 0.85, 200, 300, 0.5) > base
    assert paired_difference_power(0.08, 0.85, 100, 150, 0.5) > base
    assert paired_difference_power(0.05, 0.85, 100, 150, 0.8) > base
    assert paired_difference_power(0.0, 0.85, 100, 150, 0.5) == pytest.approx(0.05)


def test_cases_for_power_is_the_smallest_set_that_reaches_it() -> None:
    n = cases_for_power(0.05, 0.85, 0.4, 0.6, power=0.8)
    at = paired_difference_power(0.05, 0.85, round(n * 0.4), n - round(n * 0.4), 0.6)
    m = n - 1
    below = paired_difference_power(0.05, 0.85, round(m * 0.4), m - round(m * 0.4), 0.6)
    assert at >= 0.8 > below


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"y_true": [0, 1, 1, 0], "arm": [[0.1, 0.2, 0.3]], "reference": [[0.1, 0.2, 0.3]]},
            "cases",
        ),
        ({"y_true": [0, 1, 1, 1], "arm": [[0.1] * 4], "reference": [[0.1] * 4]}, "2 negatives"),
        ({"y_true": [0, 2, 1, 0], "arm": [[0.1] * 4], "reference": [[0.1] * 4]}, "0/1"),
        ({"y_true": [0, 0, 1, 1], "arm": [[0.1] * 4] * 2, "reference": [[0.1] * 4]}, "same seeds"),
        ({"y_true": [0, 0, 1, 1], "arm": [[np.nan] * 4], "reference": [[0.1] * 4]}, "NaN"),
        (
            {
                "y_true": [0, 0, 1, 1],
                "arm": [[0.1] * 4],
                "reference": [[0.1] * 4],
                "arm_thresholds": 0.5,
            },
            "both arms",
        ),
    ],
)
def test_inputs_that_cannot_be_paired_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(PairedInputError, match=message):
        paired_bootstrap(**kwargs, n_boot=10)


def test_seed_case_interval_is_the_mean_of_the_runs_and_covers_it() -> None:
    rng = np.random.default_rng(4)
    y = np.repeat([0, 1], 200)
    runs = np.vstack([y * d + rng.normal(0, 1, y.size) for d in (0.3, 1.2, 2.5)])
    thresholds = [0.4, 0.5, 0.6]
    out = {r.metric: r for r in seed_case_bootstrap(y, runs, thresholds, n_boot=400)}
    assert set(out) == {"auroc", "sensitivity", "specificity"}
    assert out["auroc"].value == pytest.approx(np.mean([auroc(y, s) for s in runs]))
    sens = np.mean([(s[y == 1] >= t).mean() for s, t in zip(runs, thresholds, strict=True)])
    assert out["sensitivity"].value == pytest.approx(sens)
    for r in out.values():
        assert r.low <= r.value <= r.high and (r.n_seeds, r.n_cases) == (3, 400)
    # runs that disagree widen the interval against three copies of the middle run
    same = seed_case_bootstrap(y, np.vstack([runs[1]] * 3), n_boot=400)[0]
    assert (out["auroc"].high - out["auroc"].low) > (same.high - same.low)
    assert seed_case_bootstrap(y, runs[0], n_boot=100)[0].n_seeds == 1  # one run: (N,) works


def _delong_correlation_by_definition(y: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> float:
    """DeLong, DeLong and Clarke-Pearson (1988) from the kernel psi(x, z) = 1 if x > z, 1/2 if
    equal: each case's placement, their covariances over positives and negatives, O(m n)."""
    comps = []
    for s in (s1, s2):
        x, z = s[y == 1], s[y == 0]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        comps.append((psi.mean(axis=1), psi.mean(axis=0)))  # V10 per positive, V01 per negative
    m, n = comps[0][0].size, comps[0][1].size
    cov = np.cov([comps[0][0], comps[1][0]]) / m + np.cov([comps[0][1], comps[1][1]]) / n
    return float(cov[0, 1] / np.sqrt(cov[0, 0] * cov[1, 1]))


def test_auroc_correlation_is_delongs_from_the_placements() -> None:
    rng = np.random.default_rng(11)
    y, s = binormal(rng, 160, 0.4, [1.0, 1.2, 0.8], rho=0.6)
    s = np.round(s, 1)  # ties, which the kernel counts as one half
    got = auroc_correlation(y, s[1:], s[[0, 0]])
    assert got == pytest.approx([_delong_correlation_by_definition(y, s[0], s[k]) for k in (1, 2)])
    assert auroc_correlation(y, s[:1], s[:1]) == pytest.approx([1.0])
    # noise correlated 0.9 between two models gives more correlated AUROCs than noise at 0.1
    hi = np.mean([auroc_correlation(*_pair(rng, 0.9))[0] for _ in range(20)])
    lo = np.mean([auroc_correlation(*_pair(rng, 0.1))[0] for _ in range(20)])
    assert hi > lo + 0.4


def _pair(rng: np.random.Generator, rho: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y, s = binormal(rng, 300, 0.4, [1.0, 1.0], rho=rho)
    return y, s[:1], s[1:]


def test_auroc_correlation_is_nan_without_case_variation() -> None:
    y = np.array([0, 0, 1, 1])
    perfect = np.array([[0.1, 0.2, 0.8, 0.9]])
    assert math.isnan(auroc_correlation(y, perfect, perfect)[0])
