"""A lean reader of DICOM Part 10 headers: one read of the file, no pydicom ``Dataset``.

It walks the top-level data elements of little-endian files (explicit or implicit VR), keeps the raw
bytes of the few tags ingest needs, skips everything else (sequences of defined or undefined length
included) and stops at *Pixel Data*, whose value offset and length it records so the pixel pass can
read native pixels with one ``readinto`` and no re-parsing.

Anything it does not handle (big endian, deflate, invalid VRs, multi-frame functional groups, malformed
items) raises :class:`NeedsFallback` and :mod:`shiftguard.dicom.scan` reads the file with pydicom
instead, so the two paths must agree: ``tests/unit/dicom/test_scan.py`` compares them on pydicom's
bundled files.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

PIXEL_DATA = 0x7FE00010
FLOAT_PIXEL_DATA = 0x7FE00008
DOUBLE_PIXEL_DATA = 0x7FE00009
TS_TAG = 0x00020010
MEDIA_SOP_CLASS_TAG = 0x00020002
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
#: Sequences nested deeper than this are left to pydicom. Real objects nest a few levels; each level
#: costs two Python frames here, so a crafted file could otherwise exhaust the stack.
MAX_NESTING = 64

#: VRs whose explicit-VR header has 2 reserved bytes and a 32-bit length.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_SHORT_VRS = frozenset(
    {
        b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
        b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
    }
)  # fmt: skip
_VALID_VRS = _LONG_VRS | _SHORT_VRS

#: The tags ingest reads, with their dictionary VR (needed for implicit VR files).
WANTED: dict[int, str] = {
    0x00020002: "UI",  # MediaStorageSOPClassUID
    0x00020010: "UI",  # TransferSyntaxUID
    0x00080005: "CS",  # SpecificCharacterSet
    0x00080008: "CS",  # ImageType
    0x00080016: "UI",  # SOPClassUID
    0x00080018: "UI",  # SOPInstanceUID
    0x00080020: "DA",  # StudyDate
    0x00080022: "DA",  # AcquisitionDate
    0x00080030: "TM",  # StudyTime
    0x00080032: "TM",  # AcquisitionTime
    0x00080050: "SH",  # AccessionNumber
    0x00080060: "CS",  # Modality
    0x00080070: "LO",  # Manufacturer
    0x00080080: "LO",  # InstitutionName
    0x00081010: "SH",  # StationName
    0x0008103E: "LO",  # SeriesDescription
    0x00081090: "LO",  # ManufacturerModelName
    0x00100020: "LO",  # PatientID
    0x00100030: "DA",  # PatientBirthDate
    0x00100040: "CS",  # PatientSex
    0x00101010: "AS",  # PatientAge
    0x00180024: "SH",  # SequenceName
    0x00180050: "DS",  # SliceThickness
    0x00180080: "DS",  # RepetitionTime
    0x00180081: "DS",  # EchoTime
    0x00180082: "DS",  # InversionTime
    0x00180086: "IS",  # EchoNumbers
    0x00180087: "DS",  # MagneticFieldStrength
    0x00180088: "DS",  # SpacingBetweenSlices
    0x00181020: "LO",  # SoftwareVersions
    0x00181314: "DS",  # FlipAngle
    0x0020000D: "UI",  # StudyInstanceUID
    0x0020000E: "UI",  # SeriesInstanceUID
    0x00200011: "IS",  # SeriesNumber
    0x00200012: "IS",  # AcquisitionNumber
    0x00200013: "IS",  # InstanceNumber
    0x00200032: "DS",  # ImagePositionPatient
    0x00200037: "DS",  # ImageOrientationPatient
    0x00200052: "UI",  # FrameOfReferenceUID
    0x00280002: "US",  # SamplesPerPixel
    0x00280004: "CS",  # PhotometricInterpretation
    0x00280006: "US",  # PlanarConfiguration
    0x00280008: "IS",  # NumberOfFrames
    0x00280010: "US",  # Rows
    0x00280011: "US",  # Columns
    0x00280030: "DS",  # PixelSpacing
    0x00280100: "US",  # BitsAllocated
    0x00280101: "US",  # BitsStored
    0x00280102: "US",  # HighBit
    0x00280103: "US",  # PixelRepresentation
    0x00281052: "DS",  # RescaleIntercept
    0x00281053: "DS",  # RescaleSlope
    0x00289110: "SQ",  # PixelMeasuresSequence (only its presence matters here)
    0x52009229: "SQ",  # SharedFunctionalGroupsSequence (presence)
    0x52009230: "SQ",  # PerFrameFunctionalGroupsSequence (presence)
}

_HEAD = struct.Struct("<HH2sH")
_TAG_LEN = struct.Struct("<HHI")
_U32 = struct.Struct("<I")


class NeedsFallback(Exception):  # noqa: N818 - a signal, not an error a user sees
    """The lean reader does not handle this file; read it with pydicom."""


class Truncated(Exception):  # noqa: N818 - turned into UnreadableFileError by the caller
    """The file ends inside a data element."""


class _NeedMore(Exception):  # noqa: N818
    """The buffer ends before the header does: read more of the file and parse again."""


@dataclass(slots=True)
class LeanHeader:
    """What the lean reader found in one file.

    Attributes:
        elements: Tag -> (VR as found, or ``b""`` for implicit VR; raw value bytes) for WANTED tags.
        explicit: Whether the data set is explicit VR.
        has_preamble: Whether the file has the 128-byte preamble and ``DICM`` magic.
        has_meta: Whether the file has a File Meta group (0002,xxxx).
        pixel_offset: Byte offset of the Pixel Data value in the file, -1 when there is none.
        pixel_length: Length of the Pixel Data value, -1 when undefined (encapsulated).
        file_size: Size of the file in bytes.
    """

    elements: dict[int, tuple[bytes, bytes]]
    explicit: bool
    has_preamble: bool
    has_meta: bool
    pixel_offset: int
    pixel_length: int
    file_size: int


def read_lean(path: str, first_read: int = 65536) -> LeanHeader:
    """Parse the header of one file.

    Args:
        path: The file.
        first_read: How many bytes to read first; the rest is read only when the header is longer.

    Returns:
        The elements found and where Pixel Data starts.

    Raises:
        NeedsFallback: The file needs pydicom (big endian, deflate, unusual encoding, multi-frame).
        Truncated: The file ends inside a data element.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        data = os.read(fd, first_read)
        size = len(data) if len(data) < first_read else os.fstat(fd).st_size
        while True:
            try:
                return _parse(data, size)
            except _NeedMore:
                if len(data) >= size:
                    raise Truncated from None
                more = os.read(fd, max(len(data), 1 << 16))
                if not more:
                    raise Truncated from None
                data += more
    finally:
        os.close(fd)


def _parse(data: bytes, size: int) -> LeanHeader:
    n = len(data)
    elements: dict[int, tuple[bytes, bytes]] = {}
    has_preamble = n >= 132 and data[128:132] == b"DICM"
    pos = 132 if has_preamble else 0
    has_meta = n >= pos + 6 and data[pos : pos + 2] == b"\x02\x00"
    if has_meta and data[pos + 4 : pos + 6] not in _VALID_VRS:
        raise NeedsFallback("file meta group is not explicit VR little endian")
    if not has_preamble and not has_meta:
        # No preamble, no meta: accept only what looks like a little-endian data set starting at a
        # plausible group; pydicom's force=True read decides about everything else.
        if n < 8:
            raise NeedsFallback("too short")
        group = data[0] | data[1] << 8
        if group not in (0x0008, 0x0010, 0x0018, 0x0020, 0x0028):
            raise NeedsFallback("does not start with a little-endian data element")
    # File meta group: always explicit VR little endian.
    while has_meta and pos + 8 <= n and data[pos : pos + 2] == b"\x02\x00":
        group, elem, vr, length = _HEAD.unpack_from(data, pos)
        if vr in _LONG_VRS:
            if pos + 12 > n:
                raise _NeedMore
            length = _U32.unpack_from(data, pos + 8)[0]
            vpos = pos + 12
        elif vr in _VALID_VRS:
            vpos = pos + 8
        else:
            raise NeedsFallback("invalid VR in file meta")
        if length == _UNDEFINED:
            raise NeedsFallback("undefined length in file meta")
        end = vpos + length
        if end > n:
            raise _NeedMore
        elements[group << 16 | elem] = (vr, data[vpos:end])
        pos = end
    sop_raw = elements.get(MEDIA_SOP_CLASS_TAG)
    if sop_raw and sop_raw[1].rstrip(b"\x00 ") == MEDIA_STORAGE_DIRECTORY.encode():
        # A DICOMDIR: the caller records it as an index file; its records are not needed.
        return LeanHeader(elements, True, has_preamble, has_meta, -1, -1, size)
    ts_raw = elements.get(TS_TAG)
    ts = ts_raw[1].rstrip(b"\x00 ").decode("ascii", "replace") if ts_raw else ""
    if ts == IMPLICIT_VR_LE:
        explicit = False
    elif ts in (EXPLICIT_VR_BE, DEFLATED_LE):
        raise NeedsFallback(f"transfer syntax {ts}")
    elif ts:
        explicit = True
    else:
        # Missing transfer syntax: guess from the first element, as pydicom does.
        if pos + 6 > n:
            raise _NeedMore
        if data[pos] == 0 and data[pos + 1] != 0:
            raise NeedsFallback("looks big endian")
        explicit = data[pos + 4 : pos + 6] in _VALID_VRS

    walk = _walk_explicit if explicit else _walk_implicit
    pixel_offset, pixel_length = walk(data, pos, size, elements)
    return LeanHeader(
        elements=elements,
        explicit=explicit,
        has_preamble=has_preamble,
        has_meta=has_meta,
        pixel_offset=pixel_offset,
        pixel_length=pixel_length,
        file_size=size,
    )


def _swap(tag: int) -> int:
    """``(group << 16 | element)`` -> the little-endian uint32 of the tag bytes."""
    return (tag >> 16) | ((tag & 0xFFFF) << 16)


#: Keys of the hot loops: tags as the uint32 their 4 bytes read as (element << 16 | group).
_WANTED_SWAPPED = {_swap(tag): tag for tag in WANTED}
_PIXEL_SWAPPED = _swap(PIXEL_DATA)
_SPECIAL_SWAPPED = frozenset(
    _swap(t) for t in (PIXEL_DATA, FLOAT_PIXEL_DATA, DOUBLE_PIXEL_DATA, _ITEM, _ITEM_END, _SEQ_END)
)
_TAG32_VR_LEN = struct.Struct("<I2sH")
_TAG32_LEN = struct.Struct("<II")


def _pixel_found(vpos: int, length: int, size: int) -> tuple[int, int]:
    pixel_length = -1 if length == _UNDEFINED else length
    if pixel_length >= 0 and vpos + pixel_length > size:
        raise Truncated
    return vpos, pixel_length


def _walk_explicit(
    data: bytes, pos: int, size: int, elements: dict[int, tuple[bytes, bytes]]
) -> tuple[int, int]:
    """Walk top-level explicit VR elements from ``pos``; returns Pixel Data's (offset, length).

    The hot loop of ingest's header scan: one iteration per element, constants bound to locals,
    rare cases (Pixel Data, undefined lengths) tested last.
    """
    n = len(data)
    head = _TAG32_VR_LEN.unpack_from
    u32 = _U32.unpack_from
    short_vrs, long_vrs = _SHORT_VRS, _LONG_VRS
    wanted = _WANTED_SWAPPED
    special = _SPECIAL_SWAPPED
    undefined = _UNDEFINED
    while pos + 8 <= n:
        t32, vr, length = head(data, pos)
        if vr in short_vrs:
            vpos = pos + 8
        elif vr in long_vrs:
            if pos + 12 > n:
                raise _NeedMore
            length = u32(data, pos + 8)[0]
            vpos = pos + 12
        else:
            raise NeedsFallback(f"invalid VR {vr!r} in tag {_swap(t32):08X}")
        if t32 in special:
            if t32 == _PIXEL_SWAPPED:
                return _pixel_found(vpos, length, size)
            raise NeedsFallback(f"unexpected element {_swap(t32):08X}")
        if length == undefined:
            tag = wanted.get(t32)
            if tag is not None:
                elements[tag] = (vr, b"")
            pos = _skip_undefined_sequence(data, vpos, vr != b"UN")
            continue
        pos = vpos + length
        tag = wanted.get(t32)
        if tag is not None:
            if pos > n:
                raise _NeedMore
            elements[tag] = (vr, data[vpos:pos])
    if n < size or pos > n:
        raise _NeedMore
    return -1, -1


def _walk_implicit(
    data: bytes, pos: int, size: int, elements: dict[int, tuple[bytes, bytes]]
) -> tuple[int, int]:
    """Like :func:`_walk_explicit` for implicit VR little endian (VR from the dictionary)."""
    n = len(data)
    head = _TAG32_LEN.unpack_from
    wanted = _WANTED_SWAPPED
    special = _SPECIAL_SWAPPED
    undefined = _UNDEFINED
    while pos + 8 <= n:
        t32, length = head(data, pos)
        vpos = pos + 8
        if t32 in special:
            if t32 == _PIXEL_SWAPPED:
                return _pixel_found(vpos, length, size)
            raise NeedsFallback(f"unexpected element {_swap(t32):08X}")
        if length == undefined:
            tag = wanted.get(t32)
            if tag is not None:
                elements[tag] = (b"", b"")
            pos = _skip_undefined_sequence(data, vpos, False)
            continue
        pos = vpos + length
        tag = wanted.get(t32)
        if tag is not None:
            if pos > n:
                raise _NeedMore
            elements[tag] = (b"", data[vpos:pos])
    if n < size or pos > n:
        raise _NeedMore
    return -1, -1


def _skip_undefined_sequence(data: bytes, pos: int, explicit: bool, depth: int = 1) -> int:
    """Return the offset just past the sequence delimiter of a sequence starting at ``pos``.

    ``depth`` is the sequence's nesting level; past :data:`MAX_NESTING` the file needs pydicom.
    """
    if depth > MAX_NESTING:
        raise NeedsFallback(f"sequences nested deeper than {MAX_NESTING} levels")
    n = len(data)
    while True:
        if pos + 8 > n:
            raise _NeedMore
        group, elem, length = _TAG_LEN.unpack_from(data, pos)
        tag = group << 16 | elem
        if tag == _SEQ_END:
            return pos + 8
        if tag != _ITEM:
            raise NeedsFallback(f"({group:04X},{elem:04X}) inside a sequence where an item belongs")
        if length == _UNDEFINED:
            pos = _skip_undefined_item(data, pos + 8, explicit, depth)
        else:
            pos += 8 + length


def _skip_undefined_item(data: bytes, pos: int, explicit: bool, depth: int = 1) -> int:
    """Return the offset just past the item delimiter of an item whose content starts at ``pos``."""
    n = len(data)
    while True:
        if pos + 8 > n:
            raise _NeedMore
        if explicit:
            group, elem, vr, length = _HEAD.unpack_from(data, pos)
            if group == 0xFFFE:
                length = _U32.unpack_from(data, pos + 4)[0]
                vpos = pos + 8
            elif vr in _LONG_VRS:
                if pos + 12 > n:
                    raise _NeedMore
                length = _U32.unpack_from(data, pos + 8)[0]
                vpos = pos + 12
            elif vr in _VALID_VRS:
                vpos = pos + 8
            else:
                raise NeedsFallback(f"invalid VR {vr!r} in ({group:04X},{elem:04X}) in a sequence")
        else:
            group, elem, length = _TAG_LEN.unpack_from(data, pos)
            vr = b""
            vpos = pos + 8
        tag = group << 16 | elem
        if tag == _ITEM_END:
            return pos + 8
        if length == _UNDEFINED:
            pos = _skip_undefined_sequence(data, vpos, explicit and vr != b"UN", depth + 1)
        else:
            pos = vpos + length
