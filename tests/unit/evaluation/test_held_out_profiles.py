"""The held-out-profile rule: a scanner profile a model trained with is never scored as unseen."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from shiftguard.evaluation.validate import held_out_profiles, robustness_summary


def table(rows: dict[str, list[float]]) -> pd.DataFrame:
    """Robustness rows: ``{profile: [AUROC at severity 0, 1, ...]}``."""
    return pd.DataFrame(
        [
            {"profile": p, "severity": s, "auroc": a}
            for p, values in rows.items()
            for s, a in enumerate(values)
        ]
    )


SHIFTED = table(
    {
        "low_field": [0.90, 0.89, 0.88],  # trained with: barely drops
        "rf_spike": [0.90, 0.80, 0.60],  # held out: drops 0.30
        "high_field_3t": [0.90, 0.85, 0.80],  # held out: drops 0.10
    }
)


def test_the_drop_is_scored_on_held_out_profiles_only() -> None:
    summary = robustness_summary(SHIFTED, ["low_field"])
    assert summary["profiles_scored"] == ["high_field_3t", "rf_spike"]
    assert summary["profiles_seen_in_training"] == ["low_field"]
    assert summary["auroc_drop_at_max_severity"] == pytest.approx(0.20)  # (0.30 + 0.10) / 2
    assert summary["worst_profile_at_max_severity"] == "rf_spike"
    assert summary["mean_auroc_by_severity"]["2"] == pytest.approx(0.70)


@pytest.mark.parametrize("seen", [["low_field", "rf_spike"], ["rf_spike", "high_field_3t"]])
def test_a_trained_profile_never_counts_as_unseen(seen: list[str]) -> None:
    summary = robustness_summary(SHIFTED, seen)
    assert not set(summary["profiles_scored"]) & set(seen)
    # the worst profile is never one the model trained with, even when it is the worst of all
    assert summary["worst_profile_at_max_severity"] not in seen


def test_every_profile_seen_or_unknown_gives_no_drop_and_says_why() -> None:
    everything = robustness_summary(SHIFTED, ["low_field", "rf_spike", "high_field_3t"])
    assert everything["auroc_drop_at_max_severity"] is None
    assert "every profile was used in training" in everything["reason"]
    unknown = robustness_summary(SHIFTED, None)
    assert unknown["auroc_drop_at_max_severity"] is None and unknown["profiles_scored"] == []
    assert "does not say" in unknown["reason"]
    # without augmentation every profile is held out
    none = robustness_summary(SHIFTED, [])
    assert none["auroc_drop_at_max_severity"] == pytest.approx((0.02 + 0.30 + 0.10) / 3)
    assert not math.isnan(none["auroc_drop_at_max_severity"])


def test_held_out_profiles_keeps_order() -> None:
    assert held_out_profiles(["b", "a", "c"], ["a"]) == ["b", "c"]
