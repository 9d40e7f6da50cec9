"""Value types shared by every part of the server."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NewType

from pydicom.datadict import tag_for_keyword

from dicomflow.errors import InvalidRequestError

Uid = NewType("Uid", str)

# PS3.5 9.1: components of digits separated by '.', no leading zero in a component, at most 64 chars.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and _UID_RE.match(value) is not None


def parse_uid(value: str, what: str = "UID") -> Uid:
    """Validate a UID from a peer (URL, query, dataset); raise a 400/0xC000 error if invalid."""
    if not is_valid_uid(value):
        raise InvalidRequestError(f"invalid {what}: not a DICOM UID (PS3.5 9.1)")
    return Uid(value)


#: an attribute tag as 8 hex digits, group then element (PS3.18 F.2.1.1: the JSON model's keys)
HEX_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")


def attribute_tag(name: str) -> str:
    """The 8-hex tag of a DICOM keyword (``Modality``) or tag (``00080060``); ValueError if it is neither."""
    if HEX_TAG.match(name):
        return name.upper()
    tag = tag_for_keyword(name)
    if tag is None:
        raise ValueError(f"{name!r} is neither a DICOM keyword nor an 8-digit hex tag")
    return f"{tag:08X}"


class Level(StrEnum):
    """Query/retrieve levels (PS3.4 C.6)."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


class Protocol(StrEnum):
    DICOMWEB = "dicomweb"
    DIMSE = "dimse"
    IMPORT = "import"
    MAINTENANCE = "maintenance"  # dicomflow fsck and other operator tools


@dataclass(frozen=True, slots=True)
class Source:
    """Who sent something: protocol plus calling AE title, token subject and address."""

    protocol: Protocol
    calling_ae: str | None = None
    subject: str | None = None
    address: str | None = None

    def as_dict(self) -> dict[str, str]:
        return {k: v for k, v in (("protocol", self.protocol.value), ("calling_ae", self.calling_ae),
                                  ("subject", self.subject), ("address", self.address)) if v}


@dataclass(frozen=True, slots=True)
class InstanceKey:
    tenant: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str


@dataclass(frozen=True, slots=True)
class ParsedInstance:
    """What ingest learned from parsing one instance once.

    ``metadata`` is the PS3.18 JSON model of the whole dataset without bulk data: large binary values
    are replaced by ``{"BulkDataURI": "<BULK>/<tag path>"}`` placeholders that the adapters rewrite
    into absolute URLs at response time (see :data:`BULK_PLACEHOLDER`).
    """

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    metadata: dict[str, Any]
    #: byte offset of the top-level pixel data element (tag start) in the Part 10 file, if any
    pixel_data_offset: int | None = None
    number_of_frames: int | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)


#: Prefix of BulkDataURI values stored in the index; replaced by ``{instance retrieve URL}/bulkdata``.
BULK_PLACEHOLDER = "dicomflow:bulk"


class StoreResult(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # identical bytes already stored: success, nothing changed
    REPLACED = "replaced"  # different bytes, overwrite policy


@dataclass(frozen=True, slots=True)
class StoreOutcome:
    key: InstanceKey
    sop_class_uid: str
    result: StoreResult
    #: PS3.18 Table 10.5.3-3 / PS3.4 B.2.3 warning code (e.g. 0xB000 coercion), if any
    warning: int | None = None
    warning_detail: str | None = None
