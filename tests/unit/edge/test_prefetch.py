"""Preparing studies while they arrive: the preparer in a child process (the default) or a thread
gives the slices the whole-series path gives; a preparer that dies or cannot start costs speed,
never a study; the child never outlives the service."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from shiftguard.config.deploy import SeriesSelection
from shiftguard.config.schema import IngestConfig
from shiftguard.data.canonical import canonical_volume
from shiftguard.dicom.scan import scan_files
from shiftguard.dicom.series import group_series
from shiftguard.dicom.testing import SeriesSpec, write_series
from shiftguard.edge import prefetch
from shiftguard.edge.prefetch import Prefetcher

RULES = IngestConfig(spacing=(3.0, 2.5, 2.0), shape=(14, 16, 18), min_slices=2)
OTHER = IngestConfig(spacing=(2.0, 2.0, 2.0), shape=(12, 12, 12), min_slices=2)


def _served(rules: IngestConfig = RULES, selection: SeriesSelection | None = None) -> object:
    """What the prefetcher reads of the bundle served: its grid and its series selection."""
    return SimpleNamespace(rules=rules, selection=selection or SeriesSelection(min_slices=2))


def _wait(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def series(tmp_path: Path) -> list[Path]:
    return write_series(
        tmp_path / "series",
        SeriesSpec(rows=40, cols=36, n_slices=24, pixel_spacing=(1.0, 1.25), slice_spacing=2.0),
    )


@pytest.fixture(params=["process", "thread"])
def prefetcher(request: pytest.FixtureRequest) -> Iterator[Prefetcher]:
    served = _served()
    p = Prefetcher(lambda: served, request.param)  # type: ignore[arg-type,return-value]
    p.start()
    assert p.wait_ready()
    yield p
    p.stop()


def _whole(files: list[Path], rules: IngestConfig = RULES) -> tuple[object, np.ndarray]:
    headers, issues = scan_files(files)
    assert not issues
    [group] = group_series(headers)
    return group, canonical_volume(group, rules)[1].array


def _check(prefetcher: Prefetcher, files: list[Path], expect_all: bool = True) -> None:
    """Take the study and finish its series from the prepared slices: the whole-series volume
    to float32 rounding (and, with ``expect_all``, every slice was prepared)."""
    group, whole = _whole(files)
    study = prefetcher.take(group.study_uid)  # type: ignore[attr-defined]
    assert study is not None
    stream = study.series[group.series_uid]  # type: ignore[attr-defined]
    if expect_all:
        assert len(stream) == len(files)
    headers, issues = study.scanned(files)
    assert len(headers) == len(files) and not issues
    _, got, _ = canonical_volume(group, RULES, stream)  # type: ignore[arg-type]
    assert got.method == "streamed"
    span = float(whole.max() - whole.min())
    assert np.abs(got.array - whole).max() <= 1e-5 * span


def test_prepared_slices_give_the_whole_series_volume(
    prefetcher: Prefetcher, series: list[Path]
) -> None:
    study_uid = scan_files(series[:1])[0][0].study_uid
    for f in series:
        prefetcher.add(study_uid, str(f))
    _wait(lambda: prefetcher.backlog() == 0)
    assert prefetcher.prepared == len(series) and prefetcher.errors == 0
    _check(prefetcher, series)


def test_a_series_the_bundle_does_not_read_is_headers_only(series: list[Path]) -> None:
    """A series the selection refuses by its modality gets no stream (nothing reduced), yet its
    headers are kept for the worker."""
    served = _served(selection=SeriesSelection(modalities=["CT"], min_slices=2))
    p = Prefetcher(lambda: served)  # type: ignore[arg-type,return-value]
    p.start()
    try:
        study_uid = scan_files(series[:1])[0][0].study_uid
        for f in series:
            p.add(study_uid, str(f))
        _wait(lambda: p.backlog() == 0)
        study = p.take(study_uid)
        assert study is not None and not study.series
        assert len(study.headers) == len(series)
    finally:
        p.stop()


def test_a_killed_child_is_started_again_and_the_study_is_still_whole(series: list[Path]) -> None:
    """SIGKILL of the preparing process halfway: the next instance starts another, the slices
    the dead one held are read when the series is finished, and the volume is the same."""
    served = _served()
    p = Prefetcher(lambda: served)  # type: ignore[arg-type,return-value]
    p.start()
    try:
        assert p.wait_ready()
        study_uid = scan_files(series[:1])[0][0].study_uid
        half = len(series) // 2
        for f in series[:half]:
            p.add(study_uid, str(f))
        _wait(lambda: p.backlog() == 0)
        child = p._preparer
        assert isinstance(child, prefetch._InProcess)
        os.kill(child.process.pid, signal.SIGKILL)
        child.process.wait(10)
        for f in series[half:]:
            p.add(study_uid, str(f))
        assert p.restarts == 1 and p.mode == "process"
        _wait(lambda: p.backlog() == 0)
        _check(p, series, expect_all=False)
    finally:
        p.stop()


def test_a_child_that_cannot_start_leaves_the_work_to_a_thread(
    series: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prefetch, "_CHILD", "import sys; sys.exit(3)")
    served = _served()
    p = Prefetcher(lambda: served)  # type: ignore[arg-type,return-value]
    p.start()
    try:
        _wait(lambda: p.mode == "thread")
        study_uid = scan_files(series[:1])[0][0].study_uid
        for f in series:
            p.add(study_uid, str(f))
        assert p.wait_ready()
        _wait(lambda: p.backlog() == 0)
        assert p.prepared >= 1
        _check(p, series, expect_all=False)
    finally:
        p.stop()


def test_a_bundle_swap_prepares_later_slices_for_the_new_grid(series: list[Path]) -> None:
    """The served bundle changes halfway (another grid): the series' stream keeps the grid it was
    started for and refuses slices reduced for the other; the worker reads those, and the volume
    is still the whole-series one."""
    served = [_served(RULES)]
    p = Prefetcher(lambda: served[0])  # type: ignore[arg-type,return-value]
    p.start()
    try:
        study_uid = scan_files(series[:1])[0][0].study_uid
        half = len(series) // 2
        for f in series[:half]:
            p.add(study_uid, str(f))
        served[0] = _served(OTHER)
        for f in series[half:]:
            p.add(study_uid, str(f))
        _wait(lambda: p.backlog() == 0)
        group, _ = _whole(series)
        study = p.take(group.study_uid)  # type: ignore[attr-defined]
        assert study is not None
        stream = study.series[group.series_uid]  # type: ignore[attr-defined]
        assert stream.rules == RULES and len(stream) == half
        got = canonical_volume(group, RULES, stream)[1]  # type: ignore[arg-type]
        whole = _whole(series)[1]
        span = float(whole.max() - whole.min())
        assert np.abs(got.array - whole).max() <= 1e-5 * span
    finally:
        p.stop()


def test_a_study_taken_is_closed_to_what_comes_after(
    prefetcher: Prefetcher, series: list[Path]
) -> None:
    """Instances of a study added after its worker took it are prepared for the study's next
    revision, never slipped into the one being processed."""
    study_uid = scan_files(series[:1])[0][0].study_uid
    for f in series[:5]:
        prefetcher.add(study_uid, str(f))
    _wait(lambda: prefetcher.backlog() == 0)
    first = prefetcher.take(study_uid)
    assert first is not None and len(first.headers) == 5
    for f in series[5:]:
        prefetcher.add(study_uid, str(f))
    _wait(lambda: prefetcher.backlog() == 0)
    assert len(first.headers) == 5
    second = prefetcher.take(study_uid)
    assert second is not None and len(second.headers) == len(series) - 5


def test_the_child_ends_when_the_service_is_killed(tmp_path: Path) -> None:
    """SIGKILL of the process that started the preparer: the child sees its pipe close and ends
    (no orphan left holding memory)."""
    script = (
        "import sys, time\n"
        "from types import SimpleNamespace\n"
        "from shiftguard.config.deploy import SeriesSelection\n"
        "from shiftguard.config.schema import IngestConfig\n"
        "from shiftguard.edge.prefetch import Prefetcher\n"
        "served = SimpleNamespace(rules=IngestConfig(), selection=SeriesSelection())\n"
        "p = Prefetcher(lambda: served)\n"
        "p.start()\n"
        "assert p.wait_ready()\n"
        "print(p._preparer.process.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        os.kill(child, 0)  # running
    finally:
        parent.kill()
        parent.wait(10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        # a zombie (reparented, not reaped yet) has ended: its state says so
        with open(f"/proc/{child}/stat") as fh:  # noqa: PTH123
            if fh.read().split(")")[1].split()[0] == "Z":
                return
        time.sleep(0.05)
    raise AssertionError(f"the preparing process {child} outlived its service")
