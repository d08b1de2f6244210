"""The sets an augmentation design is scored on, built once before its sweep.

A design (``conf/design/<name>.yaml``) names two cohorts from ``conf/cohort/``: the in-distribution
hold-out (``design.holdout_cohort``: the training scanners, other patients) and the unseen scanners
(``design.external_cohort``). :func:`prepare` generates, ingests and splits each into
``design.cohorts/<cohort>/`` (``data/``, ``ingest/``, ``split/dataset.csv``) unless its split table
is already there, so designs that share a cohort share its files, and a design that needs more
studies names a larger cohort instead of overwriting a smaller one.

The hold-out is split half ``val`` (the operating point) and half ``test``; every series of the
unseen cohort lands in the ``external`` split (``split.external`` lists the unseen scanners).

Given the design's ``train`` section, it also writes each set's network inputs once
(``<cohort>/inputs/``, :func:`shiftguard.experiment.inputs.write_inputs`), which every cell of a
parallel sweep then reads instead of preprocessing the volumes in each of its processes.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shiftguard.config import (
    CohortConfig,
    DataConfig,
    IngestConfig,
    SplitConfig,
    compose_section,
)
from shiftguard.config.schema import DesignConfig, TrainConfig

log = logging.getLogger(__name__)

#: the hold-out set's split: no training series, half for the operating point, half scored only
HOLDOUT_FRACTIONS = "split.fractions={train: 0.0, val: 0.5, test: 0.5}"


@dataclass(frozen=True)
class PreparedSet:
    """One of a design's scored sets: its role, ``conf/cohort/`` choice, folder, and whether
    this call built it (``False``: its split table was already there)."""

    role: str
    cohort: str
    folder: Path
    built: bool
    seconds: float
    inputs: Path | None = None


def prepare(
    design: DesignConfig,
    root: Path | None = None,
    workers: int | None = None,
    progress: bool = True,
    overrides: Sequence[str] = (),
    train: TrainConfig | None = None,
) -> list[PreparedSet]:
    """Generate, ingest and split the design's hold-out and unseen-scanner cohorts where their
    split tables are missing; with ``train``, write their network inputs where those are missing.

    Args:
        design: the design section.
        root: what relative paths are relative to (the repository; default: the working folder).
        workers: processes for generation and ingest (``None``: one per core).
        progress: show progress bars.
        overrides: more Hydra overrides for the cohort, ingest and split sections (after the
            design's ``cohort=<name>``).
        train: the design's ``train`` section (its preprocessing); ``None`` writes no inputs.

    Returns:
        The two sets, hold-out first.

    Raises:
        ConfigError: a cohort the design names is not in ``conf/cohort/`` (the message lists them).
    """
    from shiftguard.cohort import generate
    from shiftguard.data import ingest, split

    root = root or Path.cwd()
    out = []
    for role, cohort in (("holdout", design.holdout_cohort), ("external", design.external_cohort)):
        folder = design.cohort_folder(cohort, root)
        table = folder / "split" / "dataset.csv"
        if table.is_file():
            log.info("experiment: %s set %s already prepared in %s", role, cohort, folder)
            began = time.perf_counter()
            inputs = _inputs(folder, train, workers, progress)
            seconds = time.perf_counter() - began if inputs else 0.0
            out.append(PreparedSet(role, cohort, folder, False, seconds, inputs))
            continue
        began = time.perf_counter()
        cohort_cfg = compose_section("cohort", CohortConfig, [f"cohort={cohort}", *overrides])
        if folder.exists():  # a half-built set from an interrupted run
            shutil.rmtree(folder)
        log.info(
            "experiment: generating the %s set %s (%d studies) into %s",
            role,
            cohort,
            cohort_cfg.n_subjects,
            folder,
        )
        generate.run(cohort_cfg, folder / "data", workers=workers, progress=progress)
        ingest.run(
            compose_section("ingest", IngestConfig, overrides),
            folder / "data" / "dicom",
            folder / "ingest",
            workers=workers,
            progress=progress,
        )
        fractions = [HOLDOUT_FRACTIONS] if role == "holdout" else []
        data = compose_section("data", DataConfig, overrides).model_copy(
            update={"labels": str(folder / "data" / "ris" / "verified_diagnoses.csv")}
        )
        split.run(
            compose_section("split", SplitConfig, [*overrides, *fractions]),
            data,
            folder / "ingest" / "manifest.csv",
            folder / "split",
            folder / "split" / "labels.csv",
            trainable=False,  # an evaluation-only set has no train split
        )
        inputs = _inputs(folder, train, workers, progress)
        out.append(PreparedSet(role, cohort, folder, True, time.perf_counter() - began, inputs))
    return out


def _inputs(
    folder: Path, train: TrainConfig | None, workers: int | None, progress: bool
) -> Path | None:
    """Write the network inputs of every series of ``folder``'s split table for ``train``'s
    preprocessing unless they are there; the file, or ``None`` without ``train``."""
    import csv

    from shiftguard.experiment.inputs import INPUTS_DIR, input_tag, write_inputs

    if train is None:
        return None
    target = folder / INPUTS_DIR
    tag = input_tag(train)
    if (target / f"{tag}.npy").is_file() and (target / f"{tag}.txt").is_file():
        return target / f"{tag}.npy"
    with (folder / "split" / "dataset.csv").open(newline="", encoding="utf-8") as fh:
        paths = [str(folder / "ingest" / row["volume_path"]) for row in csv.DictReader(fh)]
    return write_inputs(paths, train, target, workers=workers, progress=progress)
