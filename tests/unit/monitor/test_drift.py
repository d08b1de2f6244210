"""The drift engine against Evidently 0.7.23's DataDriftPreset as the oracle, and against scipy.

Two pairs of frames cover every branch of Evidently's default test selection: a small reference
(400 rows: ks, chisquare, z) and a large one (1500 rows: wasserstein, jensenshannon), each with
continuous, few-valued, binary and constant numerical columns, categorical columns with two and
more values, shifted and unshifted columns, NaN/±inf values and a category seen only in the current
window. Evidently runs once per pair (module-scoped fixture); every column's test name, threshold,
score and verdict must agree.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd
import pytest
from evidently import DataDefinition, Dataset, Report
from evidently.presets import DataDriftPreset
from scipy import stats
from scipy.spatial import distance

from shiftguard.errors import ShiftGuardError
from shiftguard.monitor.drift import (
    CATEGORICAL,
    NUMERICAL,
    ColumnDrift,
    DriftEngine,
    DriftInputError,
    DriftResult,
)

# Evidently stores the test's display name in the snapshot; map it back to the registry name.
DISPLAY_TO_NAME = {
    "K-S p_value": "ks",
    "chi-square p_value": "chisquare",
    "Z-test p_value": "z",
    "Wasserstein distance (normed)": "wasserstein",
    "Jensen-Shannon distance": "jensenshannon",
}

KINDS: dict[str, str] = {
    "cont_same": NUMERICAL,
    "cont_shift": NUMERICAL,
    "cont_nan_inf": NUMERICAL,
    "sparse": NUMERICAL,  # 60 % missing: 600 finite of 1500 in the large reference -> still ks
    "tiny_std": NUMERICAL,  # std below Evidently's 0.001 floor
    "six_values": NUMERICAL,  # 6 distinct values: continuous tests
    "five_values": NUMERICAL,  # 5 distinct values: tested as categories
    "three_near": NUMERICAL,
    "binary_shift": NUMERICAL,
    "binary_near": NUMERICAL,
    "constant": NUMERICAL,
    "cat3_near": CATEGORICAL,
    "cat3_shift": CATEGORICAL,
    "cat_new": CATEGORICAL,  # a category only in current
    "cat_gone": CATEGORICAL,  # a category only in reference
    "cat_bin_shift": CATEGORICAL,
    "cat_bin_near": CATEGORICAL,
    "cat_missing": CATEGORICAL,  # None and NaN among the values
    "cat_int": CATEGORICAL,  # integer codes
    "cat_constant": CATEGORICAL,
}

SIZES = {"small": (400, 300), "large": (1500, 1200)}


def _frame(n: int, seed: int, current: bool) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    shift = 1.0 if current else 0.0

    def with_gaps(x: np.ndarray) -> np.ndarray:
        x = x.copy()
        x[rng.random(n) < 0.05] = np.nan
        x[:3] = [np.inf, -np.inf, np.inf]
        return x

    def choice(values: list[Any], p_ref: list[float], p_cur: list[float] | None = None) -> Any:
        p = p_cur if (current and p_cur is not None) else p_ref
        return rng.choice(np.array(values, dtype=object), n, p=p)

    def exact(values: list[Any], p_ref: list[float], p_cur: list[float]) -> Any:
        # fixed proportions (up to rounding), shuffled: a column that is, by construction, close
        # to but not the same as the reference
        p = p_cur if current else p_ref
        counts = [round(q * n) for q in p[:-1]]
        counts.append(n - sum(counts))
        return rng.permutation(np.repeat(np.array(values, dtype=object), counts))

    sparse = rng.normal(0, 1, n)
    sparse[: int(0.6 * n)] = np.nan
    missing = exact(
        ["a", "b", "c", None, np.nan], [0.3, 0.3, 0.2, 0.1, 0.1], [0.28, 0.32, 0.2, 0.1, 0.1]
    )
    return pd.DataFrame(
        {
            "cont_same": rng.normal(0, 1, n),
            "cont_shift": rng.normal(0.6 * shift, 1, n),
            "cont_nan_inf": with_gaps(rng.normal(0.3 * shift, 1, n)),
            "sparse": sparse,
            "tiny_std": rng.normal(3e-4 * shift, 1e-4, n),
            "six_values": rng.integers(0, 6, n).astype(float),
            "five_values": choice([0, 1, 2, 3, 4], [0.2] * 5, [0.3, 0.1, 0.2, 0.2, 0.2]),
            "three_near": exact([0.5, 1.5, 2.5], [0.5, 0.3, 0.2], [0.47, 0.33, 0.2]),
            "binary_shift": choice([0.0, 1.0], [0.5, 0.5], [0.3, 0.7]),
            "binary_near": exact([0.0, 1.0], [0.5, 0.5], [0.46, 0.54]),
            "constant": np.full(n, 3.0),
            "cat3_near": exact(["x", "y", "z"], [0.5, 0.3, 0.2], [0.46, 0.32, 0.22]),
            "cat3_shift": choice(["x", "y", "z"], [0.5, 0.3, 0.2], [0.3, 0.3, 0.4]),
            "cat_new": choice(["a", "b", "c", "NEW"], [0.4, 0.3, 0.3, 0.0], [0.35, 0.3, 0.3, 0.05]),
            "cat_gone": choice(["a", "b", "c"], [0.4, 0.3, 0.3], [0.5, 0.5, 0.0]),
            "cat_bin_shift": choice(["p", "q"], [0.5, 0.5], [0.35, 0.65]),
            "cat_bin_near": exact(["p", "q"], [0.5, 0.5], [0.47, 0.53]),
            "cat_missing": missing,
            "cat_int": rng.integers(0, 4, n),
            "cat_constant": np.full(n, "only", dtype=object),
        }
    ).astype(
        {"five_values": float, "three_near": float, "binary_shift": float, "binary_near": float}
    )


def _evidently(
    reference: pd.DataFrame, current: pd.DataFrame, kinds: dict[str, str]
) -> tuple[dict[str, tuple[str, float, float, bool]], float, float]:
    """Evidently's ``{column: (test, score, threshold, drifted)}``, drifted share and count."""
    definition = DataDefinition(
        numerical_columns=[c for c, k in kinds.items() if k == NUMERICAL],
        categorical_columns=[c for c, k in kinds.items() if k == CATEGORICAL],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # chi-square's division by zero for a new category
        snapshot = Report([DataDriftPreset()], include_tests=True).run(
            Dataset.from_pandas(current, data_definition=definition),
            Dataset.from_pandas(reference, data_definition=definition),
        )
    d = snapshot.dict()
    failed = {
        t["metric_config"]["metric_id"]: t["status"] == "FAIL"
        for t in d["tests"]
        if t["id"] == "drift"
    }
    out: dict[str, tuple[str, float, float, bool]] = {}
    share = count = math.nan
    for m in d["metrics"]:
        cfg = m["config"]
        if cfg["type"] == "evidently:metric_v2:ValueDrift":
            name = DISPLAY_TO_NAME.get(cfg["method"], cfg["method"])
            out[cfg["column"]] = (name, float(m["value"]), float(cfg["threshold"]), failed[m["id"]])
        elif cfg["type"] == "evidently:metric_v2:DriftedColumnsCount":
            share, count = float(m["value"]["share"]), float(m["value"]["count"])
    return out, share, count


@pytest.fixture(scope="module")
def compared() -> dict[str, dict[str, Any]]:
    """Per size: the frames, Evidently's results and ours."""
    out = {}
    for size, (n_ref, n_cur) in SIZES.items():
        reference, current = _frame(n_ref, 1, current=False), _frame(n_cur, 2, current=True)
        expected, share, count = _evidently(reference, current, KINDS)
        result = DriftEngine(reference, KINDS).run(current)
        out[size] = {
            "reference": reference,
            "current": current,
            "expected": expected,
            "share": share,
            "count": count,
            "result": result,
        }
    return out


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-300) or (math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("column", list(KINDS))
@pytest.mark.parametrize("size", list(SIZES))
def test_column_matches_evidently(
    compared: dict[str, dict[str, Any]], size: str, column: str
) -> None:
    expected_test, expected_score, expected_threshold, expected_drifted = compared[size][
        "expected"
    ][column]
    got = compared[size]["result"].columns[column]
    assert got.test == expected_test
    assert got.threshold == expected_threshold
    assert _close(got.score, expected_score), (got.score, expected_score)
    assert got.drifted is expected_drifted
    assert got.kind == KINDS[column]


def test_frames_cover_every_branch(compared: dict[str, dict[str, Any]]) -> None:
    # Guards the fixture: if a frame changes, every test/kind pair must still be exercised, with
    # both verdicts for the p-value tests and the distances.
    seen = {
        (c.kind, c.test, c.drifted)
        for size in SIZES
        for c in compared[size]["result"].columns.values()
    }
    for kind, test in [
        (NUMERICAL, "ks"),
        (NUMERICAL, "wasserstein"),
        (NUMERICAL, "chisquare"),
        (NUMERICAL, "z"),
        (NUMERICAL, "jensenshannon"),
        (CATEGORICAL, "chisquare"),
        (CATEGORICAL, "z"),
        (CATEGORICAL, "jensenshannon"),
    ]:
        assert (kind, test, True) in seen, (kind, test)
        assert (kind, test, False) in seen, (kind, test)


def test_reference_size_counts_finite_values_only(compared: dict[str, dict[str, Any]]) -> None:
    large = compared["large"]["result"].columns
    assert large["sparse"].n_reference == 600
    assert large["sparse"].test == "ks"
    assert large["cont_nan_inf"].test == "wasserstein"
    reference = compared["large"]["reference"]["cont_nan_inf"]
    assert large["cont_nan_inf"].n_reference == int(np.isfinite(reference).sum())


def test_new_category_gives_zero_p_value(compared: dict[str, dict[str, Any]]) -> None:
    small = compared["small"]["result"].columns
    assert small["cat_new"].score == 0.0
    assert small["cat_new"].drifted
    assert small["constant"].score == 1.0  # z-test of one shared value
    assert small["cat_constant"].score == 1.0


@pytest.mark.parametrize("size", list(SIZES))
def test_share_and_count_match_evidently(compared: dict[str, dict[str, Any]], size: str) -> None:
    result: DriftResult = compared[size]["result"]
    assert result.n_drifted == compared[size]["count"]
    assert result.share == pytest.approx(compared[size]["share"], rel=1e-12)
    assert result.dataset_drift(result.share) is True  # Evidently: share >= drift_share
    assert result.dataset_drift(result.share + 1e-9) is False


@pytest.mark.parametrize("size", list(SIZES))
def test_distance_is_ks_statistic_or_jensen_shannon(
    compared: dict[str, dict[str, Any]], size: str
) -> None:
    reference, current = compared[size]["reference"], compared[size]["current"]
    for column, c in compared[size]["result"].columns.items():
        if c.kind == NUMERICAL:
            ref = reference[column].to_numpy(float)
            cur = current[column].to_numpy(float)
            d = stats.ks_2samp(ref[np.isfinite(ref)], cur[np.isfinite(cur)]).statistic
            assert c.distance == pytest.approx(d, abs=1e-12), column
        else:
            ref_counts = reference[column].dropna().astype(str).value_counts()
            cur_counts = current[column].dropna().astype(str).value_counts()
            keys = sorted(set(ref_counts.index) | set(cur_counts.index))
            p = ref_counts.reindex(keys, fill_value=0).to_numpy() / ref_counts.sum()
            q = cur_counts.reindex(keys, fill_value=0).to_numpy() / cur_counts.sum()
            assert c.distance == pytest.approx(distance.jensenshannon(p, q), abs=1e-12), column
        assert 0.0 <= c.distance <= 1.0


@pytest.mark.parametrize(
    ("n_ref", "n_cur", "decimals"),
    [(300, 200, None), (900, 5000, 1), (12_000, 800, None), (2000, 3000, 2)],
)
def test_ks_and_wasserstein_match_scipy_tightly(
    n_ref: int, n_cur: int, decimals: int | None
) -> None:
    rng = np.random.default_rng(n_ref + n_cur)
    ref, cur = rng.normal(0, 1, n_ref), rng.normal(0.05, 1.1, n_cur)
    if decimals is not None:  # ties
        ref, cur = np.round(ref, decimals), np.round(cur, decimals)
    c = (
        DriftEngine(pd.DataFrame({"x": ref}), {"x": NUMERICAL})
        .run(pd.DataFrame({"x": cur}))
        .columns["x"]
    )
    ks = stats.ks_2samp(ref, cur)
    assert c.distance == pytest.approx(ks.statistic, rel=1e-12)
    if n_ref <= 1000:
        assert c.test == "ks"
        assert c.score == pytest.approx(ks.pvalue, rel=1e-9)
    else:
        assert c.test == "wasserstein"
        expected = stats.wasserstein_distance(ref, cur) / max(float(np.std(ref)), 0.001)
        assert c.score == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_p_values_are_scipys_own_bit_for_bit(seed: int) -> None:
    """The engine calls scipy's tests past their axis/NaN wrapper: the p-values must be exactly
    what the public functions return, ties and few-valued columns included."""
    rng = np.random.default_rng(seed)
    n_ref, n_cur = int(rng.integers(20, 1000)), int(rng.integers(5, 300))
    ref = pd.DataFrame({
        "x": np.round(rng.normal(0, 1, n_ref), seed % 3 + 1),
        "c": rng.choice(["a", "b", "c", "d"], n_ref, p=[0.4, 0.3, 0.2, 0.1]),
        "b": rng.choice(["yes", "no"], n_ref),
    })  # fmt: skip
    cur = pd.DataFrame({
        "x": np.round(rng.normal(0.2, 1.2, n_cur), seed % 3 + 1),
        "c": rng.choice(["a", "b", "c", "d"], n_cur, p=[0.25, 0.25, 0.25, 0.25]),
        "b": rng.choice(["yes", "no"], n_cur, p=[0.7, 0.3]),
    })  # fmt: skip
    kinds = {"x": NUMERICAL, "c": CATEGORICAL, "b": CATEGORICAL}
    result = DriftEngine(ref, kinds).run(cur).columns
    assert result["x"].test == "ks"
    assert result["x"].score == stats.ks_2samp(ref["x"], cur["x"]).pvalue
    keys = ["a", "b", "c", "d"]
    ref_counts = ref["c"].value_counts().reindex(keys, fill_value=0).to_numpy(dtype=float)
    cur_counts = cur["c"].value_counts().reindex(keys, fill_value=0).to_numpy(dtype=float)
    assert result["c"].test == "chisquare"
    expected = stats.chisquare(cur_counts, ref_counts * (n_cur / n_ref)).pvalue
    assert result["c"].score == expected
    p1 = float((ref["b"] == "yes").sum()) / n_ref  # the second of the sorted values
    p2 = float((cur["b"] == "yes").sum()) / n_cur
    pooled = (p1 * n_ref + p2 * n_cur) / (n_ref + n_cur)
    z = (p1 - p2) / np.sqrt(pooled * (1 - pooled) * (1.0 / n_ref + 1.0 / n_cur))
    assert result["b"].test == "z"
    assert result["b"].score == float(2 * (1 - stats.norm.cdf(np.abs(z))))


def test_identical_windows_do_not_drift() -> None:
    frame = _frame(1500, 5, current=False)
    result = DriftEngine(frame, KINDS).run(frame)
    assert result.n_drifted == 0
    assert result.share == 0.0
    assert result.dataset_drift() is False
    assert all(c.distance == 0.0 for c in result.columns.values())


def test_engine_is_reusable_across_windows() -> None:
    reference = _frame(500, 1, current=False)
    engine = DriftEngine(reference, KINDS)
    windows = [_frame(300, seed, current=bool(seed % 2)) for seed in (2, 3)]
    first = [engine.run(w) for w in windows]
    again = [engine.run(w) for w in windows]
    fresh = [DriftEngine(reference, KINDS).run(w) for w in windows]
    assert first == again == fresh
    assert first[0] != first[1]


def test_empty_column_is_reported_not_tested() -> None:
    rng = np.random.default_rng(0)
    reference = pd.DataFrame({"x": rng.normal(0, 1, 200), "e": rng.normal(0, 1, 200), "c": "a"})
    current = pd.DataFrame({"x": rng.normal(1, 1, 200), "e": np.inf, "c": None})
    kinds = {"x": NUMERICAL, "e": NUMERICAL, "c": CATEGORICAL}
    # Evidently fails the whole report on an empty column ...
    with pytest.raises(ValueError, match="empty column"):
        _evidently(reference, current, kinds)
    # ... the engine leaves it out, and out of the share.
    result = DriftEngine(reference, kinds).run(current)
    assert set(result.columns) == {"x"}
    assert result.empty == ("e", "c")
    assert result.share == 1.0
    assert list(result.to_frame().index) == ["x"]
    all_missing = DriftEngine(reference.assign(x=np.nan), {"x": NUMERICAL}).run(current)
    assert all_missing.columns == {}
    assert all_missing.share == 0.0
    assert all_missing.dataset_drift() is False


def test_an_empty_column_is_logged_once_not_every_window(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(1)
    reference = pd.DataFrame({"x": rng.normal(0, 1, 200), "kvp": np.nan})
    engine = DriftEngine(reference, {"x": NUMERICAL, "kvp": NUMERICAL})
    with caplog.at_level("INFO", logger="shiftguard.monitor.drift"):
        for _ in range(5):
            window = pd.DataFrame({"x": rng.normal(0, 1, 50), "kvp": np.nan})
            assert engine.run(window).empty == ("kvp",)  # still left out every time
    said = [r for r in caplog.records if "no values" in r.getMessage()]
    assert len(said) == 1 and "kvp" in said[0].getMessage()


def test_missing_current_column_is_named() -> None:
    reference = pd.DataFrame({"snr": [1.0, 2.0, 3.0], "vendor": ["a", "b", "a"]})
    engine = DriftEngine(reference, {"snr": NUMERICAL, "vendor": CATEGORICAL})
    with pytest.raises(ValueError, match="'vendor'") as info:
        engine.run(reference.drop(columns="vendor"))
    assert isinstance(info.value, DriftInputError)
    assert isinstance(info.value, ShiftGuardError)
    assert "current" in str(info.value)


def test_bad_kinds_and_missing_reference_columns_are_named() -> None:
    reference = pd.DataFrame({"snr": [1.0, 2.0]})
    with pytest.raises(DriftInputError, match=r"'snr'.*'ordinal'"):
        DriftEngine(reference, {"snr": "ordinal"})
    with pytest.raises(DriftInputError, match=r"'te'.*reference"):
        DriftEngine(reference, {"snr": NUMERICAL, "te": NUMERICAL})


def test_numerical_values_are_coerced() -> None:
    rng = np.random.default_rng(4)
    ref, cur = rng.normal(0, 1, 300), rng.normal(0.2, 1, 250)
    engine = DriftEngine(pd.DataFrame({"x": ref}), {"x": NUMERICAL})
    as_text = pd.Series([str(v) for v in cur] + ["n/a", "", None], dtype=object)
    got = engine.run(pd.DataFrame({"x": as_text})).columns["x"]
    assert got == engine.run(pd.DataFrame({"x": cur})).columns["x"]
    assert got.n_current == 250
    # nullable integers and pd.NA
    ints = pd.Series([1, 2, 3, 4, 5, 6, pd.NA] * 20, dtype="Int64")
    c = DriftEngine(pd.DataFrame({"x": ints}), {"x": NUMERICAL}).run(pd.DataFrame({"x": ints}))
    assert c.columns["x"].n_reference == 120
    assert c.columns["x"].score == 1.0


def test_categories_are_compared_as_strings() -> None:
    rng = np.random.default_rng(6)
    ref, cur = rng.integers(0, 12, 600), rng.integers(0, 12, 500)
    as_int = DriftEngine(pd.DataFrame({"c": ref}), {"c": CATEGORICAL}).run(pd.DataFrame({"c": cur}))
    as_str = DriftEngine(pd.DataFrame({"c": ref.astype(str)}), {"c": CATEGORICAL}).run(
        pd.DataFrame({"c": cur.astype(str)})
    )
    assert as_int == as_str
    # a pandas Categorical with a category no row uses: the unused category is not a value
    levels = [str(v) for v in range(13)]
    as_category = DriftEngine(
        pd.DataFrame({"c": pd.Categorical(ref.astype(str), categories=levels)}), {"c": CATEGORICAL}
    ).run(pd.DataFrame({"c": pd.Categorical(cur.astype(str), categories=levels)}))
    assert as_category == as_str
    mixed = pd.DataFrame({"c": pd.Series(["1", 1, "2", 2] * 100, dtype=object)})
    column = DriftEngine(mixed, {"c": CATEGORICAL}).run(mixed).columns["c"]
    assert column.test == "z"  # two categories, "1" and "2"
    assert column.score == 1.0


def test_to_frame_has_one_row_per_column(compared: dict[str, dict[str, Any]]) -> None:
    result: DriftResult = compared["large"]["result"]
    frame = result.to_frame()
    assert list(frame.index) == list(KINDS)
    assert list(frame.columns) == [
        "kind",
        "test",
        "score",
        "threshold",
        "drifted",
        "distance",
        "n_reference",
        "n_current",
    ]
    assert frame["drifted"].sum() == result.n_drifted
    row = frame.loc["cont_shift"]
    column: ColumnDrift = result.columns["cont_shift"]
    assert (row["test"], row["score"], row["distance"]) == (
        column.test,
        column.score,
        column.distance,
    )
