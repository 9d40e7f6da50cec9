"""Parse-once invariants: the PS3.18 F.2 JSON model, bulk data placeholders, validation, truncation."""

from __future__ import annotations

import json
import os
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from dicomflow.errors import DatasetMismatchError, DicomServiceError, UnreadableInstanceError, UnsupportedMediaTypeError
from dicomflow.ingest.parse import configure_pydicom, parse_part10
from dicomflow.model import BULK_PLACEHOLDER
from tests.factory import (
    MR_IMAGE,
    make_dataset,
    make_mg,
    make_named,
    make_ophthalmic,
    make_rt_dose,
    make_seg,
    make_sr,
    make_us_multiframe,
    make_whole_slide,
    to_bytes,
    with_transfer_syntax,
)

configure_pydicom()

BINARY = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}


def _write(tmp_path: Path, data: bytes, name: str = "x.dcm") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _normalise(model: dict[str, Any]) -> dict[str, Any]:
    """Binary values compared by presence only; group lengths dropped; pixel data dropped."""
    out: dict[str, Any] = {}
    for key, value in model.items():
        if key.endswith("0000") or key in ("7FE00010", "7FE00008", "7FE00009"):
            continue
        if "InlineBinary" in value or "BulkDataURI" in value:
            out[key] = {"vr": value["vr"], "binary": True}
        elif value.get("vr") == "SQ" and value.get("Value"):
            out[key] = {"vr": "SQ", "Value": [_normalise(item) for item in value["Value"]]}
        elif value.get("vr") == "SQ":
            out[key] = {"vr": "SQ"}
        else:
            out[key] = value
    return out


def _reference(path: Path) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return ds.to_json_dict(bulk_data_element_handler=lambda _e: "bulk", bulk_data_threshold=1,
                              suppress_invalid_tags=False)


def _pydicom_files() -> list[str]:
    return sorted(f for f in get_testdata_files() if os.path.isfile(f))


GENERATED: dict[str, Callable[[], Dataset]] = {
    "ct": lambda: make_dataset(),
    "mr-implicit": lambda: with_transfer_syntax(make_dataset(sop_class=MR_IMAGE, modality="MR"),
                                                ImplicitVRLittleEndian),
    "ct-big-endian": lambda: with_transfer_syntax(make_dataset(), ExplicitVRBigEndian),
    "ct-rle": lambda: with_transfer_syntax(make_dataset(), RLELossless),
    "ct-j2k": lambda: with_transfer_syntax(make_dataset(rows=64, columns=64), JPEG2000Lossless),
    "us-jpeg": lambda: with_transfer_syntax(make_us_multiframe(), JPEGBaseline8Bit),
    "mg": make_mg,
    "rtdose": make_rt_dose,
    "wsi": make_whole_slide,
    "ophthalmic": make_ophthalmic,
    "sr": make_sr,
    "seg": make_seg,
    "latin1": lambda: make_named("latin1"),
    "utf8": lambda: make_named("utf8"),
    "jis": lambda: make_named("jis"),
}


@pytest.mark.parametrize("threshold", [16, 1024])
def test_json_model_matches_pydicom_on_every_bundled_file(tmp_path: Path, threshold: int) -> None:
    """Our model equals pydicom's to_json_dict except for binary values (placeholders) and group lengths.

    A small threshold defers most values at read time: sequences and text must still come back inline.
    """
    compared = 0
    for name in _pydicom_files():
        try:
            parsed = parse_part10(Path(name), threshold)
        except DicomServiceError:
            continue
        try:
            reference = _reference(Path(name))
        except ValueError:  # pydicom cannot convert a value either (badVR.dcm: tested below)
            continue
        ours = _normalise(parsed.metadata)
        theirs = _normalise(reference)
        dropped = {w.split()[1] for w in parsed.warnings}
        for key in dropped:
            theirs.pop(key, None)
        assert ours == theirs, name
        json.dumps(parsed.metadata, allow_nan=False)  # valid JSON, always
        compared += 1
    assert compared >= 100


@pytest.mark.parametrize("kind", sorted(GENERATED))
def test_json_model_matches_pydicom_on_generated_instances(tmp_path: Path, kind: str) -> None:
    path = _write(tmp_path, to_bytes(GENERATED[kind]()))
    parsed = parse_part10(path, 16)
    assert parsed.warnings == ()
    assert _normalise(parsed.metadata) == _normalise(_reference(path))
    if kind != "sr":
        assert parsed.metadata["7FE00010"]["BulkDataURI"] == f"{BULK_PLACEHOLDER}/7FE00010"


def test_pixel_data_offset_points_at_the_pixel_data_tag(tmp_path: Path) -> None:
    for kind in ("ct", "ct-big-endian", "mr-implicit", "ct-rle", "us-jpeg"):
        data = to_bytes(GENERATED[kind]())
        parsed = parse_part10(_write(tmp_path, data), 1024)
        assert parsed.pixel_data_offset is not None
        fmt = ">HH" if kind == "ct-big-endian" else "<HH"
        assert struct.unpack(fmt, data[parsed.pixel_data_offset:parsed.pixel_data_offset + 4]) == (0x7FE0, 0x0010)
    assert parse_part10(_write(tmp_path, to_bytes(make_us_multiframe(frames=5))), 1024).number_of_frames == 5


def test_deferred_sequence_and_long_text_are_inline_binary_is_bulk(tmp_path: Path) -> None:
    ds = make_dataset()
    ds.ReferencedImageSequence = Sequence([Dataset() for _ in range(40)])
    for i, item in enumerate(ds.ReferencedImageSequence):
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        item.ReferencedSOPInstanceUID = f"1.2.3.{i + 1}"
    ds.ImageComments = "x" * 5000  # LT, longer than the threshold
    icon = Dataset()
    icon.Rows = icon.Columns = 64
    icon.PixelData = b"\x01" * 4096
    icon["PixelData"].VR = "OB"
    ds.IconImageSequence = Sequence([icon])
    ds.add_new(0x00091010, "LO", "ACME 1.0")  # private creator
    ds.add_new(0x00091001, "OB", b"\x00" * 3000)  # a private binary blob
    parsed = parse_part10(_write(tmp_path, to_bytes(ds)), 1024)
    md = parsed.metadata
    assert len(md["00081140"]["Value"]) == 40
    assert md["00081140"]["Value"][39]["00081155"] == {"vr": "UI", "Value": ["1.2.3.40"]}
    assert md["00204000"] == {"vr": "LT", "Value": ["x" * 5000]}
    assert md["00880200"]["Value"][0]["7FE00010"] == {"vr": "OB",
                                                      "BulkDataURI": f"{BULK_PLACEHOLDER}/00880200/0/7FE00010"}
    assert md["00091010"] == {"vr": "LO", "Value": ["ACME 1.0"]}
    assert md["00091001"] == {"vr": "OB", "BulkDataURI": f"{BULK_PLACEHOLDER}/00091001"}
    assert not any(key.endswith("0000") for key in md)


def test_value_types_pn_groups_at_is_ds(tmp_path: Path) -> None:
    md = parse_part10(_write(tmp_path, to_bytes(make_named("jis"))), 1024).metadata
    assert md["00100010"]["Value"] == [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎",
                                        "Phonetic": "やまだ^たろう"}]
    md = parse_part10(_write(tmp_path, to_bytes(make_named("latin1"))), 1024).metadata
    assert md["00100010"]["Value"] == [{"Alphabetic": "Buc^Jérôme"}]
    md = parse_part10(_write(tmp_path, to_bytes(make_rt_dose(frames=3))), 1024).metadata
    assert md["00280009"] == {"vr": "AT", "Value": ["3004000C"]}
    assert md["3004000C"] == {"vr": "DS", "Value": [0.0, 2.5, 5.0]}
    assert md["00280008"] == {"vr": "IS", "Value": [3]}
    assert md["00200013"] == {"vr": "IS", "Value": [1]}


def test_unconvertible_values_are_left_out_with_a_warning(tmp_path: Path) -> None:
    parsed = parse_part10(Path(get_testdata_file("badVR.dcm")), 1024)  # NumberOfFrames "1A"
    assert "00280008" not in parsed.metadata
    assert parsed.warnings == ("attribute 00280008 could not be indexed",)


def test_non_finite_floats_stay_valid_json(tmp_path: Path) -> None:
    ds = make_dataset()
    ds.add_new(0x00189087, "FD", float("nan"))  # Diffusion b-value
    ds.add_new(0x00181318, "DS", "1.5")
    ds.add_new(0x0018605A, "FL", [float("inf"), float("-inf"), 1.0])  # Tabulated Values
    md = parse_part10(_write(tmp_path, to_bytes(ds)), 1024).metadata
    assert md["00189087"]["Value"] == ["NaN"]
    assert md["0018605A"]["Value"] == ["Infinity", "-Infinity", 1.0]
    json.dumps(md, allow_nan=False)


@pytest.mark.parametrize("keyword,tag", [("SOPClassUID", "SOP Class UID"), ("SOPInstanceUID", "SOP Instance UID"),
                                         ("StudyInstanceUID", "Study Instance UID"),
                                         ("SeriesInstanceUID", "Series Instance UID")])
def test_missing_or_invalid_required_uids_are_refused(tmp_path: Path, keyword: str, tag: str) -> None:
    ds = make_dataset(sop_uid="1.2.3.4.5")
    delattr(ds, keyword)
    with pytest.raises(DatasetMismatchError, match=f"{tag} .Type 1. is missing") as info:
        parse_part10(_write(tmp_path, to_bytes(ds)), 1024)
    assert info.value.dimse_status == 0xA900 and info.value.http_status == 400
    if keyword not in ("SOPClassUID", "SOPInstanceUID"):
        assert info.value.sop_instance_uid == "1.2.3.4.5"
        assert info.value.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    ds = make_dataset(sop_uid="1.2.3.4.5")
    setattr(ds, keyword, "1.02.abc")
    with pytest.raises(DatasetMismatchError, match=f"{tag} is not a valid UID"):
        parse_part10(_write(tmp_path, to_bytes(ds)), 1024)


def test_not_part10_is_unreadable(tmp_path: Path) -> None:
    for data in (b"", b"hello world", b"\0" * 128 + b"DICM", b"\0" * 128 + b"DICM" + b"\x02\x00" * 3,
                 to_bytes(make_dataset())[132:]):  # a bare data set without preamble and meta
        with pytest.raises(UnreadableInstanceError) as info:
            parse_part10(_write(tmp_path, data), 1024)
        assert info.value.dimse_status == 0xC000


def test_unknown_transfer_syntax_is_unsupported(tmp_path: Path) -> None:
    data = to_bytes(make_dataset())
    assert data.count(b"1.2.840.10008.1.2.1\0") == 1
    data = data.replace(b"1.2.840.10008.1.2.1\0", b"1.2.3.4.5.6.7.8.9.1\0")  # same length: meta stays valid
    with pytest.raises(UnsupportedMediaTypeError) as info:
        parse_part10(_write(tmp_path, data), 1024)
    assert info.value.dimse_status == 0xC122


@pytest.mark.parametrize("kind", ["ct", "ct-big-endian", "mr-implicit", "ct-rle", "us-jpeg", "seg"])
def test_files_cut_inside_pixel_data_or_header_are_refused(tmp_path: Path, kind: str) -> None:
    data = to_bytes(GENERATED[kind]())
    full = parse_part10(_write(tmp_path, data), 1024)
    assert full.pixel_data_offset is not None
    step = max(1, (len(data) - 132) // 150)
    for cut in [*range(132, len(data), step), len(data) - 1, full.pixel_data_offset + 3]:
        path = _write(tmp_path, data[:cut])
        try:
            parsed = parse_part10(path, 1024)
        except (UnreadableInstanceError, DatasetMismatchError, UnsupportedMediaTypeError):
            continue
        # only a cut exactly between two elements before the image pixel module can look complete
        assert cut < full.pixel_data_offset and parsed.pixel_data_offset is None, (kind, cut)
        assert "00280010" not in parsed.metadata, (kind, cut)


def test_rows_and_columns_without_image_pixel_module_need_no_pixel_data(tmp_path: Path) -> None:
    """MR Spectroscopy carries Rows/Columns and Spectroscopy Data, no Pixel Data (PS3.3 C.8.14.4)."""
    ds = make_dataset(sop_class="1.2.840.10008.5.1.4.1.1.4.2", modality="MR", pixels=False)
    ds.Rows, ds.Columns = 1, 1
    ds.add_new(0x56000020, "OF", b"\0" * 64)  # Spectroscopy Data
    parsed = parse_part10(_write(tmp_path, to_bytes(ds)), 1024)
    assert parsed.pixel_data_offset is None and parsed.metadata["00280010"] == {"vr": "US", "Value": [1]}
    ds.SamplesPerPixel = 1  # with the Image Pixel module, Pixel Data must follow
    with pytest.raises(DatasetMismatchError, match="without Pixel Data"):
        parse_part10(_write(tmp_path, to_bytes(ds)), 1024)


def test_pydicoms_truncated_samples_are_refused() -> None:
    for name in ("MR_truncated.dcm", "rtplan_truncated.dcm"):
        with pytest.raises(UnreadableInstanceError, match="truncated"):
            parse_part10(Path(get_testdata_file(name)), 1024)


def test_deflated_instance_is_parsed(tmp_path: Path) -> None:
    ds = make_dataset(sop_uid="1.2.3.9")
    parsed = parse_part10(_write(tmp_path, to_bytes(with_transfer_syntax(ds, DeflatedExplicitVRLittleEndian))), 1024)
    assert parsed.sop_instance_uid == "1.2.3.9"
    assert parsed.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    assert parsed.metadata["00100010"]["Value"] == [{"Alphabetic": "Doe^John"}]
    # the pixel data is there (as bulk data), but has no byte offset in the deflated file
    assert parsed.metadata["7FE00010"] == {"vr": "OW", "BulkDataURI": f"{BULK_PLACEHOLDER}/7FE00010"}
    assert parsed.pixel_data_offset is None and parsed.number_of_frames == 1
    with pytest.raises(UnreadableInstanceError):  # zlib refuses a cut deflate stream
        data = to_bytes(with_transfer_syntax(ds, DeflatedExplicitVRLittleEndian))
        parse_part10(_write(tmp_path, data[:-200]), 1024)
