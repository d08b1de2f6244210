"""Structure-aware fuzzing of the parsers that read untrusted bytes: strategies and properties.

Shared by the seeded, bounded fuzz tests (``tests/unit/dicom/test_walkers_fuzz.py``,
``tests/unit/edge/test_scp_fuzz.py``) and the longer campaign (``scripts/fuzz_campaign.py``).

The inputs start from valid objects and break them the way a faulty or hostile peer would:
truncations, flipped bytes, length fields set to 0, to odd values, to ``0xFFFFFFFF`` or past the
end, inserted and deleted runs, deeply nested undefined-length sequences, swapped transfer
syntaxes, non-ASCII UIDs; and, for the Storage SCP, PDUs dropped, repeated or reordered and the
stream cut into arbitrary TCP segments. Plain random bytes are drawn too.

Each target is a strategy and a ``check_*`` function that raises ``AssertionError`` (or lets an
undocumented exception through) when the property fails:

- a DICOM byte walker returns a result or raises only its documented errors, and its result is
  consistent with the bytes (never ``IndexError``, ``struct.error``, ``RecursionError``, a hang);
- the SCP's connection, fed any byte stream in any segmentation, never lets an exception escape,
  writes only well-formed PDUs, and stores nothing once it has decided to close.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from shiftguard.dicom import binary, pixels
from shiftguard.dicom.scan import read_headers
from shiftguard.edge import scp
from shiftguard.edge.receiver import scan_uids
from shiftguard.errors import UnreadableFileError

if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    # Hypothesis caches what it learns from the source under ./.hypothesis; keep the tree clean
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "shiftguard-hypothesis")

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
UID_ROOT = "1.2.826.0.1.3680043.10.1463.99"
STUDY_UID, SERIES_UID, SOP_UID = f"{UID_ROOT}.1", f"{UID_ROOT}.2", f"{UID_ROOT}.3"
TRANSFER_SYNTAXES = (
    binary.IMPLICIT_VR_LE,
    binary.EXPLICIT_VR_LE,
    binary.EXPLICIT_VR_BE,
    binary.DEFLATED_LE,
    "1.2.840.10008.1.2.5",  # RLE lossless (encapsulated)
    "1.2.3.4",  # unknown
    "",
)
_SHORT = {"AE", "AS", "CS", "DA", "DS", "IS", "LO", "PN", "SH", "UI", "US", "SS", "UL", "FL"}
_LONG = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
_U32_VALUES = (0, 1, 2, 7, 8, 0xFFFF, 0xFFFFFFFE, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000)


def fuzz(examples: int) -> settings:
    """The test suite's settings: seeded (the same examples on every run), bounded, no
    per-example deadline (a slow CI machine must not fail a property)."""
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=False,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


# ------------------------------------------------------------------------------------------------
# a small DICOM encoder (little endian) for the seeds
# ------------------------------------------------------------------------------------------------


def element(tag: int, vr: str, value: bytes | None, explicit: bool = True) -> bytes:
    """One data element; ``value=None`` writes an undefined length (a sequence's content follows)."""
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    length = 0xFFFFFFFF if value is None else len(value)
    body = value or b""
    if not explicit:
        return head + struct.pack("<I", length) + body
    if vr in _LONG:
        return head + vr.encode() + b"\0\0" + struct.pack("<I", length) + body
    return head + vr.encode() + struct.pack("<H", length) + body


def delimiter(tag: int, length: int = 0) -> bytes:
    """An item (``0xFFFEE000``) or delimiter header: tag and a 32-bit length, no VR."""
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, length)


def sequence(tag: int, items: list[bytes], explicit: bool, undefined: bool = True) -> bytes:
    """A sequence of items, each of undefined length when ``undefined`` (with delimiters)."""
    if undefined:
        body = b"".join(
            delimiter(0xFFFEE000, 0xFFFFFFFF) + i + delimiter(0xFFFEE00D) for i in items
        )
        return element(tag, "SQ", None, explicit) + body + delimiter(0xFFFEE0DD)
    body = b"".join(delimiter(0xFFFEE000, len(i)) + i for i in items)
    return element(tag, "SQ", body, explicit)


def _text(value: str, pad: bytes = b" ") -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def _ui(value: str) -> bytes:
    return _text(value, b"\0")


def file_meta(transfer_syntax: str, sop_class: str = MR_STORAGE, sop: str = SOP_UID) -> bytes:
    """Preamble, ``DICM`` and a file meta group led by its group length."""
    group = b"".join(
        [
            element(0x00020001, "OB", b"\0\1"),
            element(0x00020002, "UI", _ui(sop_class)),
            element(0x00020003, "UI", _ui(sop)),
            element(0x00020010, "UI", _ui(transfer_syntax)) if transfer_syntax else b"",
            element(0x00020012, "UI", _ui(f"{UID_ROOT}.9")),
        ]
    )
    return bytes(128) + b"DICM" + element(0x00020000, "UL", struct.pack("<I", len(group))) + group


def image_dataset(
    explicit: bool,
    encapsulated: bool = False,
    nested: bool = True,
    un: bool = False,
    uids: tuple[str, str, str] = (SOP_UID, STUDY_UID, SERIES_UID),
) -> bytes:
    """A small MR image data set: the tags ingest reads, a nested sequence, 4x4 pixels.

    With ``un`` (explicit only) the nested sequence is an undefined-length ``UN`` element whose
    content is implicit VR, as a converter that did not know the tag writes it. ``uids``: SOP
    instance, study and series instance UIDs.
    """
    e = explicit
    sop, study, series = uids

    def el(tag: int, vr: str, value: bytes) -> bytes:
        return element(tag, vr, value, e)

    def referenced(ex: bool) -> bytes:
        inner = element(0x00080100, "SH", _text("T-A0100"), ex)
        inner += element(0x00080102, "SH", _text("SRT"), ex)
        code_seq = sequence(0x00082218, [inner], ex, undefined=False)
        item = element(0x00081150, "UI", _ui(MR_STORAGE), ex) + code_seq
        # a sequence of undefined length whose item holds a sequence of defined length
        return sequence(0x00081140, [item], ex)

    nested_part = b""
    if nested:
        nested_part = referenced(e)
        if un and explicit:
            nested_part = element(0x00081140, "UN", None) + referenced(False)[8:]
    parts = [
        el(0x00080005, "CS", _text("ISO_IR 100")),
        el(0x00080008, "CS", _text("ORIGINAL\\PRIMARY\\AXIAL")),
        el(0x00080016, "UI", _ui(MR_STORAGE)),
        el(0x00080018, "UI", _ui(sop)),
        el(0x00080020, "DA", _text("20240131")),
        el(0x00080060, "CS", _text("MR")),
        el(0x00080070, "LO", _text("ACME")),
        nested_part,
        el(0x00100020, "LO", _text("SYN001")),
        el(0x00180050, "DS", _text("1.5")),
        el(0x0020000D, "UI", _ui(study)),
        el(0x0020000E, "UI", _ui(series)),
        el(0x00200013, "IS", _text("1")),
        el(0x00200032, "DS", _text("0\\0\\0")),
        el(0x00200037, "DS", _text("1\\0\\0\\0\\1\\0")),
        el(0x00280002, "US", struct.pack("<H", 1)),
        el(0x00280004, "CS", _text("MONOCHROME2")),
        el(0x00280010, "US", struct.pack("<H", 4)),
        el(0x00280011, "US", struct.pack("<H", 4)),
        el(0x00280030, "DS", _text("1\\1")),
        el(0x00280100, "US", struct.pack("<H", 16)),
        el(0x00280101, "US", struct.pack("<H", 12)),
        el(0x00280102, "US", struct.pack("<H", 11)),
        el(0x00280103, "US", struct.pack("<H", 0)),
    ]
    if encapsulated:
        parts.append(element(0x7FE00010, "OB", None, e) + encapsulated_pixels())
    else:
        parts.append(el(0x7FE00010, "OW", bytes(range(32))))
    return b"".join(parts)


def encapsulated_pixels(fragments: tuple[bytes, ...] = (b"\x01" * 10, b"\x02" * 6)) -> bytes:
    """An encapsulated Pixel Data value: empty Basic Offset Table, fragments, delimiter."""
    body = delimiter(0xFFFEE000, 0)
    for fragment in fragments:
        body += delimiter(0xFFFEE000, len(fragment)) + fragment
    return body + delimiter(0xFFFEE0DD)


@dataclass(frozen=True)
class DicomSeed:
    """A valid object to mutate: data set bytes, the syntax they are encoded in, the framing."""

    name: str
    dataset: bytes
    transfer_syntax: str
    preamble: bool = True

    def encode(self, transfer_syntax: str | None = None, preamble: bool | None = None) -> bytes:
        ts = self.transfer_syntax if transfer_syntax is None else transfer_syntax
        if not (self.preamble if preamble is None else preamble):
            return self.dataset
        return file_meta(ts) + self.dataset


DICOM_SEEDS: tuple[DicomSeed, ...] = (
    DicomSeed("explicit", image_dataset(True), binary.EXPLICIT_VR_LE),
    DicomSeed("implicit", image_dataset(False), binary.IMPLICIT_VR_LE),
    DicomSeed("encapsulated", image_dataset(True, encapsulated=True), "1.2.840.10008.1.2.5"),
    DicomSeed("no-meta", image_dataset(False, nested=False), binary.IMPLICIT_VR_LE, preamble=False),
    DicomSeed("un-sequence", image_dataset(True, un=True), binary.EXPLICIT_VR_LE),
)


def pydicom_seed() -> DicomSeed:
    """The data set of a file pydicom writes through :mod:`shiftguard.dicom.testing`."""
    import io

    from pydicom import dcmwrite

    from shiftguard.dicom.testing import SeriesSpec, make_datasets

    out = io.BytesIO()
    dcmwrite(
        out, make_datasets(SeriesSpec(rows=4, cols=4, n_slices=1))[0], enforce_file_format=True
    )
    raw = out.getvalue()
    start = 144 + struct.unpack_from("<I", raw, 140)[0]  # past the file meta group
    return DicomSeed("pydicom", raw[start:], binary.EXPLICIT_VR_LE)


def length_fields(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, width, element start) of what look like length fields of little-endian element
    headers.

    A heuristic scan (an explicit VR, or an item / delimiter tag), good enough to aim mutations at
    the fields a walker trusts.
    """
    out: list[tuple[int, int, int]] = []
    for p in range(len(data) - 7):
        vr = data[p + 4 : p + 6]
        if vr.isalpha() and vr.isupper() and data[p + 1] in (0x00, 0x7F):
            if vr.decode() in _LONG and data[p + 6 : p + 8] == b"\0\0":
                out.append((p + 8, 4, p))
            else:
                out.append((p + 6, 2, p))
        if data[p : p + 2] == b"\xfe\xff" and data[p + 2 : p + 4] in (b"\x00\xe0", b"\x0d\xe0", b"\xdd\xe0"):  # fmt: skip
            out.append((p + 4, 4, p))
        elif (
            data[p + 1] == 0x00 and data[p] in (0x08, 0x10, 0x18, 0x20, 0x28) and data[p + 3] < 0x80
        ):
            out.append((p + 4, 4, p))  # implicit VR: tag, then a 32-bit length
    return out


# ------------------------------------------------------------------------------------------------
# byte-level mutations, aimed where the structure is
# ------------------------------------------------------------------------------------------------


def _nesting(draw: Callable[..., Any], explicit: bool) -> bytes:
    depth = draw(st.one_of(st.integers(1, 8), st.integers(300, 3000)))
    vr = draw(st.sampled_from(["SQ", "SQ", "UN"])) if explicit else "SQ"
    tag = draw(st.sampled_from([0x00081140, 0x00082218, 0x00400275]))
    opening = element(tag, vr, None, explicit) + delimiter(0xFFFEE000, 0xFFFFFFFF)
    closing = delimiter(0xFFFEE00D) + delimiter(0xFFFEE0DD)
    closed = draw(st.integers(0, depth))
    return opening * depth + closing * closed


def mutate(draw: Callable[..., Any], data: bytes, explicit: bool = True, big: bool = True) -> bytes:
    """Apply 0 to 4 structure-aware mutations to ``data``."""
    out = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        n = len(out)
        kind = draw(
            st.sampled_from(
                ["truncate", "byte", "bit", "length", "vr", "u32", "u16", "insert", "delete"]
                + ["repeat"]
                + (["nest"] if big else [])
            )
        )
        if n == 0 and kind not in ("insert", "nest"):
            continue
        at = draw(st.integers(0, max(n - 1, 0)))
        if kind == "truncate":
            del out[at:]
        elif kind == "byte":
            out[at] = draw(st.integers(0, 255))
        elif kind == "bit":
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "length":
            fields = length_fields(bytes(out))
            if not fields:
                continue
            pos, width, _ = draw(st.sampled_from(fields))
            top = (1 << (8 * width)) - 1
            value = draw(
                st.one_of(
                    st.sampled_from([v & top for v in _U32_VALUES] + [min(n - pos, top)]),
                    st.integers(0, top),
                )
            )
            out[pos : pos + width] = value.to_bytes(width, "little")
        elif kind == "vr":  # another valid VR: a text VR where a number belongs, and so on
            starts = [start for _, width, start in length_fields(bytes(out)) if width == 2]
            if not starts:
                continue
            at = draw(st.sampled_from(starts))
            out[at + 4 : at + 6] = draw(st.sampled_from(sorted(_SHORT))).encode()
        elif kind in ("u32", "u16"):
            width = 4 if kind == "u32" else 2
            value = draw(st.sampled_from(_U32_VALUES)) & ((1 << (8 * width)) - 1)
            out[at : at + width] = value.to_bytes(width, "little")
        elif kind == "insert":
            piece = draw(
                st.one_of(
                    st.binary(min_size=1, max_size=16),
                    st.sampled_from(
                        [
                            delimiter(0xFFFEE000, 0xFFFFFFFF),
                            delimiter(0xFFFEE00D),
                            delimiter(0xFFFEE0DD),
                            element(0x00081140, "SQ", None, explicit),
                            element(0x7FE00010, "OB", None, explicit),
                        ]
                    ),
                )
            )
            out[at:at] = piece
        elif kind == "delete":
            del out[at : at + draw(st.integers(1, 64))]
        elif kind == "repeat":
            size = draw(st.integers(1, 64))
            out[at:at] = out[at : at + size] * draw(st.integers(1, 8))
        elif kind == "nest":
            starts = sorted({start for _, _, start in length_fields(bytes(out))}) or [at]
            where = draw(st.sampled_from(starts))
            out[where:where] = _nesting(draw, explicit)
    return bytes(out)


@st.composite
def dicom_files(draw: Callable[..., Any], seeds: tuple[DicomSeed, ...] = DICOM_SEEDS) -> bytes:
    """Part 10 files (or bare data sets): valid seeds, re-framed and mutated, or random bytes."""
    shape = draw(st.sampled_from(["seed", "seed", "seed", "nested", "random", "dicm-random"]))
    if shape == "random":
        return bytes(draw(st.binary(max_size=512)))
    if shape == "dicm-random":
        return bytes(128) + b"DICM" + bytes(draw(st.binary(max_size=512)))
    seed = draw(st.sampled_from(seeds))
    ts = draw(st.one_of(st.just(seed.transfer_syntax), st.sampled_from(TRANSFER_SYNTAXES)))
    preamble = draw(st.sampled_from([seed.preamble, seed.preamble, not seed.preamble]))
    explicit = ts != binary.IMPLICIT_VR_LE
    data = seed.encode(ts, preamble)
    if data[128:132] == b"DICM" and draw(st.integers(0, 9)) == 0:  # the meta group's length
        group_length = draw(st.one_of(st.sampled_from(_U32_VALUES), st.integers(0, 1 << 32 - 1)))
        data = data[:140] + struct.pack("<I", group_length) + data[144:]
    if shape == "nested":  # deep nesting at the top level, before PatientID, then little else
        at = max(data.find(b"\x10\x00\x20\x00"), 0)
        data = data[:at] + _nesting(draw, explicit) + data[at:]
        return mutate(draw, data, explicit, big=False) if draw(st.booleans()) else data
    return mutate(draw, data, explicit)


@st.composite
def encapsulated_values(draw: Callable[..., Any]) -> bytes:
    """Encapsulated Pixel Data values (what follows the Pixel Data header), mutated."""
    fragments = tuple(draw(st.lists(st.binary(max_size=24), max_size=4)))
    return mutate(draw, encapsulated_pixels(fragments), big=False)


# ------------------------------------------------------------------------------------------------
# properties of the three walkers
# ------------------------------------------------------------------------------------------------

#: no walker needs more than milliseconds on these inputs; over this, it is a hang
HANG_S = 5.0
#: off where something else owns SIGALRM (libFuzzer's own -timeout under atheris)
TIME_LIMITS = True


@contextlib.contextmanager
def time_limit(seconds: float = HANG_S) -> Iterator[None]:
    """Raise TimeoutError in the body after ``seconds`` (main thread, POSIX): a hang fails the
    property instead of stalling the run."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"still running after {seconds} s: a hang")

    if not TIME_LIMITS:
        yield
        return

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_parse_header(data: bytes) -> binary.Header | None:
    """``binary._parse`` on the whole file: a header, or NeedsFallback / Truncated / _NeedMore."""
    try:
        with time_limit():
            header = binary.parse_header(data)
    except (binary.NeedsFallback, binary.Truncated):
        return None
    assert header.file_size == len(data)
    if header.pixel_offset >= 0:
        assert header.pixel_offset <= len(data)
        if header.pixel_length >= 0:
            assert header.pixel_offset + header.pixel_length <= len(data)
    else:
        assert header.pixel_length == -1
    return header


def check_read_header(data: bytes, path: Path, first_read: int) -> None:
    """``read_header`` on a file (re-reading when the header is longer than ``first_read``):
    NeedsFallback or Truncated only, and the same header as parsing the whole file at once."""
    path.write_bytes(data)
    try:
        with time_limit():
            header = binary.read_header(str(path), first_read)
    except (binary.NeedsFallback, binary.Truncated):
        return
    whole = check_parse_header(data)
    assert whole is not None, "read_header accepted what parsing the whole file refuses"
    assert header == whole


def check_scan_uids(data: bytes) -> None:
    """``scan_uids``: (study, series) strings, None, or ValueError."""
    try:
        with time_limit():
            found = scan_uids(data)
    except ValueError:
        return
    assert found is None or (isinstance(found[0], str) and isinstance(found[1], str))


def check_fragments(value: bytes) -> None:
    """``pixels._fragments``: the fragments (inside the value), or ValueError."""
    try:
        with time_limit():
            fragments = pixels._fragments(value)
    except ValueError:
        return
    assert sum(len(f) for f in fragments) <= len(value)


def check_read_headers(data: bytes, path: Path) -> None:
    """``read_headers`` (lean reader, pydicom fallback): headers or UnreadableFileError only."""
    path.write_bytes(data)
    try:
        with time_limit():
            headers = read_headers(path)
    except UnreadableFileError:
        return
    assert headers and all(h.path == str(path) for h in headers)


# ------------------------------------------------------------------------------------------------
# the Storage SCP: PDUs
# ------------------------------------------------------------------------------------------------

CALLING, CALLED = "MODALITY", "SHIFTGUARD"
IMPLICIT, EXPLICIT = binary.IMPLICIT_VR_LE, binary.EXPLICIT_VR_LE


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def pdu(kind: int, body: bytes) -> bytes:
    """An upper layer PDU: type, reserved, 32-bit big-endian length, body."""
    return struct.pack(">BBI", kind, 0, len(body)) + body


def associate_rq(
    contexts: tuple[tuple[int, str, tuple[str, ...]], ...] = (
        (1, MR_STORAGE, (EXPLICIT, IMPLICIT)),
        (3, scp.VERIFICATION, (IMPLICIT,)),
    ),
    calling: str = CALLING,
    max_pdu: int = 16384,
    extra_user: bytes = b"",
) -> bytes:
    """A valid A-ASSOCIATE-RQ PDU."""
    body = struct.pack(">HH", 1, 0) + CALLED.ljust(16).encode() + calling.ljust(16).encode()
    body += bytes(32) + _item(0x10, scp.APPLICATION_CONTEXT)
    for context_id, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, s.encode()) for s in syntaxes)
        body += _item(0x20, bytes([context_id, 0, 0, 0]) + sub)
    user = _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, f"{UID_ROOT}.8".encode())
    body += _item(0x50, user + extra_user)
    return pdu(scp.ASSOCIATE_RQ, body)


def p_data(pdvs: list[tuple[int, int, bytes]]) -> bytes:
    """One P-DATA-TF PDU holding (context id, control header, fragment) PDVs."""
    body = b"".join(struct.pack(">IBB", len(f) + 2, c, h) + f for c, h, f in pdvs)
    return pdu(scp.P_DATA, body)


def c_echo_rq(message_id: int) -> bytes:
    return scp.encode_command(
        [
            (0x0002, _ui(scp.VERIFICATION)),
            (0x0100, struct.pack("<H", scp.C_ECHO_RQ)),
            (0x0110, struct.pack("<H", message_id)),
            (0x0800, struct.pack("<H", scp.NO_DATASET)),
        ]
    )


def c_store_rq(message_id: int, sop: str, sop_class: str = MR_STORAGE) -> bytes:
    return scp.encode_command(
        [
            (0x0002, _ui(sop_class)),
            (0x0100, struct.pack("<H", scp.C_STORE_RQ)),
            (0x0110, struct.pack("<H", message_id)),
            (0x0700, struct.pack("<H", 0)),
            (0x0800, struct.pack("<H", 0)),
            (0x1000, _ui(sop)),
        ]
    )


def store_dataset(sop: str, study: str = STUDY_UID, series: str = SERIES_UID) -> bytes:
    """An explicit VR little endian MR data set with the given UIDs (what a C-STORE carries)."""
    return image_dataset(True, uids=(sop, study, series))


def store_pdus(context_id: int, message_id: int, sop: str, fragment: int = 0) -> list[bytes]:
    """The P-DATA PDUs of one C-STORE: the command, then the data set in fragments."""
    dataset = store_dataset(sop)
    out = [p_data([(context_id, 0x03, c_store_rq(message_id, sop))])]
    size = fragment or len(dataset)
    pieces = [dataset[i : i + size] for i in range(0, len(dataset), size)]
    for i, piece in enumerate(pieces):
        out.append(p_data([(context_id, 0x02 if i == len(pieces) - 1 else 0x00, piece)]))
    return out


#: the SOP instance UID of the C-STORE that ``pdu_streams(tail_only=True)`` keeps intact; the
#: socket test swaps its last six digits to tell the associations apart
FIRST_SOP = f"{UID_ROOT}.100000"
RELEASE_RQ = pdu(scp.RELEASE_RQ, bytes(4))
ABORT = pdu(scp.ABORT, bytes(4))


def pdu_length_fields(data: bytes) -> list[tuple[int, int, str]]:
    """(offset, width, byte order) of the length fields of the PDUs in a valid stream."""
    out: list[tuple[int, int, str]] = []
    with contextlib.suppress(struct.error, IndexError):  # a PDU an earlier mutation broke
        _pdu_length_fields(data, out)
    return out


def _pdu_length_fields(data: bytes, out: list[tuple[int, int, str]]) -> None:
    pos = 0
    while pos + 6 <= len(data):
        kind, length = data[pos], struct.unpack_from(">I", data, pos + 2)[0]
        out.append((pos + 2, 4, "big"))
        end = pos + 6 + length
        if kind == scp.ASSOCIATE_RQ:
            item = pos + 6 + 68
            while item + 4 <= end:
                item_kind, item_len = data[item], struct.unpack_from(">H", data, item + 2)[0]
                out.append((item + 2, 2, "big"))
                sub = item + 8 if item_kind == 0x20 else item + 4
                if item_kind in (0x20, 0x50):
                    while sub + 4 <= item + 4 + item_len:
                        out.append((sub + 2, 2, "big"))
                        sub += 4 + struct.unpack_from(">H", data, sub + 2)[0]
                item += 4 + item_len
        elif kind == scp.P_DATA:
            pdv = pos + 6
            while pdv + 6 <= end:
                pdv_len = struct.unpack_from(">I", data, pdv)[0]
                out.append((pdv, 4, "big"))
                if data[pdv + 5] & 0x01:  # a command: its elements' lengths
                    el = pdv + 6
                    while el + 8 <= pdv + 4 + pdv_len:
                        out.append((el + 4, 4, "little"))
                        el += 8 + struct.unpack_from("<I", data, el + 4)[0]
                pdv += 4 + pdv_len
        pos = end


@st.composite
def pdu_streams(draw: Callable[..., Any], tail_only: bool = False) -> list[bytes]:
    """Byte streams a requestor could send, cut into TCP segments: a valid association (echoes,
    stores in fragments, release), then broken with PDU-level and byte-level mutations.

    With ``tail_only`` the association request and the first C-STORE stay intact, so that what
    the mutations break comes after an acknowledged instance.
    """
    contexts = ((1, MR_STORAGE, (EXPLICIT, IMPLICIT)), (3, scp.VERIFICATION, (IMPLICIT,)))
    extra = draw(st.sampled_from([b"", _item(0x53, b"\0\1\0\1"), _item(0x54, b"\0\4" + b"1.2\0" + b"\1\1")]))  # fmt: skip
    pdus = [associate_rq(contexts, max_pdu=draw(st.sampled_from([0, 16384])), extra_user=extra)]
    keep = 1
    if tail_only:
        pdus += store_pdus(1, 1, FIRST_SOP)
        keep = len(pdus)
    for message_id in range(2, 2 + draw(st.integers(0, 3))):
        if draw(st.booleans()):
            pdus.append(p_data([(3, 0x03, c_echo_rq(message_id))]))
        else:
            fragment = draw(st.sampled_from([0, 7, 64, 333]))
            pdus += store_pdus(1, message_id, f"{UID_ROOT}.{message_id}", fragment)
    pdus.append(draw(st.sampled_from([RELEASE_RQ, RELEASE_RQ, ABORT])))
    for _ in range(draw(st.integers(0 if not tail_only else 1, 4))):
        at = draw(st.integers(keep, len(pdus) - 1))
        kind = draw(st.sampled_from(["bytes", "length", "drop", "repeat", "swap", "junk", "utf"]))
        if kind == "bytes":
            pdus[at] = mutate(draw, pdus[at], big=False)
        elif kind == "length":
            fields = pdu_length_fields(pdus[at])
            if fields:
                pos, width, order = draw(st.sampled_from(fields))
                top = (1 << (8 * width)) - 1
                value = draw(st.one_of(st.sampled_from([v & top for v in _U32_VALUES]), st.integers(0, top)))  # fmt: skip
                raw = bytearray(pdus[at])
                raw[pos : pos + width] = value.to_bytes(width, order)  # type: ignore[arg-type]
                pdus[at] = bytes(raw)
        elif kind == "drop" and len(pdus) > keep + 1:
            del pdus[at]
        elif kind == "repeat":
            pdus.insert(at, pdus[at])
        elif kind == "swap" and at + 1 < len(pdus):
            pdus[at], pdus[at + 1] = pdus[at + 1], pdus[at]
        elif kind == "junk":
            junk_kind = draw(st.integers(0, 255))
            body = draw(st.binary(max_size=64))
            pdus.insert(at, struct.pack(">BBI", junk_kind, 0, len(body)) + body)
        elif kind == "utf":  # a byte >= 0x80 inside one of the UIDs (or AE titles) of a PDU
            raw = bytearray(pdus[at])
            spots = [i for i in range(len(raw)) if raw[i] in b"0123456789.MOS"]
            if spots:
                raw[draw(st.sampled_from(spots))] = draw(st.integers(0x80, 0xFF))
                pdus[at] = bytes(raw)
    stream = b"".join(pdus)
    cuts = sorted(set(draw(st.lists(st.integers(0, len(stream)), max_size=6))))
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def read_pdus(data: bytes) -> list[tuple[int, bytes]]:
    """Split what the SCP wrote into (type, body); asserts every PDU is whole and of a type an
    acceptor sends."""
    out = []
    pos = 0
    while pos < len(data):
        assert pos + 6 <= len(data), f"a truncated PDU header at byte {pos}"
        kind, length = data[pos], struct.unpack_from(">I", data, pos + 2)[0]
        assert kind in (scp.ASSOCIATE_AC, scp.ASSOCIATE_RJ, scp.P_DATA, scp.RELEASE_RP, scp.ABORT)
        assert pos + 6 + length <= len(data), f"PDU type {kind} overruns what was written"
        out.append((kind, data[pos + 6 : pos + 6 + length]))
        pos += 6 + length
    return out


def pdu_types(stream: bytes) -> list[int]:
    """The types of the PDUs a stream holds, read at PDU boundaries as an acceptor reads them."""
    out, pos = [], 0
    while pos + 6 <= len(stream):
        out.append(stream[pos])
        pos += 6 + struct.unpack_from(">I", stream, pos + 2)[0]
    return out


class FakeTransport(asyncio.Transport):
    """Records what the connection writes and whether (and how) it closed."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False
        self.aborted = False
        self.writes_after_close = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing:
            self.writes_after_close += 1
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000)}.get(name, default)


@dataclass
class ScpOutcome:
    """What one connection did with one stream."""

    pdus: list[tuple[int, bytes]]
    closed: bool
    stored: list[str] = field(default_factory=list)
    stored_after_close: int = 0
    ended: list[str] = field(default_factory=list)


class _Errors(logging.Handler):
    """Collects the SCP's ERROR records: an exception it caught to keep serving is still a bug."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class ConnectionHarness:
    """Drives :class:`shiftguard.edge.scp._Connection` in-process, without sockets: the fast way
    to push thousands of streams through the PDU parser and the association state machine."""

    def __init__(self) -> None:
        self.errors = _Errors()
        logging.getLogger(scp.__name__).addHandler(self.errors)
        self.loop = asyncio.new_event_loop()
        self.transport: FakeTransport | None = None
        self.outcome: ScpOutcome | None = None
        self.acceptor = scp.Acceptor(
            "127.0.0.1", 0, CALLED,
            {MR_STORAGE, scp.VERIFICATION}, {IMPLICIT, EXPLICIT},
            accept=lambda calling, _address: None if calling == CALLING else 3,
            store=self._store, released=self._ended("released"), aborted=self._ended("aborted"),
        )  # fmt: skip

    def _store(self, assoc: scp.Association, sop_class: str, sop: str, data: bytes) -> tuple[int, str]:  # fmt: skip
        assert self.outcome is not None and self.transport is not None
        self.outcome.stored.append(sop)
        if self.transport.closing:
            self.outcome.stored_after_close += 1
        if not data.startswith(bytes(128) + b"DICM"):
            return 0xC210, "not Part 10"
        return 0x0000, ""

    def _ended(self, how: str) -> Callable[[scp.Association], None]:
        def ended(assoc: scp.Association) -> None:
            assert self.outcome is not None
            self.outcome.ended.append(how)

        return ended

    def close(self) -> None:
        logging.getLogger(scp.__name__).removeHandler(self.errors)
        self.loop.close()

    def run(self, chunks: list[bytes]) -> ScpOutcome:
        return self.loop.run_until_complete(self._drive(chunks))

    async def _drive(self, chunks: list[bytes]) -> ScpOutcome:
        transport = self.transport = FakeTransport()
        self.outcome = outcome = ScpOutcome([], False)
        self.errors.records.clear()
        connection = scp._Connection(self.acceptor)
        connection.connection_made(transport)
        for chunk in chunks:
            if transport.closing:  # asyncio stops reading once the transport is closing
                break
            connection.data_received(chunk)
        connection.connection_lost(None)
        outcome.pdus = read_pdus(bytes(transport.written))
        outcome.closed = transport.closing
        assert transport.writes_after_close == 0, "wrote after closing the transport"
        for record in self.errors.records:  # caught to keep serving, but a bug all the same
            raise AssertionError(record.getMessage()) from (record.exc_info or (None, None))[1]
        return outcome


def check_connection(harness: ConnectionHarness, chunks: list[bytes]) -> ScpOutcome:
    """The SCP's connection on one stream: no exception escapes ``data_received``, what it writes
    is well formed, nothing is stored once it decided to close, and an association it closes
    ends with an answer (A-ASSOCIATE-RJ, A-RELEASE-RP or A-ABORT) unless the peer aborted."""
    outcome = harness.run(chunks)
    assert outcome.stored_after_close == 0, "stored an instance after deciding to close"
    assert len(outcome.ended) <= 1, "an association ended twice"
    if outcome.closed and outcome.pdus:
        peer_aborted = scp.ABORT in pdu_types(b"".join(chunks))
        assert outcome.pdus[-1][0] in (scp.ASSOCIATE_RJ, scp.RELEASE_RP, scp.ABORT) or peer_aborted
    return outcome


# ------------------------------------------------------------------------------------------------
# the campaign's table of targets
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One fuzz target: a strategy and a property taking what it draws."""

    name: str
    strategy: st.SearchStrategy[Any]
    check: Callable[[Any], object]


def walker_targets(scratch: Path) -> list[Target]:
    """The byte walkers (``scratch``: a folder for the file-based ones)."""
    seeds = (*DICOM_SEEDS, pydicom_seed())
    files = dicom_files(seeds)
    header_file, headers_file = scratch / "header.dcm", scratch / "headers.dcm"
    return [
        Target("dicom.binary.parse_header", files, check_parse_header),
        Target(
            "dicom.binary.read_header",
            st.tuples(files, st.integers(132, 2048)),
            lambda args: check_read_header(args[0], header_file, args[1]),
        ),
        Target("edge.receiver.scan_uids", files, check_scan_uids),
        Target("dicom.pixels._fragments", encapsulated_values(), check_fragments),
        Target(
            "dicom.scan.read_headers",
            files,
            lambda data: check_read_headers(data, headers_file),
        ),
    ]


def scp_targets(harness: ConnectionHarness) -> list[Target]:
    """The SCP's PDU parsing and state machine, in-process."""
    return [
        Target("edge.scp._Connection", pdu_streams(), lambda c: check_connection(harness, c)),
        Target(
            "edge.scp._Connection (after a stored instance)",
            pdu_streams(tail_only=True),
            lambda c: check_connection(harness, c),
        ),
        Target(
            "edge.scp.AssociateRequest.decode",
            st.builds(lambda b: b[6:], pdu_streams().map(b"".join)),
            check_associate_decode,
        ),
        Target("edge.scp.parse_command", commands(), check_parse_command),
    ]


def check_associate_decode(body: bytes) -> None:
    """``AssociateRequest.decode``: a request or ProtocolError, and the answer to it encodes."""
    try:
        request = scp.AssociateRequest.decode(body)
    except scp.ProtocolError:
        return
    results = [(cid, 0, syntaxes[0] if syntaxes else IMPLICIT) for cid, _, syntaxes in request.contexts]  # fmt: skip
    scp.associate_ac(request, results, 0)


@st.composite
def commands(draw: Callable[..., Any]) -> bytes:
    """DIMSE command sets (C-ECHO-RQ, C-STORE-RQ), mutated."""
    raw = draw(st.sampled_from([c_echo_rq(1), c_store_rq(2, SOP_UID)]))
    return mutate(draw, raw, big=False)


def check_parse_command(data: bytes) -> None:
    """``parse_command``: {element: value} covering the bytes exactly, or ProtocolError."""
    try:
        command = scp.parse_command(data)
    except scp.ProtocolError:
        return
    assert sum(8 + len(v) for v in command.values()) <= len(data)
