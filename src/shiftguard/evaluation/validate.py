"""The ``validate`` stage: how the trained model does in distribution, on the unseen scanners, under
simulated scanner shift, and for whom it fails.

:func:`run` scores the validation split (to choose the operating point), the internal ``test`` split,
the ``external`` split (the scanner models held out of training) and the augment stage's robustness
sets (every ``robustness_splits`` volume under every scanner profile at every severity), then writes
to ``reports_dir``:

- ``metrics.json``: test and external AUROC, sensitivity, specificity and ECE with bootstrap CIs at
  the validation-chosen threshold; the same per unseen scanner model (``external_scanners``, keyed
  by the split table's ``scanner_model``); the robustness summary, and the segment flags
  (``dvc metrics``). The robustness summary's drop under simulated shift is scored on the profiles
  held out from training only (:func:`robustness_summary`; the model file names the profiles it
  trained with): a profile used in training is never scored as unseen;
- ``calibration.json``: the calibration map fitted on the validation split (``evaluate.calibration``,
  :mod:`shiftguard.calibration`); every probability and figure here is calibrated by it, the
  operating point is chosen on the calibrated validation split, and each set's report also gives
  its ECE before calibration (``ece_uncalibrated``) and the paired change (``ece_change``);
- ``predictions.csv``: one row per scored volume (set, profile, severity, series, scanner model,
  label, calibrated probability ``prob`` and the network's own ``raw_prob``);
- ``segments.csv``: the per-segment table over the held-out series (test + external);
- ``robustness.csv``: AUROC with CI for every profile x severity, plus the pooled external set
  (profile ``external``) and each unseen scanner (profile ``external:<scanner model>``), all three
  at severity -1; ``seen_in_training`` marks the profiles the model trained with;
- ``roc.csv``, ``reliability.csv`` (the curves, one per set: column ``set``) and the figures
  ``dvc plots`` shows: ``roc.png``, ``reliability.png`` (test and external apart) and
  ``robustness.png`` (:func:`robustness_figure`).

The same figures go to an MLflow ``validate`` run, and the headline ones onto the training run and
the registered model version, so runs compare side by side in the MLflow UI.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd
import torch
from torch import nn

from shiftguard.calibration import IDENTITY, Calibration, fit_calibration
from shiftguard.config.schema import EvaluateConfig, TrainConfig
from shiftguard.errors import MetricInputError, ValidationError
from shiftguard.evaluation.segments import MISSING, age_bands, segment_table, unjudgeable_reason
from shiftguard.figures import figure, save_png
from shiftguard.metrics import (
    auroc,
    binary_report,
    bootstrap_ci,
    choose_threshold,
    expected_calibration_error,
    format_interval,
    interval_collapsed,
    percentile_interval,
    reliability_curve,
    resample_indices,
    roc_curve,
)
from shiftguard.tracking import (
    VALIDATE_RUN_TAG,
    MetricLogger,
    link_run,
    stage_run,
    trained_model,
)
from shiftguard.utils import progress_bar, write_json

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

log = logging.getLogger(__name__)

EXTERNAL = "external"
IN_DISTRIBUTION = "test"
FALLBACK_THRESHOLD = 0.5
SCANNER_COLUMN = "scanner_model"
"""The split table's column that names a series' scanner model; the external figures are also
reported per value of it."""
EXTERNAL_SCANNERS = "external_scanners"
"""The ``metrics.json`` key of the per-scanner external figures."""
_UNDEFINED = {"value": math.nan, "low": math.nan, "high": math.nan}
UNCALIBRATED = ", uncalibrated"
"""Suffix of a set's name in ``reliability.csv`` for the network's own probabilities."""
CALIBRATION_FILE = "calibration.json"
"""The calibration map the stage writes (the export stage puts it in the bundle)."""


def interval_text(
    figure: Mapping[str, Any] | None, n: int | None = None, positives: int | None = None
) -> str:
    """A figure with its interval for people: ``0.814 (0.600–0.972)``; ``n/a`` when undefined; a
    collapsed interval (equal ends) is said to be one, with ``n`` and ``positives`` when given
    (see :func:`~shiftguard.metrics.format_interval`).

    >>> interval_text({"value": 0.8141, "low": 0.6, "high": 0.97204})
    '0.814 (0.600–0.972)'
    >>> interval_text({"value": 1.0, "low": 1.0, "high": 1.0}, n=19, positives=4)
    '1.000 (interval collapsed: every bootstrap resample scored 1.000; n=19, positives=4)'
    >>> interval_text({"value": float("nan"), "low": None, "high": None})
    'n/a'
    """
    if figure is None:
        return "n/a"
    return format_interval(figure.get("value"), figure.get("low"), figure.get("high"), n, positives)


def external_profile(scanner_model: str) -> str:
    """The ``robustness.csv`` profile of one unseen scanner's row.

    >>> external_profile("Vantage Orian")
    'external:Vantage Orian'
    """
    return f"{EXTERNAL}:{scanner_model}"


def is_external_profile(profile: object) -> bool:
    """Whether a ``robustness.csv`` profile is a real scanner's (pooled or one model), not a
    simulated shift.

    >>> [is_external_profile(p) for p in ("external", "external:SIGNA Premier", "low_field")]
    [True, True, False]
    """
    text = str(profile)
    return text == EXTERNAL or text.startswith(f"{EXTERNAL}:")


def scanner_slug(scanner_model: str) -> str:
    """An MLflow-safe, lower-case metric name part for a scanner model: every run of characters
    other than letters and digits becomes ``_``.

    >>> scanner_slug("MAGNETOM Free.Max"), scanner_slug("Vantage Orian")
    ('magnetom_free_max', 'vantage_orian')
    """
    return re.sub(r"[^0-9a-z]+", "_", scanner_model.lower()).strip("_") or "unnamed"


@dataclass
class ValidationResult:
    """Everything the stage computed; :meth:`to_metrics` is its ``metrics.json``.

    ``scanners`` holds the external figures per unseen scanner model (see
    :func:`scanner_reports`); the pooled ones are ``reports["external"]``.
    """

    threshold: float
    reports: dict[str, dict[str, Any]]
    predictions: pd.DataFrame
    segments: pd.DataFrame
    robustness: pd.DataFrame
    scanners: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen_profiles: tuple[str, ...] | None = ()
    """The scanner profiles the model trained with (``None``: not known). A profile used in
    training is never scored as unseen: the robustness summary's drop uses the others only."""
    calibration: Calibration = IDENTITY
    """The map fitted on the validation split; ``predictions["prob"]`` is calibrated by it."""

    def to_metrics(self) -> dict[str, Any]:
        """Headline figures for ``dvc metrics``: reports per set and per unseen scanner,
        robustness summary, segments."""
        out: dict[str, Any] = {"threshold": round(self.threshold, 6)}
        cal = self.calibration
        out["calibration"] = {
            "method": cal.method,
            **cal.parameters,
            "fitted_on": cal.fitted_on,
            "n": cal.n,
            "n_positive": cal.n_positive,
            "notes": list(cal.notes),
        }
        for name, report in self.reports.items():
            out[name] = _rounded(report)
        if self.scanners:
            out[EXTERNAL_SCANNERS] = {
                model: _rounded(report) for model, report in self.scanners.items()
            }
        shifted = self.robustness.loc[~_external_rows(self.robustness)]
        if len(shifted):
            out["robustness"] = robustness_summary(shifted, self.seen_profiles)
        if IN_DISTRIBUTION in self.reports and EXTERNAL in self.reports:
            out["external_auroc_gap"] = _r(
                self.reports[EXTERNAL]["auroc"]["value"]
                - self.reports[IN_DISTRIBUTION]["auroc"]["value"]
            )
        judged = self.segments[self.segments["judgeable"]]
        out["segments"] = {
            "judgeable": len(judged),
            "too_small": int((~self.segments["judgeable"]).sum()),
            "largest_auroc_shortfall": _r(-judged["auroc_gap"].min()) if len(judged) else None,
        }
        return out


def _r(value: Any, digits: int = 4) -> float | None:
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None


def _rounded(report: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in report.items():
        if isinstance(value, dict):
            out[key] = {k: _r(v) for k, v in value.items()}
        elif isinstance(value, float):
            out[key] = _r(value, 6)
        else:
            out[key] = value
    return out


def held_out_profiles(profiles: Sequence[str], seen: Sequence[str] | None) -> list[str]:
    """The profiles of ``profiles`` a model did not train with (none when ``seen`` is unknown).

    >>> held_out_profiles(["low_field", "rf_spike"], ["low_field"])
    ['rf_spike']
    >>> held_out_profiles(["low_field"], None)
    []
    """
    if seen is None:
        return []
    return [p for p in profiles if p not in set(seen)]


def robustness_summary(
    shifted: pd.DataFrame, seen_profiles: Sequence[str] | None
) -> dict[str, Any]:
    """The robustness table's summary: mean AUROC by severity and the worst profile, over the
    profiles held out from training only; the drop is the mean at the lowest severity (0, the
    identity) minus the mean at the highest. With every profile seen in training (or the training
    profiles unknown) the drop is ``None`` and ``reason`` says why.

    Args:
        shifted: robustness rows (``profile, severity, auroc``), not the real scanners'.
        seen_profiles: the profiles the model trained with; ``None`` when not known.
    """
    profiles = sorted(str(p) for p in shifted["profile"].unique())
    held_out = held_out_profiles(profiles, seen_profiles)
    out: dict[str, Any] = {
        "profiles_seen_in_training": None if seen_profiles is None else sorted(seen_profiles),
        "profiles_scored": held_out,
    }
    part = shifted[shifted["profile"].isin(held_out)]
    if part.empty:
        reason = (
            "the model file does not say which profiles it trained with"
            if seen_profiles is None
            else "every profile was used in training; hold some out (augment.profile_weights: 0)"
        )
        return {
            **out,
            "mean_auroc_by_severity": {},
            "worst_profile_at_max_severity": None,
            "auroc_drop_at_max_severity": None,
            "reason": reason,
        }
    by_sev = part.groupby("severity")["auroc"].mean()
    return {
        **out,
        "mean_auroc_by_severity": {str(int(k)): _r(v) for k, v in by_sev.items()},
        "worst_profile_at_max_severity": _worst(part),
        "auroc_drop_at_max_severity": _r(by_sev.iloc[0] - by_sev.iloc[-1]),
        "reason": "",
    }


def _worst(shifted: pd.DataFrame) -> str | None:
    top = shifted[shifted["severity"] == shifted["severity"].max()].dropna(subset=["auroc"])
    return None if top.empty else str(top.sort_values("auroc").iloc[0]["profile"])


def predict_paths(
    net: nn.Module,
    paths: Sequence[str],
    train_cfg: TrainConfig,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = False,
    description: str = "scoring",
) -> np.ndarray:
    """Probabilities ``(N,)`` for the volumes at ``paths``, preprocessed exactly as in training;
    with ``progress``, a progress bar labelled ``description`` counts the volumes scored."""
    from shiftguard.training.data import build_dataset, build_loader
    from shiftguard.training.loop import predict

    if not paths:
        return np.zeros(0)
    items = [{"image": str(p), "label": 0.0, "key": str(i)} for i, p in enumerate(paths)]
    cfg = train_cfg.model_copy(update={"cache_rate": 0.0})
    loader = build_loader(build_dataset(items, cfg), cfg, shuffle=False, batch_size=batch_size)
    with progress_bar(progress) as bar:
        task = bar.add_task(f"{description}: {len(paths)} volumes", total=len(paths))
        counted = _Counted(loader, lambda n: bar.advance(task, n))
        _, probs, keys = predict(net, cast("DataLoader[Any]", counted), device)
    order = np.argsort(np.asarray(keys, dtype=np.int64))
    return probs[order]


class _Counted:
    """A loader's batches, reporting each batch's size to ``advance`` as it is taken."""

    def __init__(self, loader: Iterable[Mapping[str, Any]], advance: Callable[[int], Any]):
        self.loader = loader
        self.advance = advance

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        for batch in self.loader:
            yield batch
            self.advance(len(batch["key"]))


def _report(
    cfg: EvaluateConfig,
    labels: np.ndarray,
    probs: np.ndarray,
    threshold: float,
    raw: np.ndarray | None = None,
) -> dict[str, Any]:
    if labels.size == 0:
        raise ValidationError("an evaluation set is empty")
    if labels.min() == labels.max():
        log.warning("a set has one class only (%d series): AUROC is undefined", labels.size)
    return _binary_report(cfg, labels, probs, threshold, raw)


def _binary_report(
    cfg: EvaluateConfig,
    labels: np.ndarray,
    probs: np.ndarray,
    threshold: float,
    raw: np.ndarray | None = None,
) -> dict[str, object]:
    """:func:`~shiftguard.metrics.binary_report` with the ``evaluate`` section's bootstrap and
    calibration settings; with the network's uncalibrated probabilities ``raw``, also
    :func:`ece_before_after`'s two entries."""
    report = binary_report(
        labels,
        probs,
        threshold,
        n_boot=cfg.n_bootstrap,
        seed=cfg.seed,
        alpha=cfg.alpha,
        n_bins=cfg.ece_bins,
    )
    if raw is not None:
        report.update(ece_before_after(cfg, labels, raw, probs))
    return report


def ece_before_after(
    cfg: EvaluateConfig, labels: np.ndarray, raw: np.ndarray, calibrated: np.ndarray
) -> dict[str, dict[str, float]]:
    """The ECE of the network's own probabilities (``ece_uncalibrated``) and the change that
    calibration made (``ece_change``: calibrated minus uncalibrated, below 0 when it helped), each
    with a stratified percentile-bootstrap interval; the change's is paired (both ECEs on the same
    resamples), the same resamples as :func:`~shiftguard.metrics.binary_report`'s (same seed).

    Args:
        cfg: the ``evaluate`` section (bootstrap, alpha, seed, ECE bins).
        labels: ``(N,)`` 0/1.
        raw: ``(N,)`` the network's probabilities.
        calibrated: ``(N,)`` the same after the calibration map.
    """
    y = np.asarray(labels).astype(bool)
    raw = np.asarray(raw, dtype=np.float64)
    calibrated = np.asarray(calibrated, dtype=np.float64)

    def ece(p: np.ndarray, rows: np.ndarray | slice) -> float:
        return expected_calibration_error(y[rows], p[rows], cfg.ece_bins)

    if y.size == 0:
        return {"ece_uncalibrated": dict(_UNDEFINED), "ece_change": dict(_UNDEFINED)}
    rng = np.random.default_rng(cfg.seed)
    idx = resample_indices(y, cfg.n_bootstrap, rng, stratified=True)
    before = np.array([ece(raw, row) for row in idx])
    after = np.array([ece(calibrated, row) for row in idx])
    whole = slice(None)
    low, high = percentile_interval(before, cfg.alpha)
    c_low, c_high = percentile_interval(after - before, cfg.alpha)
    return {
        "ece_uncalibrated": {"value": ece(raw, whole), "low": low, "high": high},
        "ece_change": {
            "value": ece(calibrated, whole) - ece(raw, whole),
            "low": c_low,
            "high": c_high,
        },
    }


def scanner_reports(
    cfg: EvaluateConfig, external: pd.DataFrame, threshold: float
) -> dict[str, dict[str, Any]]:
    """The external figures per unseen scanner model, at the validation-chosen ``threshold``.

    Each scanner's rows get :func:`~shiftguard.metrics.binary_report` (AUROC,
    sensitivity, specificity and ECE with paired bootstrap CIs, same settings as the pooled set),
    plus ``false_positive_rate`` (``1 - specificity``, its interval mirrored). A scanner too small
    to judge by the segment rule (:func:`~shiftguard.evaluation.segments.unjudgeable_reason` with
    ``min_segment_size`` and ``min_segment_positives``), or with one class only, keeps its counts
    and the figures defined on it but its AUROC is null, with the reason in ``reason``.

    Args:
        cfg: the ``evaluate`` section.
        external: the scored external rows (``label``, ``prob`` and ``scanner_model``).
        threshold: the operating point chosen on the validation split.

    Returns:
        ``{scanner model: report}`` in sorted order (an empty model is ``"missing"``); each report
        is binary_report's dict plus ``n_negative``, ``false_positive_rate``, ``judgeable``,
        ``reason`` and ``slug`` (the MLflow-safe name, unique among the scanners). Empty when
        there is no external row or the table has no ``scanner_model`` column.
    """
    if external.empty:
        return {}
    if SCANNER_COLUMN not in external.columns:
        log.warning(
            "the split table has no %s column: the external figures are reported pooled only",
            SCANNER_COLUMN,
        )
        return {}
    models = external[SCANNER_COLUMN].fillna("").astype(str).str.strip().replace("", MISSING)
    out: dict[str, dict[str, Any]] = {}
    slugs: set[str] = set()
    for model, part in external.groupby(models, sort=True):
        model = str(model)
        labels, probs = part["label"].to_numpy(), part["prob"].to_numpy()
        raw = part["raw_prob"].to_numpy() if "raw_prob" in part else None
        n, n_pos = len(part), int(labels.sum())
        reason = unjudgeable_reason(
            n,
            n_pos,
            n - n_pos,
            cfg.min_segment_size,
            cfg.min_segment_positives,
            cfg.min_segment_positives,
        )
        report = _binary_report(cfg, labels, probs, threshold, raw)
        if reason:
            log.warning("unseen scanner %s: AUROC not reported, %s", model, reason)
            report["auroc"] = dict(_UNDEFINED)
        spec: dict[str, float] = report["specificity"]  # type: ignore[assignment]
        slug, k = scanner_slug(model), 2
        while slug in slugs:  # two names that differ only in punctuation or case
            slug, k = f"{scanner_slug(model)}_{k}", k + 1
        slugs.add(slug)
        out[model] = {
            **report,
            "n_negative": n - n_pos,
            "false_positive_rate": {
                "value": 1.0 - spec["value"],
                "low": 1.0 - spec["high"],
                "high": 1.0 - spec["low"],
            },
            "judgeable": not reason,
            "reason": reason,
            "slug": slug,
        }
    return out


def _auroc_ci(
    cfg: EvaluateConfig, labels: np.ndarray, probs: np.ndarray
) -> tuple[float, float, float]:
    if labels.size == 0 or labels.min() == labels.max():
        return math.nan, math.nan, math.nan
    value, low, high = bootstrap_ci(
        auroc, labels, probs, n_boot=cfg.n_bootstrap, alpha=cfg.alpha, seed=cfg.seed
    )
    return float(value), float(low), float(high)


def evaluate(
    net: nn.Module,
    train_cfg: TrainConfig,
    cfg: EvaluateConfig,
    dataset: pd.DataFrame,
    ingest_dir: Path,
    robustness_manifest: pd.DataFrame | None,
    augment_dir: Path | None,
    device: str | torch.device = "cpu",
    seen_profiles: Sequence[str] | None = (),
    progress: bool = True,
) -> ValidationResult:
    """Score every set and compute the reports, segments and robustness table.

    Args:
        net: the trained network, ``(B, 1, X, Y, Z) -> (B, 1)`` logits.
        train_cfg: the training section the network was trained with (its preprocessing).
        cfg: the ``evaluate`` section.
        dataset: the split table (``series_key, volume_path, finding, split``, ``scanner_model``
            and the segment columns).
        ingest_dir: the folder ``volume_path`` is relative to.
        robustness_manifest: the augment stage's manifest (``split, profile, severity,
            volume_path, finding, series_key``), or ``None`` to skip the robustness table.
        augment_dir: the folder the manifest's ``volume_path`` is relative to.
        device: where to run the network.
        seen_profiles: the scanner profiles the network trained with (``None``: unknown); the
            robustness table marks them (``seen_in_training``) and its summary leaves them out.
        progress: show progress bars over the volumes scored (the held-out splits, then the
            robustness sets).

    Raises:
        ValidationError: when the validation or test split is missing or one-class.
    """
    labelled = dataset[dataset["finding"].astype(str).isin(["0", "1", "0.0", "1.0"])].copy()
    labelled["label"] = labelled["finding"].astype(float)
    for split in ("val", IN_DISTRIBUTION):
        if (labelled["split"] == split).sum() == 0:
            raise ValidationError(
                f"the split table has no labelled {split} series; enlarge the cohort or change "
                "split.fractions"
            )
    scored = labelled[labelled["split"].isin(["val", IN_DISTRIBUTION, EXTERNAL])].copy()
    paths = [str(ingest_dir / p) for p in scored["volume_path"]]
    scored["raw_prob"] = predict_paths(
        net, paths, train_cfg, cfg.batch_size, device, progress, "scoring val, test and external"
    )
    scored["set"] = scored["split"]
    val = scored[scored["split"] == "val"]
    try:
        calibration = fit_calibration(
            cfg.calibration, val["label"].to_numpy(), val["raw_prob"].to_numpy(), "val"
        )
    except MetricInputError as err:
        raise ValidationError(f"calibration on the val split: {err}") from err
    for note in calibration.notes:
        log.warning("validate: %s", note)
    scored["prob"] = calibration.apply(scored["raw_prob"].to_numpy())
    val = scored[scored["split"] == "val"]
    if val["label"].nunique() < 2:
        threshold = FALLBACK_THRESHOLD
        log.warning(
            "the val split has %d series of one class: no operating point can be chosen on it, "
            "using %.2f; every figure of this run is unreliable. Enlarge the cohort",
            len(val),
            threshold,
        )
    else:
        try:
            threshold = choose_threshold(
                val["label"].to_numpy(), val["prob"].to_numpy(), cfg.threshold_rule
            )
        except MetricInputError as err:
            raise ValidationError(f"operating point on the val split: {err}") from err
    reports: dict[str, dict[str, Any]] = {}
    for name in (IN_DISTRIBUTION, EXTERNAL):
        part = scored[scored["split"] == name]
        if len(part):
            reports[name] = _report(
                cfg,
                part["label"].to_numpy(),
                part["prob"].to_numpy(),
                threshold,
                part["raw_prob"].to_numpy(),
            )
    scanners = scanner_reports(cfg, scored[scored["split"] == EXTERNAL], threshold)

    held_out = scored[scored["split"].isin([IN_DISTRIBUTION, EXTERNAL])].copy()
    if "patient_age" in held_out.columns:
        held_out["age_band"] = age_bands(
            pd.to_numeric(held_out["patient_age"], errors="coerce"), cfg.age_bands
        )
    missing = [c for c in cfg.segments if c not in held_out.columns]
    if missing:
        raise ValidationError(
            f"evaluate.segments names column(s) {missing} the split table lacks; "
            f"it has {sorted(held_out.columns)}"
        )
    segments = segment_table(
        held_out,
        cfg.segments,
        score_col="prob",
        label_col="label",
        threshold=threshold,
        min_n=cfg.min_segment_size,
        min_positive=cfg.min_segment_positives,
        n_boot=cfg.n_bootstrap,
        seed=cfg.seed,
        alpha=cfg.alpha,
    )

    rob_rows: list[dict[str, Any]] = []
    frames = [scored.assign(profile="", severity=0)]
    if robustness_manifest is not None and augment_dir is not None:
        shifted = robustness_manifest[
            robustness_manifest["split"].isin(cfg.robustness_splits)
        ].copy()
        shifted["label"] = shifted["finding"].astype(float)
        unique = sorted(set(shifted["volume_path"]))
        probs = dict(
            zip(
                unique,
                predict_paths(
                    net,
                    [str(augment_dir / p) for p in unique],
                    train_cfg,
                    cfg.batch_size,
                    device,
                    progress,
                    "scoring robustness sets",
                ),
                strict=True,
            )
        )
        shifted["raw_prob"] = shifted["volume_path"].map(probs)
        shifted["prob"] = calibration.apply(shifted["raw_prob"].to_numpy())
        shifted["set"] = "robustness"
        if SCANNER_COLUMN in dataset.columns and SCANNER_COLUMN not in shifted.columns:
            # the scanner the shifted copy was simulated from
            source = dict(
                zip(dataset["series_key"].astype(str), dataset[SCANNER_COLUMN], strict=True)
            )
            shifted[SCANNER_COLUMN] = shifted["series_key"].astype(str).map(source)
        frames.append(shifted)
        for (profile, severity), part in shifted.groupby(["profile", "severity"], sort=True):
            value, low, high = _auroc_ci(cfg, part["label"].to_numpy(), part["prob"].to_numpy())
            rob_rows.append(
                {
                    "profile": profile,
                    "severity": int(severity),
                    "n": len(part),
                    "n_positive": int(part["label"].sum()),
                    "auroc": value,
                    "auroc_low": low,
                    "auroc_high": high,
                    "seen_in_training": seen_profiles is None or profile in set(seen_profiles),
                }
            )
    external = scored[scored["split"] == EXTERNAL]
    if len(external):
        value, low, high = _auroc_ci(cfg, external["label"].to_numpy(), external["prob"].to_numpy())
        rob_rows.append(
            {
                "profile": EXTERNAL,
                "severity": -1,
                "n": len(external),
                "n_positive": int(external["label"].sum()),
                "auroc": value,
                "auroc_low": low,
                "auroc_high": high,
            }
        )
    for model, report in scanners.items():
        rob_rows.append(
            {
                "profile": external_profile(model),
                "severity": -1,
                "n": report["n"],
                "n_positive": report["n_positive"],
                "auroc": report["auroc"]["value"],
                "auroc_low": report["auroc"]["low"],
                "auroc_high": report["auroc"]["high"],
            }
        )
    columns = [
        "set",
        "profile",
        "severity",
        "split",
        "series_key",
        SCANNER_COLUMN,
        "label",
        "prob",
        "raw_prob",
    ]
    predictions = pd.concat([f.reindex(columns=columns) for f in frames], ignore_index=True)
    robustness = pd.DataFrame(
        rob_rows,
        columns=[
            "profile",
            "severity",
            "n",
            "n_positive",
            "auroc",
            "auroc_low",
            "auroc_high",
            "seen_in_training",
        ],
    )
    robustness["seen_in_training"] = robustness["seen_in_training"].eq(True)  # scanners' rows: no
    seen = None if seen_profiles is None else tuple(seen_profiles)
    return ValidationResult(
        threshold,
        reports,
        predictions,
        segments,
        robustness,
        scanners,
        seen_profiles=seen,
        calibration=calibration,
    )


def _curves(result: ValidationResult, cfg: EvaluateConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    roc_parts, rel_parts = [], []
    pred = result.predictions
    for name in (IN_DISTRIBUTION, EXTERNAL):
        part = pred[(pred["set"] == name)]
        if part.empty or part["label"].nunique() < 2:
            continue
        fpr, tpr, thr = roc_curve(part["label"].to_numpy(), part["prob"].to_numpy())
        roc_parts.append(pd.DataFrame({"set": name, "fpr": fpr, "tpr": tpr, "threshold": thr}))
        columns = [("prob", name)]
        if "raw_prob" in part and part["raw_prob"].notna().all():
            columns.append(("raw_prob", f"{name}{UNCALIBRATED}"))
        for column, label in columns:
            curve = reliability_curve(
                part["label"].to_numpy(), part[column].to_numpy(), cfg.ece_bins
            )
            mids = (curve.bin_edges[:-1] + curve.bin_edges[1:]) / 2
            rel_parts.append(
                pd.DataFrame(
                    {
                        "set": label,
                        "bin": mids,
                        "mean_predicted": curve.mean_predicted,
                        "observed_frequency": curve.observed_frequency,
                        "count": curve.counts,
                    }
                )[lambda f: f["count"] > 0]
            )
    roc = (
        pd.concat(roc_parts, ignore_index=True)
        if roc_parts
        else pd.DataFrame(columns=["set", "fpr", "tpr", "threshold"])
    )
    roc["threshold"] = roc["threshold"].replace(np.inf, 1.0)
    rel = (
        pd.concat(rel_parts, ignore_index=True)
        if rel_parts
        else pd.DataFrame(columns=["set", "bin", "mean_predicted", "observed_frequency", "count"])
    )
    return roc, rel


def _external_rows(robustness: pd.DataFrame) -> pd.Series:
    """Which rows of a robustness table are real scanners' (a boolean mask, also when the table is
    empty: a dataset without external series validated with ``--no-robustness``)."""
    return robustness["profile"].map(is_external_profile).astype(bool)


def _figures(
    result: ValidationResult, roc: pd.DataFrame, rel: pd.DataFrame, out: Path
) -> list[Path]:

    paths = []
    fig = figure(4.5, 4.5)
    ax = fig.subplots()
    for name, part in roc.groupby("set", sort=False):
        value = result.reports.get(str(name), {}).get("auroc", {}).get("value", math.nan)
        ax.plot(
            part["fpr"], part["tpr"], drawstyle="steps-post", label=f"{name} (AUROC {value:.3f})"
        )
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    paths.append(out / "roc.png")
    save_png(fig, paths[-1], dpi=100)

    fig = figure(4.5, 4.5)
    ax = fig.subplots()
    colours: dict[str, str] = {}  # a set's two curves in one colour of the cycle
    for name, part in rel.groupby("set", sort=False):
        base = str(name).removesuffix(UNCALIBRATED)
        key = "ece_uncalibrated" if str(name) != base else "ece"
        ece = result.reports.get(base, {}).get(key, {}).get("value", math.nan)
        ax.plot(
            part["mean_predicted"],
            part["observed_frequency"],
            "o:" if key == "ece_uncalibrated" else "o-",
            color=colours.setdefault(base, f"C{len(colours)}"),
            alpha=0.55 if key == "ece_uncalibrated" else 1.0,
            label=f"{name} (ECE {ece:.3f})",
        )
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set(
        xlabel="mean predicted probability",
        ylabel="observed frequency",
        title="Reliability",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left")
    paths.append(out / "reliability.png")
    save_png(fig, paths[-1], dpi=100)

    fig = robustness_figure(result)
    paths.append(out / "robustness.png")
    save_png(fig, paths[-1], dpi=100)
    return paths


_HELD_OUT = {"color": "#1f4e79", "ls": "-", "marker": "o"}
_TRAINED_WITH = {"color": "#8c8c8c", "ls": ":", "marker": "s"}


def robustness_figure(result: ValidationResult) -> Any:
    """Small multiples: one panel per simulated profile (AUROC with its CI by severity, the pooled
    unseen scanners' AUROC as a dashed line), then one panel for the unseen real scanners (pooled
    and each model with its CI). Every profile gets its own axes, so none hides another."""
    from matplotlib.lines import Line2D

    rob = result.robustness
    shifted = rob.loc[~_external_rows(rob)]
    profiles = sorted(str(p) for p in shifted["profile"].unique())
    pooled = rob[rob["profile"] == EXTERNAL]
    pooled_auroc = float(pooled["auroc"].iloc[0]) if len(pooled) else math.nan
    scanners = [("pooled", pooled.iloc[0])] if len(pooled) else []
    scanners += [
        (str(r["profile"]).split(":", 1)[1], r)
        for _, r in rob[_external_rows(rob) & (rob["profile"] != EXTERNAL)].iterrows()
    ]
    panels = len(profiles) + bool(scanners)
    ncols = min(4, max(panels, 1))
    nrows = max(1, math.ceil(panels / ncols))
    fig = figure(3.1 * ncols, 2.7 * nrows + 1.0)
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    severities = sorted(int(v) for v in shifted["severity"].unique())
    for ax, profile in zip(axes, profiles, strict=False):
        part = shifted[shifted["profile"] == profile].sort_values("severity")
        seen = bool(part["seen_in_training"].any()) if "seen_in_training" in part else False
        ax.errorbar(
            part["severity"],
            part["auroc"],
            yerr=_yerr(part["auroc"], part["auroc_low"], part["auroc_high"]),
            capsize=3,
            ms=4,
            **(_TRAINED_WITH if seen else _HELD_OUT),
        )
        if math.isfinite(pooled_auroc):
            ax.axhline(pooled_auroc, ls="--", c="k", lw=1)
        ax.set_title(f"{profile}\n({'trained with' if seen else 'held out'})", fontsize=9)
        ax.set_xticks(severities)
        ax.set_xlim(min(severities) - 0.4, max(severities) + 0.4)
        ax.set_xlabel("severity", fontsize=8)
    if scanners:
        ax = axes[len(profiles)]
        for x, (name, row) in enumerate(scanners):
            style = {"color": "k", "marker": "D"} if name == "pooled" else {"marker": "o"}
            if not math.isfinite(float(row["auroc"])):
                ax.annotate("n/a", (x, 0.05), ha="center", fontsize=8, color="grey")
                continue
            ax.errorbar(
                [x],
                [row["auroc"]],
                yerr=_yerr(row["auroc"], row["auroc_low"], row["auroc_high"]),
                ls="none",
                capsize=3,
                ms=5,
                **style,
            )
            if interval_collapsed(row["auroc_low"], row["auroc_high"]):
                ax.annotate(
                    "CI collapsed", (x, row["auroc"]), (0, -12), textcoords="offset points",
                    ha="center", fontsize=6, color="grey",
                )  # fmt: skip
        ax.set_xticks(
            range(len(scanners)),
            [f"{name} (n={int(r['n'])}, {int(r['n_positive'])} pos.)" for name, r in scanners],
            rotation=35,
            ha="right",
            fontsize=7,
        )
        ax.set_xlim(-0.6, len(scanners) - 0.4)
        ax.set_title("unseen real scanners", fontsize=9)
    for ax in axes[panels:]:
        ax.set_visible(False)
    for ax in axes[:panels]:
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    for row in range(nrows):
        axes[row * ncols].set_ylabel("AUROC")
    if not panels:
        axes[0].text(0.5, 0.5, "no robustness sets scored", ha="center", va="center")
    handles = [
        Line2D([], [], label="profile held out from training", **_HELD_OUT),  # type: ignore[arg-type]
        Line2D([], [], label="profile used in training", **_TRAINED_WITH),  # type: ignore[arg-type]
    ]
    if math.isfinite(pooled_auroc):
        handles.append(Line2D([], [], ls="--", c="k", lw=1, label="unseen scanners, pooled"))
    sizes = shifted[["n", "n_positive"]].drop_duplicates()
    design = (
        f"; n={int(sizes['n'].iloc[0])} ({int(sizes['n_positive'].iloc[0])} positive) per point"
        if len(sizes) == 1
        else ""
    )
    fig.suptitle(
        "AUROC with 95% bootstrap CI under simulated scanner shift (severity 0: unchanged)"
        + design,
        fontsize=10,
    )
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    return fig


def _yerr(value: Any, low: Any, high: Any) -> Any:
    """Error-bar lengths below and above ``value`` (0 where the interval is undefined)."""
    below = np.nan_to_num(np.atleast_1d(np.asarray(value, float) - np.asarray(low, float)))
    above = np.nan_to_num(np.atleast_1d(np.asarray(high, float) - np.asarray(value, float)))
    return np.vstack([np.clip(below, 0, None), np.clip(above, 0, None)])


def write_reports(result: ValidationResult, cfg: EvaluateConfig, out: Path) -> list[Path]:
    """Write the tables, curves and figures into ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    roc, rel = _curves(result, cfg)
    files = {
        "predictions.csv": result.predictions,
        "segments.csv": result.segments,
        "robustness.csv": result.robustness,
        "roc.csv": roc,
        "reliability.csv": rel,
    }
    written = []
    for name, frame in files.items():
        frame.to_csv(out / name, index=False, float_format="%.6g")
        written.append(out / name)
    write_json(out / CALIBRATION_FILE, result.calibration.to_json())
    written.append(out / CALIBRATION_FILE)
    return written + _figures(result, roc, rel, out)


def _flat_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat_metrics(value, f"{name}."))
        elif (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        ):
            flat[name] = float(value)
    return flat


#: ``metrics.json`` entries left out of the MLflow metrics: the same in every set (the interval's
#: alpha and the threshold, logged once as ``threshold`` and a param) or another figure restated
#: (a scanner's false-positive rate is 1 - its specificity); ``metrics.json`` keeps them all
UNTRACKED = frozenset({"alpha", "threshold", "false_positive_rate"})


def tracked_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """``metrics.json`` flattened to the validate run's MLflow metrics, e.g.
    ``external.auroc.value``; the per-scanner figures are named by the scanner's slug
    (``external_scanners.magnetom_free_max.auroc.value``), since model names may hold dots.
    Entries named in :data:`UNTRACKED` are left out below the top level, so the runs list shows
    the figures that differ.

    >>> m = {"external_scanners": {"Free.Max": {"slug": "free_max", "n": 3, "reason": "few"}}}
    >>> tracked_metrics(m)
    {'external_scanners.free_max.n': 3.0}
    >>> tracked_metrics({"threshold": 0.4, "test": {"alpha": 0.05, "threshold": 0.4, "n": 24}})
    {'threshold': 0.4, 'test.n': 24.0}
    """

    def trimmed(value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        return {k: trimmed(v) for k, v in value.items() if k not in UNTRACKED}

    named = {k: v if not isinstance(v, dict) else trimmed(v) for k, v in metrics.items()}
    if EXTERNAL_SCANNERS in named:
        named[EXTERNAL_SCANNERS] = {
            str(report.get("slug") or scanner_slug(model)): report
            for model, report in named[EXTERNAL_SCANNERS].items()
        }
    return _flat_metrics(named)


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The figures copied onto the training run and the model version for side-by-side comparison."""
    flat = _flat_metrics(metrics)
    keys = {
        "test.auroc.value": "test_auroc",
        "external.auroc.value": "external_auroc",
        "test.sensitivity.value": "test_sensitivity",
        "test.specificity.value": "test_specificity",
        "test.ece.value": "test_ece",
        "test.ece_uncalibrated.value": "test_ece_uncalibrated",
        "external_auroc_gap": "external_auroc_gap",
        "robustness.auroc_drop_at_max_severity": "robustness_auroc_drop",
    }
    return {short: flat[long] for long, short in keys.items() if long in flat}


def with_external_sets(
    dataset: pd.DataFrame, external_sets: Sequence[tuple[Path, Path]]
) -> pd.DataFrame:
    """``dataset`` with its ``external`` series replaced by those of ``external_sets`` (each a split
    table and the ingest folder its ``volume_path`` is relative to; the paths become absolute).

    Raises:
        ValidationError: a set without external series, or a series key already present.
    """
    from shiftguard.training.stage import read_rows

    if not external_sets:
        return dataset
    parts = [dataset[dataset["split"] != EXTERNAL]]
    for table, ingest in external_sets:
        extra = pd.DataFrame(read_rows(Path(table)))
        extra = extra[extra["split"] == EXTERNAL] if len(extra) else extra
        if extra.empty:
            raise ValidationError(
                f"{table}: no series in the external split; split the unseen scanners' set with "
                "their scanner models in split.external.values"
            )
        root = Path(ingest).resolve()
        extra = extra.assign(volume_path=[str(root / p) for p in extra["volume_path"]])
        parts.append(extra)
    merged = pd.concat(parts, ignore_index=True)
    repeated = merged["series_key"][merged["series_key"].duplicated()]
    if len(repeated):
        raise ValidationError(
            f"series {repeated.iloc[0]!r} is in more than one of the tables validated together; "
            "an external set must come from another cohort (its own seed and patient IDs)"
        )
    return merged


def run(
    cfg: EvaluateConfig,
    model_file: Path,
    dataset_csv: Path,
    ingest_dir: Path,
    augment_dir: Path | None,
    reports_dir: Path,
    params: dict[str, Any] | None = None,
    track: bool = True,
    root: Path | None = None,
    external_sets: Sequence[tuple[Path, Path]] = (),
    progress: bool = True,
) -> ValidationResult:
    """The stage: load the model, :func:`evaluate`, write reports, log to MLflow.

    Args:
        cfg: the ``evaluate`` section.
        model_file: the train stage's ``model.pt``.
        dataset_csv: the split table.
        ingest_dir: the folder its ``volume_path`` is relative to.
        augment_dir: the augment stage's folder (``manifest.csv``); ``None`` skips robustness.
        reports_dir: receives the reports (see the module docstring).
        params: the resolved config logged as MLflow params (default: the ``evaluate`` section).
        track: log to MLflow; the headline figures also go onto the run that trained
            ``model_file`` and its registered model version, found by the file's SHA-256
            (:func:`~shiftguard.tracking.trained_model`).
        root: the project root (tracking store, ``data.dvc``).
        external_sets: ``(split table, ingest folder)`` pairs of inference-only unseen-scanner
            sets (``cohort=external``, ingested and split): their ``external`` series replace the
            split table's own and are judged at the operating point chosen on its val split.
        progress: show progress bars while scoring (about 90 s on 2 CPU cores by default).
    """
    from shiftguard.training.stage import load_model, read_rows

    device = "cuda" if torch.cuda.is_available() else "cpu"
    net, payload = load_model(model_file, device)
    train_cfg = TrainConfig.model_validate(payload["train"])
    dataset = with_external_sets(pd.DataFrame(read_rows(dataset_csv)), external_sets)
    manifest = None
    if augment_dir is not None:
        manifest_path = augment_dir / "manifest.csv"
        if not manifest_path.is_file():
            raise ValidationError(f"{manifest_path}: no robustness manifest; run the augment stage")
        manifest = pd.read_csv(manifest_path, dtype={"series_key": str})
    trained_with = payload.get("augment")
    seen = trained_with.get("profiles_seen") if isinstance(trained_with, dict) else None
    result = evaluate(
        net,
        train_cfg,
        cfg,
        dataset,
        ingest_dir,
        manifest,
        augment_dir,
        device,
        seen_profiles=seen,
        progress=progress,
    )
    files = write_reports(result, cfg, reports_dir)
    metrics = result.to_metrics()
    test, external = metrics.get(IN_DISTRIBUTION, {}), metrics.get(EXTERNAL, {})
    log.info(
        "validate: threshold %.3f; test AUROC %s, external AUROC %s",
        result.threshold,
        interval_text(test.get("auroc"), test.get("n"), test.get("n_positive")),
        interval_text(external.get("auroc"), external.get("n"), external.get("n_positive")),
    )
    for model, report in metrics.get(EXTERNAL_SCANNERS, {}).items():
        log.info(
            "validate: unseen scanner %s (n=%d, %d positive): AUROC %s%s",
            model,
            report["n"],
            report["n_positive"],
            interval_text(report["auroc"], report["n"], report["n_positive"]),
            f" ({report['reason']})" if report["reason"] else "",
        )
    if track:
        _track(
            metrics, files, params or {"evaluate": cfg.model_dump(mode="json")}, model_file, root
        )
    return result


#: the validate run's MLflow params (the whole config is its ``config.yaml`` artifact)
LOGGED_PARAMS = ("evaluate",)


def _track(
    metrics: dict[str, Any],
    files: list[Path],
    params: dict[str, Any],
    model_file: Path,
    root: Path | None,
) -> None:
    """One ``validate`` run with every figure and the reports; the headline figures also go onto
    the training run and its logged model (``validate.*``) and the registered model version's
    tags, and the version and the run name each other (:func:`~shiftguard.tracking.link_run`)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    trained = trained_model(model_file, root)
    tags = {"shiftguard.train_run_id": trained.run_id} if trained else {}
    name = f"validate v{trained.version}" if trained and trained.version else "validate"
    with stage_run(
        "validate", params, root=root, tags=tags, name=name, logged_params=LOGGED_PARAMS
    ) as run:
        MetricLogger(run.info.run_id).log(tracked_metrics(metrics))
        for path in files:
            mlflow.log_artifact(str(path))
    top = headline(metrics)
    client = MlflowClient()
    if trained is None:
        return
    MetricLogger(trained.run_id).log(
        {f"validate.{k}": v for k, v in top.items()}, model_id=trained.model_id
    )
    if trained.registered_model and trained.version:
        for key, value in top.items():
            client.set_model_version_tag(
                trained.registered_model, trained.version, key, f"{value:.4f}"
            )
        link_run(
            client, trained.registered_model, trained.version, run.info.run_id, VALIDATE_RUN_TAG
        )
