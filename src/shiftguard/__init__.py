"""ShiftGuard: make medical imaging models robust to scanner shift, and watch for it in deployment."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
