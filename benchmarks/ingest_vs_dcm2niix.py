"""Benchmark: ShiftGuard ingest against dcm2niix on the same DICOM files, slices per second.

Generates a synthetic cohort with :mod:`shiftguard.cohort` (or reuses one with ``--dicom``), then
converts it with, in turn and ``--repeats`` times:

* ``dcm2niix -z n -f %j -o OUT IN``  uncompressed NIfTI (``-f %j``: one file per SeriesInstanceUID,
  otherwise dcm2niix skips series whose default names collide);
* ShiftGuard ingest (header scan, validation, canonical resampling, NIfTI, manifest, quarantine) with
  ``--workers`` processes (default: all cores), timed around :func:`shiftguard.data.ingest.run`;
* ``dcm2niix -z y -f %j -o OUT IN``  gzip-compressed NIfTI, its usual mode.

and prints the best time of each, slices per second and the ratios. dcm2niix is single-threaded
(except for pigz), ShiftGuard uses a process pool: the comparison is per machine, as a user would run
them. Nothing here is asserted; it prints figures.

Usage::

    python benchmarks/ingest_vs_dcm2niix.py                 # 60 subjects, 3 repeats
    python benchmarks/ingest_vs_dcm2niix.py --subjects 20 --repeats 2
    python benchmarks/ingest_vs_dcm2niix.py --dicom /path/to/dicom/tree
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shiftguard import cohort
from shiftguard.config import CohortConfig, IngestConfig, compose_section
from shiftguard.data import ingest
from shiftguard.dicom.scan import list_files


def _dcm2niix(exe: str, dicom: Path, out: Path, gzip: bool) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [exe, "-z", "y" if gzip else "n", "-f", "%j", "-o", str(out), str(dicom)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode not in (0, 8):  # 8: some files were not converted (reported, not fatal)
        sys.exit(f"dcm2niix failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return seconds, sum(1 for p in out.iterdir() if p.name.endswith((".nii", ".nii.gz")))


def _shiftguard(
    cfg: IngestConfig, dicom: Path, out: Path, workers: int | None
) -> tuple[float, ingest.IngestSummary]:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    summary = ingest.run(cfg, dicom, out, workers=workers, progress=False)
    return time.perf_counter() - started, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=60, help="cohort size (one series each)")
    parser.add_argument(
        "--dicom", type=Path, help="reuse this DICOM tree instead of generating one"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="ShiftGuard worker processes")
    parser.add_argument(
        "--work-dir", type=Path, help="where to write (default: a temporary folder)"
    )
    parser.add_argument("--dcm2niix", default=shutil.which("dcm2niix") or "dcm2niix")
    parser.add_argument("--ingest", nargs="*", default=[], help="ingest overrides, e.g. size=[..]")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if shutil.which(args.dcm2niix) is None:
        print(
            f"dcm2niix not found ({args.dcm2niix}); install it or pass --dcm2niix", file=sys.stderr
        )
        return 2

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="sg_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.dicom is not None:
        dicom = args.dicom
    else:
        cohort_cfg = compose_section("cohort", CohortConfig, [f"cohort.n_subjects={args.subjects}"])
        print(f"generating {args.subjects} subjects with shiftguard.cohort ...", flush=True)
        started = time.perf_counter()
        cohort.run(cohort_cfg, work / "cohort", progress=False)
        print(f"  done in {time.perf_counter() - started:.1f} s", flush=True)
        dicom = work / "cohort" / "dicom"
    ingest_cfg = compose_section("ingest", IngestConfig, [f"ingest.{o}" for o in args.ingest])
    n_files = len(list_files(dicom))

    # dcm2niix is single-threaded: ShiftGuard is also timed on one worker, for the per-core figure.
    times: dict[str, list[float]] = {
        "dcm2niix -z n": [],
        "shiftguard": [],
        "shiftguard (1w)": [],
        "dcm2niix -z y": [],
    }
    outputs: dict[str, int] = {}
    slices = 0
    for _ in range(args.repeats):
        t, outputs["dcm2niix -z n"] = _dcm2niix(args.dcm2niix, dicom, work / "d2n_n", gzip=False)
        times["dcm2niix -z n"].append(t)
        t, summary = _shiftguard(ingest_cfg, dicom, work / "shiftguard", args.workers)
        times["shiftguard"].append(t)
        outputs["shiftguard"], slices = summary.series_accepted, summary.slices_accepted
        t, summary = _shiftguard(ingest_cfg, dicom, work / "shiftguard", 1)
        times["shiftguard (1w)"].append(t)
        outputs["shiftguard (1w)"] = summary.series_accepted
        t, outputs["dcm2niix -z y"] = _dcm2niix(args.dcm2niix, dicom, work / "d2n_y", gzip=True)
        times["dcm2niix -z y"].append(t)

    workers = args.workers or os.cpu_count()
    print(
        f"\n{n_files} files, {slices} slices accepted by ShiftGuard; {os.cpu_count()} CPU(s) "
        f"({platform.processor() or platform.machine()}), ShiftGuard workers: {workers}; "
        f"best of {args.repeats}"
    )
    print(f"{'tool':16s} {'seconds':>8s} {'slices/s':>10s} {'volumes':>8s}")
    rate = {}
    for tool, values in times.items():
        best = min(values)
        rate[tool] = n_files / best
        print(f"{tool:16s} {best:8.3f} {rate[tool]:10.0f} {outputs[tool]:8d}")
    for ours in ("shiftguard", "shiftguard (1w)"):
        for peer in ("dcm2niix -z n", "dcm2niix -z y"):
            print(f"ratio {ours} / {peer}: {rate[ours] / rate[peer]:.2f}")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
