"""One shadow evaluation from files: the shadow log, the diagnoses (RIS files and/or a PACS
query), the bundles' validation figures; the report folder and the MLflow run. What
``shiftguard shadow evaluate`` and the DVC stage ``shadow`` call."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from shiftguard.config.shadow import ShadowConfig
from shiftguard.shadow.diagnoses import DiagnosisBook
from shiftguard.shadow.evaluate import ShadowResult, run
from shiftguard.shadow.log import read_shadow_log
from shiftguard.shadow.report import log_run, write_report

log = logging.getLogger(__name__)

VALIDATION_MEMBER = "validation/segments.csv"


def validation_tables(
    bundles: Sequence[Path | str], log_frame: pd.DataFrame
) -> dict[str, pd.DataFrame]:
    """Each role's validation segment table, from the bundle (of those given) the role ran."""
    from shiftguard.edge.bundle import open_bundle
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
            log_run(
                result, Path(out), {"shadow": cfg.model_dump(mode="json")}, cfg.experiment, root
            )
    return result, path
