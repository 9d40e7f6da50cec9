"""imaging.transcode: the conversion library WADO-RS and C-MOVE/C-GET share."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from dicomflow.errors import NotAcceptableError
from dicomflow.imaging.transcode import PixelInfo, choose_target, possible_targets, transcode
from tests.factory import make_dataset, to_bytes

MPEG4 = "1.2.840.10008.1.2.4.102"


def test_possible_targets() -> None:
    native = possible_targets(ExplicitVRLittleEndian)
    assert {ImplicitVRLittleEndian, JPEGLSLossless, JPEG2000Lossless, RLELossless, JPEGBaseline8Bit} <= native
    assert "1.2.840.10008.1.2.2" not in native  # retired big endian is never produced
    assert possible_targets(MPEG4) == frozenset({MPEG4})
    info16 = PixelInfo(16, 12, 1, 0, rows=512, columns=512)
    assert JPEGBaseline8Bit not in possible_targets(ExplicitVRLittleEndian, info16)  # PS3.5 8.2.1: 8-bit only
    assert JPEG2000Lossless in possible_targets(ExplicitVRLittleEndian, info16)
    tiny = PixelInfo(16, 16, 1, 0, rows=16, columns=16)
    assert JPEG2000Lossless not in possible_targets(ExplicitVRLittleEndian, tiny)
    floats = PixelInfo(32, 32, 1, 0, float_pixels=True, rows=64, columns=64)
    assert possible_targets(ExplicitVRLittleEndian, floats) == frozenset(
        {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian})
    assert JPEGLSLossless in possible_targets(MPEG4, has_pixels=False)  # no pixel data: only the encoding changes


def test_choose_target_prefers_stored_then_lossless() -> None:
    assert choose_target(JPEGLSLossless, {ExplicitVRLittleEndian, JPEGLSLossless}) == JPEGLSLossless
    assert choose_target(JPEGLSLossless, {ImplicitVRLittleEndian, JPEGBaseline8Bit}) == ImplicitVRLittleEndian
    info8 = PixelInfo(8, 8, 1, 0, rows=64, columns=64)
    assert choose_target(ExplicitVRLittleEndian, {JPEGBaseline8Bit, RLELossless}, info8) == RLELossless
    assert choose_target(ExplicitVRLittleEndian, {JPEGBaseline8Bit}, info8) == JPEGBaseline8Bit
    assert choose_target(MPEG4, {ExplicitVRLittleEndian}) is None


@pytest.mark.parametrize("target", [JPEGLSLossless, JPEG2000Lossless, RLELossless, JPEGLosslessSV1,
                                    ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
@pytest.mark.parametrize(("bits", "samples"), [(16, 1), (8, 3)])
def test_lossless_round_trip(target: str, bits: int, samples: int) -> None:
    ds = make_dataset(rows=40, columns=48, frames=2, bits=bits, samples=samples)
    original = to_bytes(ds)
    out = transcode(io.BytesIO(original), target)
    got = pydicom.dcmread(io.BytesIO(out))
    assert got.file_meta.TransferSyntaxUID == target
    assert got.SOPInstanceUID == ds.SOPInstanceUID and got.PatientName == ds.PatientName
    assert np.array_equal(got.pixel_array, ds.pixel_array)
    assert "LossyImageCompression" not in got
    back = pydicom.dcmread(io.BytesIO(transcode(out, ExplicitVRLittleEndian)))
    assert np.array_equal(back.pixel_array, ds.pixel_array)


@pytest.mark.parametrize("target", [JPEGBaseline8Bit, JPEG2000, JPEGLSNearLossless])
def test_lossy_targets_are_marked(target: str) -> None:
    ds = make_dataset(rows=64, columns=64, bits=8)
    ds.PixelData = (np.add.outer(np.arange(64), np.arange(64)) * 2).astype(np.uint8).tobytes()  # smooth
    got = pydicom.dcmread(io.BytesIO(transcode(to_bytes(ds), target)))
    assert got.file_meta.TransferSyntaxUID == target
    assert got.LossyImageCompression == "01"  # PS3.3 C.7.6.1.1.5
    assert got.LossyImageCompressionMethod
    assert np.abs(got.pixel_array.astype(int) - ds.pixel_array.astype(int)).mean() < 4


def test_impossible_conversions_raise_not_acceptable() -> None:
    ds = make_dataset(rows=64, columns=64, bits=16)
    with pytest.raises(NotAcceptableError):
        transcode(to_bytes(ds), JPEGBaseline8Bit)
    with pytest.raises(NotAcceptableError):
        transcode(to_bytes(ds), "1.2.3.4")


def test_instance_without_pixels_only_changes_encoding() -> None:
    ds = make_dataset(pixels=False)
    out = pydicom.dcmread(io.BytesIO(transcode(to_bytes(ds), ImplicitVRLittleEndian)))
    assert out.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian and out.PatientID == ds.PatientID
