"""The one figure helper: the caller's matplotlib backend is left alone, and the PNG bytes depend on
the drawing only."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from shiftguard.figures import figure, png_bytes


def test_drawing_and_saving_never_switch_the_callers_backend_or_load_pyplot(tmp_path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        import matplotlib
        matplotlib.use("svg")  # a caller's choice
        from shiftguard.figures import figure, save_png
        fig = figure(2, 2)
        fig.subplots().plot([0, 1], [1, 0])
        save_png(fig, {str(tmp_path / "a.png")!r}, dpi=40)
        assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
        assert "matplotlib.pyplot" not in sys.modules
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "a.png").read_bytes().startswith(b"\x89PNG")


def test_the_same_drawing_gives_the_same_bytes_with_no_version_stamp() -> None:
    def draw() -> bytes:
        fig = figure(3, 2)
        ax = fig.subplots()
        ax.plot([0, 1, 2], [2, 0, 1], label="a")
        ax.legend()
        return png_bytes(fig, dpi=50)

    first = draw()
    assert first == draw()
    assert b"Software" not in first and b"matplotlib" not in first.lower()
