"""Per-segment table: judgeability, gaps to the overall figure, age bands."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from shiftguard.evaluation.segments import age_bands, segment_table
from shiftguard.metrics import MetricInputError, auroc, binary_report


def _frame(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = 400
    label = rng.integers(0, 2, n)
    vendor = rng.choice(["GE", "Siemens"], n)
    shift = np.where(vendor == "GE", 2.0, 0.5)  # GE separates better
    score = 1 / (1 + np.exp(-(rng.normal(size=n) + shift * (label - 0.5))))
    frame = pd.DataFrame(
        {"score": score, "label": label, "vendor": vendor, "age": rng.uniform(20, 90, n)}
    )
    frame["sex"] = rng.choice(["F", "M"], n)
    # a tiny site with only negatives, and a small site below min_n
    frame["site"] = "A"
    neg_rows = frame.index[frame["label"] == 0][:8]
    frame.loc[neg_rows, "site"] = "C"
    site_a = frame["site"] == "A"
    small = np.r_[
        frame.index[site_a & (frame["label"] == 1)][:6],
        frame.index[site_a & (frame["label"] == 0)][:6],
    ]
    frame.loc[small, "site"] = "B"  # 12 cases, both classes: below min_n=20 only
    frame.loc[frame.index[:3], "sex"] = None
    return frame


def test_segment_table_rows_and_counts() -> None:
    frame = _frame()
    table = segment_table(frame, ["vendor", "site", "sex"], threshold=0.5, n_boot=100)
    assert list(table["column"]) == [
        "vendor",
        "vendor",
        "site",
        "site",
        "site",
        "sex",
        "sex",
        "sex",
    ]
    assert list(table["segment"][table["column"] == "sex"]) == ["F", "M", "missing"]
    for column in ("vendor", "site", "sex"):
        assert table.loc[table["column"] == column, "n"].sum() == len(frame)
    ge = table[(table["column"] == "vendor") & (table["segment"] == "GE")].iloc[0]
    sub = frame[frame["vendor"] == "GE"]
    assert ge["n"] == len(sub) and ge["n_positive"] == sub["label"].sum()
    assert ge["auroc"] == pytest.approx(auroc(sub["label"], sub["score"]))
    assert ge["auroc_low"] <= ge["auroc"] <= ge["auroc_high"]


def test_one_class_and_small_segments_are_not_judgeable() -> None:
    table = segment_table(_frame(), ["site"], threshold=0.5, n_boot=100).set_index("segment")
    assert not table.loc["C", "judgeable"]
    assert "one class" in table.loc["C", "reason"]
    assert math.isnan(table.loc["C", "auroc"])
    assert math.isnan(table.loc["C", "auroc_low"]) and math.isnan(table.loc["C", "auroc_gap"])
    assert table.loc["C", "specificity"] == pytest.approx(
        (_frame().query("site == 'C'")["score"] < 0.5).mean()
    )  # defined point values are still reported
    assert not table.loc["B", "judgeable"]
    assert table.loc["B", "reason"] == "n=12 < min_n=20"
    assert table.loc["A", "judgeable"] and table.loc["A", "reason"] == ""


def test_gaps_are_against_the_overall_figure() -> None:
    frame = _frame()
    overall = binary_report(frame["label"], frame["score"], threshold=0.5, n_boot=50)
    table = segment_table(frame, ["vendor"], threshold=0.5, overall=overall, n_boot=50)
    for m in ("auroc", "sensitivity", "specificity"):
        expected = table[m] - overall[m]["value"]  # type: ignore[index]
        np.testing.assert_allclose(table[f"{m}_gap"], expected)
    ge, siemens = table.set_index("segment").loc[["GE", "Siemens"], "auroc_gap"]
    assert ge > 0 > siemens
    flat = segment_table(frame, ["vendor"], threshold=0.5, overall={"auroc": 0.5}, n_boot=50)
    np.testing.assert_allclose(flat["auroc_gap"], flat["auroc"] - 0.5)
    assert flat["sensitivity_gap"].isna().all()  # no overall figure given -> no gap


def test_default_overall_is_whole_frame() -> None:
    frame = _frame()
    table = segment_table(frame, ["vendor"], threshold=0.5, n_boot=50)
    np.testing.assert_allclose(
        table["auroc_gap"], table["auroc"] - auroc(frame["label"], frame["score"])
    )


def test_segment_table_is_deterministic_for_a_seed() -> None:
    frame = _frame()
    a = segment_table(frame, ["vendor", "sex"], threshold=0.5, n_boot=100, seed=3)
    b = segment_table(frame, ["vendor", "sex"], threshold=0.5, n_boot=100, seed=3)
    pd.testing.assert_frame_equal(a, b)


def test_segment_table_missing_column() -> None:
    with pytest.raises(MetricInputError, match="scanner_model"):
        segment_table(_frame(), ["scanner_model"], threshold=0.5)


def test_age_bands_labels_and_order() -> None:
    bands = age_bands([12, 39.9, 40, 59, 60, 74, 75, 101, np.nan])
    assert list(bands.categories) == ["0-39", "40-59", "60-74", "75+"]
    assert bands.ordered
    assert list(bands[:8]) == [
        "0-39",
        "0-39",
        "40-59",
        "40-59",
        "60-74",
        "60-74",
        "75+",
        "75+",
    ]
    assert pd.isna(bands[8])


def test_age_bands_in_segment_table_keep_band_order() -> None:
    frame = _frame()
    frame["age_band"] = age_bands(frame["age"], edges=(0, 40, 60, 75, 200))
    table = segment_table(frame, ["age_band"], threshold=0.5, n_boot=50)
    present = [b for b in ["0-39", "40-59", "60-74", "75+"] if b in set(table["segment"])]
    assert list(table["segment"]) == present


@pytest.mark.parametrize(
    ("ages", "edges", "match"),
    [([30, 250], (0, 40, 200), "outside"), ([30], (0, 40, 40), "increasing"), ([30], (0,), "two")],
)
def test_age_bands_errors(ages: list, edges: tuple, match: str) -> None:
    with pytest.raises(MetricInputError, match=match):
        age_bands(ages, edges)
