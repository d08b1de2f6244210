"""One figure helper for every plot ShiftGuard writes.

:func:`figure` draws on a matplotlib ``Figure`` made without pyplot, so a caller's backend (a
notebook's inline one, an interactive window) is never switched and no global figure list grows;
:func:`save_png` and :func:`png_bytes` write it as PNG without matplotlib's ``Software`` stamp, so
the bytes depend only on what was drawn and a matplotlib upgrade does not change a DVC output.

Example:
    >>> fig = figure(2.0, 1.5)
    >>> ax = fig.subplots()
    >>> _ = ax.plot([0, 1], [0, 1])
    >>> png_bytes(fig, dpi=50)[:8]
    b'\\x89PNG\\r\\n\\x1a\\n'
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def figure(width: float, height: float) -> Figure:
    """A new figure of ``width`` x ``height`` inches, outside pyplot."""
    from matplotlib.figure import Figure  # deferred: matplotlib costs a third of a second

    return Figure(figsize=(width, height))


def save_png(fig: Figure, target: Path | str | BinaryIO, dpi: int, tight: bool = True) -> None:
    """Write ``fig`` as PNG to a path or an open binary file.

    Args:
        fig: The figure.
        target: Where to write.
        dpi: Resolution.
        tight: Crop to what was drawn (``bbox_inches="tight"``).
    """
    fig.savefig(
        target,
        format="png",
        dpi=dpi,
        bbox_inches="tight" if tight else None,
        metadata={"Software": None},
    )


def png_bytes(fig: Figure, dpi: int, tight: bool = True) -> bytes:
    """``fig`` as PNG bytes (for a page that embeds it)."""
    buffer = io.BytesIO()
    save_png(fig, buffer, dpi, tight)
    return buffer.getvalue()
