"""The edge runtime: what runs at a hospital site. The DICOM receiver and SCP, the durable work
queue, the bundle loader and its predictor, result objects (SR, Secondary Capture) and their
delivery, the record spool and shipper, and the service that ties them together.

Standard library, numpy, pydicom and onnxruntime only: nothing here imports the lab side
(training, evaluation, export, shadow, central monitoring) or torch, MONAI, MLflow, DVC or pandas.
"""
