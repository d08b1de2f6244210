"""What a site needs to follow a registry channel safely: the bundles it holds, and the watch
after each swap.

* :class:`FollowState` (``<storage>/bundles/state.json``, replaced atomically): the bundle being
  served (``current``), the one before it (``previous``, kept loaded while the current one is
  observed), whether the current one has passed its observation (``confirmed``), the registry
  versions this site refused and why (a failed signature, hash or smoke test, or a rollback: never
  taken again), and the last events. The bundles themselves lie beside it; the last known-good
  one is served after a restart whatever the registry says, so a registry outage changes nothing.
* :class:`Watch`: after a swap, the site watches the new bundle's failures, its predict latency
  against the previous bundle's, and the monitor's output rule (:func:`~shiftguard.records.
  distance.output_score` of its outputs against the bundle's held-out reference); the first that
  trips is the reason to roll back. The observation ends after ``edge.rollback.observe_studies``
  studies and ``observe_hours`` hours, whichever comes later.
* :func:`in_window`: whether a local time is in a ``HH:MM-HH:MM`` maintenance window.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from datetime import time as clock
from pathlib import Path
from typing import Any

import numpy as np

from shiftguard.config.deploy import RollbackConfig
from shiftguard.records.distance import output_score

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
#: output features the site's output rule judges (the monitor's ``output`` group, numerical)
OUTPUT_FEATURES = ("probability", "entropy")
#: held-out reference rows needed to judge outputs on them alone (as the monitor does)
MIN_HELD_OUT = 20
MAX_EVENTS = 50


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Installed:
    """A bundle on the site's disk: its file, name, content version and the registry version it
    came from (None: the site file's ``edge.bundle``)."""

    path: str
    name: str
    version: str
    registry_version: str | None = None
    since: str = field(default_factory=utc_now)

    @property
    def label(self) -> str:
        registry = f" (registry version {self.registry_version})" if self.registry_version else ""
        return f"{self.name} v{self.version}{registry}"


@dataclass
class FollowState:
    """The follower's memory (see the module docstring)."""

    path: Path
    current: Installed | None = None
    previous: Installed | None = None
    confirmed: bool = True
    refused: dict[str, str] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, folder: Path) -> FollowState:
        """The state in ``folder`` (an empty one when there is none yet). An unreadable file is
        set aside (``state.json.bad``) and the site starts from its configured bundle."""
        path = folder / STATE_FILE
        if not path.is_file():
            return cls(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                path,
                current=Installed(**data["current"]) if data.get("current") else None,
                previous=Installed(**data["previous"]) if data.get("previous") else None,
                confirmed=bool(data.get("confirmed", True)),
                refused={str(k): str(v) for k, v in dict(data.get("refused", {})).items()},
                events=list(data.get("events", [])),
            )
        except (ValueError, TypeError, KeyError) as exc:
            bad = path.with_suffix(".json.bad")
            path.replace(bad)
            log.error("follow: %s is unreadable (%s); set aside as %s", path, exc, bad.name)
            return cls(path)

    def save(self) -> None:
        data = {
            "current": asdict(self.current) if self.current else None,
            "previous": asdict(self.previous) if self.previous else None,
            "confirmed": self.confirmed,
            "refused": self.refused,
            "events": self.events[-MAX_EVENTS:],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.path)

    def event(self, kind: str, detail: str, **extra: Any) -> dict[str, Any]:
        entry = {"at": utc_now(), "event": kind, "detail": detail, **extra}
        self.events.append(entry)
        return entry

    def last(self, kind: str) -> dict[str, Any] | None:
        return next((e for e in reversed(self.events) if e.get("event") == kind), None)

    def prune(self, keep: int) -> list[Path]:
        """Delete bundle files beyond the ``keep`` newest that are neither current nor previous."""
        held = {Path(i.path).resolve() for i in (self.current, self.previous) if i is not None}
        files = sorted(
            (p for p in self.path.parent.glob("*.sgbundle") if p.resolve() not in held),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        gone = files[max(keep - len(held), 0) :]
        for p in gone:
            p.unlink(missing_ok=True)
        return gone


def in_window(window: str | None, now: clock) -> bool:
    """Whether ``now`` (local time of day) is in ``HH:MM-HH:MM`` (None: always). A window may
    span midnight.

    >>> in_window("01:00-05:00", clock(3, 0)), in_window("22:00-02:00", clock(23, 30))
    (True, True)
    >>> in_window("22:00-02:00", clock(12, 0)), in_window(None, clock(12, 0))
    (False, True)
    """
    if window is None:
        return True
    start, end = (clock(int(t[:2]), int(t[3:5])) for t in window.split("-"))
    if start <= end:
        return start <= now < end
    return now >= start or now < end


def reference_outputs(reference_csv: bytes) -> dict[str, np.ndarray]:
    """The output features of a bundle's ``reference.csv``: its held-out rows' (``split`` not
    ``train``) when there are at least :data:`MIN_HELD_OUT`, else all rows' (a network is
    overconfident on the series it was fitted to)."""
    rows = list(csv.DictReader(io.StringIO(reference_csv.decode("utf-8"))))
    held_out = [r for r in rows if r.get("split", "") not in ("", "train")]
    chosen = held_out if len(held_out) >= MIN_HELD_OUT else rows
    return {
        name: np.array([_float(r.get(name)) for r in chosen], dtype=np.float64)
        for name in OUTPUT_FEATURES
        if rows and name in rows[0]
    }


def _float(text: Any) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


class Watch:
    """The observation of a bundle just swapped in (see the module docstring).

    Args:
        cfg: ``edge.rollback``.
        reference: the new bundle's :func:`reference_outputs` (empty: no output rule).
        baseline: predict latencies (s) of the previous bundle's recent studies.
    """

    def __init__(
        self,
        cfg: RollbackConfig,
        reference: Mapping[str, np.ndarray],
        baseline: Sequence[float] = (),
        started: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.reference = dict(reference)
        self.baseline = list(baseline)
        self.started = time.time() if started is None else started
        self.studies = 0
        self.failures = 0
        self.latencies: list[float] = []
        self.outputs: dict[str, list[float]] = {name: [] for name in self.reference}
        self.last_output_score = math.nan
        self._next_judged = cfg.min_output_studies

    def record(self, seconds: float, rows: Sequence[Mapping[str, Any]]) -> None:
        """A study the bundle processed: its predict time and its result rows."""
        self.studies += 1
        self.latencies.append(seconds)
        for row in rows:
            for name, values in self.outputs.items():
                values.append(_float(row.get(name)))

    def failed(self) -> None:
        self.studies += 1
        self.failures += 1

    def verdict(self) -> str | None:
        """Why to roll back now, or None."""
        cfg = self.cfg
        if self.failures > cfg.max_failures:
            return (
                f"{self.failures} of {self.studies} studies failed since the swap "
                f"(edge.rollback.max_failures {cfg.max_failures})"
            )
        if len(self.latencies) >= cfg.min_latency_studies and len(self.baseline) >= 5:
            now, before = np.percentile(self.latencies, 95), np.percentile(self.baseline, 95)
            if now > cfg.latency_factor * before:
                return (
                    f"p95 predict latency {now:.3f} s over {len(self.latencies)} studies, "
                    f"{now / before:.1f} x the previous bundle's {before:.3f} s "
                    f"(edge.rollback.latency_factor {cfg.latency_factor:g})"
                )
        n = min((len(v) for v in self.outputs.values()), default=0)
        # judged at every min_output_studies-th series, on all since the swap: a fixed schedule
        # rather than after every study, which would test the same drift again and again
        if self.reference and n >= self._next_judged:
            self._next_judged = (n // cfg.min_output_studies + 1) * cfg.min_output_studies
            window = {k: np.asarray(v) for k, v in self.outputs.items()}
            self.last_output_score = output_score(self.reference, window)
            if self.last_output_score > cfg.output_score:
                return (
                    f"output score {self.last_output_score:.2f} over {n} series (the monitor's "
                    f"output rule: edge.rollback.output_score {cfg.output_score:g})"
                )
        return None

    def done(self, now: float | None = None) -> bool:
        """Whether the observation is over (enough studies and hours)."""
        elapsed_h = ((time.time() if now is None else now) - self.started) / 3600
        return self.studies >= self.cfg.observe_studies and elapsed_h >= self.cfg.observe_hours

    def summary(self) -> dict[str, Any]:
        score = self.last_output_score
        return {
            "studies": self.studies,
            "failures": self.failures,
            "p95_latency_s": float(np.percentile(self.latencies, 95)) if self.latencies else None,
            "output_score": None if math.isnan(score) else round(score, 3),
            "since": datetime.fromtimestamp(self.started, UTC).isoformat(timespec="seconds"),
        }
