"""Typed errors of the synthetic cohort generator; each message names the input and what to do."""

from __future__ import annotations

from shiftguard.errors import ShiftGuardError


class CohortError(ShiftGuardError):
    """The cohort cannot be generated from this configuration or into this folder."""


class TemplateNotFoundError(CohortError, FileNotFoundError):
    """The MNI152 template that the anatomy is built from is missing (nilearn not installed)."""


class UnsupportedTransferSyntaxError(CohortError, ValueError):
    """A scanner profile asks for a transfer syntax that is unknown or has no working encoder."""


class OutputDirectoryError(CohortError, FileExistsError):
    """The output folder holds files that the generator did not write and will not overwrite."""
