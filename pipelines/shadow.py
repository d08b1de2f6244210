"""DVC stage ``shadow``: the edge runner's shadow-mode predictions (``edge_predict``, the external
split's studies) judged against the verified diagnoses (the data source's labels as the split stage
joined them, ``artifacts/split/diagnoses.csv``): overall and per segment (sex, age band, site,
scanner vendor and model) with bootstrap CIs and the gap to the validation stage's figure for the same segment,
flagged segments, an HTML report with plots (``reports/shadow/report.html``), the tables behind it,
and an MLflow run with the same figures; headline figures in ``reports/shadow/metrics.json``.

Config: the ``shadow`` section of ``params.yaml``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from shiftguard.config import DataConfig, ShadowConfig, load_section
from shiftguard.data.identifiers import lab_copy_of_results, pseudonymizer
from shiftguard.shadow.stage import evaluate_files, stage_evaluation, stage_metrics
from shiftguard.utils import run_stage, setup_logging, write_json

BUNDLES = Path("artifacts/export")
RESULTS = Path("artifacts/edge/results.csv")
DIAGNOSES = Path("artifacts/split/diagnoses.csv")  # the data source's labels, joined by split
OUT = Path("reports/shadow")


def main() -> int:
    setup_logging()
    cfg: ShadowConfig = load_section("shadow", ShadowConfig)
    data = load_section("data", DataConfig)
    ids = pseudonymizer(data.name, data.identifiers, data.key_id)
    with tempfile.TemporaryDirectory() as tmp:
        results = lab_copy_of_results(RESULTS, ids, Path(tmp)) if ids.active else RESULTS
        result, report = evaluate_files(
            results, cfg, [DIAGNOSES], bundles=[BUNDLES], out=OUT,
            title="Shadow evaluation: the unseen scanner's studies",
        )  # fmt: skip
    evaluated = stage_evaluation(result)
    write_json(OUT / "metrics.json", stage_metrics(evaluated))
    if evaluated is None:  # the edge predicted nothing (the test suite's tiny cohort can do that)
        print(f"shadow: no predictions in {RESULTS}; report {report}")
        return 0
    if not evaluated.segments.empty:
        print(
            f"shadow: {len(evaluated.joined)} of {evaluated.n_predictions} studies verified, AUROC "
            f"{evaluated.overall['auroc']:.3f}, {len(evaluated.flagged)} segment(s) flagged; "
            f"report {report}"
        )
    else:  # the test suite's tiny cohort: too few verified studies of both classes
        print(
            f"shadow: {len(evaluated.joined)} verified studies, not both classes; report {report}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
