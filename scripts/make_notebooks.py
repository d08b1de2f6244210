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


SCANNER_SIMULATION = [
    (
        "markdown",
        """# Scanner simulation: profiles x severity

The `augment` stage simulates every validation and test volume under every scanner profile
(`conf/scanner/`) at every severity (0 = identity to 4). This notebook shows its gallery and the
parameters actually drawn. Without pipeline outputs it builds a tiny example in a temporary folder.""",
    ),
    (
        "code",
        """import json
import os
import tempfile
from pathlib import Path

import pandas as pd
from IPython.display import Image, display

from shiftguard.augment import robustness
from shiftguard.config import AugmentConfig, CohortConfig, IngestConfig, compose, validate

root = Path(os.environ.get("SHIFTGUARD_PROJECT", Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()))
config = compose(["experiment=tiny"])
augment = validate("augment", config["augment"], AugmentConfig)
manifest_csv = root / "artifacts" / "augment" / "manifest.csv"
gallery_png = root / "reports" / "augment" / "gallery.png"
if not manifest_csv.exists():
    from shiftguard.cohort import generate
    from shiftguard.data import ingest

    work = Path(tempfile.mkdtemp(prefix="shiftguard-nb-"))
    cohort = validate("cohort", {**config["cohort"], "n_subjects": 2}, CohortConfig)
    generate.run(cohort, work / "data", workers=1, progress=False)
    ingest.run(validate("ingest", config["ingest"], IngestConfig), work / "data" / "dicom", work / "ingest", workers=1, progress=False)
    volume = next((work / "ingest" / "volumes").glob("*.nii"))
    gallery_png = robustness.gallery(augment, volume, work / "gallery.png")
display(Image(filename=str(gallery_png)))""",
    ),
    ("markdown", "## The profiles at severity 4 (the configured ranges)"),
    (
        "code",
        """rows = []
for name, profile in augment.profiles.items():
    ranges = profile.model_dump(exclude_none=True)
    description = ranges.pop("description", "")
    rows.append({"profile": name, "description": description, "transforms": ", ".join(sorted(ranges))})
pd.DataFrame(rows).set_index("profile")""",
    ),
    ("markdown", "## Parameters drawn for the robustness sets"),
    (
        "code",
        """if manifest_csv.exists():
    drawn = pd.read_csv(manifest_csv)
else:  # draw them the way the stage does, for one made-up series key
    import numpy as np

    from shiftguard.augment.profiles import draw

    drawn = pd.DataFrame(
        {
            "profile": p,
            "severity": s,
            "params": json.dumps(draw(augment.profiles[p], s, robustness.generator_for(0, "example", p, s), (24, 28, 24)).to_dict()),
        }
        for p in augment.robustness.profiles
        for s in augment.robustness.severities
    )
def summary(params: str) -> str:
    active = {k: v for k, v in json.loads(params).items() if v is not None}
    return ", ".join(sorted(active)) or "identity"
drawn.assign(transforms=drawn["params"].map(summary)).groupby(["profile", "severity"])["transforms"].first().unstack()""",
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
    nbformat.write(build(SCANNER_SIMULATION), NOTEBOOKS / "02_scanner_simulation.ipynb")


if __name__ == "__main__":
    main()
