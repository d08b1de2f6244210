"""The embedded synthetic multi-scanner brain MRI cohort (DICOM, RIS table, ground truth).

Each subject is the MNI152 template, individually posed, warped, aged and (for those with the finding)
given a focal lesion, then acquired by its site's scanner profile and written as real DICOM. See
:func:`run` and :class:`shiftguard.config.CohortConfig`.
"""

from __future__ import annotations

from shiftguard.cohort.demographics import SubjectPlan, sample_subjects
from shiftguard.cohort.generate import CohortSummary, run
from shiftguard.cohort.writer import TRANSFER_SYNTAXES
from shiftguard.errors import (
    CohortError,
    OutputDirectoryError,
    TemplateNotFoundError,
    UnsupportedTransferSyntaxError,
)

__all__ = [
    "TRANSFER_SYNTAXES",
    "CohortError",
    "CohortSummary",
    "OutputDirectoryError",
    "SubjectPlan",
    "TemplateNotFoundError",
    "UnsupportedTransferSyntaxError",
    "run",
    "sample_subjects",
]
