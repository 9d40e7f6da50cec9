"""Parse a Part 10 file once (blocking pydicom code: always called through the offloader).

Produces the PS3.18 F.2 JSON model without bulk data. Large binary values and the pixel data are
never read into memory: ``dcmread(stop_before_pixels=True, defer_size=threshold)`` leaves them on
disk, and their JSON carries a BulkDataURI placeholder instead of the value.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

from dicomflow.errors import DatasetMismatchError, UnreadableInstanceError
from dicomflow.model import BULK_PLACEHOLDER, ParsedInstance, is_valid_uid

#: VRs whose values may be bulk data (PS3.18 8.6: "large" binary values)
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
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


def _vr_of(elem: RawDataElement | DataElement) -> str:
    vr = elem.VR
    if vr is None:
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


def dataset_to_json(ds: Dataset, threshold: int, path: str = "") -> tuple[dict[str, Any], list[str]]:
    """The PS3.18 F.2 JSON model of ``ds``; large binary values become BulkDataURI placeholders.

    Returns the model and a list of tags whose values could not be converted (left out).
    """
    out: dict[str, Any] = {}
    dropped: list[str] = []
    for tag in list(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)
        if raw is None or tag.element == 0:  # group lengths are not part of the JSON model
            continue
        key = _tag_hex(tag)
        vr = _vr_of(raw)
        length = raw.length if isinstance(raw, RawDataElement) else None
        deferred = isinstance(raw, RawDataElement) and raw.value is None and (raw.length or 0) > 0
        if deferred or (vr in BULK_VRS and length is not None and length > threshold):
            out[key] = {"vr": vr, "BulkDataURI": f"{BULK_PLACEHOLDER}/{path}{key}"}
            continue
        try:
            elem = ds[tag]
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
            out[key] = elem.to_json_dict(bulk_data_element_handler=None, bulk_data_threshold=1 << 62)
        except Exception:  # an unconvertible value: leave it out of the index, keep the bytes as stored
            dropped.append(key)
    return out, dropped


def _pixel_element(fh: BinaryIO, ds: Dataset, ts: UID, file_size: int) -> tuple[int, int, str] | None:
    """Locate the top-level pixel data element after ``stop_before_pixels``: (offset, tag, VR)."""
    offset = fh.tell()
    if offset + 8 > file_size:
        return None
    head = fh.read(8)
    fmt = "<HH" if ts.is_little_endian else ">HH"
    group, element = struct.unpack(fmt, head[:4])
    tag = (group << 16) | element
    if tag not in PIXEL_TAGS:
        return None
    vr = PIXEL_TAGS[tag]
    if vr is None:
        if not ts.is_implicit_VR:
            vr = head[4:6].decode("ascii", "replace")
        elif ts.is_compressed:
            vr = "OB"
        else:
            vr = "OW" if int(ds.get("BitsAllocated", 16) or 16) > 8 else "OB"
    return offset, tag, vr


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
            raise
        except Exception as exc:
            raise UnreadableInstanceError("required UIDs could not be read") from exc
        pixel = _pixel_element(fh, ds, ts, file_size) if ts.is_transfer_syntax else None
    try:
        metadata, dropped = dataset_to_json(ds, threshold)
    except Exception as exc:
        raise UnreadableInstanceError("DICOM data set could not be parsed",
                                      sop_instance_uid=uids[0x00080018]) from exc
    frames: int | None = None
    pixel_offset: int | None = None
    if pixel is not None:
        pixel_offset, pixel_tag, pixel_vr = pixel
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
