"""Alert rules over the window history, alert records, and the optional webhook.

A rule (``conf/monitor/``: ``{name, metric, above, windows}``) fires on a site's window when the
metric is above its threshold in that window and the ``windows - 1`` before it. Each firing is
recorded once (rule, site, window); a new one is POSTed to the webhook when one is configured.
A webhook that fails is logged, and the alert stays recorded: nothing is lost for a scheduler
that reads the alert table or the exit status of ``shiftguard monitor check``.
"""

from __future__ import annotations

import json
import logging
import math
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alert:
    rule: str
    site: str
    window: int
    metric: str
    value: float
    above: float
    windows: int
    window_end: str

    def message(self) -> str:
        ending = f" (ending {self.window_end})" if self.window_end else ""
        return (
            f"[{self.site}] {self.rule}: {self.metric} = {self.value:.3f} > {self.above:g} "
            f"for {self.windows} window(s), up to window {self.window}{ending}"
        )


def evaluate(rules: Sequence[Any], history: Mapping[str, Sequence[Any]]) -> list[Alert]:
    """Every firing of every rule over each site's windows (in order). ``history`` maps a site to
    its :class:`~shiftguard.monitor.score.WindowResult` list (anything with ``index``, ``end``
    and ``metric(name)``)."""
    out = []
    for site, windows in history.items():
        values_by_rule = {}
        for rule in rules:
            values = [_value(w, rule.metric) for w in windows]
            values_by_rule[rule.name] = values
            for i in range(rule.windows - 1, len(windows)):
                run = values[i - rule.windows + 1 : i + 1]
                if all(v is not None and v > rule.above for v in run):
                    out.append(
                        Alert(
                            rule=rule.name,
                            site=site,
                            window=int(windows[i].index),
                            metric=rule.metric,
                            value=float(run[-1]),  # type: ignore[arg-type]
                            above=float(rule.above),
                            windows=int(rule.windows),
                            window_end=str(windows[i].end),
                        )
                    )
    return out


def _value(window: Any, metric: str) -> float | None:
    try:
        value = float(window.metric(metric))
    except KeyError:
        return None
    return value if math.isfinite(value) else None


def first_alert(alerts: Iterable[Alert]) -> Alert | None:
    ordered = sorted(alerts, key=lambda a: (a.window, a.rule))
    return ordered[0] if ordered else None


def post_webhook(url: str, alerts: Sequence[Alert], timeout: float = 5.0) -> bool:
    """POST ``{"alerts": [...]}``; True on a 2xx answer. Failures are logged, not raised."""
    if not alerts:
        return True
    body = json.dumps(
        {"source": "shiftguard", "alerts": [{**asdict(a), "message": a.message()} for a in alerts]}
    ).encode()
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            ok = 200 <= answer.status < 300
    except OSError as exc:
        log.error("alert webhook %s failed: %s (the alerts stay recorded)", url, exc)
        return False
    if not ok:
        log.error("alert webhook %s answered %s", url, answer.status)
    return ok
