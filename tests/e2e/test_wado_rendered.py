"""WADO-RS rendered and thumbnail resources (PS3.18 10.4.1.1.3, 8.3.5) with dicomweb-client and aiohttp."""

from __future__ import annotations

import io
from typing import Any

import aiohttp
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.uid import JPEGLSLossless, generate_uid

from tests.factory import US_MULTIFRAME, make_dataset, to_bytes

pytestmark = pytest.mark.e2e


def _ramp(**kw: Any) -> pydicom.Dataset:
    ds = make_dataset(rows=32, columns=64, **kw)
    arr = np.tile(np.arange(64, dtype=np.uint16) * 64, (32, 1))  # 0..4032 across the columns
    ds.PixelData = arr.tobytes()
    ds.BitsStored, ds.HighBit = 12, 11
    return ds


@pytest.fixture
def stored(live_server: Any) -> dict[str, Any]:
    study, s1, s2 = generate_uid(), generate_uid(), generate_uid()
    native = _ramp(study_uid=study, series_uid=s1, instance_number=1)
    inverted = _ramp(study_uid=study, series_uid=s1, instance_number=2)
    inverted.PhotometricInterpretation = "MONOCHROME1"
    jls = _ramp(study_uid=study, series_uid=s1, instance_number=3)
    jls.compress(JPEGLSLossless, generate_instance_uid=False)
    multi = make_dataset(study_uid=study, series_uid=s2, frames=3, rows=24, columns=24, bits=8,
                         sop_class=US_MULTIFRAME, modality="US")
    datasets = [pydicom.dcmread(io.BytesIO(to_bytes(d))) for d in (native, inverted, jls, multi)]
    client = DICOMwebClient(live_server.dicomweb)
    client.store_instances(datasets)
    return {"study": study, "series": (s1, s2), "ds": datasets, "client": client, "server": live_server}


def _sop(s: dict[str, Any], i: int) -> tuple[str, str]:
    ds = s["ds"][i]
    return ds.SeriesInstanceUID, ds.SOPInstanceUID


def test_rendered_instance_jpeg_png_window_viewport(stored: dict[str, Any]) -> None:
    client: DICOMwebClient = stored["client"]
    series, sop = _sop(stored, 0)
    jpeg = client.retrieve_instance_rendered(stored["study"], series, sop)
    img = Image.open(io.BytesIO(jpeg))
    assert img.format == "JPEG" and img.size == (64, 32)
    png = client.retrieve_instance_rendered(stored["study"], series, sop, media_types=("image/png",),
                                            params={"window": "2048,4096,linear-exact"})
    arr = np.asarray(Image.open(io.BytesIO(png)))
    expected = np.clip(((np.arange(64) * 64 - 2048) / 4096 + 0.5) * 255, 0, 255)
    assert np.abs(arr[0].astype(float) - expected).max() <= 1.0
    small = client.retrieve_instance_rendered(stored["study"], series, sop, media_types=("image/png",),
                                              params={"viewport": "32,32"})
    assert Image.open(io.BytesIO(small)).size == (32, 16)  # aspect ratio kept
    crop = client.retrieve_instance_rendered(stored["study"], series, sop, media_types=("image/png",),
                                             params={"viewport": "16,16,0,0,16,16", "window": "2048,4096,linear"})
    cropped = np.asarray(Image.open(io.BytesIO(crop)))
    assert cropped.shape == (16, 16) and cropped[0, 0] == 0 and cropped.max() <= 64  # the dark left quarter
    lo = client.retrieve_instance_rendered(stored["study"], series, sop, params={"quality": "5"})
    hi = client.retrieve_instance_rendered(stored["study"], series, sop, params={"quality": "100"})
    assert len(lo) < len(hi)


def test_monochrome1_is_inverted_and_compressed_renders_like_native(stored: dict[str, Any]) -> None:
    client: DICOMwebClient = stored["client"]
    params = {"window": "2048,4096,linear-exact"}
    images = []
    for i in (0, 1, 2):
        series, sop = _sop(stored, i)
        png = client.retrieve_instance_rendered(stored["study"], series, sop, media_types=("image/png",),
                                                params=params)
        images.append(np.asarray(Image.open(io.BytesIO(png))).astype(int))
    assert np.abs(images[1] - (255 - images[0])).max() <= 1 and images[1][0, 0] == 255
    assert np.array_equal(images[2], images[0])


def test_rendered_frames_and_thumbnails(stored: dict[str, Any]) -> None:
    client: DICOMwebClient = stored["client"]
    series, sop = _sop(stored, 3)
    f1 = client.retrieve_instance_frames_rendered(stored["study"], series, sop, [1], media_types=("image/png",))
    f3 = client.retrieve_instance_frames_rendered(stored["study"], series, sop, [3], media_types=("image/png",))
    a1, a3 = (np.asarray(Image.open(io.BytesIO(b))) for b in (f1, f3))
    assert a1.shape == (24, 24) and not np.array_equal(a1, a3)
    gif = client.retrieve_instance_rendered(stored["study"], series, sop, media_types=("image/gif",))
    anim = Image.open(io.BytesIO(gif))
    assert anim.format == "GIF" and anim.n_frames == 3
    first = client.retrieve_instance_rendered(stored["study"], series, sop, media_types=("image/png",))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(first))), a1)  # a single image is frame 1


async def test_thumbnails_collections_and_errors(stored: dict[str, Any]) -> None:
    root = stored["server"].dicomweb
    study, (s1, s2) = stored["study"], stored["series"]
    _series, sop = _sop(stored, 3)
    async with aiohttp.ClientSession() as session:
        for url in (f"{root}/studies/{study}/thumbnail", f"{root}/studies/{study}/series/{s2}/thumbnail",
                    f"{root}/studies/{study}/series/{s2}/instances/{sop}/thumbnail",
                    f"{root}/studies/{study}/series/{s2}/instances/{sop}/frames/2/thumbnail"):
            async with session.get(url, headers={"Accept": "image/jpeg"}) as resp:
                assert resp.status == 200, url
                assert resp.headers["Content-Type"] == "image/jpeg"
                img = Image.open(io.BytesIO(await resp.read()))
                assert max(img.size) <= 128
        async with session.get(f"{root}/studies/{study}/series/{s1}/thumbnail",
                               params={"viewport": "64,64"}) as resp:
            assert resp.status == 200 and Image.open(io.BytesIO(await resp.read())).size == (64, 32)
        async with session.get(f"{root}/studies/{study}/series/{s1}/thumbnail",
                               params={"accept": "image/png"}, headers={"Accept": "image/jpeg"}) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"] == "image/png"  # PS3.18 8.3.3.1
        async with session.get(f"{root}/studies/{study}/rendered",
                               headers={"Accept": 'multipart/related; type="image/png"'}) as resp:
            assert resp.status == 200
            reader = aiohttp.MultipartReader.from_response(resp)
            types = []
            while (part := await reader.next()) is not None:
                assert isinstance(part, aiohttp.BodyPartReader)
                types.append(part.headers["Content-Type"])
                Image.open(io.BytesIO(bytes(await part.read())))
            assert types == ["image/png"] * 4
        inst = f"{root}/studies/{study}/series/{s2}/instances/{sop}"
        for url, params, accept, status in (
                (f"{inst}/rendered", {"window": "1,2"}, None, 400),
                (f"{inst}/rendered", {"window": "1,0,linear"}, None, 400),
                (f"{inst}/rendered", {"quality": "0"}, None, 400),
                (f"{inst}/rendered", {"viewport": "a,b"}, None, 400),
                (f"{inst}/rendered", {"bogus": "1"}, None, 400),
                (f"{inst}/rendered", {}, "text/html", 406),
                (f"{inst}/frames/9/rendered", {}, None, 404),
                (f"{root}/studies/{study}/series/1.2.3/rendered", {}, None, 404)):
            async with session.get(url, params=params, headers={"Accept": accept} if accept else {}) as resp:
                assert resp.status == status, (url, params)
