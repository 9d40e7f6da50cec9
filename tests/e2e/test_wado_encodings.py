"""WADO-RS over stored encodings other than the usual: big endian, deflate, JPEG lossless colour, video."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.factory import get_multipart, make_dataset, multipart, to_bytes

pytestmark = pytest.mark.e2e

FILES = ("MR_small_bigendian.dcm", "image_dfl.dcm", "SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle_2frame.dcm")
MPEG4 = "1.2.840.10008.1.2.4.102"
STAR = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _video() -> bytes:
    ds = make_dataset(rows=64, columns=64, bits=8, samples=3, frames=10, pixels=True)
    ds.file_meta.TransferSyntaxUID = MPEG4
    ds.PhotometricInterpretation = "YBR_PARTIAL_420"
    stream = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40
    ds.PixelData = encapsulate([stream[:4000], stream[4000:]], has_bot=False)
    ds["PixelData"].VR = "OB"
    return to_bytes(ds)


@pytest.fixture
def stored(live_server: Any) -> dict[str, Any]:
    blobs: dict[str, bytes] = {}
    for name in FILES:
        path = get_testdata_file(name)
        assert path is not None
        blobs[name] = Path(str(path)).read_bytes()
    blobs["video"] = _video()
    return {"server": live_server, "blobs": blobs}


async def _store_and_urls(s: dict[str, Any], session: aiohttp.ClientSession) -> dict[str, str]:
    urls = {}
    for name, raw in s["blobs"].items():
        body, ctype = multipart([raw])
        # two of pydicom's files share a SOP Instance UID: keep them in different tenants
        root = s["server"].tenant_dicomweb("acme") if name == "SC_rgb_rle_2frame.dcm" else s["server"].dicomweb
        async with session.post(f"{root}/studies", data=body, headers={"Content-Type": ctype}) as r:
            assert r.status == 200, (name, await r.text())
            result = await r.json(content_type=None)
        urls[name] = result["00081199"]["Value"][0]["00081190"]["Value"][0]
    return urls


async def test_stored_encodings(stored: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as session:
        urls = await _store_and_urls(stored, session)
        for name in FILES:
            raw = stored["blobs"][name]
            status, _, parts = await get_multipart(urls[name], STAR, session)
            assert status == 200 and parts[0][1] == raw, name  # byte-exact as stored
            status, _, parts = await get_multipart(urls[name], None, session)  # default: Explicit VR Little Endian
            assert status == 200, name
            got = pydicom.dcmread(io.BytesIO(parts[0][1]))
            original = pydicom.dcmread(io.BytesIO(raw))
            assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian, name
            assert np.array_equal(got.pixel_array, original.pixel_array), name
            status, _, frames = await get_multipart(urls[name] + "/frames/1", None, session)
            assert status == 200 and frames[0][0].startswith("application/octet-stream"), name
            first = original.pixel_array if int(original.get("NumberOfFrames", 1) or 1) == 1 else \
                original.pixel_array[0]
            assert frames[0][1] == np.ascontiguousarray(first.astype(first.dtype.newbyteorder("<"))).tobytes(), name


async def test_video_only_as_stored(stored: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as session:
        urls = await _store_and_urls(stored, session)
        url, raw = urls["video"], stored["blobs"]["video"]
        status, _, parts = await get_multipart(url, STAR, session)
        assert status == 200 and parts[0][1] == raw
        assert (await get_multipart(url, None, session))[0] == 406  # no decoder for MPEG-4 here
        assert (await get_multipart(url + "/frames/1", STAR, session))[0] == 400
        status, _, parts = await get_multipart(url + "/bulkdata/7FE00010",
                                     "multipart/related; type=application/octet-stream; transfer-syntax=*", session)
        assert status == 200 and len(parts) == 1
        assert parts[0][0] == f"video/mp4; transfer-syntax={MPEG4}"
        assert parts[0][1] == b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40


async def test_instance_without_pixels_has_no_frames(stored: dict[str, Any]) -> None:
    sr = make_dataset(pixels=False, modality="SR", study_uid=generate_uid())
    async with aiohttp.ClientSession() as session:
        body, ctype = multipart([to_bytes(sr)])
        root = stored["server"].dicomweb
        async with session.post(f"{root}/studies", data=body, headers={"Content-Type": ctype}) as r:
            url = (await r.json(content_type=None))["00081199"]["Value"][0]["00081190"]["Value"][0]
        assert (await get_multipart(url + "/frames/1", None, session))[0] == 404
        async with session.get(url + "/rendered") as resp:
            assert resp.status == 406
        status, _, parts = await get_multipart(url, 'multipart/related; type="application/dicom"; '
                                                   'transfer-syntax=1.2.840.10008.1.2', session)
        assert status == 200 and pydicom.dcmread(io.BytesIO(parts[0][1])).PatientID == sr.PatientID
