"""De-identification before a forward: PS3.15 Annex E Basic Application Level Confidentiality Profile.

The attribute table (PS3.15 Table E.1-1, actions D/Z/X/U and their combinations) comes from
dicom-anonymizer's copy of the standard. On top of it, dicomflow:

* replaces UIDs deterministically (``2.25.`` + 128 bits of SHA-256 over a per-route salt and the UID,
  PS3.5 B.2), so a delivery that is retried sends the same instance again, and instances of one study
  stay in one study on the receiving side;
* implements the retain options a route names (PS3.15 E.3: Retain UIDs, Device Identity, Institution
  Identity, Patient Characteristics, Longitudinal Temporal Information with Full Dates);
* records what was done: Patient Identity Removed (0012,0062) = YES, De-identification Method
  (0012,0063) and De-identification Method Code Sequence (0012,0064) with the DCM codes of CID 7050.

Blocking pydicom code: call through the Offloader. One instance is held in memory at a time.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO

import pydicom
from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from dicomanonymizer.simpledicomanonymizer import anonymize_dataset, initialize_actions, keep
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset

from dicomflow.engine.routes import DeidOption

#: the edition of PS3.15 Table E.1-1 used
TABLE_EDITION = "dicomfields_2026c"

#: PS3.16 CID 7050 De-identification Method (DCM codes)
_METHOD_CODES: dict[str, tuple[str, str]] = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    DeidOption.RETAIN_UIDS: ("113110", "Retain UIDs Option"),
    DeidOption.RETAIN_DEVICE_IDENTITY: ("113109", "Retain Device Identity Option"),
    DeidOption.RETAIN_INSTITUTION_IDENTITY: ("113112", "Retain Institution Identity Option"),
    DeidOption.RETAIN_PATIENT_CHARACTERISTICS: ("113108", "Retain Patient Characteristics Option"),
    DeidOption.RETAIN_LONGITUDINAL_FULL_DATES: ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
}

Tag = tuple[int, int]

#: attributes each option keeps (the "K" entries of its column in PS3.15 Table E.1-1)
_RETAINED: dict[DeidOption, list[Tag]] = {
    DeidOption.RETAIN_DEVICE_IDENTITY: [
        (0x0018, 0x1000),  # Device Serial Number
        (0x0018, 0x1002),  # Device UID
        (0x0008, 0x1010),  # Station Name
        (0x0018, 0x700A),  # Detector ID
        (0x0018, 0x1008),  # Gantry ID
        (0x0018, 0x1004),  # Plate ID
        (0x0018, 0x1007),  # Cassette ID
    ],
    DeidOption.RETAIN_INSTITUTION_IDENTITY: [
        (0x0008, 0x0080),  # Institution Name
        (0x0008, 0x0081),  # Institution Address
        (0x0008, 0x0082),  # Institution Code Sequence
        (0x0008, 0x1040),  # Institutional Department Name
    ],
    DeidOption.RETAIN_PATIENT_CHARACTERISTICS: [
        (0x0010, 0x0040),  # Patient's Sex
        (0x0010, 0x1010),  # Patient's Age
        (0x0010, 0x1020),  # Patient's Size
        (0x0010, 0x1030),  # Patient's Weight
        (0x0010, 0x2160),  # Ethnic Group
        (0x0010, 0x21A0),  # Smoking Status
        (0x0010, 0x21C0),  # Pregnancy Status
        (0x0010, 0x2203),  # Patient's Sex Neutered
    ],
}


def derived_uid(salt: str, uid: str) -> str:
    """A UID derived from ``uid`` (PS3.5 B.2: ``2.25.`` and a 128-bit integer)."""
    digest = hashlib.sha256(f"{salt}|{uid}".encode()).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"


def _vr(tag: Tag) -> str:
    try:
        return str(dictionary_VR((tag[0] << 16) | tag[1]))
    except KeyError:
        return ""


def _rules(options: Iterable[DeidOption], salt: str) -> dict[Tag, Callable[[Dataset, Tag], None]]:
    table = dicom_anonymization_database_selector(TABLE_EDITION)
    chosen = set(options)

    def replace_uid(dataset: Dataset, tag: Tag) -> None:
        element = dataset.get(tag)
        if element is None or element.value in (None, ""):
            return
        if element.VM > 1:
            element.value = [derived_uid(salt, str(v)) for v in element.value]
        else:
            element.value = derived_uid(salt, str(element.value))

    rules: dict[Tag, Callable[[Dataset, Tag], None]] = {}
    for category in ("D_TAGS", "U_TAGS", "X_Z_U_STAR_TAGS", "Z_D_TAGS", "X_D_TAGS", "X_Z_D_TAGS"):
        for tag in table[category]:
            if len(tag) == 2 and _vr(tag) == "UI":
                rules[tag] = keep if DeidOption.RETAIN_UIDS in chosen else replace_uid
    for option, tags in _RETAINED.items():
        if option in chosen:
            rules.update({tag: keep for tag in tags})
    if DeidOption.RETAIN_LONGITUDINAL_FULL_DATES in chosen:
        for category in table:
            for tag in table[category]:
                if len(tag) == 2 and _vr(tag) in ("DA", "DT", "TM"):
                    rules[tag] = keep
    return rules


def deidentify_dataset(ds: Dataset, options: Iterable[DeidOption] = (), salt: str = "dicomflow") -> Dataset:
    """De-identify ``ds`` in place and return it."""
    chosen = list(dict.fromkeys(options))
    anonymize_dataset(ds, extra_anonymization_rules=_rules(chosen, salt), delete_private_tags=True,
                      base_rules_gen=lambda: initialize_actions(TABLE_EDITION))
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = ["PS3.15 E.1 Basic Profile", *(o.value for o in chosen)]  # LO, VM 1-n
    items = []
    for key in ["basic", *chosen]:
        code, meaning = _METHOD_CODES[key]
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, "DCM", meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = items
    if hasattr(ds, "file_meta") and "SOPInstanceUID" in ds:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def deidentify_part10(fh: BinaryIO, options: Iterable[DeidOption] = (), salt: str = "dicomflow") -> bytes:
    """Read a Part 10 file, de-identify it, return the new Part 10 bytes."""
    ds = pydicom.dcmread(fh)
    deidentify_dataset(ds, options, salt)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def options_of(action: dict[str, Any]) -> tuple[list[DeidOption], str] | None:
    """(options, salt) of an action's ``deidentify`` block, or None when it has none."""
    spec = action.get("deidentify")
    if not isinstance(spec, dict):
        return None
    return [DeidOption(o) for o in spec.get("options", [])], str(spec.get("uid_salt", "dicomflow"))
