"""Side tables of the cohort, written by the parent process in subject order with stable bytes.

* ``ris/verified_diagnoses.csv``: one row per study, like a RIS export (the label lives here, not in
  the images): ``accession_number, patient_id, study_instance_uid, finding, finding_label, reader,
  report_date``.
* ``ground_truth/lesions.csv``: one row per subject with the finding: ``patient_id,
  study_instance_uid, series_instance_uid, centre_r_mm, centre_a_mm, centre_s_mm, radius_mm,
  contrast, sign, mask_voxels, mask_path`` (centre: RAS mm centroid of the lesion in the series;
  sign: ``+1`` hyperintense, ``-1`` hypointense).
* ``cohort.json``: provenance (version, seed, config and its sha256, counts, layout).
"""

from __future__ import annotations

import hashlib
import json

from shiftguard.config.schema import CohortConfig

RIS_COLUMNS = (
    "accession_number",
    "patient_id",
    "study_instance_uid",
    "finding",
    "finding_label",
    "reader",
    "report_date",
)
LESION_COLUMNS = (
    "patient_id",
    "study_instance_uid",
    "series_instance_uid",
    "centre_r_mm",
    "centre_a_mm",
    "centre_s_mm",
    "radius_mm",
    "contrast",
    "sign",
    "t1_ms",
    "t2_ms",
    "pd",
    "mask_voxels",
    "mask_path",
)
FINDING_LABELS = {0: "no finding", 1: "focal lesion"}
LAYOUT = {
    "dicom": "dicom/<PatientID>/<SeriesInstanceUID>/<InstanceNumber:04d>.dcm",
    "masks": "ground_truth/masks/<PatientID>.nii.gz (uint8, series voxel grid, RAS affine)",
    "labels": "ground_truth/labels/<PatientID>.nii.gz (uint8 tissue labels, series voxel grid): "
    "0 air, 1 csf, 2 gm, 3 wm, 4 fat, 5 muscle, 6 bone, 7 marrow, 8 skin, 9 lesion",
    "lesions": "ground_truth/lesions.csv",
    "ris": "ris/verified_diagnoses.csv",
}


def canonical_config(cfg: CohortConfig) -> str:
    """The config as canonical JSON: sorted keys, no whitespace."""
    return json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def config_digest(cfg: CohortConfig) -> str:
    """sha256 (hex) of :func:`canonical_config`."""
    return hashlib.sha256(canonical_config(cfg).encode("utf-8")).hexdigest()
