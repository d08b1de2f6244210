"""DVC stage ``edge_predict``: the exported bundle run by the edge runner, as a hospital would run
it, on the unseen scanner's studies (the external test split): DICOM in, a Comprehensive 3D SR and
a Secondary Capture key image per series out (``artifacts/edge/``, with ``results.csv`` and
``skipped.csv``; counts in ``reports/edge/metrics.json``), in shadow mode. The seconds each step took
per series go to ``reports/edge/timings.csv``, which neither DVC nor git tracks: timings differ from
run to run, the outputs must not.

Only the choice of series is lab-side (the split table says which are external); the
prediction itself is ``shiftguard edge predict`` (:mod:`shiftguard.edge.predict`), which imports
no torch, MONAI, MLflow or DVC.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from shiftguard.config import DataConfig, load_section
from shiftguard.data.identifiers import Pseudonymized, pseudonymizer
from shiftguard.edge.bundle import open_bundle
from shiftguard.edge.predict import Predictor
from shiftguard.utils import run_stage, setup_logging, write_json

BUNDLES = Path("artifacts/export")
DATASET = Path("artifacts/split/dataset.csv")
OUT = Path("artifacts/edge")
REPORTS = Path("reports/edge")
TIMINGS = REPORTS / "timings.csv"  # not a DVC output (git-ignored)


def external_series(dataset_csv: Path) -> set[str]:
    """The SeriesInstanceUIDs of the external split (whatever the DICOM tree's layout)."""
    with dataset_csv.open(newline="") as fh:
        return {r["series_uid"] for r in csv.DictReader(fh) if r["split"] == "external"}


def main() -> int:
    setup_logging()
    [bundle_path] = sorted(BUNDLES.glob("*.sgbundle"))
    data = load_section("data", DataConfig)
    ids = pseudonymizer(data.name, data.identifiers, data.key_id)
    external = Pseudonymized(ids, external_series(DATASET))  # the table's UIDs may be pseudonyms
    for old in OUT.glob("*.dcm"):
        old.unlink()
    predictor = Predictor(open_bundle(bundle_path), shadow=True)
    summary = predictor.predict_folder(Path(data.dicom), OUT, timings_csv=TIMINGS, series=external)
    seconds = [
        sum(float(r[k]) for k in ("read_s", "preprocess_s", "infer_s", "write_s"))
        for r in summary.results
    ]
    write_json(
        REPORTS / "metrics.json",
        {
            "series_predicted": summary.n_predicted,
            "series_skipped": len([s for s in summary.skipped if s["series_uid"]]),
            "files_skipped": len([s for s in summary.skipped if not s["series_uid"]]),
            "positive": sum(r["result"] == "finding present" for r in summary.results),
        },
    )
    print(
        f"edge predict: {summary.n_predicted} unseen-scanner series -> SR + key image in {OUT}/ "
        f"(median {sorted(seconds)[len(seconds) // 2] if seconds else 0:.2f} s per series; "
        f"timings in {TIMINGS})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
