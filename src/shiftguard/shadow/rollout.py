"""Staged rollout of a new champion to the fleet, and its halt when a site rolled back.

The plan is ``shadow.rollout.waves`` (``conf/shadow/``); a site's wave is its
``edge.follow.wave``. State lives on the champion's model version in the MLflow registry, where
every site reads it (:mod:`shiftguard.edge.registry`):

* :data:`WAVE_TAG`: the highest wave open; a site of a later wave keeps its bundle. No tag: every
  wave (a plan of one wave, or a version promoted before plans existed);
* :data:`HALTED_TAG`: set when a site rolled back or refused the version; no further site takes it;
* :data:`OPENED_TAG`: when the open wave opened (UTC); :data:`STATE_TAG`: the rollout in words;
* ``rollout.site.<site>``: each site's state, from its last heartbeat.

:func:`start` runs just before ``shiftguard promote`` moves the alias (so that no site sees the
new champion without its wave; wave 0 only, when the plan has
more than one wave); :func:`advance` is ``shiftguard fleet rollout``: it reads the fleet's
heartbeats from the collector, records each site's state, halts the rollout when a site went
back, and opens the next wave when the open one passed its conditions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from shiftguard.config.shadow import RolloutConfig
from shiftguard.edge.registry import ROLLOUT_HALTED_TAG as HALTED_TAG
from shiftguard.edge.registry import ROLLOUT_WAVE_TAG as WAVE_TAG

log = logging.getLogger(__name__)

OPENED_TAG = "rollout.wave_opened_at"
STATE_TAG = "rollout.state"
SITE_TAG = "rollout.site."
SERVING, OBSERVING, ROLLED_BACK, REFUSED, WAITING, STALE = (
    "serving", "observing", "rolled back", "refused", "waiting", "stale",
)  # fmt: skip


def _now() -> datetime:
    return datetime.now(UTC)


def _stamp(at: datetime) -> str:
    return at.isoformat(timespec="seconds").replace("+00:00", "Z")


def start(client: Any, name: str, version: str, plan: RolloutConfig) -> dict[str, str]:
    """Tag a version just promoted with the start of its rollout; the tags set."""
    first = plan.waves[0].name
    if len(plan.waves) == 1:
        tags = {STATE_TAG: f"open to every site (one wave: {first})"}
    else:
        tags = {
            WAVE_TAG: "0",
            OPENED_TAG: _stamp(_now()),
            STATE_TAG: f"wave 0 ({first}) open; {len(plan.waves) - 1} more to go",
        }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return tags


@dataclass(frozen=True)
class SiteState:
    """A site's part in one version's rollout, from its last heartbeat."""

    site: str
    wave: int
    state: str
    detail: str = ""
    studies: int = 0

    def text(self) -> str:
        return f"{self.state}: {self.detail}" if self.detail else self.state


def site_state(version: str, row: Mapping[str, Any]) -> SiteState:
    """Where a site stands with registry ``version`` (its heartbeat ``row`` from the fleet view)."""
    site, wave = str(row["site"]), int(row.get("wave") or 0)
    refused = dict(row.get("refused") or {})
    if version in refused:
        reason = str(refused[version])
        state = ROLLED_BACK if reason.startswith("rolled back") else REFUSED
        return SiteState(site, wave, state, reason.removeprefix("rolled back: "))
    studies = int(row.get("studies_on_bundle") or 0)
    if row.get("stale"):
        return SiteState(site, wave, STALE, f"no heartbeat for {row.get('age_s')} s")
    if str(row.get("registry_version") or "") != version:
        return SiteState(site, wave, WAITING, str(row.get("follow") or ""))
    if row.get("state") == "observing":
        obs = row.get("observation") or {}
        return SiteState(
            site, wave, OBSERVING, f"{obs.get('studies', 0)} studies observed", studies
        )
    return SiteState(site, wave, SERVING, f"{studies} studies", studies)


@dataclass
class Step:
    """What one :func:`advance` found and did."""

    model: str
    version: str
    open_wave: int
    waves: list[str]
    sites: list[SiteState]
    action: str
    halted: bool = False
    complete: bool = False
    blockers: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        open_text = ("all" if self.open_wave >= len(self.waves) - 1 else
                     f"{self.open_wave} ({self.waves[self.open_wave]})")  # fmt: skip
        out = [f"{self.model} version {self.version}: waves open up to {open_text}"]
        for s in sorted(self.sites, key=lambda s: (s.wave, s.site)):
            out.append(f"  wave {s.wave}  {s.site:<20} {s.text()}")
        out += [f"  waiting for: {b}" for b in self.blockers]
        out.append(self.action)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sites": [asdict(s) for s in self.sites]}


def advance(
    client: Any,
    name: str,
    plan: RolloutConfig,
    fleet: Sequence[Mapping[str, Any]],
    channel: str = "champion",
    dry_run: bool = False,
    now: datetime | None = None,
) -> Step:
    """One look at the rollout of ``name@channel`` (see the module docstring)."""
    now = now or _now()
    mv = client.get_model_version_by_alias(name, channel)
    version, tags = str(mv.version), dict(mv.tags or {})
    waves = [w.name for w in plan.waves]
    last = len(waves) - 1
    open_wave = int(tags[WAVE_TAG]) if WAVE_TAG in tags else last
    sites = [site_state(version, row) for row in fleet]
    step = Step(name, version, min(open_wave, last), waves, sites, action="")

    def tag(key: str, value: str) -> None:
        if not dry_run:
            client.set_model_version_tag(name, version, key, value)

    for s in sites:
        tag(f"{SITE_TAG}{s.site}", s.text()[:500])
    if tags.get(HALTED_TAG):
        step.halted, step.action = True, f"halted: {tags[HALTED_TAG]}"
        return step
    gone_back = [s for s in sites if s.state in (ROLLED_BACK, REFUSED) and s.wave <= open_wave]
    if gone_back:
        reason = "; ".join(f"{s.site} {s.state} ({s.detail})" for s in gone_back)
        tag(HALTED_TAG, reason[:500])
        tag(STATE_TAG, f"halted in wave {open_wave}")
        step.halted, step.action = True, f"HALTED: {reason}"
        log.error("rollout of %s version %s halted: %s", name, version, reason)
        return step
    current = [s for s in sites if s.wave == open_wave]
    wave = plan.waves[min(open_wave, last)]
    blockers = [f"{s.site} ({s.text()})" for s in current if s.state != SERVING]
    studies = sum(s.studies for s in current)
    if studies < wave.min_studies:
        blockers.append(f"{studies} of {wave.min_studies} studies on it in wave {wave.name}")
    opened = tags.get(OPENED_TAG)
    if opened and wave.min_hours:
        hours = (now - datetime.fromisoformat(opened.replace("Z", "+00:00"))).total_seconds() / 3600
        if hours < wave.min_hours:
            blockers.append(f"{hours:.1f} of {wave.min_hours:g} hours in wave {wave.name}")
    if not current:
        blockers.append(f"no site of wave {open_wave} ({wave.name}) has reported")
    step.blockers = blockers
    if blockers:
        step.action = f"wave {open_wave} ({wave.name}) not passed yet"
    elif open_wave >= last:
        step.complete, step.action = True, "complete: every wave serves it"
        tag(STATE_TAG, "complete")
    else:
        nxt = open_wave + 1
        tag(WAVE_TAG, str(nxt))
        tag(OPENED_TAG, _stamp(now))
        tag(STATE_TAG, f"wave {nxt} ({waves[nxt]}) open")
        step.open_wave, step.action = nxt, f"opened wave {nxt} ({waves[nxt]})"
        log.info("rollout of %s version %s: wave %d (%s) open", name, version, nxt, waves[nxt])
    if dry_run:
        step.action += " (dry run: nothing recorded)"
    return step
