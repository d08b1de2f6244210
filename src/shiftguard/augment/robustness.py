"""Offline robustness test sets: every validation and test volume under every scanner profile at every
severity level, with a manifest of what was drawn, and a gallery to look at.

The validation stage reads these sets to report how a model degrades per profile and severity. Each
(series, profile, severity) has its own generator, derived from the robustness seed and the series key,
so a set is reproducible and does not depend on the worker count.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import zlib
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shiftguard.augment.profiles import draw
from shiftguard.config.schema import AugmentConfig
from shiftguard.data.volume import read_nifti
from shiftguard.errors import RobustnessInputError
from shiftguard.figures import figure, save_png
from shiftguard.pool import WorkerPool, run_tasks
from shiftguard.tracking import stage_run
from shiftguard.utils import progress_bar, write_csv

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = (
    "series_key",
    "split",
    "patient_id",
    "finding",
    "site",
    "scanner_model",
    "profile",
    "severity",
    "volume_path",
    "params",
)
DATASET_COLUMNS = MANIFEST_COLUMNS[:6]  # carried over from the split's dataset.csv
VOLUMES_DIR = "volumes"


@dataclass(frozen=True)
class RobustnessSummary:
    """What the stage wrote, for ``dvc metrics``."""

    series: int
    profiles: int
    severities: int
    volumes_written: int

    def to_metrics(self) -> dict[str, int]:
        return asdict(self)


def generator_for(seed: int, series_key: str, profile: str, severity: int) -> np.random.Generator:
    """The generator of one (series, profile, severity): stable across runs and worker counts."""
    return np.random.default_rng(
        [seed, zlib.crc32(series_key.encode()), zlib.crc32(profile.encode()), severity]
    )


def simulate(
    volume: np.ndarray,
    spacing: tuple[float, float, float],
    cfg: AugmentConfig,
    profile: str,
    severity: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, dict[str, Any]]:
    """One volume under one profile and severity.

    Args:
        volume: ``(X, Y, Z)`` intensities.
        spacing: voxel size in mm.
        cfg: the augment configuration (profiles, backend).
        profile: a key of ``cfg.profiles``.
        severity: 0 (identity) to 4.
        rng: the generator every random draw comes from.

    Returns:
        The simulated ``(X, Y, Z)`` float32 volume and the drawn parameters as a plain dict.
    """

    params = draw(cfg.profiles[profile], severity, rng, volume.shape)
    if params.is_identity():
        return volume.astype(np.float32, copy=False), params.to_dict()
    if cfg.backend == "fast":
        from shiftguard.augment.fast import apply_fast as apply
    else:
        from shiftguard.augment.reference import apply_reference as apply
    out = apply(volume[None], params, spacing)[0]
    return out.numpy().astype(np.float32, copy=False), params.to_dict()


def _series_task(
    row: dict[str, str],
    ingest_dir: str,
    out_dir: str,
    cfg: AugmentConfig,
) -> list[dict[str, str]]:
    import nibabel as nib
    import torch

    torch.set_num_threads(1)
    source = Path(ingest_dir) / row["volume_path"]
    try:
        volume, affine, spacing = read_nifti(source)
    except (OSError, ValueError) as exc:
        raise RobustnessInputError(
            f"{source}: cannot read the ingested volume ({exc}); re-run `dvc repro ingest`"
        ) from exc
    rows = []
    for profile in cfg.robustness.profiles:
        for severity in cfg.robustness.severities:
            rng = generator_for(cfg.robustness.seed, row["series_key"], profile, severity)
            simulated, params = simulate(volume, spacing, cfg, profile, severity, rng)
            if severity == 0:  # the identity: point at the clean volume instead of copying it
                relative = Path(os.path.relpath(source, out_dir))
            else:
                relative = (
                    Path(VOLUMES_DIR) / profile / str(severity) / f"{row['series_key']}.nii.gz"
                )
                path = Path(out_dir) / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                out = nib.Nifti1Image(simulated, affine)
                # Scaled int16 (scl_slope, ~1e-4 of the range), gzip level 1 without a timestamp
                # (nibabel's defaults): a fraction of the float32 bytes, same bytes every run.
                out.set_data_dtype(np.int16)
                out.to_filename(path)
            rows.append(
                {
                    **{k: row.get(k, "") for k in DATASET_COLUMNS},
                    "profile": profile,
                    "severity": str(severity),
                    "volume_path": relative.as_posix(),
                    "params": json.dumps(params, sort_keys=True),
                }
            )
    return rows


def run(
    cfg: AugmentConfig,
    dataset_csv: Path,
    ingest_dir: Path,
    out_dir: Path,
    splits: Sequence[str] = ("val", "test"),
    workers: int | None = None,
    progress: bool = True,
) -> RobustnessSummary:
    """Write the robustness sets for ``splits`` of ``dataset_csv`` into ``out_dir``.

    Writes ``out_dir/volumes/<profile>/<severity>/<series_key>.nii.gz`` and ``out_dir/manifest.csv``
    (:data:`MANIFEST_COLUMNS`; ``volume_path`` is relative to ``out_dir``, and for severity 0, the
    identity, it points at the clean ingested volume; ``params`` is the JSON of the drawn
    :class:`~shiftguard.augment.params.SimParams`).
    """
    if not dataset_csv.is_file():
        raise RobustnessInputError(f"{dataset_csv}: file not found; run the split stage first")
    with dataset_csv.open(newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("split") in set(splits)]
    rows.sort(key=lambda r: r["series_key"])
    out_dir.mkdir(parents=True, exist_ok=True)
    n_workers = max(1, workers or os.cpu_count() or 1)
    results: list[dict[str, str]] = []
    args = [(row, str(ingest_dir), str(out_dir), cfg) for row in rows]
    # Workers start before the progress bar's thread exists, so they are forked (see WorkerPool);
    # untuned, so they compute exactly as the one-process path does.
    pool = (
        WorkerPool(min(n_workers, len(rows)), tune=False) if min(n_workers, len(rows)) > 1 else None
    )
    with pool or nullcontext(), progress_bar(progress) as bar:
        task = bar.add_task(f"robustness sets: {len(rows)} series", total=len(rows))
        for written in run_tasks(pool, _series_task, args, _worker_died):
            results.extend(written)
            bar.advance(task)
    results.sort(key=lambda r: (r["profile"], int(r["severity"]), r["series_key"]))
    write_csv(out_dir / "manifest.csv", MANIFEST_COLUMNS, results, extras="raise")
    return RobustnessSummary(
        series=len(rows),
        profiles=len(cfg.robustness.profiles),
        severities=len(cfg.robustness.severities),
        volumes_written=sum(r["severity"] != "0" for r in results),
    )


def _worker_died(args: tuple[Any, ...]) -> Iterator[list[dict[str, str]]]:
    """A series whose simulation killed its worker even when run alone."""
    raise RobustnessInputError(
        f"series {args[0].get('series_key', '?')}: simulating its robustness set killed the worker "
        "process (out of memory: use fewer workers)"
    )
    yield []  # a generator, as run_tasks expects


def gallery(
    cfg: AugmentConfig,
    volume_path: Path,
    out_png: Path,
    seed: int | None = None,
) -> Path:
    """A grid (scanner profile x severity) of one subject's mid axial slice, written as a PNG.

    Args:
        cfg: the augment configuration: the grid has ``cfg.robustness.profiles`` rows and
            ``cfg.robustness.severities`` columns.
        volume_path: an ingested (RAS) NIfTI volume.
        out_png: where to write the figure.
        seed: generator seed (default: ``cfg.robustness.seed``).
    """

    volume, _, spacing = read_nifti(volume_path)
    profiles = list(cfg.robustness.profiles)
    severities = list(cfg.robustness.severities)
    key = volume_path.stem
    z = volume.shape[2] // 2
    fig = figure(1.9 * len(severities), 2.1 * len(profiles))
    axes = fig.subplots(len(profiles), len(severities), squeeze=False)
    for i, profile in enumerate(profiles):
        for j, severity in enumerate(severities):
            rng = generator_for(
                cfg.robustness.seed if seed is None else seed, key, profile, severity
            )
            simulated, _ = simulate(volume, spacing, cfg, profile, severity, rng)
            ax = axes[i, j]
            plane = simulated[:, :, z].T
            # Each panel on its own window, as a viewer would show it: artefacts, not scaling.
            ax.imshow(plane, origin="lower", cmap="gray", vmin=0, vmax=np.percentile(plane, 99.5))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"severity {severity}", fontsize=9)
            if j == 0:
                ax.set_ylabel(profile, fontsize=9)
    fig.suptitle(f"scanner profiles x severity, series {key}", fontsize=10)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, out_png, dpi=80, tight=False)
    return out_png


def gallery_series(dataset_csv: Path, split: str = "test") -> str:
    """The series shown in the gallery: the first (by key) with the finding in ``split``, so the
    lesion is there to see; any series of the split when none has it."""
    with dataset_csv.open(newline="", encoding="utf-8") as fh:
        rows = sorted(
            (r for r in csv.DictReader(fh) if r.get("split") == split),
            key=lambda r: r["series_key"],
        )
    if not rows:
        raise RobustnessInputError(f"{dataset_csv}: no series in split {split!r} to show")
    positive = [r for r in rows if r.get("finding") == "1"]
    return (positive or rows)[0]["series_key"]


def run_stage(
    cfg: AugmentConfig,
    dataset_csv: Path,
    ingest_dir: Path,
    out_dir: Path,
    gallery_png: Path,
    workers: int | None = None,
    progress: bool = True,
) -> RobustnessSummary:
    """The ``augment`` stage: robustness sets, gallery, and an MLflow run that logs the config,
    the counts, the gallery and the manifest of drawn parameters."""
    import mlflow

    summary = run(cfg, dataset_csv, ingest_dir, out_dir, workers=workers, progress=progress)
    key = gallery_series(dataset_csv)
    gallery(cfg, ingest_dir / "volumes" / f"{key}.nii", gallery_png)
    with stage_run("augment", {"augment": cfg.model_dump(mode="json")}):
        mlflow.log_metrics({k: float(v) for k, v in summary.to_metrics().items()})
        mlflow.log_artifact(str(gallery_png))
        mlflow.log_artifact(str(out_dir / "manifest.csv"))
    return summary
