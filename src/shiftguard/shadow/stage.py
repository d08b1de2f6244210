"""One shadow evaluation from files: the shadow log, the diagnoses (RIS files and/or a PACS
query), the bundles' validation figures; the report folder and the MLflow run. What
``shiftguard shadow evaluate`` and the DVC stage ``shadow`` call; the stage's headline figures
(``reports/shadow/metrics.json``) are :func:`stage_metrics` of :func:`stage_evaluation`.

Roles are the registry's aliases (:data:`~shiftguard.tracking.CHALLENGER`,
:data:`~shiftguard.tracking.CHAMPION`): an ``edge predict`` results table without a ``role`` column
whose every row was predicted in shadow mode is a challenger's log (nothing it predicted was sent),
not a champion's. The MLflow run is named after the model versions it judged
(``shadow challenger v3``) and each version and the run name each other
(:data:`~shiftguard.tracking.SHADOW_RUN_TAG`, :data:`~shiftguard.tracking.MODEL_VERSION_TAG`)."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from shiftguard.config.shadow import ShadowConfig
from shiftguard.edge.bundle import open_bundle
from shiftguard.shadow.diagnoses import DiagnosisBook
from shiftguard.shadow.evaluate import ShadowEvaluation, ShadowResult, jsonable, run
from shiftguard.shadow.log import read_shadow_log
from shiftguard.shadow.report import log_run, write_report
from shiftguard.tracking import (
    CHALLENGER,
    CHAMPION,
    MODEL_VERSION_TAG,
    SHADOW_RUN_TAG,
    bundle_model_version,
    run_name,
    tracking_uri,
)

log = logging.getLogger(__name__)

VALIDATION_MEMBER = "validation/segments.csv"


def validation_tables(
    bundles: Sequence[Path | str], log_frame: pd.DataFrame
) -> dict[str, pd.DataFrame]:
    """Each role's validation segment table, from the bundle (of those given) the role ran."""
    from shiftguard.edge.service import resolve_bundle

    by_name = {}
    for path in bundles:
        bundle = open_bundle(resolve_bundle(path))
        if VALIDATION_MEMBER in bundle.members:
            by_name[f"{bundle.name}-v{bundle.version}"] = pd.read_csv(
                io.StringIO(bundle.text(VALIDATION_MEMBER))
            )
    tables = {}
    for role, rows in log_frame.groupby("role"):
        name = str(rows["bundle"].iloc[0])
        if name in by_name:
            tables[str(role)] = by_name[name]
        else:
            log.warning("no bundle given for %s (%s): no validation figures to compare", role, name)
    return tables


def shadow_mode_table(path: Path | str) -> bool:
    """Whether ``path`` is an ``edge predict`` results table without a ``role`` column whose every
    row was predicted in shadow mode (its ``shadow`` column is 1)."""
    try:
        flags = pd.read_csv(path, usecols=lambda c: c in ("role", "shadow"), dtype=str)
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        log.debug("%s is not a results table (%s): roles as logged", path, exc)
        return False
    if "role" in flags or "shadow" not in flags or flags.empty:
        return False
    return bool((flags["shadow"].str.strip() == "1").all())


def link_versions(result: ShadowResult, run_id: str, root: Path | None = None) -> dict[str, str]:
    """Tag each role's registered model version (found by its bundle's version,
    :func:`~shiftguard.tracking.bundle_model_version`) with the shadow run, the run with them, and
    name the run after them (``shadow challenger v3, champion v2``); returns ``{role: version}``
    of the roles the registry knows."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(root))
    versions: dict[str, str] = {}
    for role in sorted(result.evaluations, key=lambda r: (r != CHALLENGER, r)):
        e = result.evaluations[role]
        version = bundle_model_version(client, e.model, e.model_version)
        if version is None:
            log.info("shadow: %s's bundle %s is not a registered model version", role, e.bundle)
            continue
        versions[role] = version
        client.set_model_version_tag(e.model, version, SHADOW_RUN_TAG, run_id)
        client.set_tag(run_id, f"{MODEL_VERSION_TAG}.{role}", f"{e.model}/{version}")
    judged = versions.get(CHALLENGER) or (versions[next(iter(versions))] if versions else None)
    if judged is not None:
        model = result.evaluations[CHALLENGER if CHALLENGER in versions else next(iter(versions))]
        client.set_tag(run_id, MODEL_VERSION_TAG, f"{model.model}/{judged}")
    if versions:
        what = ", ".join(f"{role} v{version}" for role, version in versions.items())
        client.set_tag(run_id, "mlflow.runName", run_name(f"shadow {what}"))
    return versions


def evaluate_files(
    shadow_log: Path | str,
    cfg: ShadowConfig,
    diagnoses: Sequence[Path | str] = (),
    book: DiagnosisBook | None = None,
    bundles: Sequence[Path | str] = (),
    out: Path | str | None = None,
    site: str | None = None,
    track: bool = True,
    root: Path | None = None,
    title: str = "Shadow evaluation",
) -> tuple[ShadowResult, Path | None]:
    """Read, join, judge and report; returns the result and the HTML report's path."""
    frame = read_shadow_log(shadow_log, site=site)
    if shadow_mode_table(shadow_log):
        frame["role"] = frame["role"].replace(CHAMPION, CHALLENGER)
    book = book or DiagnosisBook()
    for file in diagnoses:
        problems = book.add_file(file)
        for problem in problems[:20]:
            log.warning("left out: %s", problem)
    result = run(
        frame, book, cfg.segments, validation_tables(bundles, frame) or None,
        min_n=cfg.min_n, min_positive=cfg.min_positive, n_boot=cfg.n_boot, seed=cfg.seed,
        alpha=cfg.alpha,
    )  # fmt: skip
    if frame.attrs.get("older_bundle_rows"):
        log.info("left out %d rows of bundles since replaced", frame.attrs["older_bundle_rows"])
    path: Path | None = None
    if out is not None:
        path = write_report(result, Path(out), title)
        if track:
            run_id = log_run(
                result, Path(out), {"shadow": cfg.model_dump(mode="json")}, cfg.experiment, root
            )
            link_versions(result, run_id, root)
    return result, path


def stage_evaluation(result: ShadowResult) -> ShadowEvaluation | None:
    """The evaluation the DVC stage ``shadow`` reports: the challenger's (the edge ran the exported
    bundle alone, in shadow mode: a challenger, see :func:`shadow_mode_table`), else the
    champion's; ``None`` when the edge predicted nothing."""
    return result.evaluations.get(CHALLENGER) or result.evaluations.get(CHAMPION)


def stage_metrics(evaluated: ShadowEvaluation | None) -> dict[str, Any]:
    """The DVC stage ``shadow``'s headline figures, ``reports/shadow/metrics.json``.

    Args:
        evaluated: The evaluation the stage reports (:func:`stage_evaluation`); ``None`` when the
            edge predicted nothing.

    Returns:
        ``bundle``; the counts ``studies`` (predicted), ``judged`` (with a verified diagnosis) and
        ``pending``; ``auroc``, ``sensitivity`` and ``specificity`` overall with their ``_low``
        and ``_high`` bounds (``None`` when not both classes were judged); ``segments_judged``
        (the overall row not counted) and ``segments_too_small``; ``flagged`` as
        ``column=segment``. With no evaluation: zero counts, nothing flagged, no bundle and no
        figures.
    """
    if evaluated is None:
        return {"studies": 0, "judged": 0, "pending": 0, "flagged": [],
                "segments_judged": 0, "segments_too_small": 0}  # fmt: skip
    overall = evaluated.overall
    judged = not evaluated.segments.empty
    segments = evaluated.segments
    return {
        "bundle": evaluated.bundle,
        "studies": evaluated.n_predictions,
        "judged": len(evaluated.joined),
        "pending": evaluated.n_pending,
        **{
            f"{m}{s}": jsonable(overall.get(f"{m}{s}"))
            for m in ("auroc", "sensitivity", "specificity")
            for s in ("", "_low", "_high")
        },
        "segments_judged": int(segments["judgeable"].sum()) - 1 if judged else 0,
        "segments_too_small": int((~segments["judgeable"]).sum()) if judged else 0,
        "flagged": [f"{r.column}={r.segment}" for r in evaluated.flagged.itertuples()],
    }
