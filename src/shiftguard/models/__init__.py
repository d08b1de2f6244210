"""Classifiers: a compact 3D CNN and a factory that instantiates the ``model`` section."""

from __future__ import annotations

from shiftguard.models.factory import build_model
from shiftguard.models.small_cnn import SmallCNN3d

__all__ = ["SmallCNN3d", "build_model"]
