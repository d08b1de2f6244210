"""The shadow log as a table: one row per (role, study), whichever way the predictions were made.

Two sources:

* the edge service's queue (``queue.db``, table ``results``): champion and challenger rows, with
  the segments the service recorded (sex, age, site, institution, scanner vendor and model);
* an ``edge predict`` ``results.csv``: one bundle's rows, taken as the champion's unless the file
  has a ``role`` column.

When a role changed bundle during the log (a new champion deployed), only its latest bundle's rows
are judged; the others are counted in ``frame.attrs["older_bundle_rows"]``. A study with several
series the model read is judged once: its highest probability counts (the
study is positive when any of its series is). The ``site`` segment is the acquiring institution as
the DICOM header names it, or the edge's configured site when the header names none.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pandas as pd

from shiftguard.errors import ShadowLogError

#: columns of the table :func:`read_shadow_log` returns
COLUMNS = (
    "study_uid", "role", "bundle", "model", "model_version", "probability", "raw_probability",
    "threshold", "n_series", "site", "manufacturer", "scanner_model", "sex", "patient_age", "age_band",
)  # fmt: skip
SEGMENT_TEXT = ("site", "institution", "manufacturer", "scanner_model", "sex", "age_band")


def read_shadow_log(path: Path | str, site: str | None = None) -> pd.DataFrame:
    """The shadow log at ``path`` (``queue.db`` or ``results.csv``), one row per (role, study).

    Args:
        path: the edge service's queue database or an ``edge predict`` results table.
        site: site name for rows whose header names no institution (default: the row's own
            ``site`` when the service recorded one, else ``"unknown"``).

    Raises:
        ShadowLogError: the file is missing, unreadable, or lacks the study UID or probability.
    """
    path = Path(path)
    if not path.is_file():
        raise ShadowLogError(f"{path}: no such shadow log (expected queue.db or results.csv)")
    frame = _read_queue(path) if _is_sqlite(path) else _read_results_csv(path)
    missing = [c for c in ("study_uid", "probability") if c not in frame]
    if missing:
        raise ShadowLogError(f"{path}: lacks the column(s) {', '.join(missing)}")
    return per_study(frame, site)


def _is_sqlite(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(16) == b"SQLite format 3\x00"


def _read_queue(path: Path) -> pd.DataFrame:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return pd.read_sql_query("SELECT * FROM results", db)
    except (sqlite3.DatabaseError, pd.errors.DatabaseError) as exc:
        raise ShadowLogError(f"{path}: not an edge queue with a results table ({exc})") from exc


def _read_results_csv(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype={"model_version": str, "study_uid": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ShadowLogError(f"{path}: not a results table ({exc})") from exc
    if "role" not in frame:
        frame["role"] = "champion"
    if "model" in frame and "bundle" not in frame:
        frame["bundle"] = frame["model"].astype(str) + "-v" + frame["model_version"].astype(str)
    return frame


def per_study(frame: pd.DataFrame, site: str | None = None) -> pd.DataFrame:
    """One row per (role, study): the highest probability of the study's series, its segments."""
    frame = frame.copy()
    for column in ("bundle", "model", "model_version", *SEGMENT_TEXT):
        if column not in frame:
            frame[column] = ""
        frame[column] = frame[column].fillna("").astype(str).str.strip()
    if "role" not in frame:
        frame["role"] = "champion"
    if "threshold" not in frame:
        frame["threshold"] = float("nan")
    frame["patient_age"] = pd.to_numeric(frame.get("patient_age"), errors="coerce")
    frame["probability"] = pd.to_numeric(frame["probability"], errors="coerce")
    # the network's own probability (before the bundle's calibration map), where the log has it
    frame["raw_probability"] = (
        pd.to_numeric(frame["raw_probability"], errors="coerce")
        if "raw_probability" in frame
        else float("nan")
    )
    if frame["probability"].isna().any():
        bad = frame.loc[frame["probability"].isna(), "study_uid"].iloc[0]
        raise ShadowLogError(f"study {bad}: probability is not a number")
    frame, older = _latest_bundle(frame)
    fallback = frame["site"].where(frame["site"] != "", site or "unknown")
    frame["site"] = frame["institution"].where(frame["institution"] != "", fallback)
    frame = frame.sort_values(["role", "study_uid", "probability"], ascending=[True, True, False])
    grouped = frame.groupby(["role", "study_uid"], sort=True)
    out = grouped.first().reset_index()
    out["n_series"] = grouped.size().to_numpy()
    for column in ("manufacturer", "scanner_model", "sex", "age_band", "site"):
        out[column] = out[column].replace("", "unknown")
    out = out[list(COLUMNS)]
    out.attrs["older_bundle_rows"] = older
    return out


def _latest_bundle(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Each role's rows from its latest bundle (by ``created_at``, else by order in the log)."""
    order = pd.to_numeric(frame["created_at"], errors="coerce") if "created_at" in frame else None
    when = order if order is not None else pd.Series(range(len(frame)), index=frame.index)
    latest = when.groupby([frame["role"], frame["bundle"]]).max().reset_index(name="when")
    keep = latest.sort_values("when").groupby("role").tail(1)
    mask = pd.Series(
        list(zip(frame["role"], frame["bundle"], strict=True)), index=frame.index
    ).isin(list(zip(keep["role"], keep["bundle"], strict=True)))
    return frame[mask], int((~mask).sum())
