"""Export: the trained model to ONNX (and TorchScript), checked, and packed into an edge bundle.

The stage (``pipelines/export.py``, DVC stage ``export``):

1. loads ``artifacts/train/model.pt`` and exports it to ONNX with the logit, for networks that
   have one (:meth:`shiftguard.models.SmallCNN3d.activation_map`) a class-activation map, and the
   penultimate features (the drift monitor's embedding); and to TorchScript;
2. checks parity on a batch of validation series: ONNX Runtime against PyTorch (logits within
   ``export.parity_tolerance``), and the edge runner's numpy preprocessing against the training
   pipeline's MONAI preprocessing (within 1e-5): the stage fails otherwise;
3. writes the bundle ``NAME.sgbundle`` (:mod:`shiftguard.edge.bundle`): manifest, model(s), a
   model card built from the validation reports, those reports, and the drift baseline: the edge
   runner itself run on the training series' DICOM files (:mod:`shiftguard.records.features`), with
   the PCA basis of their penultimate features; and the smoke test's reference series (the first
   validation series on the canonical grid, pixel values only) with the logit ONNX Runtime gave
   it, which a site checks before it serves the bundle (:mod:`shiftguard.edge.smoke`). The same inputs give the same bytes: the version
   is a digest of what decides the predictions, the TorchScript model carries no debug
   information (source paths), and no MLflow run id or registry number is inside;
4. finds the training run by ``model.pt``'s SHA-256 in MLflow, logs the bundle to it and tags the
   registered model version with the bundle's file name, version (``bundle_version``), SHA-256
   and URI: the registry's number for a bundle is looked up there.
"""

from __future__ import annotations

from shiftguard.errors import ExportError
from shiftguard.export.stage import ExportSummary, export_onnx, run

__all__ = ["ExportError", "ExportSummary", "export_onnx", "run"]
