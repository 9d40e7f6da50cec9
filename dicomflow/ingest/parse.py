"""Parse a Part 10 file once (blocking pydicom code: always called through the offloader).

Produces the PS3.18 F.2 JSON model without bulk data. Large binary values and the pixel data are
never read into memory: ``dcmread(stop_before_pixels=True, defer_size=threshold)`` leaves them on
disk, and their JSON carries a BulkDataURI placeholder instead of the value.
"""

from __future__ import annotations

import math
import struct
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

from dicomflow.errors import DatasetMismatchError, UnreadableInstanceError, UnsupportedMediaTypeError
from dicomflow.model import BULK_PLACEHOLDER, ParsedInstance, is_valid_uid

#: VRs whose values may be bulk data (PS3.18 8.6: "large" binary values)
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_FLOAT_VRS = frozenset({"FL", "FD", "DS"})
PIXEL_TAGS = {0x7FE00008: "OF", 0x7FE00009: "OD", 0x7FE00010: None}

_REQUIRED = (
    (0x00080016, "SOP Class UID"),
    (0x00080018, "SOP Instance UID"),
    (0x0020000D, "Study Instance UID"),
    (0x0020000E, "Series Instance UID"),
)


def configure_pydicom() -> None:
    """Process-wide pydicom settings: set once at start-up, never per request."""
    # We validate what we rely on (UIDs) ourselves; everything else is stored as received.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    # Encoding mistakes pydicom reads around (e.g. implicit VR under an explicit Transfer Syntax) are
    # warned about unconditionally; they are the peer's, not ours: keep them out of stderr.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")


def _vr_of(elem: RawDataElement | DataElement) -> str:
    vr = elem.VR
    if vr is None or vr == "UN":  # implicit VR, or UN that pydicom replaces with the known VR
        try:
            vr = dictionary_VR(elem.tag)
        except KeyError:
            vr = "UN"
    vr = str(vr)
    if " or " in vr:  # ambiguous VRs (e.g. "US or OW"): bulk values are the OW/OB form
        options = vr.split(" or ")
        vr = next((o for o in options if o in BULK_VRS), options[0])
    return vr


def _tag_hex(tag: BaseTag | int) -> str:
    return f"{int(tag):08X}"


def _finite(value: Any) -> Any:
    # JSON has no NaN/Infinity literals; keep the document valid by writing them as strings.
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def dataset_to_json(ds: Dataset, threshold: int, path: str = "") -> tuple[dict[str, Any], list[str]]:
    """The PS3.18 F.2 JSON model of ``ds``; large binary values become BulkDataURI placeholders.

    Binary VRs (:data:`BULK_VRS`) longer than ``threshold`` or left unread by ``defer_size`` are
    bulk data (PS3.18 8.6.1); every other value, even a deferred one (a long sequence or text), is
    read and converted the way pydicom's ``to_json_dict`` does. Group lengths are left out.
    Returns the model and the tags whose values could not be converted (left out).
    """
    out: dict[str, Any] = {}
    dropped: list[str] = []
    for tag in list(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)
        if raw is None or tag.element == 0:
            continue
        key = _tag_hex(tag)
        vr = _vr_of(raw)
        if vr in BULK_VRS and isinstance(raw, RawDataElement) and (
                (raw.value is None and raw.length) or raw.length > threshold):
            out[key] = {"vr": vr, "BulkDataURI": f"{BULK_PLACEHOLDER}/{path}{key}"}
            continue
        try:
            elem = ds[tag]  # converts the raw value; reads a deferred one from the file
            if elem.VR == "SQ":
                items = []
                for i, item in enumerate(elem.value):
                    item_json, item_dropped = dataset_to_json(item, threshold, f"{path}{key}/{i}/")
                    items.append(item_json)
                    dropped.extend(item_dropped)
                out[key] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
                continue
            if elem.VR in BULK_VRS and elem.value is not None and len(elem.value) > threshold:
                out[key] = {"vr": elem.VR, "BulkDataURI": f"{BULK_PLACEHOLDER}/{path}{key}"}
                continue
            json_elem = elem.to_json_dict(bulk_data_element_handler=None, bulk_data_threshold=1 << 62)
            if elem.VR in _FLOAT_VRS and "Value" in json_elem:
                json_elem["Value"] = [_finite(v) for v in json_elem["Value"]]
            out[key] = json_elem
        except Exception:  # an unconvertible value: leave it out of the index, keep the bytes as stored
            dropped.append(f"{path}{key}")
    return out, dropped


#: Samples per Pixel, Photometric Interpretation, Bits Allocated (PS3.3 C.7.6.3). Not Rows/Columns:
#: MR Spectroscopy (PS3.3 C.8.14.4) has those without Pixel Data. Samples per Pixel precedes Rows in
#: the file, so a file cut after Rows still shows the module.
_IMAGE_PIXEL_TAGS = (0x00280002, 0x00280004, 0x00280100)
_TRUNCATED = "truncated DICOM file: a value runs past the end of the data (PS3.5 7.1)"
_LONG_EXPLICIT_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})


def _check_fragments(fh: BinaryIO, pos: int, file_size: int) -> None:
    """Walk the encapsulated pixel data items (PS3.5 A.4) up to the Sequence Delimitation Item."""
    while True:  # every step moves at least 8 bytes forward, so this ends by the file size
        fh.seek(pos)
        head = fh.read(8)
        if len(head) < 8:
            raise UnreadableInstanceError(_TRUNCATED)
        group, element, length = struct.unpack("<HHL", head)
        if (group, element) == (0xFFFE, 0xE0DD):
            return
        if (group, element) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF:
            raise UnreadableInstanceError("malformed encapsulated pixel data (PS3.5 A.4)")
        pos += 8 + length
        if pos > file_size:
            raise UnreadableInstanceError(_TRUNCATED)


def _encoding(ds: Dataset, ts: UID) -> tuple[bool, bool]:
    """(implicit VR, little endian) as actually read: pydicom corrects a wrong Transfer Syntax UID."""
    for tag in reversed(list(ds.keys())):
        raw = ds.get_item(tag, keep_deferred=True)
        if isinstance(raw, RawDataElement):
            return bool(raw.is_implicit_VR), bool(raw.is_little_endian)
    return bool(ts.is_implicit_VR), bool(ts.is_little_endian)


def _pixel_element(fh: BinaryIO, ds: Dataset, ts: UID, file_size: int) -> tuple[int, int, str] | None:
    """Locate the top-level pixel data element after ``stop_before_pixels``: (offset, tag, VR).

    Also checks that its value is complete: a file cut short inside the pixel data is refused.
    """
    offset = fh.tell()
    if offset >= file_size:
        return None
    head = fh.read(12)
    if len(head) < 8:
        raise UnreadableInstanceError(_TRUNCATED)
    implicit, little = _encoding(ds, ts)
    endian = "<" if little else ">"
    group, element = struct.unpack(endian + "HH", head[:4])
    tag = (group << 16) | element
    if tag not in PIXEL_TAGS:
        return None
    vr = PIXEL_TAGS[tag]
    if not implicit:
        explicit_vr = head[4:6].decode("ascii", "replace")
        vr = vr or explicit_vr
        if explicit_vr in _LONG_EXPLICIT_VRS:
            if len(head) < 12:
                raise UnreadableInstanceError(_TRUNCATED)
            header, length = 12, struct.unpack(endian + "L", head[8:12])[0]
        else:
            header, length = 8, struct.unpack(endian + "H", head[6:8])[0]
    else:
        header, length = 8, struct.unpack(endian + "L", head[4:8])[0]
        if vr is None:
            vr = "OB" if ts.is_compressed else "OW" if int(ds.get("BitsAllocated", 16) or 16) > 8 else "OB"
    if length == 0xFFFFFFFF:
        _check_fragments(fh, offset + header, file_size)
    elif offset + header + length > file_size:
        raise UnreadableInstanceError(_TRUNCATED)
    else:
        _check_tail(fh, offset + header + length, file_size, implicit, endian)
    return offset, tag, vr


def _check_tail(fh: BinaryIO, pos: int, file_size: int, implicit: bool, endian: str) -> None:
    """Walk the elements after a defined-length Pixel Data (e.g. trailing padding): none may be cut short."""
    while pos < file_size:  # every step moves at least 8 bytes forward
        fh.seek(pos)
        head = fh.read(12)
        if len(head) < 8:
            raise UnreadableInstanceError(_TRUNCATED)
        if implicit:
            header, length = 8, struct.unpack(endian + "L", head[4:8])[0]
        elif head[4:6].decode("ascii", "replace") in _LONG_EXPLICIT_VRS:
            if len(head) < 12:
                raise UnreadableInstanceError(_TRUNCATED)
            header, length = 12, struct.unpack(endian + "L", head[8:12])[0]
        else:
            header, length = 8, struct.unpack(endian + "H", head[6:8])[0]
        if length == 0xFFFFFFFF:
            return  # an undefined-length sequence: not walked further
        pos += header + length
        if pos > file_size:
            raise UnreadableInstanceError(_TRUNCATED)


def _check_complete(ds: Dataset, file_size: int, stopped_at: int) -> None:
    """Refuse a data set whose last element runs past the end of the file or is cut inside its header."""
    last_end = 0
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset yields converted elements
        raw = ds.get_item(tag, keep_deferred=True)
        if isinstance(raw, RawDataElement) and raw.length != 0xFFFFFFFF and raw.value_tell is not None:
            last_end = max(last_end, raw.value_tell + raw.length)
        else:
            last_end = 0  # undefined length sequence: pydicom read it to its delimiter
    if last_end > file_size:
        raise UnreadableInstanceError(_TRUNCATED)
    if last_end and stopped_at >= file_size and 0 < file_size - last_end < 8:
        raise UnreadableInstanceError(_TRUNCATED)  # a partial element header after the last element


def parse_part10(path: Path, threshold: int) -> ParsedInstance:
    """Parse and validate one stored-to-be Part 10 file."""
    file_size = path.stat().st_size
    with open(path, "rb") as fh:
        try:
            ds = pydicom.dcmread(fh, stop_before_pixels=True, defer_size=threshold)
        except (InvalidDicomError, EOFError) as exc:
            raise UnreadableInstanceError("not a DICOM Part 10 file (PS3.10 7.1)") from exc
        except Exception as exc:
            raise UnreadableInstanceError("DICOM data set could not be parsed") from exc
        meta = ds.file_meta
        ts_raw = str(meta.get("TransferSyntaxUID", "") or "").strip("\0 ")
        if not ts_raw or not is_valid_uid(ts_raw):
            raise UnreadableInstanceError("File Meta Information has no valid Transfer Syntax UID")
        ts = UID(ts_raw)
        if not ts.is_transfer_syntax:
            raise UnsupportedMediaTypeError("unknown Transfer Syntax UID in the File Meta Information")
        if not ts.is_deflated:  # deflated data sets are checked by zlib while inflating
            _check_complete(ds, file_size, fh.tell())
        uids: dict[int, str] = {}
        try:
            for tag, name in _REQUIRED:
                value = ds.get(Tag(tag))
                text = str(value.value).strip("\0 ") if value is not None and value.value is not None else ""
                if not text:
                    raise DatasetMismatchError(f"{name} (Type 1) is missing")
                if not is_valid_uid(text):
                    raise DatasetMismatchError(f"{name} is not a valid UID")
                uids[tag] = text
        except DatasetMismatchError as exc:
            exc.sop_instance_uid = uids.get(0x00080018)
            exc.sop_class_uid = uids.get(0x00080016)
            raise
        except Exception as exc:
            raise UnreadableInstanceError("required UIDs could not be read") from exc
        pixel = None if ts.is_deflated else _pixel_element(fh, ds, ts, file_size)
        if pixel is None and not ts.is_deflated and any(k in ds for k in _IMAGE_PIXEL_TAGS):
            # PS3.3 C.7.6.3: the Image Pixel module comes with Pixel Data (else the file was cut before it)
            raise DatasetMismatchError("Image Pixel module without Pixel Data: truncated?",
                                       sop_instance_uid=uids[0x00080018], sop_class_uid=uids[0x00080016])
    if ts.is_deflated:
        # PS3.5 A.5: pydicom inflates the whole data set in memory anyway; read it again with the pixel
        # data (offsets inside the inflated stream mean nothing in the file, so nothing is deferred)
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:
            raise UnreadableInstanceError("DICOM data set could not be parsed", sop_instance_uid=uids[0x00080018],
                                          sop_class_uid=uids[0x00080016]) from exc
    try:
        metadata, dropped = dataset_to_json(ds, threshold)
    except Exception as exc:
        raise UnreadableInstanceError("DICOM data set could not be parsed", sop_instance_uid=uids[0x00080018],
                                      sop_class_uid=uids[0x00080016]) from exc
    frames: int | None = None
    pixel_offset: int | None = None
    if ts.is_deflated:
        deflated_pixel = next((tag for tag in PIXEL_TAGS if tag in ds), None)
        if deflated_pixel is not None:  # bulk data, retrievable by inflating the blob (no byte offset)
            pixel = (0, deflated_pixel, str(ds[deflated_pixel].VR))
    if pixel is not None:
        pixel_offset, pixel_tag, pixel_vr = pixel
        pixel_offset = None if ts.is_deflated else pixel_offset
        metadata[_tag_hex(pixel_tag)] = {"vr": pixel_vr, "BulkDataURI": f"{BULK_PLACEHOLDER}/{pixel_tag:08X}"}
        try:
            frames = int(ds.get("NumberOfFrames", 1) or 1)
        except (TypeError, ValueError):
            frames = 1
    warnings = tuple(f"attribute {tag} could not be indexed" for tag in dropped)
    return ParsedInstance(
        study_instance_uid=uids[0x0020000D], series_instance_uid=uids[0x0020000E],
        sop_instance_uid=uids[0x00080018], sop_class_uid=uids[0x00080016], transfer_syntax_uid=str(ts),
        metadata=metadata, pixel_data_offset=pixel_offset, number_of_frames=frames, warnings=warnings,
    )
