"""Errors raised while composing or validating configuration."""

from __future__ import annotations

from shiftguard.errors import ShiftGuardError


class ConfigError(ShiftGuardError, ValueError):
    """A configuration file, override or section is missing or invalid; the message names the key."""
