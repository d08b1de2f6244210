"""Pixel pass: read the stored values of a series' slices into one array.

Native little-endian pixel data is read straight into the output array at the offset the header scan
recorded (one ``preadv`` per slice, no parsing, no intermediate copies). Encapsulated data (RLE,
JPEG-LS, JPEG 2000, JPEG) is handed to pydicom's decoder with the image description from the header,
so pydicom's plugins (pylibjpeg, pyjpegls, ...) decode it without re-parsing the file. Files the
walker did not parse (big endian, deflate, enhanced multi-frame) are read with pydicom.

A failure names the file: :class:`~shiftguard.errors.PixelDecodeError`.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from shiftguard.dicom import binary
from shiftguard.dicom.scan import SliceHeader
from shiftguard.errors import PixelDecodeError

log = logging.getLogger(__name__)

__all__ = ["read_stored", "stored_dtype"]

_NATIVE_LE = frozenset({binary.EXPLICIT_VR_LE, binary.IMPLICIT_VR_LE})
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
_ITEM_HEAD = struct.Struct("<HHI")

try:  # pylibjpeg-rle, the decoder pydicom itself would pick for RLE Lossless
    from rle.rle import decode_frame as _rle_decode
except ImportError:  # pragma: no cover - then pydicom's own decoders are used
    _rle_decode = None


def stored_dtype(h: SliceHeader) -> np.dtype[Any]:
    """The NumPy dtype of one stored sample (little endian), from BitsAllocated and PixelRepresentation.

    Args:
        h: A slice header.

    Returns:
        ``uint8``/``int8``/``uint16``/``int16``/``uint32``/``int32``.

    Raises:
        PixelDecodeError: BitsAllocated is not 8, 16 or 32.
    """
    if h.bits_allocated not in (8, 16, 32):
        raise PixelDecodeError(
            "unsupported_pixel_format",
            f"{h.path}: BitsAllocated {h.bits_allocated} is not supported (8, 16 or 32 bits)",
            "convert the series to 8/16-bit grayscale (e.g. with dcmconv or gdcmconv)",
            [h.path],
        )
    kind = "i" if h.pixel_representation == 1 else "u"
    return np.dtype(f"<{kind}{h.bits_allocated // 8}")


def read_stored(headers: Sequence[SliceHeader]) -> np.ndarray:
    """Read the stored pixel values of single-sample slices, in the given order.

    All headers must share rows, columns, BitsAllocated and PixelRepresentation (series validation
    ensures it).

    Args:
        headers: One header per slice (frames of multi-frame files included).

    Returns:
        Array ``(n_slices, rows, cols)`` of the stored dtype, unused high bits corrected (masked for
        unsigned, sign-extended for signed data) as pydicom does.

    Raises:
        PixelDecodeError: A file cannot be read or decoded; the message names it.
    """
    first = headers[0]
    dtype = stored_dtype(first)
    rows, cols = first.rows, first.cols
    out = np.empty((len(headers), rows, cols), dtype=dtype)
    frame_bytes = rows * cols * dtype.itemsize
    needs_bit_fix = np.zeros(len(headers), dtype=bool)
    decoded_cache: dict[str, np.ndarray] = {}
    for k, h in enumerate(headers):
        try:
            if h.pixel_offset >= 0 and h.pixel_length >= 0 and h.transfer_syntax in _NATIVE_LE:
                _read_native(h, out[k], frame_bytes)
                needs_bit_fix[k] = h.bits_stored < h.bits_allocated
            elif h.pixel_offset >= 0 and h.pixel_length < 0:
                if _rle_decode is not None and _rle_fast_path(h):
                    _decode_rle(h, out[k])
                    needs_bit_fix[k] = h.bits_stored < h.bits_allocated
                else:
                    out[k] = _decode_encapsulated(h)
            else:
                arr = decoded_cache.get(h.path)
                if arr is None:
                    arr = _read_with_pydicom(h)
                    if h.n_frames > 1:
                        decoded_cache[h.path] = arr
                out[k] = arr[h.frame] if arr.ndim == 3 else arr
        except PixelDecodeError:
            raise
        except Exception as exc:
            raise PixelDecodeError(
                "pixel_decode_failed",
                f"pixel data of {h.path} (frame {h.frame}, transfer syntax "
                f"{h.transfer_syntax or 'unknown'}) could not be read or decoded: "
                f"{type(exc).__name__}: {exc}",
                "re-export the file from the archive, or convert it to explicit VR little endian "
                "(e.g. gdcmconv --raw); check that the decoder plugins (pylibjpeg-*, pyjpegls) "
                "are installed",
                [h.path],
            ) from exc
    if needs_bit_fix.any():
        _fix_unused_bits(out, needs_bit_fix, first)
    return out


def _read_native(h: SliceHeader, dest: np.ndarray, frame_bytes: int) -> None:
    offset = h.pixel_offset + h.frame * frame_bytes
    if h.pixel_length < (h.frame + 1) * frame_bytes:
        raise PixelDecodeError(
            "pixel_data_short",
            f"{h.path}: Pixel Data holds {h.pixel_length} bytes, frame {h.frame} needs "
            f"{(h.frame + 1) * frame_bytes}",
            "re-export the image; the file was cut short or its image tags are wrong",
            [h.path],
        )
    view = dest.data.cast("B")
    fd = os.open(h.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [view], offset)
        else:  # pragma: no cover - platforms without preadv
            data = os.pread(fd, frame_bytes, offset) if hasattr(os, "pread") else b""
            got = len(data)
            view[:got] = data
    finally:
        os.close(fd)
    if got != frame_bytes:
        raise PixelDecodeError(
            "truncated",
            f"{h.path}: read {got} of {frame_bytes} pixel bytes; the file is truncated",
            "copy the file again from its source",
            [h.path],
        )


def _rle_fast_path(h: SliceHeader) -> bool:
    return (
        h.transfer_syntax == RLE_LOSSLESS
        and h.n_frames == 1
        and h.samples_per_pixel == 1
        and h.bits_allocated in (8, 16, 32)
    )


def _fragments(buffer: bytes) -> list[memoryview]:
    """The fragments of encapsulated Pixel Data (after the Basic Offset Table), PS3.5 A.4."""
    view = memoryview(buffer)
    pos = 0
    items: list[memoryview] = []
    while pos + 8 <= len(buffer):
        group, elem, length = _ITEM_HEAD.unpack_from(buffer, pos)
        if (group, elem) == (0xFFFE, 0xE0DD):
            break
        if (group, elem) != (0xFFFE, 0xE000) or pos + 8 + length > len(buffer):
            raise ValueError(f"malformed encapsulated pixel data at byte {pos} of the value")
        items.append(view[pos + 8 : pos + 8 + length])
        pos += 8 + length
    else:
        raise ValueError("encapsulated pixel data ends without a sequence delimiter")
    if not items:
        raise ValueError("encapsulated pixel data holds no items")
    return items[1:]  # items[0] is the Basic Offset Table


def _decode_rle(h: SliceHeader, dest: np.ndarray) -> None:
    """Decode one single-frame grayscale RLE image with pylibjpeg-rle directly into ``dest``.

    Same decoder as pydicom's pylibjpeg plugin, without its per-call validation and dataset
    handling (which cost several times the decoding of a small frame).
    """
    assert _rle_decode is not None
    buffer = _read_tail(h.path, h.pixel_offset)
    fragments = _fragments(buffer)
    frame = bytes(fragments[0]) if len(fragments) == 1 else b"".join(fragments)
    decoded = _rle_decode(frame, h.rows * h.cols, h.bits_allocated, "<")
    dest[...] = np.frombuffer(decoded, dtype=dest.dtype).reshape(dest.shape)


def _read_tail(path: str, offset: int) -> bytes:
    """The bytes of ``path`` from ``offset`` to its end (an encapsulated Pixel Data value)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        size = os.fstat(fd).st_size
        if hasattr(os, "pread"):
            return os.pread(fd, max(0, size - offset), offset)
        os.lseek(fd, offset, os.SEEK_SET)  # pragma: no cover - platforms without pread
        return os.read(fd, max(0, size - offset))  # pragma: no cover
    finally:
        os.close(fd)


def _decode_encapsulated(h: SliceHeader) -> np.ndarray:
    from pydicom.pixels import get_decoder

    buffer = _read_tail(h.path, h.pixel_offset)
    decoder = get_decoder(h.transfer_syntax)
    options: dict[str, Any] = {
        "rows": h.rows,
        "columns": h.cols,
        "samples_per_pixel": h.samples_per_pixel,
        "bits_allocated": h.bits_allocated,
        "bits_stored": h.bits_stored,
        "pixel_representation": h.pixel_representation,
        "photometric_interpretation": h.photometric,
        "number_of_frames": h.n_frames,
        "planar_configuration": h.planar_configuration,
    }
    arr, _ = decoder.as_array(buffer, index=h.frame, **options)
    return np.asarray(arr)


def _read_with_pydicom(h: SliceHeader) -> np.ndarray:
    import warnings

    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(h.path, force=True)
        return np.asarray(ds.pixel_array)


def _fix_unused_bits(out: np.ndarray, which: np.ndarray, h: SliceHeader) -> None:
    """Ignore bits above BitsStored (PS3.5 8.1.1), as pydicom's ``correct_unused_bits``."""
    shift = h.bits_allocated - h.bits_stored
    idx = np.flatnonzero(which)
    sub = out[idx] if len(idx) != len(out) else out
    if h.pixel_representation == 1:
        np.left_shift(sub, shift, out=sub)
        np.right_shift(sub, shift, out=sub)
    else:
        np.bitwise_and(sub, np.array((1 << h.bits_stored) - 1, dtype=out.dtype), out=sub)
    if len(idx) != len(out):
        out[idx] = sub
