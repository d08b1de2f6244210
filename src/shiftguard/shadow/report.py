"""What ``shiftguard shadow evaluate`` writes: a self-contained HTML report with plots, the tables
behind it, and an MLflow run holding the same figures.

Files in the report folder:

* ``report.html``: counts, each role's figures overall and per segment (forest plots with CIs, the
  overall line and the validation figure), flagged and too-small segments, ROC curves, and the
  paired champion-versus-challenger comparison;
* ``segments.csv``: every role's segment table (``role`` column; the first row of each role is
  ``overall``);
* ``paired.csv``: the paired differences, overall (``column = overall``) and per segment;
* ``summary.json``: :func:`~shiftguard.shadow.evaluate.summary`.

The MLflow run is not named in these files (its id differs from one store to the next, and the DVC
stage ``shadow`` hashes them): it is tagged with the SHA-256 of ``summary.json``, by which
:func:`evaluation_run` finds it.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shiftguard.evaluation.segments import SEGMENT_METRICS
from shiftguard.figures import figure, png_bytes
from shiftguard.metrics import format_interval, interval_collapsed, roc_curve
from shiftguard.shadow.evaluate import OVERALL, ShadowResult, summary
from shiftguard.tracking import MetricLogger, file_sha256, stage_run, tracking_uri

log = logging.getLogger(__name__)

REPORT = "report.html"
SEGMENTS_CSV = "segments.csv"
PAIRED_CSV = "paired.csv"
SUMMARY = "summary.json"
#: the shadow run's tag holding the SHA-256 of the ``summary.json`` it logged
SUMMARY_SHA256_TAG = "shiftguard.summary_sha256"


def write_report(result: ShadowResult, out: Path | str, title: str = "Shadow evaluation") -> Path:
    """Write the report folder (see the module docstring); returns the HTML report's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables = [e.segments.assign(role=r) for r, e in result.evaluations.items() if len(e.segments)]
    segments = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    if len(segments):
        segments = segments[["role", *[c for c in segments.columns if c != "role"]]]
    segments.to_csv(out / SEGMENTS_CSV, index=False)
    paired_table(result).to_csv(out / PAIRED_CSV, index=False)
    write_summary(out, summary(result))
    path = out / REPORT
    path.write_text(_html(result, title), encoding="utf-8")
    return path


def write_summary(out: Path, figures: Mapping[str, Any]) -> None:
    (out / SUMMARY).write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


def paired_table(result: ShadowResult) -> pd.DataFrame:
    """The paired comparison as one table (empty when there is no challenger)."""
    p = result.paired
    if p is None:
        return pd.DataFrame(columns=["column", "segment", "metric"])
    overall = p.overall.assign(column=OVERALL[0], segment=OVERALL[1], n=p.n)
    rows = [overall]
    for _, seg in p.segments.iterrows():
        if not seg["judgeable"]:
            continue
        rows.append(
            pd.DataFrame(
                [
                    {
                        "column": seg["column"],
                        "segment": seg["segment"],
                        "n": seg["n"],
                        "metric": m,
                        **{
                            k: seg.get(f"{m}_{k}")
                            for k in ("champion", "challenger", "diff", "diff_low", "diff_high")
                        },
                        "delong_p": seg.get("delong_p_lower") if m == "auroc" else np.nan,
                        "worse": bool(seg["worse"]) if m == "auroc" else False,
                    }
                    for m in SEGMENT_METRICS
                ]
            )
        )
    table = pd.concat(rows, ignore_index=True)
    lead = ["column", "segment", "n", "metric"]
    return table[[*lead, *[c for c in table.columns if c not in lead]]]


# ------------------------------------------------------------------------------------------------
# MLflow
# ------------------------------------------------------------------------------------------------


def _key(text: str) -> str:
    """An MLflow-safe metric-name fragment."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", str(text)).strip().replace(" ", "_") or "_"


def flat_metrics(result: ShadowResult) -> dict[str, float]:
    """Every figure of the report as ``{name: value}`` (names like ``champion.auroc``,
    ``champion.scanner_model.Ingenia.auroc_low``, ``paired.auroc.diff``)."""
    metrics: dict[str, float] = {}
    for role, e in result.evaluations.items():
        metrics[f"{role}.studies"] = e.n_predictions
        metrics[f"{role}.pending"] = e.n_pending
        metrics[f"{role}.judged"] = len(e.joined)
        metrics[f"{role}.flagged_segments"] = len(e.flagged)
        for _, row in e.segments.iterrows():
            head = role if (row["column"], row["segment"]) == OVERALL else (
                f"{role}.{_key(row['column'])}.{_key(row['segment'])}"
            )  # fmt: skip
            metrics[f"{head}.n"] = row["n"]
            for m in SEGMENT_METRICS:
                for suffix in ("", "_low", "_high", "_validation_gap"):
                    metrics[f"{head}.{m}{suffix}"] = row.get(f"{m}{suffix}", np.nan)
    if result.paired is not None:
        p = result.paired
        metrics["paired.n"] = p.n
        metrics["paired.worse_segments"] = len(p.worse)
        for _, row in p.overall.iterrows():
            for key in ("diff", "diff_low", "diff_high", "p_boot", "delong_p"):
                metrics[f"paired.{row['metric']}.{key}"] = row[key]
    return {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(float(v))}


def log_run(
    result: ShadowResult,
    out: Path,
    params: Mapping[str, Any],
    experiment: str = "shiftguard",
    root: Path | None = None,
) -> str:
    """An MLflow run (``shiftguard.stage = shadow``) with :func:`flat_metrics`, the bundles and
    ``summary.json``'s SHA-256 as tags and the report folder as artifacts; returns its id."""
    import mlflow

    tags = {f"shiftguard.{role}": e.bundle for role, e in result.evaluations.items()}
    if (out / SUMMARY).is_file():
        tags[SUMMARY_SHA256_TAG] = file_sha256(out / SUMMARY)
    with stage_run("shadow", params, root=root, experiment=experiment, tags=tags) as run:
        MetricLogger(run.info.run_id).log(flat_metrics(result))
        for name in (REPORT, SEGMENTS_CSV, PAIRED_CSV, SUMMARY):
            if (out / name).is_file():
                mlflow.log_artifact(str(out / name), artifact_path="shadow")
    return str(run.info.run_id)


def evaluation_run(summary_json: Path, root: Path | None = None) -> str | None:
    """The id of the latest MLflow run that logged this ``summary.json`` (found by its SHA-256,
    :data:`SUMMARY_SHA256_TAG`, in any experiment of the tracking store); ``None`` when none did."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(root))
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    runs = client.search_runs(
        experiments,
        f"tags.`{SUMMARY_SHA256_TAG}` = '{file_sha256(summary_json)}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return str(runs[0].info.run_id) if runs else None


# ------------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;padding:0 2em;max-width:1500px;color:#222}
.scroll{overflow-x:auto}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.85em}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;vertical-align:top}
th{background:#f3f3f3;text-align:center} td.l{text-align:left}
td.ci{max-width:12em} .nw{white-space:nowrap} td.ci small{color:#555} td.why{text-align:left;min-width:16em;max-width:28em}
tr.flag td{background:#fde2e2} tr.small td{color:#777;background:#f7f7f7}
.key span{display:inline-block;padding:0 0.5em;border:1px solid #ccc;margin-right:0.3em}
.key .flag{background:#fde2e2} .key .small{background:#f7f7f7;color:#777}
.warn{color:#b00020;font-weight:600} .ok{color:#1b7f3b;font-weight:600}
img{max-width:100%}
"""

#: the report's column headers for the tables' fields (anything else: underscores become spaces)
HEADERS = {
    "n": "studies",
    "n_positive": "with the finding",
    "p_boot": "bootstrap p",
    "delong_p": "DeLong p",
    "auroc": "AUROC",
}


def _label(name: str) -> str:
    """A field or segmenting column as the report names it.

    >>> _label("scanner_model"), _label("n_positive"), _label("auroc")
    ('scanner model', 'with the finding', 'AUROC')
    """
    return HEADERS.get(name, name.replace("_", " "))


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else ""
    if isinstance(value, float | np.floating):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _png(fig: Any) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(png_bytes(fig, dpi=90)).decode()}">'


def _forest(table: pd.DataFrame, title: str) -> str:
    """Per-segment point and CI of each metric, the overall figure as a line, validation as x."""

    rows = table.iloc[1:]
    fig = figure(13, 0.32 * len(rows) + 1.4)
    axes = fig.subplots(1, 3, sharey=True)
    labels = [f"{_label(c)}: {s}" for c, s in zip(rows["column"], rows["segment"], strict=True)]
    y = np.arange(len(rows))[::-1]
    for ax, m in zip(axes, SEGMENT_METRICS, strict=True):
        judged = rows["judgeable"].to_numpy(bool)
        flagged = rows["flagged"].to_numpy(bool)
        point = rows[m].to_numpy(float)
        low, high = rows[f"{m}_low"].to_numpy(float), rows[f"{m}_high"].to_numpy(float)
        colour = np.where(flagged, "#c62828", np.where(judged, "#1f4e79", "#aaaaaa"))
        for i in range(len(rows)):
            if judged[i] and np.isfinite(low[i]):
                ax.plot([low[i], high[i]], [y[i], y[i]], color=colour[i], lw=2)
            ax.plot(point[i], y[i], "o", color=colour[i], ms=5)
        val = rows.get(f"{m}_validation")
        if val is not None and val.notna().any():
            ax.plot(val.to_numpy(float), y, "x", color="#2e7d32", ms=6, label="validation")
        ax.axvline(float(table.iloc[0][m]), color="#555", ls="--", lw=1, label="overall")
        ax.set_title(_label(m))
        ax.set_xlim(-0.02, 1.02)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, labels)
    axes[-1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title + "  (red: flagged; grey: too small to judge)", fontsize=10)
    return _png(fig)


def _roc(result: ShadowResult) -> str:

    fig = figure(4.5, 4.5)
    ax = fig.subplots()
    for role, e in result.evaluations.items():
        if e.joined.empty or e.joined["finding"].nunique() < 2:
            continue
        fpr, tpr, _ = roc_curve(e.joined["finding"], e.joined["probability"])
        ax.plot(fpr, tpr, label=f"{role} ({e.bundle}) AUROC {e.overall.get('auroc', np.nan):.3f}")
        sens, spec = e.overall.get("sensitivity"), e.overall.get("specificity")
        if sens is not None and spec is not None:
            ax.plot(1 - spec, sens, "o", color=ax.lines[-1].get_color())
    ax.plot([0, 1], [0, 1], color="#bbb", lw=1)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    ax.set_title("ROC on verified studies (dot: the bundle's threshold)", fontsize=9)
    return _png(fig)


def _paired_plot(result: ShadowResult) -> str:

    table = paired_table(result)
    auroc = table[table["metric"] == "auroc"]
    if auroc.empty:
        return ""
    fig = figure(7, 0.32 * len(auroc) + 1.2)
    ax = fig.subplots()
    y = np.arange(len(auroc))[::-1]
    worse = auroc["worse"].eq(True).to_numpy() if "worse" in auroc else np.zeros(len(auroc), bool)
    for i, (_, row) in enumerate(auroc.iterrows()):
        colour = "#c62828" if worse[i] else "#1f4e79"
        ax.plot([row["diff_low"], row["diff_high"]], [y[i], y[i]], color=colour, lw=2)
        ax.plot(row["diff"], y[i], "o", color=colour)
    ax.axvline(0, color="#555", lw=1)
    ax.set_yticks(
        y, [f"{_label(c)}: {s}" for c, s in zip(auroc["column"], auroc["segment"], strict=True)]
    )
    ax.set_xlabel("AUROC, challenger - champion (paired bootstrap CI)")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _table(frame: pd.DataFrame, columns: list[str], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(_label(c))}</th>" for c in columns)
    body = []
    for i, (_, row) in enumerate(frame.iterrows()):
        css = f' class="{classes[i]}"' if classes and classes[i] else ""
        cells = "".join(
            f'<td class="l">{_fmt(row.get(c))}</td>'
            if isinstance(row.get(c), str)
            else f"<td>{_fmt(row.get(c))}</td>"
            for c in columns
        )
        body.append(f"<tr{css}>{cells}</tr>")
    return f"<div class='scroll'><table><tr>{head}</tr>{''.join(body)}</table></div>"


def _segment_table(segments: pd.DataFrame) -> str:
    """One role's segment table: each metric as ``value (CI)`` with its validation figure beside
    it, and a last column saying why a row is red (flagged) or grey (not judged)."""
    metrics = [m for m in SEGMENT_METRICS if m in segments]
    head = ["segmented by", "segment", "studies", "with the finding"]
    for m in metrics:
        head += [f"{_label(m)} (95% CI)", f"{_label(m)} at validation"]
    head.append("status")
    rows = []
    for _, r in segments.iterrows():
        flagged, judged = bool(r.get("flagged")), bool(r.get("judgeable"))
        n, positives = _count(r.get("n")), _count(r.get("n_positive"))
        cells = [
            f'<td class="l">{html.escape(_label(str(r["column"])))}</td>',
            f'<td class="l">{html.escape(str(r["segment"]))}</td>',
            f"<td>{_fmt(r.get('n'))}</td>",
            f"<td>{_fmt(r.get('n_positive'))}</td>",
        ]
        for m in metrics:
            low, high = (r.get(f"{m}_low"), r.get(f"{m}_high")) if judged else (None, None)
            cells.append(f'<td class="ci">{_interval_cell(r.get(m), low, high, n, positives)}</td>')
            cells.append(f"<td>{_fmt(r.get(f'{m}_validation'))}</td>")
        if flagged:
            why = _readable(str(r.get("flag_reason") or "below the reference"))
            status, css = f"flagged: {why}", "flag"
        elif not judged:
            why = _readable(str(r.get("reason") or "too few studies"))
            status, css = f"not judged: {why}", "small"
        else:
            status, css = "judged, not flagged", ""
        cells.append(f'<td class="why">{html.escape(str(status))}</td>')
        rows.append(
            f"<tr class='{css}'>{''.join(cells)}</tr>" if css else f"<tr>{''.join(cells)}</tr>"
        )
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f"<div class='scroll'><table><tr>{header}</tr>{''.join(rows)}</table></div>"


SEGMENT_KEY = (
    "<p class='key'><span class='flag'>red</span>flagged: significantly below the overall figure "
    "or its validation figure (the status column says which). <span class='small'>grey</span>not "
    "judged: too few studies or too few of one class for an interval (the status column says "
    "which minimum is missed); its figures are shown without intervals and never flagged.</p>"
)


_READABLE = (
    (re.compile(r"\bn=(\d+) < min_n=(\d+)"), r"\1 studies, fewer than the \2 needed"),
    (re.compile(r"(\d+) positive < min_positive=(\d+)"), r"\1 with the finding (\2 needed)"),
    (re.compile(r"(\d+) negative < min_negative=(\d+)"), r"\1 without the finding (\2 needed)"),
    (re.compile(r"\bauroc\b"), "AUROC"),
)


def _readable(reason: str) -> str:
    """A segment's flag or too-small reason in words.

    >>> _readable("n=9 < min_n=20; 1 positive < min_positive=5")
    '9 studies, fewer than the 20 needed; 1 with the finding (5 needed)'
    >>> _readable("auroc 0.500 below overall 0.760 (p=0.01)")
    'AUROC 0.500 below overall 0.760 (p=0.01)'
    """
    for pattern, words in _READABLE:
        reason = pattern.sub(words, reason)
    return reason


def _interval_cell(
    value: Any, low: Any, high: Any, n: int | None = None, positives: int | None = None
) -> str:
    """``value (low–high)`` on one line; a collapsed interval's explanation in small type below
    the value, wrapped to the cell's width."""
    text = format_interval(_num(value), _num(low), _num(high), n, positives)
    if not interval_collapsed(_num(low), _num(high)):
        return f"<span class='nw'>{html.escape(text)}</span>"
    figure, _, note = text.partition(" (")
    return f"{html.escape(figure)}<br><small>({html.escape(note)}</small>"


def _num(value: Any) -> float | None:
    try:
        return None if value is None or pd.isna(value) else float(value)
    except (TypeError, ValueError):
        return None


def _count(value: Any) -> int | None:
    number = _num(value)
    return None if number is None else int(number)


def _warn_list(heading: str, items: Iterable[str]) -> str:
    """A warning paragraph over a bulleted list; ``heading`` and ``items`` are HTML already."""
    bullets = "".join(f"<li>{item}</li>" for item in items)
    return f"<p class='warn'>{heading}</p><ul>{bullets}</ul>"


def _segment_name(row: pd.Series) -> str:
    """``column = segment`` of a segment table's row, escaped for HTML."""
    return f"{html.escape(_label(row['column']))} = {html.escape(row['segment'])}"


def _html(result: ShadowResult, title: str) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             f"</title><style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]  # fmt: skip
    counts = pd.DataFrame(
        [
            {
                "role": role,
                "bundle": e.bundle,
                "threshold": e.threshold,
                "studies predicted": e.n_predictions,
                "with verified diagnosis": len(e.joined),
                "pending (no diagnosis yet)": e.n_pending,
                "positive": int(e.joined["finding"].sum()) if len(e.joined) else 0,
                "flagged segments": len(e.flagged),
            }
            for role, e in result.evaluations.items()
        ]
    )
    parts.append("<h2>Studies</h2>" + _table(counts, list(counts.columns)))
    if result.disagreements:
        parts.append(
            f"<p>{len(result.disagreements)} studies have reports that disagree; the latest "
            "signed report counts.</p>"
        )
    if result.problems:
        parts.append(
            _warn_list(
                f"{len(result.problems)} diagnosis rows were left out:",
                (html.escape(p) for p in result.problems[:50]),
            )
        )
    parts.append("<h2>ROC</h2>" + _roc(result))
    for role, e in result.evaluations.items():
        parts.append(f"<h2>{html.escape(role)}: {html.escape(e.bundle)}</h2>")
        if e.segments.empty:
            parts.append("<p>No verified studies of both classes yet: nothing to judge.</p>")
            continue
        flagged = e.flagged
        if len(flagged):
            parts.append(
                _warn_list(
                    "Flagged segments:",
                    (
                        f"{_segment_name(r)}: {html.escape(r['flag_reason'])}"
                        for _, r in flagged.iterrows()
                    ),
                )
            )
        else:
            parts.append("<p class='ok'>No segment is significantly below the overall figure or "
                         "its validation figure.</p>")  # fmt: skip
        if len(e.segments) > 1:
            parts.append(_forest(e.segments, f"{role}: {e.bundle}"))
        parts.append(SEGMENT_KEY + _segment_table(e.segments))
    if result.paired is not None:
        p = result.paired
        parts.append(
            f"<h2>Challenger versus champion (paired, {p.n} studies)</h2>"
            f"<p>{html.escape(p.challenger)} against {html.escape(p.champion)}: differences are "
            "challenger - champion with paired stratified-bootstrap CIs; DeLong's test for AUROC."
            "</p>"
        )
        overall = pd.DataFrame(
            {
                "metric": [_label(m) for m in p.overall["metric"]],
                "champion": p.overall["champion"],
                "challenger": p.overall["challenger"],
                "challenger - champion (95% CI)": [
                    format_interval(_num(d), _num(lo), _num(hi), n=p.n)
                    for d, lo, hi in zip(
                        p.overall["diff"],
                        p.overall["diff_low"],
                        p.overall["diff_high"],
                        strict=True,
                    )
                ],
                "p_boot": p.overall["p_boot"],
                "delong_p": p.overall["delong_p"],
            }
        )
        parts.append(_table(overall, list(overall.columns)))
        worse = p.worse
        if len(worse):
            parts.append(
                _warn_list(
                    "Segments where the challenger is significantly worse:",
                    (
                        f"{_segment_name(r)} (n={r['n']}): "
                        f"AUROC {r['auroc_champion']:.3f} → {r['auroc_challenger']:.3f}"
                        for _, r in worse.iterrows()
                    ),
                )
            )
        parts.append(_paired_plot(result))
    parts.append("</body></html>")
    return "\n".join(parts)
