"""Staged rollout against a real MLflow registry (SQLite store in a temporary folder): promote
opens wave 0, `fleet rollout` opens the next wave only when the canaries serve the version with
their observation passed, and halts it when a site rolled back."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from shiftguard.config.shadow import GateConfig, RolloutConfig
from shiftguard.edge.registry import ModelVersion
from shiftguard.shadow.evaluate import run
from shiftguard.shadow.promote import promote
from shiftguard.shadow.report import write_report
from shiftguard.shadow.rollout import HALTED_TAG, OPENED_TAG, WAVE_TAG, advance, start

PLAN = RolloutConfig.model_validate(
    {"waves": [{"name": "canary", "min_studies": 10, "min_hours": 2}, {"name": "everyone"}]}
)


def _site(name: str, wave: int, **beat: Any) -> dict[str, Any]:
    return {"site": name, "wave": wave, "stale": False, "state": "serving", **beat}


def _tags(registry: Any, version: str = "2") -> dict[str, str]:
    return dict(registry.get_model_version("m", version).tags)


def test_promotion_opens_wave_zero_and_the_canaries_gate_the_next(
    tmp_path: Path, registry: Any, shadow_case: Callable[..., Any]
) -> None:
    registry.set_registered_model_alias("m", "challenger", "2")
    log, book = shadow_case(seed=7, challenger_separation=0.3)
    write_report(run(log, book, n_boot=300), tmp_path / "report")
    decision = promote(
        tmp_path / "report", GateConfig(min_studies=100), root=tmp_path, rollout=PLAN
    )
    assert decision.promoted
    tags = _tags(registry)
    assert tags[WAVE_TAG] == "0" and OPENED_TAG in tags
    # what a site reads from the registry: a wave-1 site waits, a canary may take it
    seen = ModelVersion("m", "2", "", tags)
    assert seen.open_wave == 0

    opened = datetime.fromisoformat(tags[OPENED_TAG].replace("Z", "+00:00"))
    fleet = [
        _site("canary-a", 0, registry_version="2", state="observing", studies_on_bundle=4,
              observation={"studies": 4}),
        _site("big-b", 1, registry_version="1", follow="waits: rollout open to waves up to 0"),
    ]  # fmt: skip
    step = advance(registry, "m", PLAN, fleet, now=opened + timedelta(hours=3))
    assert not step.halted and step.open_wave == 0
    assert any("canary-a (observing" in b for b in step.blockers)
    assert any("4 of 10 studies" in b for b in step.blockers)
    assert _tags(registry)["rollout.site.canary-a"] == "observing: 4 studies observed"

    fleet[0] = _site("canary-a", 0, registry_version="2", studies_on_bundle=12)
    early = advance(registry, "m", PLAN, fleet, now=opened + timedelta(hours=1))
    assert early.open_wave == 0 and any("1.0 of 2 hours" in b for b in early.blockers)
    dry = advance(registry, "m", PLAN, fleet, dry_run=True, now=opened + timedelta(hours=3))
    assert dry.open_wave == 1 and _tags(registry)[WAVE_TAG] == "0"  # nothing recorded
    step = advance(registry, "m", PLAN, fleet, now=opened + timedelta(hours=3))
    assert step.open_wave == 1 and step.action == "opened wave 1 (everyone)"
    assert _tags(registry)[WAVE_TAG] == "1"

    fleet[1] = _site("big-b", 1, registry_version="2", studies_on_bundle=3)
    done = advance(registry, "m", PLAN, fleet)
    assert done.complete and _tags(registry)["rollout.state"] == "complete"


def test_a_canary_that_rolled_back_halts_the_rollout(registry: Any) -> None:
    registry.set_registered_model_alias("m", "champion", "3")
    start(registry, "m", "3", PLAN)
    fleet = [
        _site("canary-a", 0, registry_version="1",
              refused={"3": "rolled back: output score 6.20 over 20 series"}),
        _site("big-b", 1, registry_version="1"),
    ]  # fmt: skip
    step = advance(registry, "m", PLAN, fleet)
    assert step.halted and "canary-a rolled back (output score 6.20" in step.action
    tags = _tags(registry, "3")
    assert "canary-a" in tags[HALTED_TAG] and tags[WAVE_TAG] == "0"
    assert ModelVersion("m", "3", "", tags).open_wave == -1  # no site takes it any more
    assert advance(registry, "m", PLAN, fleet).halted  # stays halted


def test_a_plan_of_one_wave_opens_every_site_at_once(registry: Any) -> None:
    one = RolloutConfig.model_validate({"waves": [{"name": "all"}]})
    registry.set_registered_model_alias("m", "champion", "2")
    tags = start(registry, "m", "2", one)
    assert WAVE_TAG not in tags and ModelVersion("m", "2", "", _tags(registry)).open_wave is None
    waiting = advance(registry, "m", one, [_site("a", 0, registry_version="1")])
    assert not waiting.complete and waiting.blockers == ["a (waiting)"]
    done = advance(registry, "m", one, [_site("a", 0, registry_version="2", studies_on_bundle=1)])
    assert done.complete
