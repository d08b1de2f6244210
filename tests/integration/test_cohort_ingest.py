"""Generator and ingest agree on geometry: each ground-truth lesion mask, carried into the ingested
canonical volume through the two affines, lands on the lesion the image shows."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from shiftguard.cohort import generate
from shiftguard.config import CohortConfig, IngestConfig, compose, validate
from shiftguard.data import ingest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_lesion_masks_land_on_the_lesions_after_ingest(tmp_path: Path) -> None:
    config = compose(
        [
            "experiment=tiny",
            "cohort.n_subjects=14",
            "cohort.lesion.radius_mm=[14,16]",
            # a lesion every sequence shows clearly (long T1, little T2 change), dark on all
            "cohort.lesion.t1_factor=[1.9,2.0]",
            "cohort.lesion.t2_factor=[1.0,1.05]",
            "cohort.lesion.pd_factor=[1.0,1.0]",
            "cohort.lesion.t1_short_fraction=0.0",
            *(f"cohort.sites.{i}.prevalence=1.0" for i in range(7)),
            "ingest.spacing=[4,4,4]",
            "ingest.shape=[44,52,44]",
        ],
        conf_dir=REPO / "conf",
    )
    generate.run(validate("cohort", config["cohort"], CohortConfig), tmp_path / "data", 2, False)
    ingest.run(
        validate("ingest", config["ingest"], IngestConfig),
        tmp_path / "data" / "dicom",
        tmp_path / "out",
        workers=2,
        progress=False,
    )
    with (tmp_path / "out" / "manifest.csv").open() as fh:
        manifest = {r["series_uid"]: r for r in csv.DictReader(fh)}
    with (tmp_path / "data" / "ground_truth" / "lesions.csv").open() as fh:
        lesions = list(csv.DictReader(fh))
    assert len(lesions) == 14

    scanners_checked = set()
    for lesion in lesions:
        series = manifest[lesion["series_instance_uid"]]
        image = nib.load(tmp_path / "out" / series["volume_path"])
        mask_img = nib.load(tmp_path / "data" / lesion["mask_path"])
        # Mask (series grid) -> ingested grid: output voxel -> RAS mm -> mask voxel.
        to_mask = np.linalg.inv(mask_img.affine) @ image.affine
        mask = ndimage.affine_transform(
            np.asarray(mask_img.dataobj, dtype=np.float32),
            to_mask[:3, :3],
            to_mask[:3, 3],
            output_shape=image.shape,
            order=1,
        )
        inside = mask > 0.5
        assert inside.sum() >= 8, lesion["patient_id"]
        ring = ndimage.binary_dilation(inside, iterations=2) & ~inside
        data = image.get_fdata()
        difference = data[inside].mean() - data[ring].mean()
        relative = difference / data[ring].mean()
        assert np.sign(relative) == int(lesion["sign"]), (lesion["patient_id"], relative)
        # (thick tiny-preset slices dilute the contrast by partial volume)
        assert abs(relative) > 0.05, (lesion["patient_id"], relative)
        # The centre recorded in the RIS-side table is where the mask is, in RAS mm.
        centroid_vox = np.array(ndimage.center_of_mass(inside))
        centroid_ras = image.affine[:3, :3] @ centroid_vox + image.affine[:3, 3]
        recorded = np.array([float(lesion[f"centre_{a}_mm"]) for a in "ras"])
        assert np.linalg.norm(centroid_ras - recorded) < 6.0, lesion["patient_id"]
        scanners_checked.add(series["scanner_model"])
    # axial, thick-slice, sagittal, oblique, 2D with slice gaps: every scanner of the cohort
    assert len(scanners_checked) == 7
