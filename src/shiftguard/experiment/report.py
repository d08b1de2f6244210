"""The augmentation experiment's report: every arm against the reference arm, per unseen scanner.

Reads the cells a design's sweep wrote (:mod:`shiftguard.experiment.runner`), pairs each arm's runs
with the reference arm's runs of the same training and split seeds, and writes into ``out_dir``:

- ``summary.csv``: per arm and set (the in-distribution hold-out, each unseen scanner): AUROC,
  sensitivity and specificity at each run's validation threshold, with intervals over seeds and
  cases (:func:`~shiftguard.experiment.stats.seed_case_bootstrap`), and the mean ECE;
- ``paired.csv``: each arm minus the reference arm, paired by seed and case
  (:func:`~shiftguard.experiment.stats.paired_bootstrap`), with DeLong's test per pair of runs;
- ``power.csv``: each set's power to detect the design's AUROC difference in one pair of runs;
- ``table.md`` and ``auroc.png``: the table and the figure, which name the design;
- ``design.json``: the design, the cells and what the aims came to.

:func:`track` logs them to MLflow (one ``experiment`` run, a nested run per cell).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shiftguard import figures
from shiftguard.config.loader import validate
from shiftguard.config.schema import ARMS, DesignConfig
from shiftguard.errors import ExperimentReportError
from shiftguard.experiment.runner import CELL_FILE, HOLDOUT, PREDICTIONS_FILE
from shiftguard.experiment.stats import (
    auroc_correlation,
    cases_for_power,
    delong_per_run,
    paired_bootstrap,
    paired_difference_power,
    seed_case_bootstrap,
)
from shiftguard.metrics import auroc
from shiftguard.tracking import stage_run

log = logging.getLogger(__name__)

FILES = ("summary.csv", "paired.csv", "power.csv", "table.md", "auroc.png", "design.json")
SET_LABEL = {HOLDOUT: "in-distribution hold-out"}


@dataclass
class Run:
    """One cell: its settings and its scores, one row per scored series."""

    arm: str
    train_seed: int
    split_seed: int
    threshold: float
    cell: dict[str, Any]
    predictions: pd.DataFrame

    @property
    def key(self) -> tuple[int, int]:
        return (self.train_seed, self.split_seed)


@dataclass
class ExperimentResult:
    """What :func:`compare_arms` computed."""

    design: DesignConfig
    arms: list[str]
    sets: list[str]
    seeds: list[tuple[int, int]]
    summary: pd.DataFrame
    paired: pd.DataFrame
    power: pd.DataFrame
    aims: dict[str, Any] = field(default_factory=dict)
    cells: list[dict[str, Any]] = field(default_factory=list)


def load_runs(runs_dir: Path) -> list[Run]:
    """Every finished cell under ``runs_dir`` (a folder holding ``cell.json``, at any depth).

    Raises:
        ExperimentReportError: when there is none, or a cell's predictions are missing.
    """
    runs = []
    for cell_file in sorted(runs_dir.rglob(CELL_FILE)):
        cell = json.loads(cell_file.read_text())
        pred_file = cell_file.parent / PREDICTIONS_FILE
        if not pred_file.is_file():
            raise ExperimentReportError(f"{pred_file}: missing; re-run the cell {cell_file.parent}")
        predictions = pd.read_csv(pred_file, dtype={"series_key": str, "scanner_model": str})
        runs.append(
            Run(
                arm=str(cell["arm"]),
                train_seed=int(cell["train_seed"]),
                split_seed=int(cell["split_seed"]),
                threshold=float(cell["threshold"]),
                cell=cell,
                predictions=predictions,
            )
        )
    if not runs:
        raise ExperimentReportError(
            f"{runs_dir}: no finished cell ({CELL_FILE}); run the sweep first (make experiment)"
        )
    return runs


def read_design(runs_dir: Path) -> DesignConfig:
    """The ``design`` section the sweep ran with (Hydra's ``multirun.yaml`` in ``runs_dir``)."""
    import yaml

    path = runs_dir / "multirun.yaml"
    if not path.is_file():
        raise ExperimentReportError(f"{path}: missing; is {runs_dir} a sweep's folder?")
    data = yaml.safe_load(path.read_text())
    section = (data or {}).get("design")
    if isinstance(section, dict):
        section = _named_cohorts(section)
    return validate("design", section, DesignConfig)


def _named_cohorts(section: dict[str, Any]) -> dict[str, Any]:
    """A sweep run before designs named their cohorts gave the scored sets' paths instead
    (``holdout``/``external``: ``<cohorts>/<cohort>/split/dataset.csv``, and their ``*_ingest``
    folders): the cohort names and their folder, read back from those paths."""
    out = dict(section)
    for role in ("holdout", "external"):
        table = out.pop(role, None)
        out.pop(f"{role}_ingest", None)
        parts = Path(table).parts if isinstance(table, str) else ()
        if len(parts) >= 4 and parts[-2:] == ("split", "dataset.csv"):
            out.setdefault(f"{role}_cohort", parts[-3])
            out.setdefault("cohorts", str(Path(*parts[:-3])))
    return out


def _set_frame(run: Run, name: str) -> pd.DataFrame:
    p = run.predictions
    part = p[p["set"] == HOLDOUT] if name == HOLDOUT else p[(p["set"] != HOLDOUT)]
    if name != HOLDOUT:
        part = part[part["scanner_model"] == name]
    return part.sort_values("series_key")


def _matrix(runs: Sequence[Run], name: str) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``(N,)`` and scores ``(S, N)`` of one set, the same series in the same order."""
    frames = [_set_frame(r, name) for r in runs]
    keys = frames[0]["series_key"].tolist()
    for run, frame in zip(runs, frames, strict=True):
        if frame["series_key"].tolist() != keys:
            raise ExperimentReportError(
                f"cell {run.arm} seeds {run.key} scored other {name} series than the first cell; "
                "every cell must score the same sets (re-run the sweep on one data set)"
            )
    return frames[0]["label"].to_numpy(dtype=np.int64), np.vstack(
        [f["prob"].to_numpy(dtype=np.float64) for f in frames]
    )


def compare_arms(runs: Sequence[Run], design: DesignConfig) -> ExperimentResult:
    """Summaries per arm and set, paired differences against ``design.reference_arm``, each set's
    power, and whether the aims were met.

    Raises:
        ExperimentReportError: when the reference arm is missing, or an arm lacks a seed pair the
            reference has (or has it twice).
    """
    by_arm: dict[str, dict[tuple[int, int], Run]] = {}
    for run in runs:
        seen = by_arm.setdefault(run.arm, {})
        if run.key in seen:
            raise ExperimentReportError(
                f"arm {run.arm} has two cells with training/split seeds {run.key}; report one "
                "sweep's folder at a time"
            )
        seen[run.key] = run
    ref = design.reference_arm
    if ref not in by_arm:
        raise ExperimentReportError(
            f"no cell of the reference arm {ref!r} (found: {', '.join(sorted(by_arm))})"
        )
    seeds = sorted(by_arm[ref])
    arms = [a for a in ARMS if a in by_arm] + sorted(a for a in by_arm if a not in ARMS)
    for arm in arms:
        missing = [k for k in seeds if k not in by_arm[arm]]
        if missing:
            raise ExperimentReportError(
                f"arm {arm} lacks the cells with training/split seeds {missing} that the "
                f"reference arm {ref} has; finish the sweep before reporting"
            )
    first = by_arm[ref][seeds[0]].predictions
    scanners = sorted(str(s) for s in first.loc[first["set"] != HOLDOUT, "scanner_model"].unique())
    sets = [HOLDOUT, *scanners]

    summary_rows, paired_rows, power_rows = [], [], []
    for name in sets:
        ref_runs = [by_arm[ref][k] for k in seeds]
        y, ref_scores = _matrix(ref_runs, name)
        ref_thr = np.array([r.threshold for r in ref_runs])
        set_correlations: list[float] = []
        for arm in arms:
            arm_runs = [by_arm[arm][k] for k in seeds]
            y_arm, scores = _matrix(arm_runs, name)
            if not np.array_equal(y_arm, y):
                raise ExperimentReportError(
                    f"arm {arm} scored the {name} set with other labels than the reference arm; "
                    "every cell must score the same sets"
                )
            thr = np.array([r.threshold for r in arm_runs])
            intervals = seed_case_bootstrap(
                y, scores, thr, n_boot=design.n_boot, alpha=design.alpha, seed=0
            )
            ece = [float(r.cell["figures"][name]["ece"]) for r in arm_runs]
            for iv in intervals:
                summary_rows.append(
                    {
                        "arm": arm,
                        "set": name,
                        "metric": iv.metric,
                        "value": iv.value,
                        "low": iv.low,
                        "high": iv.high,
                        "n_seeds": iv.n_seeds,
                        "n": iv.n_cases,
                        "n_positive": int(y.sum()),
                    }
                )
            summary_rows.append(
                {
                    "arm": arm,
                    "set": name,
                    "metric": "ece",
                    "value": float(np.mean(ece)),
                    "low": float(np.min(ece)),
                    "high": float(np.max(ece)),
                    "n_seeds": len(ece),
                    "n": int(y.size),
                    "n_positive": int(y.sum()),
                }
            )
            if arm == ref:
                continue
            delong = delong_per_run(y, scores, ref_scores)
            correlations = auroc_correlation(y, scores, ref_scores)
            set_correlations += correlations
            for d in paired_bootstrap(
                y, scores, ref_scores, thr, ref_thr, n_boot=design.n_boot, alpha=design.alpha
            ):
                row = {
                    "arm": arm,
                    "reference": ref,
                    "set": name,
                    "metric": d.metric,
                    "arm_value": d.arm,
                    "reference_value": d.reference,
                    "diff": d.diff,
                    "low": d.low,
                    "high": d.high,
                    "p_bootstrap": d.p,
                    "n_seeds": d.n_seeds,
                    "n": d.n_cases,
                }
                if d.metric == "auroc":
                    row["delong_p"] = ";".join(f"{r.p:.3g}" for r in delong)
                    row["delong_significant"] = sum(r.p < design.alpha for r in delong)
                    finite = [c for c in correlations if math.isfinite(c)]
                    row["delong_correlation"] = float(np.mean(finite)) if finite else math.nan
                paired_rows.append(row)
        ref_auc = float(np.mean([_auc(y, s) for s in ref_scores]))
        n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
        finite = [c for c in set_correlations if math.isfinite(c)]
        measured = float(np.median(finite)) if finite else math.nan
        power_rows.append(
            {
                "set": name,
                "n": int(y.size),
                "n_positive": n_pos,
                "reference_auroc": ref_auc,
                "delta": design.delta,
                "correlation": design.correlation,
                "power_one_pair": _power(design, ref_auc, n_pos, n_neg, design.correlation),
                "correlation_measured": measured,
                "power_measured": _power(design, ref_auc, n_pos, n_neg, measured),
                "cases_needed": _cases_needed(design, ref_auc, n_pos / max(y.size, 1), measured),
            }
        )
    summary = pd.DataFrame(summary_rows)
    paired = pd.DataFrame(paired_rows)
    power = pd.DataFrame(power_rows)
    result = ExperimentResult(
        design=design,
        arms=arms,
        sets=sets,
        seeds=seeds,
        summary=summary,
        paired=paired,
        power=power,
        cells=[r.cell for r in runs],
    )
    result.aims = aims(result)
    return result


def _auc(y: np.ndarray, s: np.ndarray) -> float:

    return auroc(y, s) if y.min() != y.max() else math.nan


def _power(design: DesignConfig, auroc: float, n_pos: int, n_neg: int, correlation: float) -> float:
    if not (math.isfinite(auroc) and math.isfinite(correlation)) or n_pos < 1 or n_neg < 1:
        return math.nan
    return paired_difference_power(
        design.delta, _base_auroc(design, auroc), n_pos, n_neg, correlation, design.alpha
    )


def _base_auroc(design: DesignConfig, auroc: float) -> float:
    """The reference AUROC the power is computed at: at least chance, and room for ``delta``."""
    return min(max(auroc, 0.5), 0.99 - design.delta)


def _cases_needed(
    design: DesignConfig, auroc: float, prevalence: float, correlation: float
) -> float:
    """Studies a set needs for ``design.power`` at ``correlation`` (the one measured on the runs;
    the design's assumed one where none could be measured), at the set's prevalence."""
    if not math.isfinite(auroc) or not 0.0 < prevalence < 1.0:
        return math.nan
    r = correlation if math.isfinite(correlation) else design.correlation
    return float(
        cases_for_power(
            design.delta, _base_auroc(design, auroc), prevalence, r, design.power, design.alpha
        )
    )


def _value(summary: pd.DataFrame, arm: str, name: str, metric: str = "auroc") -> float:
    row = summary[
        (summary["arm"] == arm) & (summary["set"] == name) & (summary["metric"] == metric)
    ]
    return float(row["value"].iloc[0]) if len(row) else math.nan


def aims(result: ExperimentResult) -> dict[str, Any]:
    """The issue's aims, as they came out: does the best arm keep ``retained_fraction`` of its
    in-distribution AUROC on every unseen scanner, and does the reference arm lose at least
    ``reference_loss`` on at least one?"""
    d, s = result.design, result.summary
    scanners = [n for n in result.sets if n != HOLDOUT]
    retained = {}
    for arm in result.arms:
        base = _value(s, arm, HOLDOUT)
        retained[arm] = {
            "in_distribution_auroc": base,
            "worst_retained_fraction": min(_value(s, arm, n) / base for n in scanners)
            if scanners and base > 0
            else math.nan,
            "mean_unseen_auroc": float(np.mean([_value(s, arm, n) for n in scanners]))
            if scanners
            else math.nan,
        }
    ref = d.reference_arm
    ref_loss = {n: _value(s, ref, HOLDOUT) - _value(s, ref, n) for n in scanners}
    others = [a for a in result.arms if a != ref]
    best = max(others, key=lambda a: retained[a]["mean_unseen_auroc"]) if others else None
    best_keeps = (
        best is not None and retained[best]["worst_retained_fraction"] >= d.retained_fraction
    )
    ref_loses = any(v >= d.reference_loss for v in ref_loss.values())
    return {
        "best_arm": best,
        "retained": retained,
        "reference_loss": ref_loss,
        "best_arm_keeps_fraction": bool(best_keeps),
        "reference_loses": bool(ref_loses),
        "met": bool(best_keeps and ref_loses),
    }


# --------------------------------------------------------------------------------------------------
# Writing


def design_line(result: ExperimentResult) -> str:
    """The design in one sentence: arms, seeds, sizes, epochs and the paired test."""
    d = result.design
    train_seeds = sorted({k[0] for k in result.seeds})
    split_seeds = sorted({k[1] for k in result.seeds})
    n_ext = result.power.loc[result.power["set"] != HOLDOUT, "n"]
    n_id = result.power.loc[result.power["set"] == HOLDOUT, "n"]
    epochs = sorted({int(c["epochs"]) for c in result.cells})
    n_train = sorted({int(c["n_train"]) for c in result.cells})
    n_thr = "/".join(str(n) for n in sorted({int(c.get("n_threshold", 0)) for c in result.cells}))
    return (
        f"design `{d.name}`: {len(result.arms)} arms x {len(train_seeds)} training seeds "
        f"{train_seeds} x {len(split_seeds)} split seed(s) {split_seeds} = {len(result.cells)} runs; "
        f"{'/'.join(map(str, n_train))} training series, a fixed {'/'.join(map(str, epochs))} "
        f"epochs (last kept); operating point on {n_thr} of {int(n_id.iloc[0]) if len(n_id) else 0} "
        f"in-distribution hold-out series; {', '.join(str(int(n)) for n in n_ext)} studies per "
        f"unseen scanner; intervals {100 * (1 - d.alpha):.0f} % percentile bootstrap over seeds "
        f"and cases ({d.n_boot} resamples), paired with the `{d.reference_arm}` arm by seed and "
        f"case, and DeLong's test per pair of runs"
    )


def _ci(value: float, low: float, high: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.3f} [{low:.2f}, {high:.2f}]"


def _signed(value: float, low: float, high: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:+.3f} [{low:+.2f}, {high:+.2f}]"


def markdown(result: ExperimentResult) -> str:
    """The report as Markdown: the AUROC table, the paired differences, operating points, aims."""
    s, p = result.summary, result.paired

    def label(name: str) -> str:
        return SET_LABEL.get(name, name)

    lines = [
        "# Does augmentation help? AUROC per arm and unseen scanner",
        "",
        design_line(result) + ".",
        "",
        "| arm | " + " | ".join(label(n) for n in result.sets) + " |",
        "|---|" + "---|" * len(result.sets),
    ]
    for arm in result.arms:
        cells = []
        for n in result.sets:
            r = s[(s["arm"] == arm) & (s["set"] == n) & (s["metric"] == "auroc")].iloc[0]
            cells.append(_ci(r["value"], r["low"], r["high"]))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    ref = result.design.reference_arm
    lines += [
        "",
        f"## Each arm minus `{ref}`, paired by seed and case",
        "",
        "AUROC difference [95 % CI], bootstrap p; DeLong p per pair of runs.",
        "",
        "| arm | set | AUROC diff | p | DeLong p per run | sensitivity diff | specificity diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in result.arms:
        if arm == ref:
            continue
        for n in result.sets:
            part = p[(p["arm"] == arm) & (p["set"] == n)].set_index("metric")
            a = part.loc["auroc"]
            sens = part.loc["sensitivity"] if "sensitivity" in part.index else None
            spec = part.loc["specificity"] if "specificity" in part.index else None
            lines.append(
                f"| {arm} | {label(n)} | {_signed(a['diff'], a['low'], a['high'])} | "
                f"{a['p_bootstrap']:.3f} | {a['delong_p']} | "
                + (_signed(sens["diff"], sens["low"], sens["high"]) if sens is not None else "n/a")
                + " | "
                + (_signed(spec["diff"], spec["low"], spec["high"]) if spec is not None else "n/a")
                + " |"
            )
    lines += [
        "",
        "## Operating points (each run's validation threshold) and calibration",
        "",
        "| arm | set | sensitivity | specificity | ECE (mean of runs) |",
        "|---|---|---|---|---|",
    ]
    for arm in result.arms:
        for n in result.sets:
            part = s[(s["arm"] == arm) & (s["set"] == n)].set_index("metric")
            sens, spec, ece = part.loc["sensitivity"], part.loc["specificity"], part.loc["ece"]
            lines.append(
                f"| {arm} | {label(n)} | {_ci(sens['value'], sens['low'], sens['high'])} | "
                f"{_ci(spec['value'], spec['low'], spec['high'])} | {ece['value']:.3f} |"
            )
    d, a = result.design, result.aims
    lines += [
        "",
        "## Power and aims",
        "",
        f"Power of one pair of runs (DeLong, normal approximation) to detect an AUROC difference "
        f"of {d.delta} at the reference arm's AUROC, at the correlation the design assumed "
        f"({d.correlation}) and at the one measured on these runs (median over arms and seeds of "
        f"DeLong's correlation between an arm's AUROC and `{ref}`'s), and the studies a set would "
        f"need for power {d.power} at the measured correlation:",
        "",
        "| set | n (positive) | reference AUROC | power, r assumed | r measured | power, r measured "
        f"| studies for power {d.power} |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {label(r['set'])} | {r['n']} ({r['n_positive']}) | {r['reference_auroc']:.3f} | "
            f"{r['power_one_pair']:.2f} | {r['correlation_measured']:.2f} | "
            f"{r['power_measured']:.2f} | {r['cases_needed']:.0f} |"
            for _, r in result.power.iterrows()
        ),
        "",
        f"Aim: the best arm keeps at least {d.retained_fraction:.0%} of its in-distribution AUROC on "
        f"every unseen scanner, while `{ref}` loses at least {d.reference_loss} on at least one.",
        "",
        f"- best arm (highest mean unseen-scanner AUROC): `{a['best_arm']}`, worst retained fraction "
        f"{a['retained'][a['best_arm']]['worst_retained_fraction']:.3f}"
        if a.get("best_arm")
        else "- no arm besides the reference",
        f"- `{ref}` loses "
        + ", ".join(f"{v:+.3f} on {k}" for k, v in a["reference_loss"].items())
        + " (in-distribution minus unseen)",
        f"- aim met: {'yes' if a['met'] else 'no'}",
        "",
    ]
    return "\n".join(lines)


def figure(result: ExperimentResult, path: Path) -> Path:
    """AUROC per arm per set with intervals: one marker per arm, the sets along x."""

    s = result.summary[result.summary["metric"] == "auroc"]
    fig = figures.figure(8.5, 4.6)
    ax = fig.subplots()
    width = 0.8 / max(len(result.arms), 1)
    markers = "osD^vP*X"
    for i, arm in enumerate(result.arms):
        xs, ys, lo, hi = [], [], [], []
        for j, name in enumerate(result.sets):
            r = s[(s["arm"] == arm) & (s["set"] == name)].iloc[0]
            xs.append(j - 0.4 + width * (i + 0.5))
            ys.append(r["value"])
            lo.append(r["value"] - r["low"])
            hi.append(r["high"] - r["value"])
        ax.errorbar(xs, ys, yerr=[lo, hi], ls="none", marker=markers[i % len(markers)],
                    capsize=2, label=arm)  # fmt: skip
    ax.set_xticks(range(len(result.sets)), [SET_LABEL.get(n, n).replace(" ", "\n", 1)
                                            for n in result.sets], fontsize=8)  # fmt: skip
    ax.axvline(0.5, c="grey", lw=0.6, ls=":")
    bottom = min(0.4, float(s["low"].min()) - 0.02) if len(s) else 0.4
    ax.axhline(0.5, c="grey", lw=0.6, ls="--")
    ax.set(ylabel="AUROC (mean of runs, 95 % CI)", ylim=(bottom, 1.0))
    ax.set_title(
        f"Augmentation arms on unseen scanners (design {result.design.name}: "
        f"{len(result.cells)} runs)",
        fontsize=10,
    )
    ax.legend(fontsize=8, ncol=len(result.arms), loc="upper right")
    path.parent.mkdir(parents=True, exist_ok=True)
    figures.save_png(fig, path, dpi=100)
    return path


def write_report(result: ExperimentResult, out_dir: Path) -> list[Path]:
    """The files of :data:`FILES` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, frame in (
        ("summary.csv", result.summary),
        ("paired.csv", result.paired),
        ("power.csv", result.power),
    ):
        path = out_dir / name
        frame.to_csv(path, index=False, float_format="%.4f", lineterminator="\n")
        paths.append(path)
    (out_dir / "table.md").write_text(markdown(result))
    paths.append(out_dir / "table.md")
    paths.append(figure(result, out_dir / "auroc.png"))
    kept = ("arm", "train_seed", "split_seed", "epochs", "n_train", "threshold", "seconds")
    cells = sorted(
        ({k: c[k] for k in (*kept, "train_seconds")} for c in result.cells),
        key=lambda c: (c["arm"], c["train_seed"], c["split_seed"]),
    )
    design = {
        "design": result.design.model_dump(mode="json"),
        "statement": design_line(result),
        "arms": result.arms,
        "sets": result.sets,
        "seeds": [list(k) for k in result.seeds],
        "aims": result.aims,
        "cells": cells,
        "sweep_seconds": round(sum(c["seconds"] for c in cells), 1),
    }
    (out_dir / "design.json").write_text(json.dumps(design, indent=2, default=_json) + "\n")
    paths.append(out_dir / "design.json")
    return paths


def _json(value: Any) -> Any:
    if isinstance(value, float | np.floating) and not math.isfinite(float(value)):
        return None
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def track(result: ExperimentResult, files: Sequence[Path], root: Path | None = None) -> str:
    """Log the report to MLflow: one ``experiment`` run with the files, the design as params and
    each arm's AUROC and paired difference per set as metrics; a nested run per cell. Returns the
    run's id."""
    import mlflow

    params = {"design": result.design.model_dump(mode="json"), "arms": ",".join(result.arms)}
    tags = {"shiftguard.design": result.design.name}
    with stage_run("experiment", params, root=root, tags=tags) as run:
        metrics: dict[str, float] = {}
        for _, r in result.summary.iterrows():
            metrics[f"{r['metric']}.{r['arm']}.{_slug(r['set'])}"] = float(r["value"])
        for _, r in result.paired.iterrows():
            metrics[f"diff.{r['metric']}.{r['arm']}.{_slug(r['set'])}"] = float(r["diff"])
        mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
        mlflow.set_tag("shiftguard.aim_met", str(result.aims.get("met")))
        for path in files:
            mlflow.log_artifact(str(path))
        for cell in result.cells:
            name = f"{cell['arm']}-t{cell['train_seed']}-s{cell['split_seed']}"
            with mlflow.start_run(run_name=name, nested=True, tags={**tags, "shiftguard.stage": "experiment-cell", "shiftguard.augment_arm": cell["arm"]}):  # fmt: skip
                mlflow.log_params(
                    {k: cell[k] for k in ("arm", "train_seed", "split_seed", "epochs")}
                )
                values = {
                    f"{metric}.{_slug(name_)}": float(v)
                    for name_, fig in cell["figures"].items()
                    for metric, v in fig.items()
                    if metric in ("auroc", "sensitivity", "specificity", "ece")
                }
                mlflow.log_metrics({k: v for k, v in values.items() if math.isfinite(v)})
        return str(run.info.run_id)


def run(
    runs_dir: Path, out_dir: Path, tracking: bool = True, root: Path | None = None
) -> ExperimentResult:
    """Read a sweep's cells, compare the arms, write the report and (``tracking``) log it."""
    design = read_design(runs_dir)
    result = compare_arms(load_runs(runs_dir), design)
    files = write_report(result, out_dir)
    if tracking:
        run_id = track(result, files, root)
        log.info("experiment report logged to MLflow run %s", run_id)
    return result
