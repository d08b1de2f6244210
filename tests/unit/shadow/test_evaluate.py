"""Shadow evaluation on constructed cases: a planted failure is flagged, a good model is not,
studies without a diagnosis are pending, batches of diagnoses do not change the result."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from shiftguard.shadow.diagnoses import Diagnosis, DiagnosisBook
from shiftguard.shadow.evaluate import evaluate, join


def case(
    n: int = 600, seed: int = 0, broken: str | None = None
) -> tuple[pd.DataFrame, DiagnosisBook]:
    """Predictions from a good model (AUROC ~0.95); on scanner ``broken`` it guesses."""
    rng = np.random.default_rng(seed)
    finding = rng.random(n) < 0.4
    scanner = rng.choice(["Skyra", "Ingenia", "Vantage"], n)
    score = np.clip(0.5 + np.where(finding, 0.25, -0.25) + rng.normal(0, 0.15, n), 0, 1)
    if broken is not None:
        score = np.where(scanner == broken, rng.random(n), score)
    predictions = pd.DataFrame(
        {
            "study_uid": [f"1.2.{i}" for i in range(n)],
            "probability": score,
            "scanner_model": scanner,
            "sex": rng.choice(["F", "M"], n),
            "role": "champion",
        }
    )
    book = DiagnosisBook()
    book.add(
        Diagnosis(f"1.2.{i}", "2026-01-01T00:00:00Z", "dr", int(f)) for i, f in enumerate(finding)
    )
    return predictions, book


def test_a_segment_with_a_planted_failure_is_flagged() -> None:
    predictions, book = case(broken="Vantage")
    result = evaluate(predictions, book, threshold=0.5, n_boot=200)["champion"]
    flagged = result.flagged
    assert list(zip(flagged["column"], flagged["segment"], strict=True)) == [
        ("scanner_model", "Vantage")
    ]
    assert flagged["flag_reason"].iloc[0].startswith("auroc ")
    assert "below overall" in flagged["flag_reason"].iloc[0]


def test_a_uniformly_good_model_flags_nothing() -> None:
    predictions, book = case(seed=1)
    result = evaluate(predictions, book, threshold=0.5, n_boot=200)["champion"]
    assert result.flagged.empty and result.n_pending == 0
    assert result.segments["judgeable"].all()


def test_below_validation_is_flagged_with_the_validation_figure() -> None:
    predictions, book = case(seed=2)
    # at 0.6 the model finds ~84% of lesions everywhere; validation found 99% in women
    validation = pd.DataFrame(
        [{"column": "sex", "segment": "F", "auroc": 0.5, "sensitivity": 0.99, "specificity": 0.0}]
    )
    result = evaluate(predictions, book, 0.6, validation=validation, n_boot=200)["champion"]
    [row] = result.flagged.to_dict("records")
    assert (row["column"], row["segment"]) == ("sex", "F")
    assert row["flag_reason"].startswith("sensitivity ")
    assert "below validation 0.990" in row["flag_reason"]
    assert row["sensitivity_validation_gap"] < -0.1


def test_studies_without_a_diagnosis_are_pending_not_dropped() -> None:
    predictions, book = case(n=100)
    partial = DiagnosisBook()
    partial.add(d for uid, reports in book.reports.items() for d in reports if uid < "1.2.5")
    joined, pending = join(predictions, partial)
    assert len(joined) + pending == 100 and pending > 50
    with pytest.raises(ValueError, match="lacks the column"):
        join(predictions.drop(columns=["probability"]), partial)


def test_diagnoses_in_batches_give_the_same_evaluation() -> None:
    predictions, book = case(seed=3, broken="Skyra")
    reports = [d for r in book.reports.values() for d in r]
    batched = DiagnosisBook()
    for chunk in (reports[400:], reports[:150], reports[150:400]):
        batched.add(chunk)
    one = evaluate(predictions, book, 0.5, n_boot=100)["champion"].segments
    two = evaluate(predictions, batched, 0.5, n_boot=100)["champion"].segments
    pd.testing.assert_frame_equal(one, two)
