"""Convert a stored Part 10 instance to another transfer syntax (blocking: run through the offloader).

The API other parts use::

    from dicomflow.imaging.transcode import transcode, possible_targets, choose_target

    possible_targets(src_ts, pixel)                # which target syntaxes we can produce from src_ts
    choose_target(src_ts, accepted, pixel)         # best of a peer's accepted syntaxes (C-MOVE/C-GET), or None
    data = transcode(fileobj_or_path, target_ts)   # Part 10 bytes in target_ts, or NotAcceptableError
    transcode_to(src, target_ts, dst_fileobj)      # the same, written to a file object
    ds = transcode_dataset(pydicom.dcmread(src), target_ts)   # in place, e.g. for pynetdicom send_c_store

``pixel`` is a :class:`PixelInfo` (``PixelInfo.from_metadata(json)`` from the index, or ``from_dataset``);
without it the answer assumes the encoders take the pixel data. All calls block: run them through the
offloader (or in a pynetdicom handler thread), one instance at a time.

Decoding uses pydicom's pixel decoders (pylibjpeg, pylibjpeg-openjpeg, pylibjpeg-rle, python-gdcm, Pillow);
encoding uses pydicom's encoders (RLE, JPEG-LS through pyjpegls, JPEG 2000 through pylibjpeg-openjpeg) and
python-gdcm for the JPEG process 1 and 14 syntaxes pydicom cannot write. Everything except the pixel data
and the attributes that describe its encoding (PS3.5 8.2, PS3.3 C.7.6.1.1.5 lossy compression) is kept
as stored; the SOP Instance UID is kept too (PS3.18 8.7.3.5 lets the origin server transcode on retrieve).
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicomflow.errors import NotAcceptableError

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.57"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_LS_NEAR_LOSSLESS = "1.2.840.10008.1.2.4.81"
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_2000 = "1.2.840.10008.1.2.4.91"
HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
HTJ2K_LOSSLESS_RPCL = "1.2.840.10008.1.2.4.202"
HTJ2K = "1.2.840.10008.1.2.4.203"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"

#: Native (uncompressed) encodings of pixel data (PS3.5 A.1-A.3, A.5).
NATIVE = frozenset({IMPLICIT_VR_LE, EXPLICIT_VR_LE, DEFLATED_EXPLICIT_VR_LE, EXPLICIT_VR_BE})
#: Encapsulated syntaxes whose pixel data we can decode (pydicom decoders available here).
DECODABLE = frozenset({
    JPEG_BASELINE, JPEG_EXTENDED, JPEG_LOSSLESS, JPEG_LOSSLESS_SV1, JPEG_LS_LOSSLESS, JPEG_LS_NEAR_LOSSLESS,
    JPEG_2000_LOSSLESS, JPEG_2000, HTJ2K_LOSSLESS, HTJ2K_LOSSLESS_RPCL, HTJ2K, RLE_LOSSLESS,
})
#: Native syntaxes we write (Explicit VR Big Endian is retired, PS3.5 A.3, and never produced).
NATIVE_TARGETS = frozenset({IMPLICIT_VR_LE, EXPLICIT_VR_LE, DEFLATED_EXPLICIT_VR_LE})
_PYDICOM_ENCODED = frozenset({RLE_LOSSLESS, JPEG_LS_LOSSLESS, JPEG_LS_NEAR_LOSSLESS, JPEG_2000_LOSSLESS, JPEG_2000})
_GDCM_ENCODED = frozenset({JPEG_BASELINE, JPEG_LOSSLESS, JPEG_LOSSLESS_SV1})
_GDCM_FALLBACK = frozenset({JPEG_2000_LOSSLESS, JPEG_2000, JPEG_LS_LOSSLESS, RLE_LOSSLESS})
ENCODABLE = _PYDICOM_ENCODED | _GDCM_ENCODED
LOSSY = frozenset({JPEG_BASELINE, JPEG_EXTENDED, JPEG_LS_NEAR_LOSSLESS, JPEG_2000, HTJ2K})
#: Preference order when choosing among accepted syntaxes: as stored first, then lossless, then lossy.
PREFERENCE = (
    EXPLICIT_VR_LE, IMPLICIT_VR_LE, JPEG_2000_LOSSLESS, JPEG_LS_LOSSLESS, RLE_LOSSLESS, JPEG_LOSSLESS_SV1,
    JPEG_LOSSLESS, DEFLATED_EXPLICIT_VR_LE, JPEG_LS_NEAR_LOSSLESS, JPEG_2000, JPEG_BASELINE,
)
_LOSSY_METHOD = {JPEG_BASELINE: "ISO_10918_1", JPEG_LS_NEAR_LOSSLESS: "ISO_14495_1", JPEG_2000: "ISO_15444_1"}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass(frozen=True, slots=True)
class PixelInfo:
    """What decides whether an encoder can take the pixel data (PS3.5 8.2.1-8.2.4 restrictions)."""

    bits_allocated: int = 16
    bits_stored: int = 16
    samples_per_pixel: int = 1
    pixel_representation: int = 0
    float_pixels: bool = False
    rows: int = 0
    columns: int = 0

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> PixelInfo | None:
        """From a PS3.18 JSON model; None when the instance has no pixel data."""
        if not any(t in metadata for t in ("7FE00010", "7FE00008", "7FE00009")):
            return None

        def first(tag: str, default: int) -> int:
            try:
                return int(metadata[tag]["Value"][0])
            except (KeyError, IndexError, TypeError, ValueError):
                return default

        allocated = first("00280100", 16)
        return cls(allocated, first("00280101", allocated), first("00280002", 1), first("00280103", 0),
                   "7FE00010" not in metadata, first("00280010", 0), first("00280011", 0))

    @classmethod
    def from_dataset(cls, ds: Dataset) -> PixelInfo | None:
        if not any(k in ds for k in _PIXEL_KEYWORDS):
            return None
        allocated = int(ds.get("BitsAllocated", 16) or 16)
        return cls(allocated, int(ds.get("BitsStored", allocated) or allocated),
                   int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("PixelRepresentation", 0) or 0),
                   "PixelData" not in ds, int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))


def _encoder_accepts(target: str, info: PixelInfo) -> bool:
    """Static limits of the encoders (pydicom 3 encoder docs, gdcm, PS3.5 8.2.1 for JPEG processes)."""
    if info.float_pixels or info.bits_allocated == 1 or info.samples_per_pixel not in (1, 3):
        return False
    if target == JPEG_BASELINE:
        return info.bits_allocated == 8 and info.pixel_representation == 0
    if target in (JPEG_LOSSLESS, JPEG_LOSSLESS_SV1):
        return info.bits_allocated in (8, 16)
    if target == RLE_LOSSLESS:
        return info.bits_allocated in (8, 16, 32)
    if target in (JPEG_LS_LOSSLESS, JPEG_LS_NEAR_LOSSLESS):
        return info.bits_allocated in (8, 16) and 2 <= info.bits_stored <= 16
    if target in (JPEG_2000_LOSSLESS, JPEG_2000):
        # openjpeg's default 6 resolution levels need at least 32 pixels per side
        return info.bits_allocated in (8, 16) and info.bits_stored <= 16 and min(info.rows, info.columns) >= 32
    return False


def possible_targets(source_ts: str, pixel: PixelInfo | None = None, *, has_pixels: bool = True) -> frozenset[str]:
    """Transfer syntaxes an instance stored in ``source_ts`` can be converted to (``source_ts`` included).

    ``pixel`` narrows the answer to what the encoders take for that pixel data; pass
    ``has_pixels=False`` for instances without pixel data (only the data set encoding changes).
    """
    if not has_pixels:
        # without pixel data an encapsulated syntax only changes the File Meta (PS3.5 A.4: explicit VR LE)
        return frozenset({source_ts}) | NATIVE_TARGETS | ENCODABLE
    if source_ts not in NATIVE and source_ts not in DECODABLE:
        return frozenset({source_ts})  # video, unknown: only as stored
    encodable = ENCODABLE if pixel is None else frozenset(t for t in ENCODABLE if _encoder_accepts(t, pixel))
    if pixel is not None and (pixel.float_pixels or pixel.bits_allocated == 1):
        encodable = frozenset()
    return frozenset({source_ts}) | NATIVE_TARGETS | encodable


def can_transcode(source_ts: str, target_ts: str, pixel: PixelInfo | None = None, *,
                  has_pixels: bool = True) -> bool:
    return target_ts in possible_targets(source_ts, pixel, has_pixels=has_pixels)


def choose_target(source_ts: str, accepted: list[str] | set[str] | frozenset[str],
                  pixel: PixelInfo | None = None, *, has_pixels: bool = True) -> str | None:
    """The syntax to send to a peer that accepts ``accepted``: as stored if possible, else the best lossless
    (then lossy) syntax we can produce, else None."""
    if source_ts in accepted:
        return source_ts
    targets = possible_targets(source_ts, pixel, has_pixels=has_pixels)
    source_lossy = source_ts in LOSSY
    for ts in PREFERENCE:
        if ts in accepted and ts in targets and (source_lossy or ts not in LOSSY):
            return ts
    for ts in PREFERENCE:
        if ts in accepted and ts in targets:
            return ts
    return None


def _read(src: BinaryIO | Path | bytes) -> Dataset:
    if isinstance(src, bytes):
        src = io.BytesIO(src)
    return pydicom.dcmread(src, force=True)


def _mark_lossy(ds: Dataset, target: str, original_size: int, compressed_size: int) -> None:
    """PS3.3 C.7.6.1.1.5: record that lossy compression has been applied."""
    ds.LossyImageCompression = "01"
    methods = list(ds.get("LossyImageCompressionMethod", []) or [])
    ratios = list(ds.get("LossyImageCompressionRatio", []) or [])
    if isinstance(ds.get("LossyImageCompressionMethod"), str):
        methods = [ds.LossyImageCompressionMethod]
    methods.append(_LOSSY_METHOD[target])
    ratios.append(f"{original_size / max(compressed_size, 1):.2f}"[:16])
    ds.LossyImageCompressionMethod = methods
    ds.LossyImageCompressionRatio = ratios


def _gdcm_encode(ds: Dataset, target: str) -> None:
    """Encode native pixel data with python-gdcm (JPEG process 1 / 14); only PixelData and Photometric change."""
    import gdcm

    with tempfile.TemporaryDirectory(prefix="dicomflow-gdcm-") as tmp:
        src, dst = os.path.join(tmp, "in.dcm"), os.path.join(tmp, "out.dcm")
        ds.save_as(src, enforce_file_format=True)
        reader = gdcm.ImageReader()
        reader.SetFileName(src)
        if not reader.Read():
            raise NotAcceptableError(f"cannot encode pixel data as {target}")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(target)))
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise NotAcceptableError(f"cannot encode this pixel data as {target}")
        writer = gdcm.ImageWriter()
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        writer.SetFileName(dst)
        if not writer.Write():
            raise NotAcceptableError(f"cannot encode pixel data as {target}")
        out = pydicom.dcmread(dst)
    ds.PixelData = out.PixelData
    ds["PixelData"].VR = "OB"
    ds.PhotometricInterpretation = out.PhotometricInterpretation
    ds.file_meta.TransferSyntaxUID = UID(target)


_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def _swap_binary_values(ds: Dataset) -> None:
    """Big endian source: pydicom converts numbers but keeps OW/OF/OL/OD/OV bytes as read (PS3.5 7.3)."""
    for elem in ds.iterall():
        width = _SWAP_WIDTH.get(str(elem.VR))
        if width and isinstance(elem.value, bytes | bytearray) and len(elem.value) % width == 0:
            elem.value = np.frombuffer(elem.value, dtype=f">u{width}").astype(f"<u{width}").tobytes()


def transcode_dataset(ds: Dataset, target_ts: str) -> Dataset:
    """Convert ``ds`` (read with its File Meta) in place to ``target_ts``; raise NotAcceptableError if we cannot."""
    source = str(ds.file_meta.get("TransferSyntaxUID", EXPLICIT_VR_LE))
    if target_ts == source:
        return ds
    info = PixelInfo.from_dataset(ds)
    if not can_transcode(source, target_ts, info, has_pixels=info is not None):
        raise NotAcceptableError(f"cannot convert {source} to transfer syntax {target_ts}")
    if source == EXPLICIT_VR_BE:
        _swap_binary_values(ds)
    if info is None:
        ds.file_meta.TransferSyntaxUID = UID(target_ts)
        return ds
    try:
        if source not in NATIVE:
            # PS3.5 8.2: decoded YBR colour is returned as RGB
            try:
                ds.decompress(as_rgb=True, generate_instance_uid=False)
            except Exception:  # some codestreams only decode without the colour conversion
                ds.decompress(as_rgb=False, generate_instance_uid=False)
        if target_ts in NATIVE:
            ds.file_meta.TransferSyntaxUID = UID(target_ts)
            return ds
        native_size = len(ds.PixelData)
        ds.file_meta.TransferSyntaxUID = UID(EXPLICIT_VR_LE)
        if target_ts in _GDCM_ENCODED:
            _gdcm_encode(ds, target_ts)
        else:
            kwargs: dict[str, Any] = {}
            if target_ts == JPEG_2000:
                kwargs["j2k_cr"] = [10]
            elif target_ts == JPEG_LS_NEAR_LOSSLESS:
                kwargs["jls_error"] = 2
            try:
                ds.compress(target_ts, generate_instance_uid=False, **kwargs)
            except (RuntimeError, ValueError):
                if target_ts not in _GDCM_FALLBACK:
                    raise
                # e.g. openjpeg refuses images smaller than its 6 default resolution levels (< 32 pixels)
                _gdcm_encode(ds, target_ts)
        if target_ts in LOSSY:
            _mark_lossy(ds, target_ts, native_size, len(ds.PixelData))
    except NotAcceptableError:
        raise
    except Exception as exc:  # decoder/encoder refused this pixel data
        raise NotAcceptableError(f"cannot convert {source} to {target_ts}: {exc}") from exc
    return ds


def transcode_to(src: BinaryIO | Path | bytes, target_ts: str, dst: BinaryIO) -> None:
    """Write the Part 10 file ``src`` to ``dst`` in ``target_ts``. Raises NotAcceptableError when impossible."""
    ds = transcode_dataset(_read(src), target_ts)
    try:
        # the encoding follows the target (never big endian); preamble and File Meta as stored
        pydicom.dcmwrite(dst, ds, implicit_vr=target_ts == IMPLICIT_VR_LE, little_endian=True)
    except Exception as exc:
        raise NotAcceptableError(f"cannot write the instance as {target_ts}: {exc}") from exc


def transcode(src: BinaryIO | Path | bytes, target_ts: str) -> bytes:
    """Part 10 bytes of ``src`` in ``target_ts``. Raises NotAcceptableError when the conversion is impossible.

    Holds one instance in memory: call it through the offloader, one instance at a time.
    """
    buf = io.BytesIO()
    transcode_to(src, target_ts, buf)
    return buf.getvalue()
