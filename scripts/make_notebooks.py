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
(`conf/scanner_sim/`) at every severity (0 = identity to 4). This notebook shows its gallery and the
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

Run both arms first (`dvc exp run -n sim-on -S experiment=sim_on`, then `... sim_off`); the five-arm, paired experiment on the unseen scanners is `make experiment` (`shiftguard compare --experiment`).
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
    from shiftguard.config import (AugmentConfig, CohortConfig, DataConfig, EvaluateConfig, IngestConfig, ModelConfig,
                                   SplitConfig, TrainConfig, compose, validate)
    from shiftguard.data import ingest, split
    from shiftguard.evaluation import validate as validation
    from shiftguard.training import stage

    work = Path(tempfile.mkdtemp(prefix="shiftguard-nb-"))
    base = compose(["experiment=tiny"])
    generate.run(validate("cohort", base["cohort"], CohortConfig), work / "data", workers=1, progress=False)
    ingest.run(validate("ingest", base["ingest"], IngestConfig), work / "data/dicom", work / "ingest", workers=1, progress=False)
    data = validate("data", base["data"], DataConfig).model_copy(update={"labels": str(work / "data/ris/verified_diagnoses.csv")})
    split.run(validate("split", base["split"], SplitConfig), data, work / "ingest/manifest.csv", work / "split",
              work / "split/labels.csv")
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
                       params=config, root=work)
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


SCANNER_PHYSICS = [
    (
        "markdown",
        """# One subject through the seven scanners: what the MR-physics renderer does

The cohort's default renderer (`cohort.rendering: physics`) gives every tissue a proton density and
T1, T2, T2* at the scanner's field strength (`shiftguard.cohort.physics`), turns them into signal with
the profile's sequence (TR, TE, TI, flip angle), and acquires the object in k-space
(`shiftguard.cohort.kspace`: truncation, partial Fourier, the vendor's filter, zero-filling, thermal and
parallel-imaging noise, magnitude). Here one subject of the default cohort is rendered in-process on
every scanner of `conf/cohort/default.yaml` (nothing on disk is needed):

* (a) the middle lesion slice on each scanner, beside its tissue label map;
* (b) grey/white and lesion/white-matter contrast, predicted by the signal equations and measured on the
  rendered image in pure-tissue voxels;
* (c) each scanner's noise: texture (a patch, its autocorrelation and power spectrum) and level;
* (d) Gibbs ringing at the edge of the head without a k-space filter and with a Hamming filter.""",
    ),
    (
        "code",
        """import time
from dataclasses import replace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch
from scipy import ndimage as ndi

from shiftguard.cohort import kspace, physics, render
from shiftguard.cohort.demographics import sample_subjects
from shiftguard.config import CohortConfig, compose_section

cohort = compose_section("cohort", CohortConfig, ["cohort.rendering=physics"])
assert cohort.physics is not None
plan = next(p for p in sample_subjects(cohort) if p.finding)  # the default cohort's first subject with the finding
scanners = list(cohort.scanners)
started = time.perf_counter()
series = {
    name: render.render_subject(cohort, replace(plan, scanner=name), with_tissue=True)
    for name in scanners
}
print(
    f"{plan.patient_id} ({plan.age} y, {plan.sex}; acquired on {plan.scanner} in the cohort) rendered on "
    f"{len(series)} scanners in {time.perf_counter() - started:.1f} s"
)""",
    ),
    ("markdown", "## (a) The middle lesion slice on each scanner, and its tissue label map"),
    (
        "code",
        """LABEL_COLOURS = {
    "background": "black", "csf": "tab:blue", "gm": "0.55", "wm": "white", "fat": "gold",
    "muscle": "brown", "bone": "wheat", "marrow": "orange", "skin": "pink", "lesion": "red",
}
names_by_value = sorted(physics.LABELS, key=physics.LABELS.get)
label_cmap = ListedColormap([LABEL_COLOURS.get(n, "tab:green") for n in names_by_value])


def lesion_slice(s: render.RenderedSeries) -> int:
    slices = np.flatnonzero(s.mask.any(axis=(1, 2)))
    return int(slices[len(slices) // 2]) if len(slices) else s.mask.shape[0] // 2


fig, axes = plt.subplots(2, len(scanners), figsize=(2.6 * len(scanners), 6.0), squeeze=False)
for col, name in enumerate(scanners):
    s, p = series[name], cohort.scanners[name]
    k = lesion_slice(s)
    axes[0, col].imshow(s.physical[k], cmap="gray")
    if s.mask[k].any():
        axes[0, col].contour(s.mask[k], levels=[0.5], colors="red", linewidths=0.6)
    axes[0, col].set_title(
        f"{name}\\n{p.sequence} {p.acquisition_type}, {p.field_strength:g} T\\nslice {k + 1}/{s.mask.shape[0]}",
        fontsize=8,
    )
    axes[1, col].imshow(s.labels[k], cmap=label_cmap, vmin=-0.5, vmax=len(names_by_value) - 0.5, interpolation="nearest")
    for ax in axes[:, col]:
        ax.axis("off")
fig.legend(
    handles=[Patch(facecolor=LABEL_COLOURS.get(n, "tab:green"), edgecolor="0.4", label=n) for n in names_by_value[1:]],
    loc="lower center", ncol=len(names_by_value) - 1, fontsize=8, frameon=False,
)
fig.suptitle(f"{plan.patient_id}: rendered slice (lesion outlined) and tissue labels, acquisition orientation")
fig.tight_layout(rect=(0, 0.05, 1, 1))
plt.show()""",
    ),
    (
        "markdown",
        """## (b) Contrast: signal equations against the rendered image

Contrast of tissue X against white matter is `(|S_X| - |S_WM|) / |S_WM|` (the definition of the
`contrast` column of `ground_truth/lesions.csv`). *Predicted*: `physics.sequence_signal` on this
subject's tissues, i.e. `physics.relaxation_at` at the scanner's field times the subject's own
variation (`render.subject_tissues`), plus its lesion (`render.lesion_tissue`). *Measured*: medians of
the rendered image (bias field and noise included) in pure-tissue voxels: white matter where the
template's WM probability exceeds 0.97, grey matter where GM exceeds 0.97, the lesion's mask eroded by
one voxel. Thin cortex next to dark CSF loses some signal to blurring and partial volume, most on
thick slices.""",
    ),
    (
        "code",
        """def relative(signal: np.ndarray, tissues: physics.Relaxation, name: str) -> float:
    s = np.abs(signal)
    return float((s[tissues.index(name)] - s[tissues.index("wm")]) / s[tissues.index("wm")])


def measured(s: render.RenderedSeries) -> dict[str, float]:
    wm = (s.labels == physics.LABELS["wm"]) & (s.wm > 0.97) & (s.mask == 0)
    gm = (s.labels == physics.LABELS["gm"]) & (s.brain - s.wm > 0.97)
    lesion = ndi.binary_erosion(s.mask > 0)
    if lesion.sum() < 10:  # a lesion only a few voxels across: its whole mask
        lesion = s.mask > 0
    m_wm = float(np.median(s.physical[wm]))
    return {
        "gm": (float(np.median(s.physical[gm])) - m_wm) / m_wm,
        "lesion": (float(np.median(s.physical[lesion])) - m_wm) / m_wm if lesion.any() else np.nan,
        "voxels": f"{wm.sum()}/{gm.sum()}/{lesion.sum()}",
    }


rows = []
for name in scanners:
    p, subject = cohort.scanners[name], replace(plan, scanner=name)
    tissues = render.subject_tissues(cohort, subject)
    tissues = tissues.append("lesion", *render.lesion_tissue(cohort, subject, tissues))
    signal = physics.sequence_signal(p, tissues)
    m = measured(series[name])
    rows.append({
        "scanner": name,
        "sequence": f"{p.sequence} TR {p.repetition_time:g} TE {p.echo_time:g}"
        + (f" TI {p.inversion_time:g}" if p.inversion_time else "") + f" FA {p.flip_angle:g}",
        "B0 (T)": p.field_strength,
        "GM/WM predicted": relative(signal, tissues, "gm"),
        "GM/WM measured": m["gm"],
        "lesion/WM predicted": relative(signal, tissues, "lesion"),
        "lesion/WM measured": m["lesion"],
        "voxels WM/GM/lesion": m["voxels"],
    })
contrast = pd.DataFrame(rows).set_index("scanner")
print(contrast.round(3).to_string())
contrast.round(3)""",
    ),
    (
        "markdown",
        """## (c) Noise texture and level

Two renders of one subject cannot differ only in their noise (a subject's noise stream is fixed), so
the texture is shown by acquiring a flat object (water, `M0 = 1`) with each profile through
`kspace.acquire`, with the thermal noise `physics.noise_sd` gives that profile: what is left after
subtracting 1 is the reconstructed noise. Zero-filling (acquired matrix smaller than the reconstructed
one) and the apodisation filter correlate neighbouring pixels; the power spectrum shows each
reconstruction's k-space footprint; parallel imaging raises the noise towards the centre of the field of
view. The level is given as white-matter SNR: the WM signal by the equations over the flat object's noise,
and, on the rendered image of (a), the WM median over the noise in the air around the head (Rayleigh:
`sigma = sqrt(mean(M^2) / 2)`, in voxels over 6 voxels from the head). The two differ by the coil's
profile, the bias field and, with parallel imaging, the g-factor map (about 1 in the air at the edges of
the field of view, higher at its centre).""",
    ),
    (
        "code",
        """def lag1(noise: np.ndarray, axis: int) -> float:
    return float((noise * np.roll(noise, 1, axis=axis)).mean() / (noise * noise).mean())


over = cohort.physics.oversampling
noise_rows = []
fig, axes = plt.subplots(3, len(scanners), figsize=(2.4 * len(scanners), 7.4), squeeze=False)
for col, name in enumerate(scanners):
    p, s = cohort.scanners[name], series[name]
    rows_, cols_ = p.matrix
    flat = np.ones((6, rows_ * over, cols_ * over), dtype=np.float32)
    noise = kspace.acquire(flat, p, np.random.default_rng(col), physics.noise_sd(p, cohort.physics)) - 1.0
    noise = noise.astype(np.float64)
    spectrum = np.fft.fft2(noise - noise.mean(axis=(1, 2), keepdims=True))
    power = (np.abs(spectrum) ** 2).mean(axis=0)
    acf = np.fft.fftshift(np.fft.ifft2(power).real)
    acf /= acf.max()
    cr, cc = rows_ // 2, cols_ // 2
    nominal = physics.relaxation_at(cohort.physics, p.field_strength)
    s_wm = abs(float(physics.sequence_signal(p, nominal)[nominal.index("wm")]))
    air = ndi.distance_transform_edt(s.labels == 0) > 6
    sigma_air = float(np.sqrt(np.mean(s.physical[air].astype(np.float64) ** 2) / 2))
    wm = (s.labels == physics.LABELS["wm"]) & (s.wm > 0.97)
    noise_rows.append({
        "scanner": name,
        "acquired/matrix": f"{p.acquired[0]}x{p.acquired[1]}/{rows_}x{cols_}",
        "filter": p.apodisation,
        "PE": p.phase_encoding_direction,
        "partial Fourier": p.partial_fourier,
        "R": p.parallel_factor,
        "noise sd (x 1e-3 M0)": 1e3 * float(noise.std()),
        "WM SNR, equations + flat": s_wm / float(noise.std()),
        "WM SNR, rendered image": float(np.median(s.physical[wm])) / sigma_air,
        "lag-1 corr. down columns": lag1(noise, 1),
        "lag-1 corr. along rows": lag1(noise, 2),
    })
    patch = noise[3, :40, :40] / noise.std()
    axes[0, col].imshow(patch, cmap="gray", vmin=-3, vmax=3)
    axes[0, col].set_title(f"{name}\\n{p.apodisation}, {p.acquired[0]}x{p.acquired[1]} to {rows_}x{cols_}", fontsize=8)
    axes[1, col].imshow(acf[cr - 5 : cr + 6, cc - 5 : cc + 6], cmap="RdBu_r", vmin=-1, vmax=1, extent=(-5.5, 5.5, 5.5, -5.5))
    axes[2, col].imshow(np.log10(np.fft.fftshift(power) / power.max() + 1e-6), cmap="magma", vmin=-4, vmax=0)
    for ax in (axes[0, col], axes[2, col]):
        ax.axis("off")
    axes[1, col].tick_params(labelsize=7)
axes[1, 0].set_ylabel("autocorrelation (lags, pixels)")
fig.text(0.01, 0.82, "noise, 40x40 px", rotation=90, fontsize=9)
fig.text(0.01, 0.18, "power spectrum (log)", rotation=90, fontsize=9)
fig.suptitle("reconstructed noise of a flat object: patch (in sd), autocorrelation, power spectrum")
fig.tight_layout(rect=(0.02, 0, 1, 1))
plt.show()
noise_table = pd.DataFrame(noise_rows).set_index("scanner")
print(noise_table.round(3).to_string())
noise_table.round(3)""",
    ),
    (
        "markdown",
        """## (d) Ringing at the edge of the head: no filter against a Hamming filter

The object is sampled twice as finely as the reconstructed matrix, so k-space truncation leaves Gibbs
ringing next to sharp edges: air to scalp, scalp fat to skull. The same subject on the same profile,
rendered noise-free (`physics.snr_constant` huge), without a bias field and on the central 8 slices only
(the grid keeps its centre), once with no apodisation and once with Hamming; a line from the edge of the
field of view into the brain along the middle row of the middle slice.""",
    ),
    (
        "code",
        """name = next((n for n in scanners if cohort.scanners[n].apodisation == "none"), scanners[0])
quiet = cohort.physics.model_copy(update={"snr_constant": 1e9})
subject = replace(plan, scanner=name, finding=False)
profiles, lines = {}, {}
for kind in ("none", "hamming"):
    profile = cohort.scanners[name].model_copy(update={"apodisation": kind, "bias_field": 0.0, "n_slices": 8})
    variant = cohort.model_copy(update={"physics": quiet, "scanners": {**cohort.scanners, name: profile}})
    lines[kind] = render.render_subject(variant, subject)
s = lines["none"]
k, r = s.labels.shape[0] // 2, s.labels.shape[1] // 2
labels_line = s.labels[k, r]
head = int(np.flatnonzero(labels_line)[0])
brain = int(np.flatnonzero(np.isin(labels_line, [physics.LABELS["gm"], physics.LABELS["wm"]]))[0])
x = np.arange(max(head - 10, 0), min(brain + 8, labels_line.size))
fig, ax = plt.subplots(figsize=(10, 4))
for start in x[labels_line[x] > 0]:  # tissue under each pixel; air left blank
    ax.axvspan(start - 0.5, start + 0.5, color=LABEL_COLOURS.get(names_by_value[labels_line[start]], "tab:green"), alpha=0.3, lw=0)
for kind, style in (("none", "-"), ("hamming", "--")):
    ax.plot(x, lines[kind].physical[k, r, x], style, marker=".", label=f"apodisation {kind}")
ax.set(xlabel=f"column (pixel {cohort.scanners[name].pixel_spacing[1]:g} mm), row {r + 1}, slice {k + 1}", ylabel="reconstructed value",
       title=f"{name}: a line from the edge of the field of view into the brain (background: tissue labels)")
ax.legend(handles=ax.get_legend_handles_labels()[0] + [Patch(color=LABEL_COLOURS.get(n, "tab:green"), alpha=0.4, label=n) for n in names_by_value[1:] if physics.LABELS[n] in set(labels_line[x])], fontsize=8, ncol=2)
plt.show()
air = slice(max(head - 8, 0), head - 1)  # air one voxel or more outside the head
peak = max(float(lines[kind].physical[k, r, head : brain].max()) for kind in lines)
for kind, series_ in lines.items():
    line = series_.physical[k, r]
    print(f"{kind:8s} largest value in the air 2-8 px outside the head: {100 * line[air].max() / peak:5.2f} % of the scalp's peak")""",
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
    nbformat.write(build(SCANNER_PHYSICS), NOTEBOOKS / "06_scanner_physics.ipynb")


if __name__ == "__main__":
    main()
