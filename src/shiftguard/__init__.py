"""ShiftGuard: make medical imaging models robust to scanner shift, and watch for it in deployment."""

from __future__ import annotations

import os

from shiftguard import _kernels

__version__ = "0.1.0"

__all__ = ["__version__"]

# Nothing leaves the machine but package downloads: MLflow's usage telemetry stays off unless the
# user opts in explicitly (DVC's analytics are off in .dvc/config).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# Before numpy or torch loads: the same kernels on every x86-64 host, so the pipeline's bytes do
# not depend on the host's instruction set (_kernels.py; SHIFTGUARD_NATIVE_KERNELS=1 opts out).
_kernels.pin()
