"""DVC stage ``shadow``: the edge runner's shadow-mode predictions (``edge_predict``, the unseen
scanner's studies) judged against the radiologists' verified diagnoses
(``data/ris/verified_diagnoses.csv``): overall and per segment (sex, age band, site, scanner vendor
and model) with bootstrap CIs and the gap to the validation stage's figure for the same segment,
flagged segments, an HTML report with plots (``reports/shadow/report.html``), the tables behind it,
and an MLflow run with the same figures; headline figures in ``reports/shadow/metrics.json``.

Config: the ``shadow`` section of ``params.yaml``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from shiftguard.config import ShadowConfig, load_section
from shiftguard.shadow.evaluate import jsonable
from shiftguard.shadow.stage import evaluate_files
from shiftguard.utils import setup_logging, write_json

BUNDLES = Path("artifacts/export")
RESULTS = Path("artifacts/edge/results.csv")
DIAGNOSES = Path("data/ris/verified_diagnoses.csv")
OUT = Path("reports/shadow")


def main() -> int:
    setup_logging()
    cfg: ShadowConfig = load_section("shadow", ShadowConfig)
    result, report = evaluate_files(
        RESULTS, cfg, [DIAGNOSES], bundles=[BUNDLES], out=OUT,
        title="Shadow evaluation: the unseen scanner's studies",
    )  # fmt: skip
    champion = result.evaluations["champion"]
    overall = champion.overall
    write_json(
        OUT / "metrics.json",
        {
            "bundle": champion.bundle,
            "studies": champion.n_predictions,
            "judged": len(champion.joined),
            "pending": champion.n_pending,
            **{
                f"{m}{s}": jsonable(overall.get(f"{m}{s}"))
                for m in ("auroc", "sensitivity", "specificity")
                for s in ("", "_low", "_high")
            },
            "segments_judged": int(champion.segments["judgeable"].sum()) - 1,
            "segments_too_small": int((~champion.segments["judgeable"]).sum()),
            "flagged": [f"{r.column}={r.segment}" for r in champion.flagged.itertuples()],
        },
    )
    print(
        f"shadow: {len(champion.joined)} of {champion.n_predictions} studies verified, AUROC "
        f"{overall.get('auroc', float('nan')):.3f}, {len(champion.flagged)} segment(s) flagged; "
        f"report {report}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
