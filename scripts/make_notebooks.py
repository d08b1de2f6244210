"""Build the notebooks in notebooks/ from the cell sources below (kept here so diffs stay readable).

Run: python scripts/make_notebooks.py   (outputs are not stored; tests execute every notebook)
"""

from __future__ import annotations

from pathlib import Path

import nbformat

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

COHORT_AND_INGEST = [
    (
        "markdown",
        """# The synthetic multi-scanner cohort, as ingested

What the `ingest` stage made of the cohort: one mid-slice per scanner, the per-series image statistics
the drift monitor will use later, and the quarantine report.

Run it from the repository after `make demo`. Without pipeline outputs it builds a tiny cohort in a
temporary folder (the test suite runs it that way).""",
    ),
    (
        "code",
        """import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import nibabel as nib
import pandas as pd

root = Path(os.environ.get("SHIFTGUARD_PROJECT", Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()))
ingest_dir = root / "artifacts" / "ingest"
if not (ingest_dir / "manifest.csv").exists():
    from shiftguard.cohort import generate
    from shiftguard.config import CohortConfig, IngestConfig, compose, validate
    from shiftguard.data import ingest

    config = compose(["experiment=tiny"])
    work = Path(tempfile.mkdtemp(prefix="shiftguard-nb-"))
    generate.run(validate("cohort", config["cohort"], CohortConfig), work / "data", workers=1, progress=False)
    ingest_dir = work / "ingest"
    ingest.run(validate("ingest", config["ingest"], IngestConfig), work / "data" / "dicom", ingest_dir, workers=1, progress=False)
manifest = pd.read_csv(ingest_dir / "manifest.csv")
quarantine = pd.read_csv(ingest_dir / "quarantine.csv")
print(f"{len(manifest)} series accepted, {len(quarantine)} quarantine rows, from {ingest_dir}")""",
    ),
    ("markdown", "## Series per site and scanner"),
    (
        "code",
        """manifest.groupby(["site", "manufacturer", "scanner_model", "orientation"]).agg(
    series=("series_key", "count"),
    slices=("n_slices", "median"),
    slice_spacing=("slice_spacing", "median"),
    age=("patient_age", "mean"),
).round(1)""",
    ),
    ("markdown", "## One mid-slice per scanner, in the canonical RAS grid"),
    (
        "code",
        """examples = manifest.groupby("scanner_model").head(1)
fig, axes = plt.subplots(2, len(examples), figsize=(3.2 * len(examples), 6.4), squeeze=False)
for col, (_, row) in enumerate(examples.iterrows()):
    volume = nib.load(ingest_dir / row["volume_path"]).get_fdata()
    x, y, z = (s // 2 for s in volume.shape)
    axes[0, col].imshow(volume[:, :, z].T, origin="lower", cmap="gray")
    axes[0, col].set_title(f"{row['manufacturer']} {row['scanner_model']}", fontsize=9)
    axes[1, col].imshow(volume[x, :, :].T, origin="lower", cmap="gray")
    for ax in axes[:, col]:
        ax.axis("off")
fig.suptitle("axial (top) and sagittal (bottom) mid-slices after ingest")
plt.tight_layout()""",
    ),
    ("markdown", "## Per-series image statistics by scanner: the shift a model has to survive"),
    (
        "code",
        """stats = ["mean", "std", "p99", "snr", "foreground_fraction"]
manifest.groupby("scanner_model")[stats].median().round(3)""",
    ),
    ("markdown", "## Quarantine report"),
    (
        "code",
        """quarantine.groupby(["level", "code"]).size().rename("rows").to_frame() if len(quarantine) else "nothing quarantined\"""",
    ),
]


def build(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    make = {"markdown": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell}
    nb.cells = [make[kind](source) for kind, source in cells]
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i}"
    return nb


def main() -> None:
    NOTEBOOKS.mkdir(exist_ok=True)
    nbformat.write(build(COHORT_AND_INGEST), NOTEBOOKS / "01_cohort_and_ingest.ipynb")


if __name__ == "__main__":
    main()
