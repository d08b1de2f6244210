"""The shadow stage's words and links in MLflow (a temporary SQLite store): a bundle the edge ran
alone in shadow mode is the challenger, as the registry calls the newest version; the shadow run and
the model versions it judged name each other; its tables preview with their header. The stage's
headline figures (metrics.json) on constructed evaluations."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from shiftguard.config import ShadowConfig, compose_section
from shiftguard.shadow.diagnoses import Diagnosis, DiagnosisBook
from shiftguard.shadow.evaluate import ShadowResult, evaluate, summary
from shiftguard.shadow.stage import (
    evaluate_files,
    shadow_mode_table,
    stage_evaluation,
    stage_metrics,
)

REPO = Path(__file__).resolve().parents[3]
FIGURES = [
    f"{m}{s}" for m in ("auroc", "sensitivity", "specificity") for s in ("", "_low", "_high")
]


@pytest.fixture
def cfg(conf_dir: Path) -> ShadowConfig:
    return compose_section("shadow", ShadowConfig, ["shadow.n_boot=100"], conf_dir)


def _results_csv(log: Any, path: Path, shadow: int | None) -> Path:
    """``log`` as an ``edge predict`` results table: no role column, the shadow flag per row."""
    table = log.drop(columns=["role"])
    if shadow is not None:
        table = table.assign(shadow=shadow)
    table.to_csv(path, index=False)
    return path


def test_a_bundle_run_alone_in_shadow_mode_is_the_challenger(
    tmp_path: Path, cfg: ShadowConfig, shadow_case: Callable[..., Any]
) -> None:
    log, book = shadow_case(n=200, challenger=False)
    shadow = _results_csv(log, tmp_path / "shadow.csv", shadow=1)
    served = _results_csv(log, tmp_path / "served.csv", shadow=0)
    assert shadow_mode_table(shadow) and not shadow_mode_table(served)
    assert not shadow_mode_table(tmp_path / "missing.csv")
    log.to_csv(tmp_path / "queue.csv", index=False)  # a log with roles keeps them
    assert not shadow_mode_table(tmp_path / "queue.csv")

    result, _ = evaluate_files(shadow, cfg, book=book, out=tmp_path / "a", track=False)
    assert set(result.evaluations) == {"challenger"}
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert set(summary["roles"]) == {"challenger"}
    result, _ = evaluate_files(served, cfg, book=book, track=False)
    assert set(result.evaluations) == {"champion"}


def test_the_shadow_run_and_the_versions_it_judged_name_each_other(
    tmp_path: Path,
    cfg: ShadowConfig,
    shadow_case: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow.tracking import MlflowClient

    from shiftguard.tracking import MODEL_VERSION_TAG, SHADOW_RUN_TAG, embedded_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    client = MlflowClient(embedded_uri(tmp_path))
    client.create_registered_model("m")
    for _ in range(3):
        client.create_model_version("m", (tmp_path / "x").as_uri())
    client.set_model_version_tag("m", "1", "bundle_version", "aaaa")  # the champion's bundle
    client.set_model_version_tag("m", "3", "bundle_version", "cccc")  # the challenger's
    log, book = shadow_case(n=200, champion_version="aaaa", challenger_version="cccc")
    log.to_csv(tmp_path / "log.csv", index=False)
    out = tmp_path / "report"
    evaluate_files(tmp_path / "log.csv", cfg, book=book, out=out, root=tmp_path)

    [run] = client.search_runs(
        [client.get_experiment_by_name(cfg.experiment).experiment_id],
        "tags.`shiftguard.stage` = 'shadow'",
    )
    run_id = run.info.run_id
    assert client.get_model_version("m", "3").tags[SHADOW_RUN_TAG] == run_id
    assert client.get_model_version("m", "1").tags[SHADOW_RUN_TAG] == run_id
    assert SHADOW_RUN_TAG not in client.get_model_version("m", "2").tags
    assert run.data.tags[MODEL_VERSION_TAG] == "m/3"  # the version judged: the challenger
    assert run.data.tags[f"{MODEL_VERSION_TAG}.champion"] == "m/1"
    assert run.info.run_name == "shadow challenger v3, champion v1"
    # the tables preview with their header: the first line of the logged file names the columns
    local = Path(client.download_artifacts(run_id, "shadow/segments.csv", str(tmp_path / "dl")))
    assert local.read_text().splitlines()[0].startswith("role,column,segment,n,")
    logged = {a.path for a in client.list_artifacts(run_id, "shadow")}
    assert {"shadow/report.html", "shadow/segments.csv", "shadow/paired.csv"} <= logged


def test_the_stages_metrics_are_the_challengers_headline_figures(
    shadow_case: Callable[..., Any],
) -> None:
    log, book = shadow_case(n=300, challenger_broken="Vantage")
    waiting = log[log["role"] == "challenger"].head(10)  # 10 more studies, no diagnosis yet
    waiting = waiting.assign(study_uid=[f"1.2.826.0.9.{i}" for i in range(10)])
    log = pd.concat([log, waiting], ignore_index=True)
    result = ShadowResult(evaluate(log, book, n_boot=100), None)
    evaluated = stage_evaluation(result)
    assert evaluated is result.evaluations["challenger"]

    metrics = stage_metrics(evaluated)
    assert list(metrics) == ["bundle", "studies", "judged", "pending", *FIGURES,
                             "segments_judged", "segments_too_small", "flagged"]  # fmt: skip
    committed = json.loads((REPO / "reports" / "shadow" / "metrics.json").read_text())
    assert set(metrics) == set(committed)
    overall = summary(result)["roles"]["challenger"]["overall"]
    assert [metrics[k] for k in FIGURES] == [overall[k] for k in FIGURES]
    assert all(isinstance(metrics[k], float) for k in FIGURES)
    assert metrics["bundle"] == "m-v2"
    assert (metrics["studies"], metrics["judged"], metrics["pending"]) == (310, 300, 10)
    # sex F/M, two age bands, one site, one vendor, three scanners; the overall row not counted
    assert (metrics["segments_judged"], metrics["segments_too_small"]) == (9, 0)
    assert metrics["flagged"] == ["scanner_model=Vantage"]
    json.dumps(metrics, allow_nan=False)

    # the scanners' ~100 studies each under min_n: too small, so judged and flagged no more
    small = stage_metrics(stage_evaluation(ShadowResult(evaluate(log, book, min_n=110), None)))
    assert (small["segments_judged"], small["segments_too_small"], small["flagged"]) == (6, 3, [])


def test_the_stages_metrics_without_figures(shadow_case: Callable[..., Any]) -> None:
    log, _ = shadow_case(n=6, challenger=False)
    present = DiagnosisBook()  # four studies judged, all with the finding: one class only
    present.add(Diagnosis(u, "2026-01-01T00:00:00Z", "dr", 1) for u in log["study_uid"][:4])
    result = ShadowResult(evaluate(log, present, n_boot=100), None)
    evaluated = stage_evaluation(result)
    assert evaluated is result.evaluations["champion"]  # no challenger: the champion
    metrics = stage_metrics(evaluated)
    assert (metrics["studies"], metrics["judged"], metrics["pending"]) == (6, 4, 2)
    assert [metrics[k] for k in FIGURES] == [None] * len(FIGURES)
    assert metrics["segments_judged"] == metrics["segments_too_small"] == 0
    assert metrics["flagged"] == []

    assert stage_evaluation(ShadowResult({}, None)) is None  # the edge predicted nothing
    assert stage_metrics(None) == {"studies": 0, "judged": 0, "pending": 0, "flagged": [],
                                   "segments_judged": 0, "segments_too_small": 0}  # fmt: skip
