"""The report folder, the MLflow run holding the same figures, and `shiftguard shadow evaluate` on
files: a shadow log and diagnoses arriving in several RIS files, one with malformed rows."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from shiftguard.cli import main
from shiftguard.shadow.evaluate import run
from shiftguard.shadow.report import evaluation_run, flat_metrics, log_run, write_report

REPO = Path(__file__).resolve().parents[3]


def test_the_report_and_the_mlflow_run_hold_the_same_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shadow_case: Callable[..., Any]
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    log, book = shadow_case(n=400, challenger_broken="Vantage")
    result = run(log, book, n_boot=200)
    html = write_report(result, tmp_path / "r").read_text()
    # the flagged segment is named, with plots embedded
    assert "Flagged segments" in html and "Vantage" in html
    assert len(re.findall(r"data:image/png;base64,", html)) == 4  # ROC, 2 forests, paired
    segments = pd.read_csv(tmp_path / "r" / "segments.csv")
    assert set(segments["role"]) == {"champion", "challenger"}
    paired = pd.read_csv(tmp_path / "r" / "paired.csv")
    assert paired[(paired["segment"] == "Vantage") & (paired["metric"] == "auroc")]["worse"].item()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = log_run(result, tmp_path / "r", {"shadow": {"n_boot": 200}}, "shadow-test", tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = MlflowClient().get_run(run_id).data.metrics
    expected = flat_metrics(result)
    assert logged.keys() == expected.keys()
    assert all(logged[k] == pytest.approx(v) for k, v in expected.items())
    # the summary names no run (its id differs from store to store; DVC hashes the file): the
    # run is found by the summary's SHA-256, and the file is unchanged by logging it
    before = (tmp_path / "r" / "summary.json").read_bytes()
    write_report(result, tmp_path / "again")
    assert (tmp_path / "again" / "summary.json").read_bytes() == before
    summary = json.loads(before)
    assert "mlflow_run_id" not in summary and run_id.encode() not in before
    assert evaluation_run(tmp_path / "r" / "summary.json", tmp_path) == run_id
    assert evaluation_run(tmp_path / "r" / "segments.csv", tmp_path) is None
    challenger = summary["roles"]["challenger"]
    assert logged["challenger.auroc"] == pytest.approx(challenger["overall"]["auroc"])
    assert (
        logged["challenger.scanner_model.Vantage.auroc"]
        < logged["champion.scanner_model.Vantage.auroc"]
    )


def test_shadow_evaluate_on_files_counts_pending_and_reports_bad_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shadow_case: Callable[..., Any], capsys: Any
) -> None:
    log, book = shadow_case(n=200, challenger=False)
    log.to_csv(tmp_path / "results.csv", index=False)
    verdicts = [max(r) for r in book.reports.values()][:150]  # 50 studies still pending
    pd.DataFrame(
        [{"study_uid": d.study_uid, "finding": d.finding, "reader": d.reader,
          "report_date": "20260101"} for d in verdicts[:100]]
    ).to_csv(tmp_path / "ris1.csv", index=False)  # fmt: skip
    lines = [json.dumps({"study_uid": d.study_uid, "finding": d.finding, "reader": "dr",
                         "reported_at": "2026-01-02T10:00:00Z"}) for d in verdicts[100:]]  # fmt: skip
    lines.insert(3, '{"study_uid": "1.2.3", "finding": "maybe", "reported_at": "20260101"}')
    (tmp_path / "ris2.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(REPO)
    out = tmp_path / "report"
    code = main(["shadow", "evaluate", "--log", str(tmp_path / "results.csv"), "--diagnoses",
                 str(tmp_path / "ris2.jsonl"), str(tmp_path / "ris1.csv"), "--out", str(out),
                 "--no-mlflow", "shadow.n_boot=100"])  # fmt: skip
    assert code == 0
    assert f"shadow report: {out / 'report.html'}" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    champion = summary["roles"]["champion"]
    assert (champion["predictions"], champion["judged"], champion["pending"]) == (200, 150, 50)
    assert summary["diagnosis_problems"] == [
        "ris2.jsonl:4: finding 'maybe': expected 0/1, yes/no, positive/negative"
    ]
    assert "ris2.jsonl:4" in (out / "report.html").read_text()
    # no diagnoses at all: a clear error, exit 2
    assert main(["shadow", "evaluate", "--log", str(tmp_path / "results.csv")]) == 2


def test_the_segment_table_reads_as_words_and_says_why_a_row_is_red_or_grey(
    tmp_path: Path, shadow_case: Callable[..., Any]
) -> None:
    log, book = shadow_case(n=120, challenger=False)
    result = run(log, book, min_n=50, n_boot=200)  # each scanner (~40 studies) too small to judge
    segments = result.evaluations["champion"].segments
    # a judged segment whose every bootstrap resample scored the same
    judged = segments.index[segments["judgeable"].astype(bool)][1]
    segments.loc[judged, ["sensitivity", "sensitivity_low", "sensitivity_high"]] = 1.0
    page = write_report(result, tmp_path / "r").read_text()
    table = page[page.index("segmented by") - 200 :]
    table = table[: table.index("</table>")]
    headers = re.findall(r"<th>(.*?)</th>", table)
    assert headers[0] == "segmented by" and headers[-1] == "status"
    assert not [h for h in headers if "_" in h], headers
    assert "AUROC (95% CI)" in headers
    rows = re.findall(r"<tr(?: class='(\w+)')?>(.*?)</tr>", table)[1:]
    assert len(rows) == len(segments)
    for css, row in rows:
        status = re.findall(r'<td class="why">(.*?)</td>', row)[0]
        if css == "small":
            assert status.startswith("not judged: ")
            assert "needed" in status or "one class" in status
        elif css == "flag":
            assert status.startswith("flagged: ") and "below" in status
        else:
            assert status == "judged, not flagged"
    assert {c for c, _ in rows} >= {"", "small"}
    # the segmenting columns are named in words, and the grey and red rows have a key
    assert '<td class="l">scanner model</td>' in table and "scanner_model" not in table
    assert "<span class='small'>grey</span>not judged" in page
    # a collapsed interval says so, with the segment's counts; none prints as 1.000 (1.000–1.000)
    row = segments.loc[judged]
    assert (
        "(interval collapsed: every bootstrap resample scored 1.000; "
        f"n={int(row['n'])}, positives={int(row['n_positive'])})" in page
    )
    assert not re.search(r"(\d\.\d{3})–\1\)", page)
