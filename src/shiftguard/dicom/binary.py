"""The DICOM binary layer: one tag table and one element walker for every header ShiftGuard reads.

* The tag table (:data:`KEYWORDS`, :data:`TAGS`, :data:`WANTED`) names the header fields ingest, the
  edge and the monitor read; tags and VRs come from pydicom's data dictionary, so a new field is one
  keyword here.
* The walker reads Part 10 files (or in-memory objects) of little-endian transfer syntaxes, explicit
  or implicit VR: it parses the file meta group, walks the top-level data elements, keeps the raw
  bytes of the wanted tags, skips everything else (sequences of defined or undefined length included)
  and stops at *Pixel Data*, whose value offset and length it records so the pixel pass can read
  native pixels with one ``readinto`` and no re-parsing; or, asked to, as soon as every wanted tag is
  found (the receive path's study and series UIDs).
* :func:`explicit_element` encodes one explicit VR little-endian element (the SCP's file meta).

Users: :mod:`shiftguard.dicom.scan` (ingest's header scan), :mod:`shiftguard.dicom.pixels` (native
pixel reads), :mod:`shiftguard.edge.receiver` (UIDs and file meta identity of received instances) and
:mod:`shiftguard.edge.scp` (file meta of stored instances).

Anything the walker does not handle (big endian, deflate, invalid VRs, malformed items, sequences
nested past :data:`MAX_NESTING`) raises :class:`NeedsFallback` and the caller reads the object with
pydicom instead, so the two paths must agree: ``tests/unit/dicom/test_binary.py`` and
``tests/unit/dicom/test_scan.py`` compare them on every file pydicom ships.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

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
MEDIA_SOP_INSTANCE_TAG = 0x00020003
SOURCE_AE_TAG = 0x00020016
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
#: Sequences nested deeper than this are left to pydicom. Real objects nest a few levels; each level
#: costs two Python frames here, so a crafted file could otherwise exhaust the stack.
MAX_NESTING = 64

#: VRs whose explicit-VR header has 2 reserved bytes and a 32-bit length.
LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
SHORT_VRS = frozenset(
    {
        b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
        b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
    }
)  # fmt: skip
VALID_VRS = LONG_VRS | SHORT_VRS

#: The header fields ShiftGuard reads, by DICOM keyword. Sequences are read for their presence only.
KEYWORDS: tuple[str, ...] = (
    "MediaStorageSOPClassUID", "TransferSyntaxUID", "SpecificCharacterSet", "ImageType",
    "SOPClassUID", "SOPInstanceUID", "StudyDate", "AcquisitionDate", "StudyTime",
    "AcquisitionTime", "AccessionNumber", "Modality", "Manufacturer", "InstitutionName",
    "StationName", "SeriesDescription", "ManufacturerModelName", "PatientID", "PatientBirthDate",
    "PatientSex", "PatientAge", "SequenceName", "SliceThickness", "RepetitionTime", "EchoTime",
    "InversionTime", "EchoNumbers", "MagneticFieldStrength", "SpacingBetweenSlices",
    "SoftwareVersions", "FlipAngle", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber",
    "AcquisitionNumber", "InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient",
    "FrameOfReferenceUID", "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration",
    "NumberOfFrames", "Rows", "Columns", "PixelSpacing", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "RescaleIntercept", "RescaleSlope", "PixelMeasuresSequence",
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
)  # fmt: skip


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:  # a typo in KEYWORDS: fail at import, not on the first file
        raise KeyError(f"{keyword!r} is not a keyword of pydicom's data dictionary")
    return int(tag)


#: Keyword -> tag (``group << 16 | element``), from pydicom's data dictionary.
TAGS: dict[str, int] = {keyword: _tag(keyword) for keyword in KEYWORDS}

#: Tag -> dictionary VR of every field in :data:`KEYWORDS` (implicit VR files need it).
WANTED: dict[int, str] = {tag: dictionary_VR(tag) for tag in TAGS.values()}


def tag_name(tag: int) -> str:
    """``"Rows (0028,0010)"``: the keyword from pydicom's dictionary and the tag, or the tag alone."""
    keyword = keyword_for_tag(tag)
    code = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    return f"{keyword} {code}" if keyword else code


def explicit_element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One data element encoded explicit VR little endian (``value`` already padded to even)."""
    if vr in LONG_VRS:
        return struct.pack("<HH2s2xI", tag >> 16, tag & 0xFFFF, vr, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


_HEAD = struct.Struct("<HH2sH")
_TAG_LEN = struct.Struct("<HHI")
_U32 = struct.Struct("<I")


class NeedsFallback(Exception):  # noqa: N818 - a signal, not an error a user sees
    """The walker does not handle this file; read it with pydicom."""


class Truncated(Exception):  # noqa: N818 - turned into UnreadableFileError by the caller
    """The file ends inside a data element."""


class _NeedMore(Exception):  # noqa: N818
    """The buffer ends before the header does: read more of the file and parse again."""


def _swap(tag: int) -> int:
    """``(group << 16 | element)`` -> the little-endian uint32 of the tag bytes."""
    return (tag >> 16) | ((tag & 0xFFFF) << 16)


class Fields:
    """A set of tags for the walker to keep, prepared once (keys as the hot loops read them).

    Args:
        tags: The tags to keep (meta group tags are always kept).
        stop_when_found: Stop walking as soon as every tag was found, rather than at *Pixel Data*.
    """

    __slots__ = ("stop_after", "swapped", "tags")

    def __init__(self, tags: Iterable[int], stop_when_found: bool = False) -> None:
        self.tags = frozenset(tags)
        #: the tags as the uint32 their 4 bytes read as (element << 16 | group) -> tag
        self.swapped = {_swap(tag): tag for tag in self.tags}
        #: how many found tags end the walk; 0: walk to Pixel Data
        self.stop_after = len(self.tags) if stop_when_found else 0


#: Every field of the tag table, walked to *Pixel Data* (ingest's scan).
HEADER_FIELDS = Fields(WANTED)


@dataclass(slots=True)
class Header:
    """What the walker found in one object.

    Attributes:
        elements: Tag -> (VR as found, or ``b""`` for implicit VR; raw value bytes) for the wanted
            tags and every file meta element.
        explicit: Whether the data set is explicit VR.
        has_preamble: Whether the file has the 128-byte preamble and ``DICM`` magic.
        has_meta: Whether the file has a File Meta group (0002,xxxx).
        pixel_offset: Byte offset of the Pixel Data value in the file, -1 when there is none (or the
            walk stopped once the wanted tags were found).
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

    def text(self, tag: int) -> str | None:
        """A found element's value as ASCII text without padding; None when it was not found."""
        item = self.elements.get(tag)
        return None if item is None else item[1].decode("ascii", "replace").strip("\x00 ")


def read_header(path: str, first_read: int = 65536, fields: Fields = HEADER_FIELDS) -> Header:
    """Parse the header of one file.

    Args:
        path: The file.
        first_read: How many bytes to read first; the rest is read only when the header is longer.
        fields: The tags to keep.

    Returns:
        The elements found and where Pixel Data starts.

    Raises:
        NeedsFallback: The file needs pydicom (big endian, deflate, unusual encoding).
        Truncated: The file ends inside a data element.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        data = os.read(fd, first_read)
        size = len(data) if len(data) < first_read else os.fstat(fd).st_size
        while True:
            try:
                return _parse(data, size, fields)
            except _NeedMore:
                if len(data) >= size:
                    raise Truncated from None
                more = os.read(fd, max(len(data), 1 << 16))
                if not more:
                    raise Truncated from None
                data += more
    finally:
        os.close(fd)


def parse_header(data: bytes, fields: Fields = HEADER_FIELDS) -> Header:
    """:func:`read_header` on an object already in memory (a received instance).

    Raises:
        NeedsFallback: The object needs pydicom.
        Truncated: The object ends inside a data element.
    """
    try:
        return _parse(data, len(data), fields)
    except _NeedMore:
        raise Truncated from None


def parse_meta(data: bytes) -> dict[int, tuple[bytes, bytes]]:
    """The file meta group of a Part 10 object (always explicit VR little endian), whatever the
    transfer syntax of its data set.

    Raises:
        NeedsFallback: No Part 10 preamble and meta group, or a malformed one.
        Truncated: The object ends inside the meta group.
    """
    if len(data) < 132 or data[128:132] != b"DICM":
        raise NeedsFallback("no Part 10 preamble")
    try:
        elements, _ = _parse_meta(data, 132)
    except _NeedMore:
        raise Truncated from None
    if not elements:
        raise NeedsFallback("no file meta group")
    return elements


def _parse_meta(data: bytes, pos: int) -> tuple[dict[int, tuple[bytes, bytes]], int]:
    """Elements of the file meta group starting at ``pos`` and the offset after it."""
    n = len(data)
    elements: dict[int, tuple[bytes, bytes]] = {}
    if (
        n >= pos + 6
        and data[pos : pos + 2] == b"\x02\x00"
        and data[pos + 4 : pos + 6] not in VALID_VRS
    ):
        raise NeedsFallback("file meta group is not explicit VR little endian")
    while pos + 8 <= n and data[pos : pos + 2] == b"\x02\x00":
        group, elem, vr, length, vpos = _explicit_header(data, pos, n)
        if vpos < 0:
            raise NeedsFallback("invalid VR in file meta")
        if length == _UNDEFINED:
            raise NeedsFallback("undefined length in file meta")
        end = vpos + length
        if end > n:
            raise _NeedMore
        elements[group << 16 | elem] = (vr, data[vpos:end])
        pos = end
    return elements, pos


def _parse(data: bytes, size: int, fields: Fields) -> Header:
    n = len(data)
    has_preamble = n >= 132 and data[128:132] == b"DICM"
    pos = 132 if has_preamble else 0
    has_meta = n >= pos + 6 and data[pos : pos + 2] == b"\x02\x00"
    if not has_preamble and not has_meta:
        # No preamble, no meta: accept only what looks like a little-endian data set starting at a
        # plausible group; pydicom's force=True read decides about everything else.
        if n < 8:
            raise NeedsFallback("too short")
        group = data[0] | data[1] << 8
        if group not in (0x0008, 0x0010, 0x0018, 0x0020, 0x0028):
            raise NeedsFallback("does not start with a little-endian data element")
    elements, pos = _parse_meta(data, pos)
    sop_raw = elements.get(MEDIA_SOP_CLASS_TAG)
    if sop_raw and sop_raw[1].rstrip(b"\x00 ") == MEDIA_STORAGE_DIRECTORY.encode():
        # A DICOMDIR: the caller records it as an index file; its records are not needed.
        return Header(elements, True, has_preamble, has_meta, -1, -1, size)
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
        explicit = data[pos + 4 : pos + 6] in VALID_VRS

    walk = _walk_explicit if explicit else _walk_implicit
    pixel_offset, pixel_length = walk(data, pos, size, elements, fields)
    return Header(
        elements=elements,
        explicit=explicit,
        has_preamble=has_preamble,
        has_meta=has_meta,
        pixel_offset=pixel_offset,
        pixel_length=pixel_length,
        file_size=size,
    )


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
    data: bytes,
    pos: int,
    size: int,
    elements: dict[int, tuple[bytes, bytes]],
    fields: Fields,
) -> tuple[int, int]:
    """Walk top-level explicit VR elements from ``pos``; returns Pixel Data's (offset, length).

    The hot loop of ingest's header scan and of the receive path: one iteration per element,
    constants bound to locals, rare cases (Pixel Data, undefined lengths, wanted tags) tested last.
    It and :func:`_walk_implicit` are kept apart on purpose: one loop testing the VR encoding per
    element parsed a header about 7 % slower.
    """
    n = len(data)
    head = _TAG32_VR_LEN.unpack_from
    u32 = _U32.unpack_from
    short_vrs, long_vrs = SHORT_VRS, LONG_VRS
    wanted = fields.swapped
    stop_after, found = fields.stop_after, 0
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
        tag = wanted.get(t32)
        if length == undefined:
            pos = _skip_undefined_sequence(data, vpos, vr != b"UN")
            if tag is not None:
                elements[tag] = (vr, b"")
                found += 1
                if found == stop_after:
                    return -1, -1
            continue
        pos = vpos + length
        if tag is not None:
            if pos > n:
                raise _NeedMore
            elements[tag] = (vr, data[vpos:pos])
            found += 1
            if found == stop_after:
                return -1, -1
    if n < size or pos > n:
        raise _NeedMore
    return -1, -1


def _walk_implicit(
    data: bytes,
    pos: int,
    size: int,
    elements: dict[int, tuple[bytes, bytes]],
    fields: Fields,
) -> tuple[int, int]:
    """Like :func:`_walk_explicit` for implicit VR little endian (VR from the dictionary)."""
    n = len(data)
    head = _TAG32_LEN.unpack_from
    wanted = fields.swapped
    stop_after, found = fields.stop_after, 0
    special = _SPECIAL_SWAPPED
    undefined = _UNDEFINED
    while pos + 8 <= n:
        t32, length = head(data, pos)
        vpos = pos + 8
        if t32 in special:
            if t32 == _PIXEL_SWAPPED:
                return _pixel_found(vpos, length, size)
            raise NeedsFallback(f"unexpected element {_swap(t32):08X}")
        tag = wanted.get(t32)
        if length == undefined:
            pos = _skip_undefined_sequence(data, vpos, False)
            if tag is not None:
                elements[tag] = (b"", b"")
                found += 1
                if found == stop_after:
                    return -1, -1
            continue
        pos = vpos + length
        if tag is not None:
            if pos > n:
                raise _NeedMore
            elements[tag] = (b"", data[vpos:pos])
            found += 1
            if found == stop_after:
                return -1, -1
    if n < size or pos > n:
        raise _NeedMore
    return -1, -1


def _explicit_header(data: bytes, pos: int, n: int) -> tuple[int, int, bytes, int, int]:
    """(group, element, VR, value length, value offset) of the explicit VR little-endian element
    at ``pos``; the value offset is -1 when the VR is not a DICOM VR."""
    group, elem, vr, length = _HEAD.unpack_from(data, pos)
    if vr in LONG_VRS:
        if pos + 12 > n:
            raise _NeedMore
        return group, elem, vr, _U32.unpack_from(data, pos + 8)[0], pos + 12
    if vr in VALID_VRS:
        return group, elem, vr, length, pos + 8
    return group, elem, vr, length, -1


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
        if explicit and data[pos : pos + 2] == b"\xfe\xff":  # an item delimiter: no VR
            group, elem, length = _TAG_LEN.unpack_from(data, pos)
            vr, vpos = b"", pos + 8
        elif explicit:
            group, elem, vr, length, vpos = _explicit_header(data, pos, n)
            if vpos < 0:
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
