"""imaging.frames: frames located from the indexed pixel data offset, without reading other frames."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian, JPEGLSLossless, RLELossless

from dicomflow.imaging.frames import PixelLayout, decoded_frames, encode_frame, plan_frames, read_frames_stored
from dicomflow.ingest.parse import parse_part10
from tests.factory import make_dataset, to_bytes


def _parsed(raw: bytes) -> tuple[int, str, PixelLayout]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.dcm"
        path.write_bytes(raw)
        parsed = parse_part10(path, 1024)
    assert parsed.pixel_data_offset is not None
    return parsed.pixel_data_offset, parsed.transfer_syntax_uid, PixelLayout.from_metadata(parsed.metadata)


class _CountingReader(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def read(self, n: int | None = -1) -> bytes:
        out = super().read(n)
        self.bytes_read += len(out)
        return out


@pytest.mark.parametrize("ts", [None, ImplicitVRLittleEndian])
def test_native_frames_are_byte_ranges(ts: str | None) -> None:
    ds = make_dataset(frames=6, rows=20, columns=30)
    if ts:
        ds.file_meta.TransferSyntaxUID = ts
    raw = to_bytes(ds)
    offset, stored, layout = _parsed(raw)
    assert layout.frame_size == 20 * 30 * 2 and layout.number_of_frames == 6
    fh = _CountingReader(raw)
    plan = plan_frames(fh, pixel_data_offset=offset, transfer_syntax=stored, layout=layout, numbers=[5, 2],
                       file_size=len(raw))
    assert plan is not None and fh.bytes_read <= 12  # only the element header was read
    for ranges, idx in zip(plan.ranges, (4, 1), strict=True):
        ((start, count),) = ranges
        assert np.array_equal(np.frombuffer(raw[start:start + count], "<u2").reshape(20, 30), ds.pixel_array[idx])


@pytest.mark.parametrize("ts", [JPEGLSLossless, RLELossless])
def test_encapsulated_frames_with_and_without_offset_table(ts: str) -> None:
    ds = make_dataset(frames=4, rows=20, columns=30)
    pixels = ds.pixel_array
    ds.compress(ts, generate_instance_uid=False)
    frames = list(generate_frames(ds.PixelData, number_of_frames=4))
    for with_bot in (True, False):
        ds.PixelData = encapsulate(frames, has_bot=with_bot)
        raw = to_bytes(ds)
        offset, stored, layout = _parsed(raw)
        got = read_frames_stored(io.BytesIO(raw), pixel_data_offset=offset, transfer_syntax=stored,
                                 layout=layout, numbers=[3, 1])
        assert got == [frames[2], frames[0]]
        native = [b for b, _ds in decoded_frames(io.BytesIO(raw), [4])]
        assert np.array_equal(np.frombuffer(native[0], "<u2").reshape(20, 30), pixels[3])


def test_several_fragments_per_frame_use_the_offset_table() -> None:
    ds = make_dataset(frames=3, rows=20, columns=30)
    ds.compress(RLELossless, generate_instance_uid=False)
    frames = list(generate_frames(ds.PixelData, number_of_frames=3))
    ds.PixelData = encapsulate(frames, fragments_per_frame=2, has_bot=True)
    raw = to_bytes(ds)
    offset, stored, layout = _parsed(raw)
    plan = plan_frames(io.BytesIO(raw), pixel_data_offset=offset, transfer_syntax=stored, layout=layout,
                       numbers=[2], file_size=len(raw))
    assert plan is not None and len(plan.ranges[0]) == 2
    assert b"".join(raw[o:o + n] for o, n in plan.ranges[0]) == frames[1]


def test_big_endian_falls_back_to_pydicom_and_returns_little_endian() -> None:
    ds = make_dataset(frames=2, rows=8, columns=8)
    pixels = ds.pixel_array
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.PixelData = pixels.astype(">u2").tobytes()
    raw = to_bytes(ds)
    offset, stored, layout = _parsed(raw)
    assert plan_frames(io.BytesIO(raw), pixel_data_offset=offset, transfer_syntax=stored, layout=layout,
                       numbers=[1], file_size=len(raw)) is None
    (got,) = read_frames_stored(io.BytesIO(raw), pixel_data_offset=offset, transfer_syntax=stored, layout=layout,
                                numbers=[2])
    assert np.array_equal(np.frombuffer(got, "<u2").reshape(8, 8), pixels[1])


def test_encode_frame_round_trips() -> None:
    ds = make_dataset(frames=2, rows=20, columns=30)
    raw = to_bytes(ds)
    native, meta = next(decoded_frames(io.BytesIO(raw), [2]))
    codestream = encode_frame(native, meta, JPEGLSLossless)
    ds2 = make_dataset(rows=20, columns=30)
    ds2.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds2.PixelData = encapsulate([codestream])
    ds2 = pydicom.dcmread(io.BytesIO(to_bytes(ds2)))
    assert np.array_equal(ds2.pixel_array, ds.pixel_array[1])


def test_undecodable_pixel_data_is_not_acceptable() -> None:
    from dicomflow.errors import NotAcceptableError
    from dicomflow.imaging.frames import decode_frame

    ds = make_dataset(rows=8, columns=8)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8garbage\xff\xd9"])
    ds = pydicom.dcmread(io.BytesIO(to_bytes(ds)))
    with pytest.raises(NotAcceptableError):
        decode_frame(ds, 1)
