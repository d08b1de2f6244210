"""The promotion gate against a real MLflow registry (SQLite store in a temporary folder): a
challenger worse on one segment is refused, a sound one becomes champion, every decision is
recorded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shiftguard.config.shadow import GateConfig
from shiftguard.shadow.evaluate import run
from shiftguard.shadow.promote import PromotionError, promote
from shiftguard.shadow.report import write_report


def report(tmp_path: Path, shadow_case: Callable[..., Any], **kwargs: Any) -> Path:
    log, book = shadow_case(**kwargs)
    out = tmp_path / "report"
    write_report(run(log, book, n_boot=300), out)
    return out


def test_a_challenger_worse_on_one_segment_is_refused(
    tmp_path: Path, registry: Any, shadow_case: Callable[..., Any]
) -> None:
    out = report(tmp_path, shadow_case, challenger_broken="Vantage")
    decision = promote(out, GateConfig(min_studies=100), root=tmp_path)
    assert not decision.promoted and decision.champion == "1"
    failed = {c.name for c in decision.failed}
    assert {"flagged_segments", "no_segment_worse"} <= failed
    assert "scanner_model=Vantage" in " ".join(c.detail for c in decision.failed)
    assert str(registry.get_model_version_by_alias("m", "champion").version) == "1"  # not moved
    # the decision is on record: an MLflow run and the challenger's tags
    tags = registry.get_model_version("m", "2").tags
    assert tags["shiftguard.promotion"] == "refused"
    assert tags["shiftguard.promotion_run"] == decision.run_id
    run_ = registry.get_run(decision.run_id)
    assert run_.data.tags["shiftguard.decision"] == "refused"
    assert run_.data.tags["shiftguard.check.no_segment_worse"] == "fail"


def test_a_sound_challenger_becomes_champion(
    tmp_path: Path, registry: Any, shadow_case: Callable[..., Any]
) -> None:
    """The registry's aliases say what the shadow report says: before the decision v2 is the
    challenger and v1 the champion in both; after it v2 is the champion and no longer the
    challenger."""
    import json

    from shiftguard.tracking import CHALLENGER, CHAMPION

    registry.set_registered_model_alias("m", CHALLENGER, "2")
    out = report(tmp_path, shadow_case, seed=7, challenger_separation=0.3)
    roles = json.loads((out / "summary.json").read_text())["roles"]
    assert {role: str(roles[role]["model_version"]) for role in roles} == {
        alias: str(registry.get_model_version_by_alias("m", alias).version)
        for alias in (CHALLENGER, CHAMPION)
    }
    decision = promote(out, GateConfig(min_studies=100), root=tmp_path)
    assert decision.promoted, decision.lines()
    assert str(registry.get_model_version_by_alias("m", "champion").version) == "2"
    assert registry.get_model_version("m", "2").aliases == [CHAMPION]
    assert CHALLENGER not in registry.get_registered_model("m").aliases
    assert registry.get_run(decision.run_id).data.tags["shiftguard.challenger"] == "m v2"
    assert registry.get_model_version("m", "1").tags["shiftguard.replaced_by"] == "v2"
    assert registry.get_run(decision.run_id).data.tags["shiftguard.decision"] == "promoted"


def test_too_few_verified_studies_or_a_dry_run_moves_nothing(
    tmp_path: Path, registry: Any, shadow_case: Callable[..., Any]
) -> None:
    out = report(tmp_path, shadow_case, seed=7, challenger_separation=0.3)
    few = promote(out, GateConfig(min_studies=1000), root=tmp_path)
    assert [c.name for c in few.failed] == ["min_studies"]
    assert "600 studies with a verified diagnosis (need 1000)" in few.failed[0].detail
    dry = promote(out, GateConfig(min_studies=100), dry_run=True, root=tmp_path)
    assert dry.passed and not dry.promoted
    assert str(registry.get_model_version_by_alias("m", "champion").version) == "1"


def test_the_comparison_must_be_against_the_serving_champion(
    tmp_path: Path, registry: Any, shadow_case: Callable[..., Any]
) -> None:
    # the log's champion is v3, the registry's is v1
    out = report(tmp_path, shadow_case, seed=7, champion_version="3", challenger_version="2")
    decision = promote(out, GateConfig(min_studies=100), root=tmp_path)
    [failed] = decision.failed
    assert failed.name == "champion" and "the shadow log's champion is v3" in failed.detail


def test_the_first_champion_and_unknown_candidates(
    tmp_path: Path, registry: Any, shadow_case: Callable[..., Any]
) -> None:
    registry.delete_registered_model_alias("m", "champion")
    out = report(tmp_path, shadow_case, challenger=False, champion_version="3")
    assert promote(out, GateConfig(min_studies=100), root=tmp_path).promoted
    assert str(registry.get_model_version_by_alias("m", "champion").version) == "3"
    out = report(tmp_path, shadow_case, challenger=False, champion_version="9")
    with pytest.raises(PromotionError, match="m version 9 is not in the MLflow registry"):
        promote(out, GateConfig(), root=tmp_path)
    with pytest.raises(PromotionError, match="no shadow evaluation summary"):
        promote(tmp_path / "nowhere", GateConfig(), root=tmp_path)


def test_the_command_prints_each_check_and_exits_1_when_refused(
    tmp_path: Path,
    registry: Any,
    shadow_case: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
) -> None:
    from shiftguard.cli import main

    out = report(tmp_path, shadow_case, challenger_broken="Vantage")
    monkeypatch.chdir(Path(__file__).resolve().parents[3])  # the project's conf/
    assert main(["promote", "--report", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "m v2: REFUSED (champion was v1)" in printed
    assert "[FAIL] no_segment_worse: significantly worse than the champion on" in printed
    assert "[pass] min_studies: 600 studies" in printed
    assert str(registry.get_model_version_by_alias("m", "champion").version) == "1"


def test_bundles_name_their_content_version_and_the_registry_maps_it_to_its_number(
    tmp_path: Path, registry: Any, shadow_case: Callable[..., Any]
) -> None:
    """Bundles carry a content version, not the registry's number: the export stage tags the
    model version with it, and promotion maps it back (the newest version so tagged); the
    evaluation's MLflow run is found by the summary's SHA-256 (the summary names no run)."""
    from shiftguard.shadow.report import log_run

    champion, challenger = "0c0ffee00001", "0c0ffee00002"
    registry.set_model_version_tag("m", "1", "bundle_version", champion)
    for version in ("2", "3"):  # the same bundle exported from two registrations: v3 is newest
        registry.set_model_version_tag("m", version, "bundle_version", challenger)
    log, book = shadow_case(seed=7, challenger_separation=0.3, champion_version=champion,
                            challenger_version=challenger)  # fmt: skip
    result = run(log, book, n_boot=300)
    out = tmp_path / "report"
    write_report(result, out)
    evaluation = log_run(result, out, {"shadow": {}}, root=tmp_path)
    decision = promote(out, GateConfig(min_studies=100), root=tmp_path)
    assert decision.promoted, decision.lines()
    assert (decision.challenger, decision.champion) == ("3", "1")
    assert decision.lines()[0] == "m v3: PROMOTED (champion was v1)"
    assert str(registry.get_model_version_by_alias("m", "champion").version) == "3"
    tags = registry.get_run(decision.run_id).data.tags
    assert tags["shiftguard.challenger_bundle"] == challenger
    assert tags["shiftguard.evaluation_run"] == evaluation
    # the log's champion must be the serving champion's bundle, compared by content version
    out2 = tmp_path / "report2"
    log2, book2 = shadow_case(seed=7, champion_version="0c0ffee00009", challenger_version=champion)
    write_report(run(log2, book2, n_boot=300), out2)
    decision = promote(out2, GateConfig(min_studies=100), dry_run=True, root=tmp_path)
    assert decision.challenger == "1"
    [failed] = [c for c in decision.failed if c.name == "champion"]
    assert f"champion is v{challenger}" in failed.detail  # v3's bundle now serves
    assert "the shadow log's champion is v0c0ffee00009" in failed.detail
