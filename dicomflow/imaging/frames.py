"""Locate and extract frames of a stored Part 10 file (blocking: run through the offloader).

The index keeps the offset of the top-level pixel data element (``pixel_data_offset``), so a frame of a
native instance is a byte range and a frame of an encapsulated instance is a list of fragment ranges
(PS3.5 A.4): no other frame is read. Anything unusual (deflated or big endian files, 1-bit pixels,
fragments without an offset table) falls back to pydicom, which reads the one instance.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from dicomflow.errors import NotAcceptableError
from dicomflow.imaging.transcode import (
    DEFLATED_EXPLICIT_VR_LE,
    EXPLICIT_VR_BE,
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    NATIVE,
    transcode_dataset,
)

#: a byte range of a blob: (offset, length)
Range = tuple[int, int]
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"})
_ITEM = 0xFFFEE000
_SEQ_DELIM = 0xFFFEE0DD
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@dataclass(frozen=True, slots=True)
class PixelLayout:
    """The Image Pixel module attributes that fix the size of a frame (PS3.3 C.7.6.3)."""

    rows: int
    columns: int
    samples_per_pixel: int = 1
    bits_allocated: int = 16
    bits_stored: int = 16
    pixel_representation: int = 0
    photometric: str = "MONOCHROME2"
    number_of_frames: int = 1
    planar_configuration: int = 0

    @classmethod
    def from_metadata(cls, md: dict[str, Any]) -> PixelLayout:
        def first(tag: str, default: Any) -> Any:
            try:
                value = md[tag]["Value"][0]
            except (KeyError, IndexError, TypeError):
                return default
            return default if value is None else value

        allocated = int(first("00280100", 16))
        frames = first("00280008", 1)
        try:
            frames = int(frames)
        except (TypeError, ValueError):
            frames = 1
        return cls(int(first("00280010", 0)), int(first("00280011", 0)), int(first("00280002", 1)), allocated,
                   int(first("00280101", allocated)), int(first("00280103", 0)),
                   str(first("00280004", "MONOCHROME2")), max(frames, 1), int(first("00280006", 0)))

    @property
    def frame_size(self) -> int:
        """Bytes of one native frame; 0 when frames are not byte-aligned (1-bit data)."""
        bits = self.rows * self.columns * self.samples_per_pixel * self.bits_allocated
        return bits // 8 if bits % 8 == 0 and self.bits_allocated % 8 == 0 else 0


def pixel_value_range(fh: BinaryIO, pixel_data_offset: int, transfer_syntax: str) -> tuple[int, int | None]:
    """(value offset, value length or None if undefined) of the element at ``pixel_data_offset`` (PS3.5 7.1)."""
    fh.seek(pixel_data_offset)
    head = fh.read(12)
    if len(head) < 8:
        raise ValueError("pixel data element truncated")
    if transfer_syntax == IMPLICIT_VR_LE:
        (length,) = struct.unpack("<I", head[4:8])
        start = pixel_data_offset + 8
    else:
        fmt = ">" if transfer_syntax == EXPLICIT_VR_BE else "<"
        if head[4:6] in _LONG_VRS:
            (length,) = struct.unpack(fmt + "I", head[8:12])
            start = pixel_data_offset + 12
        else:
            (length,) = struct.unpack(fmt + "H", head[6:8])
            start = pixel_data_offset + 8
    return start, (None if length == 0xFFFFFFFF else length)


def _fragments(fh: BinaryIO, start: int, limit: int) -> tuple[list[int], list[Range]]:
    """Basic Offset Table and fragment ranges of encapsulated pixel data (PS3.5 A.4), reading only headers."""
    pos = start
    bot: list[int] | None = None
    frags: list[Range] = []
    while pos + 8 <= limit:
        fh.seek(pos)
        tag_group, tag_elem, length = struct.unpack("<HHI", fh.read(8))
        tag = (tag_group << 16) | tag_elem
        if tag == _SEQ_DELIM:
            break
        if tag != _ITEM or length == 0xFFFFFFFF:
            raise ValueError("malformed encapsulated pixel data")
        if bot is None:
            fh.seek(pos + 8)
            raw = fh.read(length)
            bot = list(struct.unpack(f"<{length // 4}I", raw)) if length else []
        else:
            frags.append((pos + 8, length))
        pos += 8 + length
    return bot or [], frags


def encapsulated_frame_ranges(fh: BinaryIO, value_start: int, file_size: int, frames: int) -> list[list[Range]] | None:
    """Fragment ranges of each frame, or None when only parsing the codestreams could tell (no BOT)."""
    bot, frags = _fragments(fh, value_start, file_size)
    if frames == 1:
        return [frags]
    if bot:
        # BOT offsets count from the first fragment's item tag (PS3.5 A.4)
        first_item = frags[0][0] - 8 if frags else 0
        starts = [first_item + off for off in bot] + [file_size + 1]
        grouped: list[list[Range]] = [[] for _ in bot]
        for frag in frags:
            item_pos = frag[0] - 8
            for i in range(len(bot)):
                if starts[i] <= item_pos < starts[i + 1]:
                    grouped[i].append(frag)
                    break
        return grouped if len(grouped) == frames else None
    if len(frags) == frames:
        return [[f] for f in frags]
    return None


@dataclass(frozen=True, slots=True)
class FramePlan:
    """Where requested frames are in a blob, as stored; ``ranges[i]`` are the byte ranges of frame i."""

    ranges: list[list[Range]]


def plan_frames(fh: BinaryIO, *, pixel_data_offset: int, transfer_syntax: str, layout: PixelLayout,
                numbers: list[int], file_size: int) -> FramePlan | None:
    """Byte ranges of the 1-based frames ``numbers`` in their stored encoding, or None if pydicom must decide.

    Native data qualifies when it is little endian and byte-aligned (its bytes are the Explicit VR
    Little Endian frame, PS3.5 8.1.1); encapsulated data when fragments map onto frames.
    """
    if transfer_syntax in (DEFLATED_EXPLICIT_VR_LE, EXPLICIT_VR_BE):
        return None
    start, length = pixel_value_range(fh, pixel_data_offset, transfer_syntax)
    if transfer_syntax in NATIVE:
        size = layout.frame_size
        if not size or length is None or length < size * layout.number_of_frames:
            return None
        return FramePlan([[(start + (n - 1) * size, size)] for n in numbers])
    if length is not None:
        return None
    per_frame = encapsulated_frame_ranges(fh, start, file_size, layout.number_of_frames)
    if per_frame is None:
        return None
    return FramePlan([per_frame[n - 1] for n in numbers])


def read_frames_stored(fh: BinaryIO, *, pixel_data_offset: int, transfer_syntax: str, layout: PixelLayout,
                       numbers: list[int]) -> list[bytes]:
    """The requested frames in their stored encoding (native frames as Explicit VR Little Endian bytes)."""
    fh.seek(0, io.SEEK_END)
    size = fh.tell()
    plan = plan_frames(fh, pixel_data_offset=pixel_data_offset, transfer_syntax=transfer_syntax, layout=layout,
                       numbers=numbers, file_size=size)
    if plan is not None:
        out = []
        for ranges in plan.ranges:
            parts = []
            for off, n in ranges:
                fh.seek(off)
                parts.append(fh.read(n))
            out.append(b"".join(parts))
        return out
    fh.seek(0)
    ds = pydicom.dcmread(fh, force=True)
    ts = str(ds.file_meta.TransferSyntaxUID)
    if ts in NATIVE:
        return [native_frame_bytes(ds, n) for n in numbers]
    frames = list(generate_frames(ds.PixelData, number_of_frames=layout.number_of_frames))
    return [frames[n - 1] for n in numbers]


def decode_frame(ds: Dataset, number: int) -> np.ndarray[Any, Any]:
    """Decode the 1-based frame ``number`` (YBR colour as RGB); NotAcceptableError when no decoder can."""
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    last: Exception | None = None
    for as_rgb in (True, False):  # some codestreams only decode without the colour conversion
        opts: Any = {"as_rgb": as_rgb}
        try:
            arr, _meta = decoder.as_array(ds, index=number - 1, **opts)
            return arr
        except Exception as exc:  # every plugin refused; the message says why
            last = exc
    raise NotAcceptableError(f"the stored pixel data cannot be decoded here: {last}") from last


def native_frame_bytes(ds: Dataset, number: int) -> bytes:
    """One decoded frame as little-endian native bytes (colour as RGB, PS3.18 8.7.3.3.2)."""
    arr = decode_frame(ds, number)
    return np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False)).tobytes()


def load_dataset(fh: BinaryIO) -> Dataset:
    """The whole instance (pixel data as stored: encapsulated data stays compressed in memory)."""
    fh.seek(0)
    return pydicom.dcmread(fh, force=True)


def frames_from_dataset(ds: Dataset, numbers: list[int], target_ts: str | None) -> list[bytes]:
    """Frames of a loaded instance: as stored (``target_ts`` None; native as little endian bytes) or
    converted to ``target_ts`` (native or a compressed syntax)."""
    stored = str(ds.file_meta.get("TransferSyntaxUID", EXPLICIT_VR_LE))
    if target_ts is None and stored not in NATIVE:
        count = int(ds.get("NumberOfFrames", 1) or 1)
        wanted = set(numbers)
        found: dict[int, bytes] = {}
        for i, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=count), start=1):
            if i in wanted:
                found[i] = frame
            if len(found) == len(wanted):
                break
        return [found[n] for n in numbers]
    if target_ts is None or target_ts in NATIVE:
        return [native_frame_bytes(ds, n) for n in numbers]
    return [encode_frame(native_frame_bytes(ds, n), ds, target_ts) for n in numbers]


def decoded_frames(fh: BinaryIO, numbers: list[int]) -> Iterator[tuple[bytes, Dataset]]:
    """Decode the requested frames of a stored instance: (native bytes, the dataset without pixel data)."""
    fh.seek(0)
    ds = pydicom.dcmread(fh, force=True)
    for n in numbers:
        yield native_frame_bytes(ds, n), ds


def _frame_dataset(native: bytes, ds: Dataset) -> Dataset:
    out = Dataset()
    out.file_meta = FileMetaDataset()
    out.file_meta.TransferSyntaxUID = UID(EXPLICIT_VR_LE)
    out.file_meta.MediaStorageSOPClassUID = UID(SECONDARY_CAPTURE)
    out.file_meta.MediaStorageSOPInstanceUID = UID(str(ds.get("SOPInstanceUID", "1.2.3")))
    out.SOPClassUID = SECONDARY_CAPTURE
    out.SOPInstanceUID = str(ds.get("SOPInstanceUID", "1.2.3"))
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    out.Rows, out.Columns, out.SamplesPerPixel = int(ds.Rows), int(ds.Columns), samples
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    out.PhotometricInterpretation = "RGB" if samples == 3 else photometric
    if samples == 3:
        out.PlanarConfiguration = 0
    out.BitsAllocated = int(ds.BitsAllocated)
    out.BitsStored = int(ds.get("BitsStored", ds.BitsAllocated))
    out.HighBit = out.BitsStored - 1
    out.PixelRepresentation = int(ds.get("PixelRepresentation", 0) or 0)
    out.PixelData = native
    out["PixelData"].VR = "OW" if out.BitsAllocated > 8 else "OB"
    return out


def encode_frame(native: bytes, ds: Dataset, target_ts: str) -> bytes:
    """Encode one native frame (as from :func:`decoded_frames`) into ``target_ts``'s codestream."""
    if target_ts in NATIVE:
        return native
    frame_ds = transcode_dataset(_frame_dataset(native, ds), target_ts)
    frames = list(generate_frames(frame_ds.PixelData, number_of_frames=1))
    if len(frames) != 1:
        raise NotAcceptableError("encoder produced no frame")
    return frames[0]
