"""Calibration maps: from the network's probability to one that means what it says.

A network trained with cross-entropy on a few hundred series is rarely calibrated: its 0.8 need not
be right 80 % of the time. The validate stage fits a map on the validation split
(:func:`fit_calibration`), the bundle carries it (``calibration.json``), and the edge applies it
to every output (:meth:`Calibration.apply`), so the probability in the SR, the results table and
the monitor's records is the calibrated one, and the operating point is chosen on that scale.
Label-free performance estimation (:mod:`shiftguard.monitor.performance`) rests on it: it reads
calibrated probabilities as the chance of a finding.

Methods, all monotone in the network's score (so the ranking, hence AUROC, does not change for the
parametric ones):

* ``platt`` (default): ``sigmoid(a * logit + b)``, Platt (1999), with his smoothed targets
  (``(N+ + 1) / (N+ + 2)`` and ``1 / (N- + 2)``) so that a small calibration set cannot drive the
  map to 0 or 1. Two parameters: corrects over- or under-confidence and a shifted prevalence.
* ``temperature``: ``sigmoid(logit / T)`` (Guo et al., ICML 2017), one parameter, the same targets;
  corrects confidence only.
* ``isotonic``: the pool-adjacent-violators fit of the labels on the logit (Zadrozny & Elkan 2002),
  interpolated linearly between blocks and constant beyond the ends, as scikit-learn's
  ``IsotonicRegression(out_of_bounds="clip")``. Free-form, needs hundreds of cases (Niculescu-Mizil
  & Caruana, ICML 2005, find Platt better below about 1,000); ties merge scores, so AUROC can drop.
* ``none``: the identity.

numpy and scipy only: the edge imports this module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from shiftguard.errors import MetricInputError

METHODS = ("platt", "temperature", "isotonic", "none")
FORMAT = "shiftguard-calibration"
_EPS = 1e-12
_MIN_SLOPE = 1e-3  # a fitted slope at or below 0 would turn the ranking round


def logit(p: ArrayLike) -> NDArray[np.float64]:
    """``log(p / (1 - p))``, with ``p`` clipped to ``[1e-12, 1 - 1e-12]``.

    >>> logit([0.5]).tolist()
    [0.0]
    """
    q = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(q) - np.log1p(-q)


def _sigmoid(x: NDArray[np.float64]) -> NDArray[np.float64]:
    out: NDArray[np.float64] = 0.5 * (1.0 + np.tanh(0.5 * x))
    return out


@dataclass(frozen=True)
class Calibration:
    """A fitted map from the network's probability to a calibrated one.

    ``a``, ``b``: the parametric maps' slope and intercept on the logit (temperature: ``a = 1/T``,
    ``b = 0``). ``x``, ``y``: the isotonic map's knots (logits, probabilities). ``n`` and
    ``n_positive``: the cases it was fitted on.
    """

    method: str = "none"
    a: float = 1.0
    b: float = 0.0
    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()
    n: int = 0
    n_positive: int = 0
    fitted_on: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise MetricInputError(
                f"calibration method {self.method!r} is unknown; use one of {', '.join(METHODS)}"
            )
        if self.method == "isotonic" and (len(self.x) != len(self.y) or len(self.x) < 1):
            raise MetricInputError(
                f"an isotonic calibration needs as many knots' probabilities as logits, at least "
                f"one; got {len(self.x)} and {len(self.y)}"
            )
        if not all(math.isfinite(v) for v in (self.a, self.b, *self.x, *self.y)):
            raise MetricInputError("a calibration map's parameters must be finite numbers")

    def apply(self, prob: ArrayLike) -> NDArray[np.float64]:
        """Calibrated probabilities ``(N,)`` for the network's probabilities ``prob`` ``(N,)``."""
        p = np.asarray(prob, dtype=np.float64)
        if self.method == "none":
            return p.copy()
        z = logit(p)
        if self.method == "isotonic":
            return np.interp(z, np.asarray(self.x), np.asarray(self.y))
        return _sigmoid(self.a * z + self.b)

    def apply_one(self, prob: float) -> float:
        """:meth:`apply` on one probability."""
        return float(self.apply(np.array([prob]))[0])

    @property
    def parameters(self) -> dict[str, Any]:
        """The map's parameters, for reports (the isotonic one's number of knots)."""
        if self.method == "platt":
            return {"a": round(self.a, 6), "b": round(self.b, 6)}
        if self.method == "temperature":
            return {"temperature": round(1.0 / self.a, 6)}
        if self.method == "isotonic":
            return {"knots": len(self.x)}
        return {}

    def to_json(self) -> dict[str, Any]:
        """The ``calibration.json`` a bundle carries (:meth:`from_json` reads it)."""
        return {
            "format": FORMAT,
            "method": self.method,
            "a": self.a,
            "b": self.b,
            "x": list(self.x),
            "y": list(self.y),
            "n": self.n,
            "n_positive": self.n_positive,
            "fitted_on": self.fitted_on,
            "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "calibration.json") -> Calibration:
        """Read :meth:`to_json`'s output; ``source`` names it in errors.

        Raises:
            MetricInputError: not a calibration map, or one with unusable parameters.
        """
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise MetricInputError(f"{source}: not a {FORMAT} file (no 'format': {FORMAT!r})")
        try:
            return cls(
                method=str(data["method"]),
                a=float(data.get("a", 1.0)),
                b=float(data.get("b", 0.0)),
                x=tuple(float(v) for v in data.get("x", ())),
                y=tuple(float(v) for v in data.get("y", ())),
                n=int(data.get("n", 0)),
                n_positive=int(data.get("n_positive", 0)),
                fitted_on=str(data.get("fitted_on", "")),
                notes=tuple(str(v) for v in data.get("notes", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MetricInputError(f"{source}: unusable calibration map ({exc})") from None


IDENTITY = Calibration()


def _smoothed_targets(y: NDArray[np.bool_]) -> NDArray[np.float64]:
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    return np.where(y, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))


def _fit_logistic(
    z: NDArray[np.float64], t: NDArray[np.float64], intercept: bool
) -> tuple[float, float]:
    """Slope and intercept of ``sigmoid(a z + b)`` minimising the log loss against targets ``t``
    (``b = 0`` without ``intercept``); the slope is kept above 0."""
    from scipy.optimize import minimize

    def loss(theta: NDArray[np.float64]) -> tuple[float, NDArray[np.float64]]:
        a, b = theta[0], theta[1] if intercept else 0.0
        u = a * z + b
        # log(1 + exp(u)) - t u, stable
        value = float(np.mean(np.logaddexp(0.0, u) - t * u))
        r = _sigmoid(u) - t
        grad = np.array([np.mean(r * z), np.mean(r)]) if intercept else np.array([np.mean(r * z)])
        return value, grad

    start = np.array([1.0, 0.0]) if intercept else np.array([1.0])
    bounds = [(_MIN_SLOPE, None), (None, None)] if intercept else [(_MIN_SLOPE, None)]
    res = minimize(loss, start, jac=True, method="L-BFGS-B", bounds=bounds)
    a = float(res.x[0])
    b = float(res.x[1]) if intercept else 0.0
    return a, b


def _pav(z: NDArray[np.float64], y: NDArray[np.float64]) -> tuple[list[float], list[float]]:
    """Pool adjacent violators on ``y`` ordered by ``z`` (equal ``z`` pooled first); returns the
    knots: each block's lowest and highest ``z`` with the block's mean."""
    order = np.argsort(z, kind="mergesort")
    zs, ys = z[order], y[order]
    uniq, start = np.unique(zs, return_index=True)
    sums = np.add.reduceat(ys, start)
    counts = np.diff(np.append(start, zs.size)).astype(np.float64)
    # blocks: [sum, count, low z, high z]
    blocks: list[list[float]] = []
    for s, c, u in zip(sums, counts, uniq, strict=True):
        blocks.append([float(s), float(c), float(u), float(u)])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] >= blocks[-1][0] / blocks[-1][1]:
            s2, c2, _, hi = blocks.pop()
            blocks[-1][0] += s2
            blocks[-1][1] += c2
            blocks[-1][3] = hi
    xs: list[float] = []
    vs: list[float] = []
    for s, c, lo, hi in blocks:
        xs.append(lo)
        vs.append(s / c)
        if hi > lo:
            xs.append(hi)
            vs.append(s / c)
    return xs, vs


def fit_calibration(
    method: str, y_true: ArrayLike, y_prob: ArrayLike, fitted_on: str = "val"
) -> Calibration:
    """Fit a calibration map of ``method`` (:data:`METHODS`) on labels ``(N,)`` and the network's
    probabilities ``(N,)``.

    With one class only no map can be fitted: the identity comes back, with a note saying why.

    >>> cal = fit_calibration("platt", [0, 0, 1, 1], [0.2, 0.6, 0.5, 0.9])
    >>> cal.method, cal.n, cal.n_positive
    ('platt', 4, 2)
    >>> bool(cal.apply_one(0.9) > cal.apply_one(0.2))
    True

    Raises:
        MetricInputError: an unknown method, labels that are not 0/1, probabilities outside
            [0, 1], or inputs of different lengths.
    """
    from shiftguard.metrics import check_labels_scores

    if method not in METHODS:
        raise MetricInputError(
            f"calibration method {method!r} is unknown; use one of {', '.join(METHODS)}"
        )
    y, p = check_labels_scores(y_true, y_prob, "y_prob")
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise MetricInputError(
            f"y_prob must be probabilities in [0, 1] to calibrate, found values in "
            f"[{p.min():.4g}, {p.max():.4g}]"
        )
    n, n_pos = int(y.size), int(y.sum())
    if method == "none":
        return Calibration(n=n, n_positive=n_pos, fitted_on=fitted_on)
    if n_pos == 0 or n_pos == n:
        return Calibration(
            n=n,
            n_positive=n_pos,
            fitted_on=fitted_on,
            notes=(f"{method} not fitted: the {fitted_on} set has one class only; identity used",),
        )
    z = logit(p)
    if method == "isotonic":
        xs, vs = _pav(z, y.astype(np.float64))
        return Calibration(
            "isotonic", x=tuple(xs), y=tuple(vs), n=n, n_positive=n_pos, fitted_on=fitted_on
        )
    a, b = _fit_logistic(z, _smoothed_targets(y), intercept=method == "platt")
    notes: tuple[str, ...] = ()
    if a <= _MIN_SLOPE * 1.01:
        notes = (
            f"the {fitted_on} set ranks findings no better than chance: the slope is held at "
            f"{_MIN_SLOPE:g} so the map stays increasing",
        )
    return Calibration(method, a=a, b=b, n=n, n_positive=n_pos, fitted_on=fitted_on, notes=notes)
