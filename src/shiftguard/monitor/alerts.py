"""Alert rules over the window history, alert records, and the optional webhook.

A rule (``conf/monitor/``: ``{name, metric, above, windows}``, or ``below`` for a metric that must
not fall, such as an estimated sensitivity) fires on a site's window when the metric is on the
firing side of its threshold in that window and the ``windows - 1`` before it. Each firing is
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
    above: float  # the rule's threshold (the side that fires: ``below``)
    windows: int
    window_end: str
    below: bool = False  # the rule fires below ``above``, not above it

    def message(self) -> str:
        ending = f" (ending {self.window_end})" if self.window_end else ""
        side = "<" if self.below else ">"
        return (
            f"[{self.site}] {self.rule}: {self.metric} = {self.value:.3f} {side} {self.above:g} "
            f"for {self.windows} window(s), up to window {self.window}{ending}"
        )


def evaluate(rules: Sequence[Any], history: Mapping[str, Sequence[Any]]) -> list[Alert]:
    """Every firing of every rule over each site's windows (in order). ``history`` maps a site to
    its :class:`~shiftguard.monitor.score.WindowResult` list (anything with ``index``, ``end``
    and ``metric(name)``). A rule fires on a window whose :func:`streaks` reach its ``windows``."""
    out = []
    for site, windows in history.items():
        for rule in rules:
            for window, run in zip(windows, streaks(rule, windows), strict=True):
                if run >= rule.windows:
                    out.append(
                        Alert(
                            rule=rule.name,
                            site=site,
                            window=int(window.index),
                            metric=rule.metric,
                            value=float(_value(window, rule.metric)),  # type: ignore[arg-type]
                            above=threshold(rule),
                            windows=int(rule.windows),
                            window_end=str(window.end),
                            below=fires_below(rule),
                        )
                    )
    return out


def streaks(rule: Any, windows: Sequence[Any]) -> list[int]:
    """Per window, how many windows in a row, up to and including it, have the rule's metric on the
    firing side of its threshold (0 where it is not, or has no value: an estimate the window
    could not support never fires). The rule fires where this reaches ``rule.windows``.

    >>> from types import SimpleNamespace as NS
    >>> rule = NS(metric="unified_score", above=4.0, windows=2)
    >>> streaks(rule, [NS(metric=lambda _, v=v: v) for v in (5.0, 3.0, 4.5, 6.0, 7.0)])
    [1, 0, 1, 2, 3]
    """
    out, run = [], 0
    for window in windows:
        value = _value(window, rule.metric)
        fired = value is not None and (
            value < threshold(rule) if fires_below(rule) else value > threshold(rule)
        )
        run = run + 1 if fired else 0
        out.append(run)
    return out


def rule_text(rule: Any) -> str:
    """A rule in words, e.g. ``unified_score above 4 in 2 windows in a row``.

    >>> from types import SimpleNamespace as NS
    >>> rule_text(NS(metric="novel:scanner_model", above=0.1, windows=1))
    'novel:scanner_model above 0.1 in a window'
    """
    span = "in a window" if rule.windows == 1 else f"in {rule.windows} windows in a row"
    side = "below" if fires_below(rule) else "above"
    return f"{rule.metric} {side} {threshold(rule):g} {span}"


def fires_below(rule: Any) -> bool:
    """Whether a rule fires below its threshold (``below`` set) rather than above it."""
    return getattr(rule, "below", None) is not None


def threshold(rule: Any) -> float:
    """A rule's threshold, whichever side fires."""
    return float(rule.below if fires_below(rule) else rule.above)


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
