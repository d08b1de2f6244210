"""The key image's burned-in text: a space between two words is seen as one (wider than any gap
between the letters of a word), with the installed font and with Pillow's own, and lines too long
for the image wrap instead of running off its edge."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from shiftguard.edge import dicom_out
from shiftguard.edge.dicom_out import SHADOW_BANNER, SeriesResult, render_key_image


@pytest.fixture(params=["installed", "pillow"])
def font_source(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each test runs with the usual font search and with none of the fonts found."""
    if request.param == "pillow":
        monkeypatch.setattr(dicom_out, "BANNER_FONTS", ("no-such-font-shiftguard.ttf",))
    dicom_out.banner_font.cache_clear()
    yield request.param
    dicom_out.banner_font.cache_clear()


def _blank_runs(ink: np.ndarray) -> list[int]:
    """Widths of the runs of columns without ink between the first and the last inked column."""
    columns = np.flatnonzero(ink.any(axis=0))
    if columns.size == 0:
        return []
    gaps = np.diff(columns) - 1
    return [int(g) for g in gaps if g > 0]


def _volume() -> np.ndarray:
    return np.random.default_rng(0).random((80, 96, 20)).astype(np.float32)


def _shadow_line(image: np.ndarray) -> np.ndarray:
    """The pixels with ink of the shadow warning's colour (red, anti-aliased edges included); the
    other lines are yellow, the image grey."""
    r, g = image[..., 0].astype(int), image[..., 1].astype(int)
    return (r > 25) & (r - g > 15)


def test_the_gap_between_words_is_wider_than_any_gap_inside_a_word(font_source: str) -> None:
    result = SeriesResult("1.2.3", 0.03, 0.456, "m", "1", shadow=True)
    image, _ = render_key_image(_volume(), None, result)
    ink = _shadow_line(image)
    assert ink.any(), "the shadow warning is drawn in its colour"
    # the warning's lines of text: bands of rows with ink, split by rows without
    rows = np.flatnonzero(ink.any(axis=1))
    bands = np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1)
    font = dicom_out.banner_font()
    expected = dicom_out.wrap_text(SHADOW_BANNER, font, image.shape[1] - 8)
    assert len(bands) == len(expected) and " ".join(expected) == SHADOW_BANNER
    for band, line in zip(bands, expected, strict=True):
        runs = sorted(_blank_runs(ink[band.min() : band.max() + 1]), reverse=True)
        spaces = line.count(" ")
        # the `spaces` widest blank runs are the spaces; each is clearly wider than any gap
        # between two letters of a word ("NOT FORCLINICAL USE": a font whose space is as narrow
        # as the gap between letters)
        assert len(runs) >= spaces
        word_gaps, letter_gaps = runs[:spaces], runs[spaces:]
        assert min(word_gaps, default=99) >= 2 * max([*letter_gaps, 1]), (font_source, runs)


def test_words_and_digits_keep_their_space(font_source: str) -> None:
    """``"probability 0.030"`` is never drawn as ``"probability0.030"``: drawing a space adds
    ink-free width (compare the same text with and without it)."""
    from PIL import Image, ImageDraw

    font = dicom_out.banner_font()

    def inked(text: str) -> np.ndarray:
        canvas = Image.new("RGB", (300, 30), (0, 0, 0))
        dicom_out.draw_words(ImageDraw.Draw(canvas), (2, 2), text, font, (255, 255, 0))
        return np.asarray(canvas)[..., 0] > 0

    spaced, joined = inked("probability 0.030"), inked("probability0.030")
    width = np.flatnonzero(spaced.any(axis=0))
    joined_width = np.flatnonzero(joined.any(axis=0))
    space = (width[-1] - width[0]) - (joined_width[-1] - joined_width[0])
    assert space >= 0.4 * font.size, (font_source, space, font.size)
    assert max(_blank_runs(spaced)) >= 0.4 * font.size


def test_long_lines_wrap_inside_the_image(font_source: str) -> None:
    result = SeriesResult(
        "1.2.3", 0.5, 0.4, "a-very-long-registered-model-name", "0123456789ab", False
    )
    image, _ = render_key_image(_volume(), None, result)
    banner = image.shape[0] - 96 * 3
    text = image[:banner].max(axis=2) > 0
    assert text.any()
    margin = 2
    assert not text[:, -margin:].any(), "no text runs off the right edge"
    # every word of every line is somewhere in the banner: the banner grew instead of clipping
    font = dicom_out.banner_font()
    lines = dicom_out.wrap_text(
        "a-very-long-registered-model-name v0123456789ab: FINDING PRESENT", font, image.shape[1] - 8
    )
    assert len(lines) >= 2
    assert all(dicom_out.text_width(line, font) <= image.shape[1] - 8 for line in lines[1:])
