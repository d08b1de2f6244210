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


COMPARE_RUNS = [
    (
        "markdown",
        """# The scanner-shift experiment, compared through MLflow

Two arms of `conf/experiment/`: training **with** scanner-simulating augmentation (`sim_on`, the default)
and **without** it (`sim_off`). Both are judged on the same internal test set, the same unseen scanner
(the external site) and the same simulated-shift robustness sets. Everything below is read back from the
MLflow tracking store through its API, exactly what a reviewer sees in the MLflow UI.

Run both arms first (`make experiment`: `dvc exp run -S experiment=sim_on`, then `... sim_off`).
Without them in the store, the notebook runs both arms on a tiny cohort in a temporary folder (the test
suite runs it that way), and the figures then only show that the machinery works.""",
    ),
    (
        "code",
        """import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from mlflow.tracking import MlflowClient

from shiftguard.tracking import embedded_uri
from shiftguard.tracking.compare import artifact_csv, latest_per_arm, validation_table

root = Path(os.environ.get("SHIFTGUARD_PROJECT", Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()))
uri = os.environ.get("MLFLOW_TRACKING_URI") or embedded_uri(root)
arms = pd.DataFrame()
if "MLFLOW_TRACKING_URI" in os.environ or (root / "mlflow.db").exists():
    arms = latest_per_arm(validation_table(MlflowClient(uri)))
print(f"{len(arms)} arm(s) validated in {uri}")""",
    ),
    (
        "code",
        """if len(arms) < 2:  # build both arms on the tiny cohort, tracked in a temporary store
    from shiftguard.augment import robustness
    from shiftguard.cohort import generate
    from shiftguard.config import (AugmentConfig, CohortConfig, EvaluateConfig, IngestConfig, ModelConfig,
                                   SplitConfig, TrainConfig, compose, validate)
    from shiftguard.data import ingest, split
    from shiftguard.evaluation import validate as validation
    from shiftguard.training import stage

    work = Path(tempfile.mkdtemp(prefix="shiftguard-nb-"))
    base = compose(["experiment=tiny"])
    generate.run(validate("cohort", base["cohort"], CohortConfig), work / "data", workers=1, progress=False)
    ingest.run(validate("ingest", base["ingest"], IngestConfig), work / "data/dicom", work / "ingest", workers=1, progress=False)
    split.run(validate("split", base["split"], SplitConfig), work / "ingest/manifest.csv",
              work / "data/ris/verified_diagnoses.csv", work / "split")
    robustness.run(validate("augment", base["augment"], AugmentConfig), work / "split/dataset.csv", work / "ingest",
                   work / "augment", workers=1, progress=False)
    for overrides in (["experiment=tiny"], ["experiment=tiny", "augment=none"]):
        config = compose(overrides)
        out = work / ("on" if config["augment"]["enabled"] else "off")
        stage.run(validate("train", config["train"], TrainConfig), validate("model", config["model"], ModelConfig),
                  validate("augment", config["augment"], AugmentConfig), work / "split/dataset.csv", work / "ingest",
                  out, params=config, root=work)
        validation.run(validate("evaluate", config["evaluate"], EvaluateConfig), out / "model.pt",
                       work / "split/dataset.csv", work / "ingest", work / "augment", out / "reports",
                       params=config, model_info=out / "model.json", root=work)
    uri = embedded_uri(work)
    arms = latest_per_arm(validation_table(MlflowClient(uri)))
client = MlflowClient(uri)
arms.index = arms.index.map({True: "sim_on", False: "sim_off"})
arms[["dvc_exp", "test_auroc", "test_auroc_low", "test_auroc_high", "external_auroc", "external_auroc_low",
      "external_auroc_high", "robustness_auroc_drop", "test_ece"]].round(3)""",
    ),
    (
        "markdown",
        "## ROC curves, both arms overlaid (solid: internal test set, dashed: unseen scanner)",
    ),
    (
        "code",
        """fig, ax = plt.subplots(figsize=(5.5, 5.5))
for arm, row in arms.iterrows():
    roc = artifact_csv(client, row["validate_run_id"], "roc.csv")
    for name, style in (("test", "-"), ("external", "--")):
        part = roc[roc["set"] == name]
        if len(part):
            auc = row[f"{name}_auroc"]
            ax.plot(part["fpr"], part["tpr"], style, drawstyle="steps-post", label=f"{arm} {name} (AUROC {auc:.2f})")
ax.plot([0, 1], [0, 1], ":", c="grey")
ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01))
ax.legend(loc="lower right", fontsize=8)
plt.show()""",
    ),
    (
        "markdown",
        "## Robustness curves, side by side: AUROC under each simulated scanner profile by severity",
    ),
    (
        "code",
        """fig, axes = plt.subplots(1, len(arms), figsize=(5.5 * len(arms), 4.5), sharey=True, squeeze=False)
for ax, (arm, row) in zip(axes[0], arms.iterrows()):
    rob = artifact_csv(client, row["validate_run_id"], "robustness.csv")
    real = rob["profile"].str.match(r"^external(:|$)")  # the unseen scanners: pooled, and each
    for profile, part in rob[~real].groupby("profile"):
        ax.plot(part["severity"], part["auroc"], "o-", label=profile)
    ext = rob[rob["profile"] == "external"]
    if len(ext):
        ax.axhline(ext["auroc"].iloc[0], ls="--", c="k", label="unseen scanners, pooled")
    for i, (_, one) in enumerate(rob[real & (rob["profile"] != "external")].iterrows()):
        ax.errorbar([-1 + 0.1 * i], [one["auroc"]], yerr=[[one["auroc"] - one["auroc_low"]],
                    [one["auroc_high"] - one["auroc"]]], marker="s", ls="none", capsize=2,
                    label=one["profile"].split(":", 1)[1])
    ax.set(title=arm, xlabel="severity", ylim=(0, 1))
axes[0][0].set_ylabel("AUROC")
axes[0][-1].legend(fontsize=7, loc="lower left")
plt.show()""",
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
    nbformat.write(build(COMPARE_RUNS), NOTEBOOKS / "03_compare_runs.ipynb")


if __name__ == "__main__":
    main()
