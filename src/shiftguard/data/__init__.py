"""Data: DICOM trees to canonical volumes, manifests and splits.

* :mod:`shiftguard.data.ingest`: the ingest stage (``run``): validated series -> RAS+ NIfTI volumes
  on a fixed grid, ``manifest.csv`` and ``quarantine.csv``.
* :mod:`shiftguard.data.volume`: canonical resampling, NIfTI writing, image statistics.
* :mod:`shiftguard.data.split`: patient-level train/val/test split with an external test set.
"""
