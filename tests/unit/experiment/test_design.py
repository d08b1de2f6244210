"""Class counts from a split table, the design table, and `shiftguard experiment power`."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from shiftguard.cli import main
from shiftguard.experiment.design import DesignInputError, class_counts, design_table
from shiftguard.experiment.stats import paired_difference_power


def split_table(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["series_key", "scanner_model", "finding", "split"])
        for i, (model, finding, split) in enumerate(rows):
            w.writerow([f"s{i}", model, finding, split])
    return path


def test_class_counts_group_one_split_by_scanner(tmp_path: Path) -> None:
    table = split_table(
        tmp_path / "dataset.csv",
        [("A", "1", "external"), ("A", "0", "external"), ("A", "0", "external"),
         ("B", "1", "external"), ("B", "1", "test"), ("C", "0", "train")],
    )  # fmt: skip
    assert class_counts(table) == {"A": (1, 2), "B": (1, 0)}
    assert class_counts(table, split="test") == {"B": (1, 0)}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("series_key,finding,split\ns0,1,external\n", "missing column"),
        ("series_key,scanner_model,finding,split\ns0,A,maybe,external\n", ":2: finding"),
        ("series_key,scanner_model,finding,split\ns0,A,1,train\n", "no series in split"),
    ],
)
def test_bad_split_tables_are_refused_by_name(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "dataset.csv"
    path.write_text(content)
    with pytest.raises(DesignInputError, match=message):
        class_counts(path)


def test_design_table_gives_power_and_the_cases_that_reach_the_target() -> None:
    row = design_table({"A": (40, 60)}, delta=0.05, auroc=0.85, correlations=(0.3, 0.7))[0]
    assert row.power[0.3] < row.power[0.7] < 0.8
    assert row.power[0.7] == pytest.approx(paired_difference_power(0.05, 0.85, 40, 60, 0.7))
    assert row.cases_needed[0.3] > row.cases_needed[0.7] > 100
    with pytest.raises(DesignInputError, match="positives and negatives"):
        design_table({"A": (10, 0)})


def test_cli_prints_one_line_per_set_and_exits_2_on_a_missing_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = split_table(tmp_path / "d.csv", [("A", "1", "external"), ("A", "0", "external")] * 30)
    assert main(["experiment", "power", "--dataset", str(table), "--correlation", "0.5"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("A "))
    assert line.split()[1:3] == ["30", "30"]
    assert main(["experiment", "power", "--dataset", str(tmp_path / "none.csv")]) == 2
    assert "no such split table" in capsys.readouterr().err
