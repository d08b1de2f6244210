"""Champion versus challenger on the same studies: DeLong against its definition, the paired
bootstrap, per-segment verdicts; validation age bands and gaps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest

from shiftguard.shadow.evaluate import band_edges, delong, evaluate, run


def delong_by_definition(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """DeLong et al. (1988) with the O(mn) structural components."""
    x, z = y.astype(bool), ~y.astype(bool)
    comps10, comps01, aucs = [], [], []
    for s in (a, b):
        psi = (s[x][:, None] > s[z][None, :]) + 0.5 * (s[x][:, None] == s[z][None, :])
        aucs.append(psi.mean())
        comps10.append(psi.mean(axis=1))
        comps01.append(psi.mean(axis=0))
    m, n = x.sum(), z.sum()
    cov = np.cov(np.vstack(comps10)) / m + np.cov(np.vstack(comps01)) / n
    return aucs[1] - aucs[0], float(np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]))


def test_delong_matches_its_definition_ties_included() -> None:
    rng = np.random.default_rng(4)
    y = rng.random(80) < 0.4
    a = np.round(rng.random(80) + 0.5 * y, 1)  # rounded: many ties
    b = np.round(rng.random(80) + 0.8 * y, 1)
    assert delong(y, a, b) == pytest.approx(delong_by_definition(y, a, b), rel=1e-9)
    assert np.isnan(delong(np.ones(5, bool), a[:5], b[:5])[0])


def test_the_same_model_twice_differs_by_nothing(shadow_case: Callable[..., Any]) -> None:
    log, book = shadow_case(n=300, challenger=False)
    twin = log.assign(role="challenger", bundle="m-v2", model_version="2")
    paired = run(pd.concat([log, twin]), book, n_boot=200).paired
    assert paired is not None and paired.n == 300
    assert (paired.overall[["diff", "diff_low", "diff_high"]].to_numpy() == 0).all()
    assert paired.worse.empty


def test_a_challenger_broken_on_one_scanner_is_worse_on_that_scanner_only(
    shadow_case: Callable[..., Any],
) -> None:
    log, book = shadow_case(challenger_broken="Vantage")
    result = run(log, book, n_boot=300)
    assert result.paired is not None
    worse = set(zip(result.paired.worse["column"], result.paired.worse["segment"], strict=True))
    # the broken scanner, and the segments that hold its studies; not the other scanners
    scanners = {s for c, s in worse if c == "scanner_model"}
    assert scanners == {"Vantage"}
    auroc = result.paired.overall.set_index("metric").loc["auroc"]
    assert auroc["diff_high"] < 0 and auroc["delong_p"] < 0.05
    # the challenger's own table flags the scanner too; the champion's flags nothing
    assert ("scanner_model", "Vantage") in set(
        zip(result.evaluations["challenger"].flagged["column"],
            result.evaluations["challenger"].flagged["segment"], strict=True)
    )  # fmt: skip
    assert result.evaluations["champion"].flagged.empty


def test_an_equally_good_challenger_is_not_worse_anywhere(shadow_case: Callable[..., Any]) -> None:
    log, book = shadow_case(seed=5)
    result = run(log, book, n_boot=300)
    assert result.paired is not None and result.paired.worse.empty
    auroc = result.paired.overall.set_index("metric").loc["auroc"]
    assert auroc["diff_low"] < 0 < auroc["diff_high"]


def test_band_edges_from_validation_labels() -> None:
    assert band_edges(["0-39", "40-59", "60-74", "75+"]) == [0, 40, 60, 75, 200]
    assert band_edges(["0-39", "60-74"]) is None  # a gap
    assert band_edges(["young", "old"]) is None


def test_ages_are_cut_into_the_validation_bands_and_gaps_reported(
    shadow_case: Callable[..., Any],
) -> None:
    log, book = shadow_case(n=400, challenger=False)
    log["patient_age"] = np.random.default_rng(0).uniform(20, 90, len(log)).round()
    validation = pd.DataFrame(
        [{"column": "patient_sex", "segment": "F", "auroc": 0.9, "sensitivity": 0.8,
          "specificity": 0.9, "judgeable": True}]
        + [{"column": "age_band", "segment": s, "auroc": 0.9, "sensitivity": 0.8,
            "specificity": 0.9, "judgeable": True} for s in ("0-39", "40-59", "60-74", "75+")]
    )  # fmt: skip
    table = evaluate(log, book, None, validation=validation, n_boot=100)["champion"].segments
    bands = table.loc[table["column"] == "age_band", "segment"].tolist()
    assert bands == ["0-39", "40-59", "60-74", "75+"]
    female = table[(table["column"] == "sex") & (table["segment"] == "F")].iloc[0]
    assert female["auroc_validation"] == 0.9
    assert female["auroc_validation_gap"] == pytest.approx(female["auroc"] - 0.9)
    male = table[(table["column"] == "sex") & (table["segment"] == "M")].iloc[0]
    assert np.isnan(male["auroc_validation"])  # no validation figure for it


def test_thresholds_come_from_the_log_and_must_be_one_per_role(
    shadow_case: Callable[..., Any],
) -> None:
    log, book = shadow_case(n=100, challenger=False)
    assert evaluate(log, book, n_boot=50)["champion"].threshold == 0.5
    log.loc[0, "threshold"] = 0.7
    with pytest.raises(ValueError, match="2 different thresholds"):
        evaluate(log, book, n_boot=50)


def test_segment_figures_equal_fairlearns_metricframe(shadow_case: Callable[..., Any]) -> None:
    """The per-group figures of the peer (Fairlearn's MetricFrame with scikit-learn's metrics)
    on the same predictions, segment by segment."""
    from fairlearn.metrics import MetricFrame
    from sklearn.metrics import recall_score, roc_auc_score

    log, book = shadow_case(n=500, challenger=False)
    ours = evaluate(log, book, 0.55, n_boot=50)["champion"].segments
    y = log["study_uid"].map(book.verdicts()).to_numpy()
    metrics = {
        "auroc": roc_auc_score,
        "sensitivity": lambda t, p: recall_score(t, p >= 0.55),
        "specificity": lambda t, p: recall_score(t, p >= 0.55, pos_label=0),
    }
    compared = 0
    for column in ("sex", "age_band", "scanner_model"):
        theirs = MetricFrame(
            metrics=metrics, y_true=y, y_pred=log["probability"].to_numpy(),
            sensitive_features=log[column],
        )  # fmt: skip
        for segment, row in theirs.by_group.iterrows():
            mine = ours[(ours["column"] == column) & (ours["segment"] == segment)].iloc[0]
            assert mine[["auroc", "sensitivity", "specificity"]].tolist() == pytest.approx(
                row[["auroc", "sensitivity", "specificity"]].tolist(), abs=1e-12
            )
            compared += 1
    assert compared == 7


def test_the_cis_are_segment_tables_with_the_same_seed(shadow_case: Callable[..., Any]) -> None:
    from shiftguard.evaluation.segments import segment_table

    log, book = shadow_case(n=500, challenger=False)
    ours = evaluate(log, book, 0.5, by=("sex", "scanner_model"), n_boot=300, seed=3)["champion"]
    frame = ours.joined.assign(overall="all")
    reference = segment_table(
        frame, ["overall", "sex", "scanner_model"], score_col="probability", label_col="finding",
        threshold=0.5, n_boot=300, seed=3,
    )  # fmt: skip
    columns = [
        f"{m}{s}" for m in ("auroc", "sensitivity", "specificity") for s in ("_low", "_high")
    ]
    np.testing.assert_array_equal(ours.segments[columns], reference[columns])
