"""Per-column drift of a window of feature records against the bundle's reference, fast.

:class:`DriftEngine` gives the same per-column verdicts, test names and scores as Evidently's
``Report([DataDriftPreset()])`` with default settings (checked against Evidently 0.7.23 in
``tests/unit/monitor/test_drift.py``), at a fraction of its cost: what can be reused across windows
(the sorted finite reference values, their standard deviation, the reference value counts) is
computed once, when the engine is built, and no report widgets are rendered.

Evidently's default test per column (``legacy/calculations/stattests/registry.py``,
``_get_default_stattest``) is chosen after NaN and ±inf are dropped from both columns; ``n_ref`` is
the number of values left in the reference and ``n_values`` the number of distinct values in
reference and current together:

=============================  ==================  ==================  =========  ==============
column                         ``n_ref <= 1000``   ``n_ref > 1000``    threshold  drift if
=============================  ==================  ==================  =========  ==============
numerical, ``n_values > 5``    ``ks``              ``wasserstein``     0.05/0.1   p <= 0.05 /
                                                                                  score >= 0.1
numerical, 3 to 5 values       ``chisquare``       ``jensenshannon``   0.05/0.1   p < 0.05 /
                                                                                  score >= 0.1
numerical, 1 or 2 values       ``z``               ``jensenshannon``   0.05/0.1   same
categorical, > 2 values        ``chisquare``       ``jensenshannon``   0.05/0.1   same
categorical, 1 or 2 values     ``z``               ``jensenshannon``   0.05/0.1   same
=============================  ==================  ==================  =========  ==============

The scores, as Evidently computes them:

* ``ks``: the p-value of ``scipy.stats.ks_2samp(reference, current)`` (two-sided, ``method="auto"``);
* ``wasserstein``: ``scipy.stats.wasserstein_distance(reference, current)`` divided by
  ``max(np.std(reference), 0.001)`` (population standard deviation);
* ``chisquare``: the p-value of ``scipy.stats.chisquare(f_obs, f_exp)`` over the union of values,
  with ``f_obs`` the current counts and ``f_exp`` the reference counts times
  ``n_current / n_reference``; a value seen only in the current window gives ``f_exp = 0`` and
  p = 0 (Evidently gets there through an infinite statistic and a RuntimeWarning; here without);
* ``z``: the pooled two-proportion z-test of "equal to the smallest value" against the rest,
  ``p = 2 * (1 - Phi(|z|))``; p = 1 when both windows hold the same single value;
* ``jensenshannon``: ``scipy.spatial.distance.jensenshannon`` (natural log, a distance in
  [0, 0.833]) of the per-value frequencies over the union of values, without smoothing.

Differences from Evidently, on purpose:

* A column whose reference or current values are all missing (NaN, None, ±inf) gets no
  :class:`ColumnDrift`; it is listed in :attr:`DriftResult.empty` and left out of the share of
  drifted columns. Evidently raises ``ValueError("An empty column ... was provided for drift
  calculation ...")`` and the whole report fails.
* Column kinds come from the caller, not from Evidently's automatic typing. Numerical columns go
  through ``pd.to_numeric(errors="coerce")`` (text that is not a number becomes missing; Evidently
  refuses a non-numeric column). Categorical values are compared as strings, after the missing
  values are dropped as Evidently drops them, so ``1`` and ``"1"`` are one category (and ``1`` and
  ``1.0`` two, where Evidently would merge them).

Besides the score, every column gets a :attr:`ColumnDrift.distance`, an effect size comparable
across columns and windows whatever test the reference size selects: the two-sample KS statistic D
for numerical columns, the Jensen-Shannon distance of the per-value frequencies for categorical
ones.

Example:
    >>> import numpy as np
    >>> import pandas as pd
    >>> rng = np.random.default_rng(0)
    >>> reference = pd.DataFrame({"snr": rng.normal(20, 2, 500), "vendor": rng.choice(["GE", "Siemens"], 500)})
    >>> current = pd.DataFrame({"snr": rng.normal(23, 2, 300), "vendor": rng.choice(["GE", "Siemens"], 300)})
    >>> engine = DriftEngine(reference, {"snr": "numerical", "vendor": "categorical"})
    >>> result = engine.run(current)
    >>> result.columns["snr"].test, result.columns["snr"].drifted
    ('ks', True)
    >>> result.columns["vendor"].test, result.columns["vendor"].drifted
    ('z', False)
    >>> result.n_drifted, result.share, result.dataset_drift()
    (1, 0.5, True)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy import special, stats
from scipy.spatial import distance as spatial_distance

from shiftguard.errors import DriftInputError

__all__ = [
    "CATEGORICAL",
    "KINDS",
    "NUMERICAL",
    "ColumnDrift",
    "DriftEngine",
    "DriftInputError",
    "DriftResult",
]

logger = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]

# scipy's tests without their axis/NaN-policy wrapper: the engine hands them 1-D finite float64
# arrays, for which the wrapper only checks and reshapes, at about seven times the cost of the test
# itself (ks_2samp on 50 against 100 values: 259 against 35 us). The same p-values
# (tests/unit/monitor/test_drift.py holds them to the wrapped calls).
_ks_2samp = getattr(stats.ks_2samp, "__wrapped__", stats.ks_2samp)
_chisquare_test = getattr(stats.chisquare, "__wrapped__", stats.chisquare)

NUMERICAL = "numerical"
CATEGORICAL = "categorical"
KINDS = (NUMERICAL, CATEGORICAL)

SMALL_REFERENCE = 1000  # Evidently: p-value tests up to this many reference values, distances above
FEW_VALUES = 5  # numerical columns with at most this many distinct values are tested as categories
P_VALUE_THRESHOLD = 0.05  # ks, chisquare, z
DISTANCE_THRESHOLD = 0.1  # wasserstein, jensenshannon
MIN_STD = 0.001  # Evidently's floor on the reference standard deviation that norms wasserstein


@dataclass(frozen=True)
class ColumnDrift:
    """The drift of one column between the reference and one window.

    Attributes:
        column: The column's name.
        kind: ``"numerical"`` or ``"categorical"``.
        test: Evidently's name of the test it selects by default: ``"ks"``, ``"wasserstein"``,
            ``"chisquare"``, ``"z"`` or ``"jensenshannon"``.
        score: The test's p-value (``ks``, ``chisquare``, ``z``) or distance (``wasserstein``,
            ``jensenshannon``), as Evidently reports it.
        threshold: The test's default threshold (0.05 for p-values, 0.1 for distances).
        drifted: Evidently's verdict: ``score <= threshold`` for ``ks``, ``score < threshold`` for
            ``chisquare`` and ``z``, ``score >= threshold`` for the distances.
        distance: An effect size in [0, 1] comparable across windows and columns: the two-sample KS
            statistic D (numerical) or the Jensen-Shannon distance, natural log, of the per-value
            frequencies over the union of values (categorical, at most ``sqrt(ln 2)`` = 0.833).
        n_reference: Reference values left after NaN and ±inf are dropped.
        n_current: Current values left after NaN and ±inf are dropped.
    """

    column: str
    kind: str
    test: str
    score: float
    threshold: float
    drifted: bool
    distance: float
    n_reference: int
    n_current: int


@dataclass(frozen=True)
class DriftResult:
    """The drift of every column of one window.

    Attributes:
        columns: Per column with values in both tables, its :class:`ColumnDrift`, in the order of
            the engine's ``kinds``.
        empty: Columns left out because their reference or current values are all missing.
    """

    columns: dict[str, ColumnDrift]
    empty: tuple[str, ...] = field(default=())

    @property
    def n_drifted(self) -> int:
        """Number of drifted columns."""
        return sum(c.drifted for c in self.columns.values())

    @property
    def share(self) -> float:
        """Drifted columns over the columns with data (Evidently's ``DriftedColumnsCount`` share);
        0.0 when no column has data."""
        return self.n_drifted / len(self.columns) if self.columns else 0.0

    def dataset_drift(self, drift_share: float = 0.5) -> bool:
        """Evidently's dataset-drift flag: whether ``share >= drift_share``.

        Args:
            drift_share: The share of drifted columns from which the dataset counts as drifted.

        Returns:
            ``False`` when no column has data, otherwise ``share >= drift_share``.
        """
        return bool(self.columns) and self.share >= drift_share

    def to_frame(self) -> pd.DataFrame:
        """The per-column results as a table.

        Returns:
            One row per column with data, indexed by ``column``, with the columns ``kind``,
            ``test``, ``score``, ``threshold``, ``drifted``, ``distance``, ``n_reference`` and
            ``n_current``.
        """
        names = [f for f in ColumnDrift.__dataclass_fields__ if f != "column"]
        rows = [asdict(c) for c in self.columns.values()]
        frame = pd.DataFrame(rows, columns=["column", *names])
        return frame.set_index("column")


@dataclass(frozen=True)
class _NumericalReference:
    values: FloatArray  # finite values, sorted
    std: float  # population standard deviation (ddof=0) of the finite values


@dataclass(frozen=True)
class _CategoricalReference:
    counts: dict[str, int]  # value (as a string) -> count
    n: int


def _finite(series: pd.Series) -> FloatArray:
    """The finite values of a column coerced to numbers, as float64 in their original order."""
    if pd.api.types.is_float_dtype(series.dtype) or pd.api.types.is_integer_dtype(series.dtype):
        numbers = series  # nothing to coerce (nullable integers and floats included)
    else:
        numbers = pd.to_numeric(series, errors="coerce")
    values = np.asarray(numbers.to_numpy(dtype=np.float64, na_value=np.nan), dtype=np.float64)
    return values[np.isfinite(values)]


def _category_counts(series: pd.Series) -> dict[str, int]:
    """The count of each value of a column as a string, after dropping NaN, None and ±inf as
    Evidently does."""
    kept = series.replace([-np.inf, np.inf], np.nan).dropna().astype(str)
    return {str(k): int(v) for k, v in kept.value_counts(sort=False).items() if v > 0}


def _chisquare(ref_counts: FloatArray, cur_counts: FloatArray, n_ref: int, n_cur: int) -> float:
    expected = ref_counts * (n_cur / n_ref)
    if np.any(expected == 0):
        return 0.0  # a value only in current: infinite statistic, as in scipy
    return float(_chisquare_test(cur_counts, expected)[1])


def _z_test(ref_first: int, cur_first: int, n_ref: int, n_cur: int, n_values: int) -> float:
    """Evidently's pooled two-proportion z-test; ``*_first``: counts of the smallest value."""
    if n_values <= 1:
        return 1.0
    p1 = float(n_ref - ref_first) / n_ref
    p2 = float(n_cur - cur_first) / n_cur
    pooled = float(p1 * n_ref + p2 * n_cur) / (n_ref + n_cur)
    z = (p1 - p2) / np.sqrt(pooled * (1 - pooled) * (1.0 / n_ref + 1.0 / n_cur))
    return float(2 * (1 - special.ndtr(np.abs(z))))  # stats.norm.cdf's own function


def _jensenshannon(ref_counts: FloatArray, cur_counts: FloatArray, n_ref: int, n_cur: int) -> float:
    return float(spatial_distance.jensenshannon(ref_counts / n_ref, cur_counts / n_cur))


class DriftEngine:
    """Drift of windows of records against one reference, with Evidently's default tests.

    Build it once per reference; :meth:`run` then costs a sort of the window's values and a merge
    with the pre-sorted reference per numerical column, and a value count per categorical column.

    Args:
        reference: The reference table, one row per record (the bundle's reference features).
        kinds: The columns to test, each mapped to ``"numerical"`` or ``"categorical"``. Other
            columns of ``reference`` (and later of ``current``) are ignored.

    Raises:
        DriftInputError: A kind is neither ``"numerical"`` nor ``"categorical"``, or a column of
            ``kinds`` is missing from ``reference``.
    """

    def __init__(self, reference: pd.DataFrame, kinds: Mapping[str, str]) -> None:
        bad = {c: k for c, k in kinds.items() if k not in KINDS}
        if bad:
            raise DriftInputError(
                f"unknown column kind(s) {bad}; each column of kinds must be "
                f"{NUMERICAL!r} or {CATEGORICAL!r}"
            )
        missing = [c for c in kinds if c not in reference.columns]
        if missing:
            raise DriftInputError(
                f"column(s) {missing} of kinds are missing from the reference table "
                f"(it has {list(reference.columns)}); add them or drop them from kinds"
            )
        self._kinds: dict[str, str] = dict(kinds)
        self._said_empty: set[str] = set()
        self._numerical: dict[str, _NumericalReference] = {}
        self._categorical: dict[str, _CategoricalReference] = {}
        for column, kind in self._kinds.items():
            if kind == NUMERICAL:
                finite = _finite(reference[column])
                std = float(np.std(finite)) if finite.size else 0.0
                self._numerical[column] = _NumericalReference(np.sort(finite), std)
            else:
                counts = _category_counts(reference[column])
                self._categorical[column] = _CategoricalReference(counts, sum(counts.values()))

    @property
    def kinds(self) -> dict[str, str]:
        """The tested columns and their kinds (a copy)."""
        return dict(self._kinds)

    def run(self, current: pd.DataFrame) -> DriftResult:
        """Test every column of ``kinds`` in one window against the reference.

        Args:
            current: The window's table, one row per record; it must hold every column of
                ``kinds``.

        Returns:
            The per-column results; columns whose reference or current values are all missing are
            listed in :attr:`DriftResult.empty` instead.

        Raises:
            DriftInputError: A column of ``kinds`` is missing from ``current`` (a ``ValueError``).
        """
        missing = [c for c in self._kinds if c not in current.columns]
        if missing:
            raise DriftInputError(
                f"column(s) {missing} are missing from the current table, which has "
                f"{list(current.columns)}; every column the engine was built with must be present"
            )
        columns: dict[str, ColumnDrift] = {}
        empty: list[str] = []
        for column, kind in self._kinds.items():
            if kind == NUMERICAL:
                drift = self._numerical_drift(column, current[column])
            else:
                drift = self._categorical_drift(column, current[column])
            if drift is None:
                empty.append(column)
            else:
                columns[column] = drift
        unsaid = [c for c in empty if c not in self._said_empty]
        if unsaid:  # once per column: a window after window of the same gap is not news
            self._said_empty.update(unsaid)
            logger.info(
                "drift: no values in the reference or current window for %s (not tested while "
                "they have none; said once)",
                unsaid,
            )
        return DriftResult(columns, tuple(empty))

    def _numerical_drift(self, column: str, series: pd.Series) -> ColumnDrift | None:
        ref = self._numerical[column]
        cur = np.sort(_finite(series))
        n_ref, n_cur = ref.values.size, cur.size
        if n_ref == 0 or n_cur == 0:
            return None
        # Both empirical CDFs on the merged sorted values: a stable argsort of two sorted runs is a
        # linear merge, and the running count of reference values along it gives both CDFs. Within
        # a run of ties the counts are partial, but there the gap to the next value is 0: the
        # Wasserstein integral is unaffected and the KS statistic is read at the last of each run
        # (where the gap is > 0), which is where ``ks_2samp``'s ``searchsorted(..., "right")``
        # evaluates the CDFs.
        both = np.concatenate((ref.values, cur))
        order = np.argsort(both, kind="stable")
        merged = both[order]
        deltas = np.diff(merged)
        steps = deltas != 0
        n_values = 1 + int(np.count_nonzero(steps))
        ref_seen = np.cumsum(order[:-1] < n_ref)
        cur_seen = np.arange(1, merged.size) - ref_seen
        diff = ref_seen / n_ref - cur_seen / n_cur
        d_stat = float(np.max(np.abs(diff[steps]))) if n_values > 1 else 0.0

        if n_values > FEW_VALUES:
            if n_ref <= SMALL_REFERENCE:
                test, score = "ks", float(_ks_2samp(ref.values, cur)[1])
            else:
                wasserstein = float(np.dot(np.abs(diff), deltas))
                test, score = "wasserstein", wasserstein / max(ref.std, MIN_STD)
        else:
            keys = merged[np.concatenate(([True], steps))]
            ref_counts = (
                ref.values.searchsorted(keys, "right") - ref.values.searchsorted(keys, "left")
            ).astype(np.float64)
            cur_counts = (cur.searchsorted(keys, "right") - cur.searchsorted(keys, "left")).astype(
                np.float64
            )
            test, score = _few_values_test(ref_counts, cur_counts, n_ref, n_cur)
        return _column_drift(column, NUMERICAL, test, score, d_stat, n_ref, n_cur)

    def _categorical_drift(self, column: str, series: pd.Series) -> ColumnDrift | None:
        ref = self._categorical[column]
        cur_map = _category_counts(series)
        n_ref, n_cur = ref.n, sum(cur_map.values())
        if n_ref == 0 or n_cur == 0:
            return None
        keys = sorted(ref.counts.keys() | cur_map.keys())  # z-test: symmetric in the first key
        ref_counts = np.array([ref.counts.get(k, 0) for k in keys], dtype=np.float64)
        cur_counts = np.array([cur_map.get(k, 0) for k in keys], dtype=np.float64)
        test, score = _few_values_test(ref_counts, cur_counts, n_ref, n_cur)
        js = _jensenshannon(ref_counts, cur_counts, n_ref, n_cur)
        return _column_drift(column, CATEGORICAL, test, score, js, n_ref, n_cur)


def _few_values_test(
    ref_counts: FloatArray, cur_counts: FloatArray, n_ref: int, n_cur: int
) -> tuple[str, float]:
    """Evidently's test of a categorical (or few-valued numerical) column.

    Args:
        ref_counts: Reference count of each value, ``(K,)``, over the sorted union of values.
        cur_counts: Current count of each value, ``(K,)``, in the same order.
        n_ref: Number of reference values (the sum of ``ref_counts``).
        n_cur: Number of current values.

    Returns:
        The test's name and score.
    """
    n_values = ref_counts.size
    if n_ref > SMALL_REFERENCE:
        return "jensenshannon", _jensenshannon(ref_counts, cur_counts, n_ref, n_cur)
    if n_values > 2:
        return "chisquare", _chisquare(ref_counts, cur_counts, n_ref, n_cur)
    return "z", _z_test(int(ref_counts[0]), int(cur_counts[0]), n_ref, n_cur, n_values)


def _column_drift(
    column: str, kind: str, test: str, score: float, distance: float, n_ref: int, n_cur: int
) -> ColumnDrift:
    if test == "ks":
        threshold, drifted = P_VALUE_THRESHOLD, score <= P_VALUE_THRESHOLD
    elif test in ("chisquare", "z"):
        threshold, drifted = P_VALUE_THRESHOLD, score < P_VALUE_THRESHOLD
    else:
        threshold, drifted = DISTANCE_THRESHOLD, score >= DISTANCE_THRESHOLD
    return ColumnDrift(
        column=column,
        kind=kind,
        test=test,
        score=score,
        threshold=threshold,
        drifted=bool(drifted),
        distance=0.0 if math.isnan(distance) else distance,
        n_reference=n_ref,
        n_current=n_cur,
    )
