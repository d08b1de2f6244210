"""The fleet view: every site's latest heartbeat, how old it is, and the stale-site alerts.

Each edge sends a heartbeat every ``edge.heartbeat_s`` seconds
(:meth:`~shiftguard.edge.service.Service.heartbeat`: site, bundle and registry version, rollout
state, queue depths, studies processed and failed, last study time, disk free); the collector keeps
the latest per site and serves them as JSON (``GET /v1/fleet``) and as a page (``GET /fleet``);
``shiftguard fleet status`` prints the table.

A site is judged by the alert rules whose metric is :data:`HEARTBEAT_AGE`: the time since its last
heartbeat in units of its own interval (3.0: three heartbeats missed). The collector checks them
every few seconds (:class:`FleetWatch`); a site that goes stale raises one alert (logged, and
POSTed to ``monitor.webhook`` through :func:`~shiftguard.monitor.alerts.post_webhook`), again only
after it has come back and gone stale once more.

>>> rows = fleet_rows([{"site": "north", "received_at": "2026-12-05T10:00:00Z",
...                     "interval_s": 60, "bundle_version": "ab12"}],
...                    now=datetime(2026, 12, 5, 10, 4, tzinfo=UTC))
>>> rows[0]["age_s"], rows[0]["heartbeat_age"], rows[0]["stale"]
(240.0, 4.0, True)
"""

from __future__ import annotations

import html
import json
import logging
import math
import urllib.request
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from shiftguard.config.monitor import FLEET_METRIC
from shiftguard.monitor.alerts import Alert, post_webhook
from shiftguard.records.contract import FLEET_ROUTE

log = logging.getLogger(__name__)

#: the alert rules' fleet metric: time since the site's last heartbeat over its interval
HEARTBEAT_AGE = FLEET_METRIC
#: heartbeats missed before a site is shown stale when no rule says otherwise
DEFAULT_STALE = 3.0
FLEET_PAGE = "/fleet"
KEEP_RAISED = 1000


def _parse(text: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None


def stale_limit(rules: Sequence[Any]) -> float:
    """The smallest :data:`HEARTBEAT_AGE` threshold among ``rules`` (:data:`DEFAULT_STALE` when
    none judges heartbeats)."""
    limits = [float(r.above) for r in rules if r.metric == HEARTBEAT_AGE and r.above is not None]
    return min(limits) if limits else DEFAULT_STALE


def fleet_rows(
    heartbeats: Sequence[Mapping[str, Any]],
    now: datetime | None = None,
    stale_after: float = DEFAULT_STALE,
) -> list[dict[str, Any]]:
    """Each heartbeat with ``age_s`` (seconds since the collector received it),
    ``heartbeat_age`` (that over the site's interval) and ``stale`` (``heartbeat_age`` over
    ``stale_after``)."""
    now = now or datetime.now(UTC)
    out = []
    for beat in heartbeats:
        received = _parse(beat.get("received_at"))
        age = (now - received).total_seconds() if received else math.inf
        interval = float(beat.get("interval_s") or 60.0)
        ratio = age / interval if interval > 0 else math.inf
        out.append({**beat, "age_s": round(age, 1), "heartbeat_age": round(ratio, 2),
                    "stale": ratio > stale_after})  # fmt: skip
    return out


class FleetWatch:
    """Stale-site alerts from the fleet's heartbeats (see the module docstring).

    Args:
        rules: the monitor's alert rules; those on :data:`HEARTBEAT_AGE` are used.
        webhook: where to POST new alerts (None: logged only).
    """

    def __init__(self, rules: Sequence[Any], webhook: str | None = None) -> None:
        self.rules = [r for r in rules if r.metric == HEARTBEAT_AGE]
        self.webhook = webhook
        self._firing: set[tuple[str, str]] = set()
        #: the alerts raised, oldest first (the last :data:`KEEP_RAISED`: a long-running collector
        #: with a flapping site must not grow without end; the webhook and the log have them all)
        self.raised: list[Alert] = []

    def check(
        self, heartbeats: Sequence[Mapping[str, Any]], now: datetime | None = None
    ) -> list[Alert]:
        """The alerts new since the last check (a site stale under a rule it was not already
        stale under), posted to the webhook."""
        new = []
        for row in fleet_rows(heartbeats, now):
            for rule in self.rules:
                key = (rule.name, str(row["site"]))
                if rule.fires(float(row["heartbeat_age"])):
                    if key not in self._firing:
                        self._firing.add(key)
                        new.append(_alert(rule, row))
                elif key in self._firing:
                    self._firing.discard(key)
                    log.info("fleet: %s sends heartbeats again", row["site"])
        for alert in new:
            log.warning("fleet: %s", alert.message())
        self.raised = [*self.raised, *new][-KEEP_RAISED:]
        if new and self.webhook:
            post_webhook(self.webhook, new)
        return new


def _alert(rule: Any, row: Mapping[str, Any]) -> Alert:
    return Alert(
        rule=rule.name,
        site=str(row["site"]),
        window=int(row.get("beats", 0)),
        metric=HEARTBEAT_AGE,
        value=float(row["heartbeat_age"]),
        above=float(rule.limit),
        windows=1,
        window_end=str(row.get("received_at", "")),
    )


COLUMNS = (
    ("site", "site"),
    ("bundle_version", "bundle"),
    ("registry_version", "registry"),
    ("wave", "wave"),
    ("state", "state"),
    ("processed", "studies"),
    ("failed", "failed"),
    ("queue_depth", "queue"),
    ("last_study_at", "last study"),
    ("disk_free_gb", "disk free GB"),
    ("age_s", "heartbeat s ago"),
    ("note", "note"),
)


def _cells(row: Mapping[str, Any]) -> dict[str, str]:
    free = row.get("disk_free_bytes")
    notes = []
    if row.get("stale"):
        notes.append(f"STALE ({row['heartbeat_age']:g} intervals)")
    back = row.get("rolled_back")
    if back:
        notes.append(
            f"rolled back {back.get('version', '')} at {back.get('at', '')}: {back.get('detail', '')}"
        )
    if row.get("registry_error"):
        notes.append(f"registry: {row['registry_error']}")
    values = {
        **{k: row.get(k) for k, _ in COLUMNS},
        "disk_free_gb": None if free is None else f"{int(free) / 1e9:.1f}",
        "note": "; ".join(notes),
    }
    return {k: "" if v is None else str(v) for k, v in values.items()}


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The fleet as a plain-text table (``shiftguard fleet status``)."""
    if not rows:
        return "no site has sent a heartbeat yet"
    cells = [_cells(r) for r in rows]
    widths = {k: max(len(title), *(len(c[k]) for c in cells)) for k, title in COLUMNS}
    lines = ["  ".join(title.ljust(widths[k]) for k, title in COLUMNS).rstrip()]
    lines += ["  ".join(c[k].ljust(widths[k]) for k, _ in COLUMNS).rstrip() for c in cells]
    stale = sum(bool(r.get("stale")) for r in rows)
    lines.append(f"{len(rows)} site(s), {stale} stale")
    return "\n".join(lines)


def render_page(rows: Sequence[Mapping[str, Any]], refresh_s: int = 30) -> bytes:
    """The fleet as an HTML page (``GET /fleet``), refreshed every ``refresh_s`` seconds."""
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in COLUMNS)
    body = []
    for row in rows:
        cells = _cells(row)
        style = ' class="stale"' if row.get("stale") else ""
        body.append(
            f"<tr{style}>"
            + "".join(f"<td>{html.escape(cells[k])}</td>" for k, _ in COLUMNS)
            + "</tr>"
        )
    stale = sum(bool(r.get("stale")) for r in rows)
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="refresh" content="{refresh_s}"><title>ShiftGuard fleet</title>'
        "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}"
        "tr.stale td{background:#fde2e1}</style></head><body>"
        f"<h1>Fleet</h1><p>{len(rows)} site(s), {stale} stale; "
        f"generated {datetime.now(UTC).isoformat(timespec='seconds')}</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        "</body></html>"
    ).encode()


def fetch_fleet(url: str, timeout_s: float = 10.0, context: Any = None) -> dict[str, Any]:
    """``GET /v1/fleet`` of the collector at ``url``: ``{"sites": [...], "stale_after": x}``."""
    with urllib.request.urlopen(
        url.rstrip("/") + FLEET_ROUTE, timeout=timeout_s, context=context
    ) as answer:
        value = json.loads(answer.read())
    if not isinstance(value, dict) or not isinstance(value.get("sites"), list):
        raise ValueError(f"{url}{FLEET_ROUTE}: not a fleet answer")
    return value
