"""Generate the synthetic multi-scanner cohort: DICOM series, RIS table, ground truth, provenance.

``run(cfg, out_dir)`` writes::

    out_dir/
      cohort.json                                   provenance (no timestamps)
      dicom/<PatientID>/<SeriesInstanceUID>/<InstanceNumber:04d>.dcm
      ris/verified_diagnoses.csv                    one row per study
      ground_truth/lesions.csv                      one row per subject with the finding
      ground_truth/masks/<PatientID>.nii.gz         lesion mask for every subject (all 0 without)
      ground_truth/labels/<PatientID>.nii.gz        tissue label map (physics renderer; see
                                                    shiftguard.cohort.physics.LABELS)

Subjects are rendered in a process pool, each worker writing its subjects' files to disjoint paths;
the tables are written by the parent in subject order. The same seed and config give a byte-identical
tree whatever the number of workers.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shiftguard import __version__
from shiftguard.cohort import tables
from shiftguard.cohort.demographics import SubjectPlan, sample_subjects
from shiftguard.cohort.render import RenderedSeries, render_subject
from shiftguard.cohort.template import template_dir
from shiftguard.cohort.writer import check_transfer_syntax, series_uids, write_mask, write_series
from shiftguard.config.schema import CohortConfig
from shiftguard.errors import CohortError, OutputDirectoryError
from shiftguard.pool import WorkerPool, run_tasks
from shiftguard.utils import progress_bar, write_csv, write_json

log = logging.getLogger(__name__)

#: what ``run`` writes at the top of ``out_dir`` (and replaces on a re-run)
MANAGED = ("cohort.json", "dicom", "ris", "ground_truth")


@dataclass(frozen=True)
class CohortSummary:
    """What :func:`run` wrote.

    Attributes:
        n_subjects: subjects (one study, one series each).
        n_files: DICOM files.
        n_positive: subjects with the finding.
        per_site: subjects per site name.
        positive_per_site: subjects with the finding per site name.
        out_dir: the cohort's folder.
    """

    n_subjects: int
    n_files: int
    n_positive: int
    per_site: dict[str, int]
    positive_per_site: dict[str, int]
    out_dir: Path

    def to_metrics(self) -> dict[str, object]:
        """Counts as plain JSON-able values (for ``dvc metrics``)."""
        return {
            "n_subjects": self.n_subjects,
            "n_files": self.n_files,
            "n_positive": self.n_positive,
            "per_site": dict(sorted(self.per_site.items())),
            "positive_per_site": dict(sorted(self.positive_per_site.items())),
        }


@dataclass(frozen=True)
class SubjectResult:
    """What a worker reports back for one subject (the parent writes the tables from these)."""

    index: int
    study_uid: str
    series_uid: str
    n_files: int
    lesion: dict[str, Any] | None = field(default=None)


def _generate_subject(
    cfg: CohortConfig, plan: SubjectPlan, out_dir: Path, digest: str, plugins: dict[str, str]
) -> SubjectResult:
    profile = cfg.scanners[plan.scanner]
    series = render_subject(cfg, plan)
    uids = series_uids(digest, cfg.seed, plan.patient_id)
    paths = write_series(
        plan,
        profile,
        series.geometry,
        series.stored,
        uids,
        out_dir / "dicom",
        plugins[plan.scanner],
    )
    mask_rel = Path("ground_truth") / "masks" / f"{plan.patient_id}.nii.gz"
    write_mask(series.mask, series.geometry, out_dir / mask_rel)
    if series.labels is not None:
        labels_rel = Path("ground_truth") / "labels" / f"{plan.patient_id}.nii.gz"
        write_mask(series.labels, series.geometry, out_dir / labels_rel)
    lesion = None
    if series.lesion is not None:
        centre = series.lesion_centre_ras
        if centre is None or not series.mask.any():
            raise CohortError(
                f"{plan.patient_id}: the lesion fell outside the {plan.scanner} field of view; "
                "enlarge the profile's matrix or n_slices"
            )
        lesion = {
            "patient_id": plan.patient_id,
            "study_instance_uid": uids.study,
            "series_instance_uid": uids.series,
            "centre_r_mm": f"{centre[0]:.2f}",
            "centre_a_mm": f"{centre[1]:.2f}",
            "centre_s_mm": f"{centre[2]:.2f}",
            "radius_mm": f"{series.lesion.radius_mm:.2f}",
            **_lesion_contrast(series),
            "mask_voxels": int(series.mask.sum()),
            "mask_path": mask_rel.as_posix(),
        }
    return SubjectResult(plan.index, uids.study, uids.series, len(paths), lesion)


def generate_subjects(
    cfg: CohortConfig, out_dir: Path, indices: Sequence[int]
) -> list[SubjectResult]:
    """Render and write only the subjects at ``indices`` (0-based, in the order of
    :func:`~shiftguard.cohort.demographics.sample_subjects`) into ``out_dir``, in one process,
    byte for byte as :func:`run` writes them: for checking a cohort against a record of its files
    (DVC's file list) without generating all of it. No table and no ``cohort.json`` is written.

    Raises:
        CohortError: an index outside the cohort, or as :func:`run`.
    """
    plans = sample_subjects(cfg)
    bad = [i for i in indices if not 0 <= i < len(plans)]
    if bad:
        raise CohortError(f"subject indices {bad} are outside the cohort's 0..{len(plans) - 1}")
    plugins = {
        name: check_transfer_syntax(name, cfg.scanners[name])
        for name in {plans[i].scanner for i in indices}
    }
    digest = tables.config_digest(cfg)
    return [_generate_subject(cfg, plans[i], Path(out_dir), digest, plugins) for i in indices]


def _lesion_contrast(series: RenderedSeries) -> dict[str, str]:
    """The lesions.csv columns that describe the lesion's appearance on its scanner."""
    assert series.lesion is not None
    tissue = series.lesion_tissue
    if tissue is None:  # legacy renderer: the drawn contrast and sign
        return {
            "contrast": f"{series.lesion.contrast:.3f}",
            "sign": f"{series.lesion.sign:+d}",
            "t1_ms": "",
            "t2_ms": "",
            "pd": "",
        }
    return {
        "contrast": f"{abs(tissue['contrast']):.3f}",
        "sign": "+1" if tissue["contrast"] >= 0 else "-1",
        "t1_ms": f"{tissue['t1_ms']:.1f}",
        "t2_ms": f"{tissue['t2_ms']:.1f}",
        "pd": f"{tissue['pd']:.3f}",
    }


def _generate_chunk(
    cfg: CohortConfig,
    plans: Sequence[SubjectPlan],
    out_dir: Path,
    digest: str,
    plugins: dict[str, str],
) -> list[SubjectResult]:
    return [_generate_subject(cfg, plan, out_dir, digest, plugins) for plan in plans]


def _prepare_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputDirectoryError(f"{out_dir}: exists and is not a folder; choose another --out")
    present = [name for name in MANAGED if (out_dir / name).exists()]
    if present and not (out_dir / "cohort.json").is_file():
        raise OutputDirectoryError(
            f"{out_dir}: holds {', '.join(present)} but no cohort.json, so it was not written by a "
            "finished cohort run; remove those entries or choose another output folder"
        )
    for name in present:
        path = out_dir / name
        log.info("replacing the previous cohort's %s", path)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


_WORKER_DIED = (
    "a cohort worker process died: out of memory (use fewer workers), or run() was called while "
    "a script's __main__ module was being imported (workers are spawned: call it under "
    "`if __name__ == '__main__':`)"
)


def _worker_died(args: tuple[Any, ...]) -> Iterator[list[SubjectResult]]:
    """A chunk that killed its worker even when run alone: the cohort cannot be written."""
    raise CohortError(_WORKER_DIED)
    yield []  # a generator, as run_tasks expects


def _chunks(plans: Sequence[SubjectPlan], workers: int) -> list[list[SubjectPlan]]:
    size = max(1, min(8, len(plans) // (workers * 6) or 1))
    return [list(plans[i : i + size]) for i in range(0, len(plans), size)]


def _run_pool(
    cfg: CohortConfig,
    plans: Sequence[SubjectPlan],
    out_dir: Path,
    digest: str,
    plugins: dict[str, str],
    workers: int,
    progress: bool,
) -> list[SubjectResult]:
    results: list[SubjectResult] = []
    bar = progress_bar(progress)
    with bar:
        task = bar.add_task(f"cohort: {len(plans)} subjects", total=len(plans))
        if workers <= 1:
            for plan in plans:
                results.extend(_generate_chunk(cfg, [plan], out_dir, digest, plugins))
                bar.advance(task)
            return results
        chunks = _chunks(plans, workers)
        # Spawned workers: a fresh interpreter each, so nothing of the caller's state leaks in;
        # untuned, so they compute exactly as the one-process path does.
        try:
            pool = WorkerPool(min(workers, len(chunks)), start="spawn", tune=False)
        except BrokenProcessPool as exc:
            raise CohortError(_WORKER_DIED) from exc
        with pool:
            args = [(cfg, chunk, out_dir, digest, plugins) for chunk in chunks]
            for chunk_results in run_tasks(pool, _generate_chunk, args, _worker_died):
                results.extend(chunk_results)
                bar.advance(task, len(chunk_results))
    return results


def run(
    cfg: CohortConfig, out_dir: Path, workers: int | None = None, progress: bool = True
) -> CohortSummary:
    """Generate the cohort into ``out_dir``.

    Args:
        cfg: the cohort configuration.
        out_dir: the cohort's folder; created if missing. A previous cohort there (one with
            ``cohort.json``) is replaced; entries other than the generator's are left alone.
        workers: worker processes; ``None`` means ``os.cpu_count()``, 1 runs in this process. The
            output does not depend on it.
        progress: show a rich progress bar.

    Returns:
        Counts of what was written.

    Raises:
        CohortError: a bad seed or config value, a transfer syntax without an encoder
            (:class:`~shiftguard.errors.UnsupportedTransferSyntaxError`), a missing template
            (:class:`~shiftguard.errors.TemplateNotFoundError`), or an output folder holding
            foreign files (:class:`~shiftguard.errors.OutputDirectoryError`).
    """
    out_dir = Path(out_dir)
    n_workers = workers if workers is not None else (os.cpu_count() or 1)
    if n_workers < 1:
        raise CohortError(f"workers: must be at least 1, got {n_workers}")
    started = time.perf_counter()
    used = sorted({site.scanner for site in cfg.sites})
    plugins = {name: check_transfer_syntax(name, cfg.scanners[name]) for name in used}
    template_dir()  # fail early, before any file is written
    plans = sample_subjects(cfg)
    digest = tables.config_digest(cfg)
    _prepare_out_dir(out_dir)
    log.info(
        "generating %d subjects with %d worker(s) into %s",
        len(plans),
        min(n_workers, len(plans)),
        out_dir,
    )
    results = _run_pool(cfg, plans, out_dir, digest, plugins, n_workers, progress)
    results.sort(key=lambda r: r.index)
    if [r.index for r in results] != list(range(len(plans))):
        raise CohortError("internal error: some subjects were not generated")

    ris_rows = [
        {
            "accession_number": plan.accession_number,
            "patient_id": plan.patient_id,
            "study_instance_uid": res.study_uid,
            "finding": int(plan.finding),
            "finding_label": tables.FINDING_LABELS[int(plan.finding)],
            "reader": plan.reader,
            "report_date": plan.report_date.strftime("%Y%m%d"),
        }
        for plan, res in zip(plans, results, strict=True)
    ]
    write_csv(out_dir / "ris" / "verified_diagnoses.csv", tables.RIS_COLUMNS, ris_rows)
    write_csv(
        out_dir / "ground_truth" / "lesions.csv",
        tables.LESION_COLUMNS,
        [r.lesion for r in results if r.lesion is not None],
    )
    per_site = Counter(p.site for p in plans)
    positive_per_site = Counter(p.site for p in plans if p.finding)
    summary = CohortSummary(
        n_subjects=len(plans),
        n_files=sum(r.n_files for r in results),
        n_positive=sum(p.finding for p in plans),
        per_site={s.name: per_site.get(s.name, 0) for s in cfg.sites},
        positive_per_site={s.name: positive_per_site.get(s.name, 0) for s in cfg.sites},
        out_dir=out_dir,
    )
    write_json(
        out_dir / "cohort.json",
        {
            "generator": "shiftguard.cohort",
            "shiftguard_version": __version__,
            "seed": cfg.seed,
            "n_subjects": cfg.n_subjects,
            "config_sha256": digest,
            "config": cfg.model_dump(mode="json"),
            "counts": summary.to_metrics(),
            "layout": tables.LAYOUT,
        },
    )
    log.info(
        "cohort: %d subjects, %d positive, %d files in %.1f s",
        summary.n_subjects,
        summary.n_positive,
        summary.n_files,
        time.perf_counter() - started,
    )
    return summary
