"""A pickle that runs code when loaded: what a model file or checkpoint from a stranger could hold."""

from __future__ import annotations

from pathlib import Path


class Trap:
    """Unpickling it creates ``marker`` (``open(marker, "w")``); a safe loader never does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")
