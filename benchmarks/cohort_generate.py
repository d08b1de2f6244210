"""Benchmark: the cohort generator end to end with the MR-physics renderer against the previous
generator (``cohort.rendering=legacy``), same config otherwise, same subjects, same workers.

Composes the cohort section of ``conf/`` twice with the project's loader
(:func:`shiftguard.config.compose_section`), once with ``cohort.rendering=physics`` (the default) and
once with ``cohort.rendering=legacy``, checks that the two configs differ only there, and then:

* times :func:`shiftguard.cohort.generate.run` (render, DICOM series, masks, label maps, tables) for
  each renderer into a temporary folder, ``--repeats`` times, alternating which goes first, with
  ``--workers`` processes; prints the median seconds, subjects per second, seconds per subject, DICOM
  files and megabytes written (everything), and the ratio new / old;
* times :func:`shiftguard.cohort.render.render_subject` alone per scanner (the first
  ``--render-subjects`` subjects of the cohort on each scanner; a scanner the cohort leaves out gets
  its first subject), ``--render-repeats`` times each, median, for both renderers, with the ratio.

The template is loaded once before timing (in this process; spawned workers load their own, which is
part of the end-to-end cost of both). The machine's load average is printed before and after: on a
shared machine the figures move with it. Nothing is asserted; it prints figures.

Usage::

    python benchmarks/cohort_generate.py                        # 14 subjects, 1 worker, 2 repeats
    python benchmarks/cohort_generate.py --subjects 60 --workers 4 --repeats 3 --render-subjects 3
    python benchmarks/cohort_generate.py --overrides experiment=tiny
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from shiftguard.cohort import generate
from shiftguard.cohort.demographics import SubjectPlan, sample_subjects
from shiftguard.cohort.geometry import AcquisitionGeometry
from shiftguard.cohort.render import render_subject, scanner_centre_lps
from shiftguard.cohort.template import load_template
from shiftguard.config import CohortConfig, compose_section

#: renderer -> the name printed for it; the first is the new one, the second the peer
ARMS = {"physics": "physics (new)", "legacy": "legacy (previous generator)"}


def cohort_configs(subjects: int, overrides: list[str]) -> dict[str, CohortConfig]:
    """The cohort config for each renderer, composed from ``conf/`` with the same overrides.

    Raises:
        SystemExit: the two configs differ in anything but ``rendering``.
    """
    cfgs = {
        arm: compose_section(
            "cohort",
            CohortConfig,
            [*overrides, f"cohort.n_subjects={subjects}", f"cohort.rendering={arm}"],
        )
        for arm in ARMS
    }
    dumps = [cfg.model_dump(exclude={"rendering"}) for cfg in cfgs.values()]
    if dumps[0] != dumps[1]:
        raise SystemExit("the physics and legacy configs differ in more than cohort.rendering")
    return cfgs


def folder_size(folder: Path) -> tuple[int, int]:
    """Files and bytes under ``folder``."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def time_generate(
    cfg: CohortConfig, out: Path, workers: int
) -> tuple[float, generate.CohortSummary, int]:
    """Seconds for one :func:`generate.run` into a fresh ``out``, its summary and bytes written."""
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    summary = generate.run(cfg, out, workers=workers, progress=False)
    seconds = time.perf_counter() - started
    return seconds, summary, folder_size(out)[1]


def render_plans(
    cfg: CohortConfig, plans: list[SubjectPlan], per_scanner: int
) -> dict[str, list[SubjectPlan]]:
    """Up to ``per_scanner`` of the cohort's subjects for every scanner of the config."""
    chosen: dict[str, list[SubjectPlan]] = {}
    for name in cfg.scanners:
        own = [p for p in plans if p.scanner == name][:per_scanner]
        chosen[name] = own or [replace(plans[0], scanner=name)]
    return chosen


def time_render(cfg: CohortConfig, plans: list[SubjectPlan], repeats: int) -> float:
    """Median seconds of :func:`render_subject` over ``plans`` x ``repeats``."""
    seconds = []
    for plan in plans:
        for _ in range(repeats):
            started = time.perf_counter()
            render_subject(cfg, plan)
            seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=14, help="cohort size (default 14)")
    parser.add_argument("--workers", type=int, default=1, help="generator processes (default 1)")
    parser.add_argument("--repeats", type=int, default=2, help="end-to-end runs, median kept")
    parser.add_argument(
        "--render-subjects", type=int, default=1, help="subjects per scanner for render timing"
    )
    parser.add_argument("--render-repeats", type=int, default=1, help="renders of each of them")
    parser.add_argument(
        "--overrides", nargs="*", default=[], help="Hydra overrides for both, e.g. cohort.seed=1"
    )
    parser.add_argument(
        "--work-dir", type=Path, help="where to write (default: a temporary folder, removed)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    cfgs = cohort_configs(args.subjects, args.overrides)
    plans = sample_subjects(cfgs["physics"])
    per_scanner = Counter(p.scanner for p in plans)
    load_before = load()
    started = time.perf_counter()
    load_template()
    template_s = time.perf_counter() - started

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="sg_bench_cohort_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        seconds: dict[str, list[float]] = {arm: [] for arm in ARMS}
        written: dict[str, tuple[int, int]] = {}
        for repeat in range(args.repeats):
            order = list(ARMS) if repeat % 2 == 0 else list(reversed(ARMS))
            for arm in order:
                print(f"repeat {repeat + 1}/{args.repeats}: {arm} ...", flush=True)
                t, summary, size = time_generate(cfgs[arm], work / arm, args.workers)
                seconds[arm].append(t)
                written[arm] = (summary.n_files, size)

        chosen = render_plans(cfgs["physics"], plans, args.render_subjects)
        render_s: dict[str, dict[str, float]] = {arm: {} for arm in ARMS}
        for name, subjects in chosen.items():
            print(f"render_subject: {name} ...", flush=True)
            for arm in ARMS:
                render_s[arm][name] = time_render(cfgs[arm], subjects, args.render_repeats)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    n = len(plans)
    mix = ", ".join(f"{per_scanner[s]} {s}" for s in cfgs["physics"].scanners if per_scanner[s])
    print(
        f"\ncohort: {n} subjects ({mix}); {args.workers} worker(s); median of {args.repeats} "
        f"end-to-end runs; {os.cpu_count()} CPU(s) ({platform.processor() or platform.machine()}), "
        f"numpy {np.__version__}; load average (1/5/15 min) {load_before} before, {load()} after; "
        f"template loaded in {template_s:.1f} s (before timing)"
    )
    header = (
        f"{'generator':30s} {'seconds':>8s} {'subjects/s':>11s} {'s/subject':>10s} "
        f"{'DICOM':>6s} {'MB':>7s}  runs (s)"
    )
    print(header)
    print("-" * len(header))
    median = {arm: statistics.median(seconds[arm]) for arm in ARMS}
    for arm, label in ARMS.items():
        files, size = written[arm]
        runs = ", ".join(f"{t:.1f}" for t in seconds[arm])
        print(
            f"{label:30s} {median[arm]:8.1f} {n / median[arm]:11.2f} {median[arm] / n:10.2f} "
            f"{files:6d} {size / 1e6:7.1f}  {runs}"
        )
    new, old = ARMS
    print(
        f"ratio new/old: {median[new] / median[old]:.2f}x the seconds per subject "
        f"({(n / median[new]) / (n / median[old]):.2f}x the subjects per second)"
    )

    counts = {name: len(subjects) * args.render_repeats for name, subjects in chosen.items()}
    print(
        f"\nrender_subject only, per scanner: median of {args.render_repeats} render(s) of up to "
        f"{args.render_subjects} subject(s) of the cohort on that scanner"
    )
    header = (
        f"{'scanner':14s} {'grid (K x R x C)':>17s} {'renders':>8s} "
        f"{'physics s':>10s} {'legacy s':>9s} {'new/old':>8s}"
    )
    print(header)
    print("-" * len(header))
    centre = scanner_centre_lps(load_template())
    for name, profile in cfgs["physics"].scanners.items():
        k, r, c = AcquisitionGeometry.from_profile(profile, centre).shape
        p_s, l_s = render_s[new][name], render_s[old][name]
        print(
            f"{name:14s} {f'{k} x {r} x {c}':>17s} {counts[name]:8d} "
            f"{p_s:10.2f} {l_s:9.2f} {p_s / l_s:7.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
