"""WADO-RS frames (PS3.18 10.4.1.1.4): dicomweb-client, raw aiohttp and OHIF-style loose headers."""

from __future__ import annotations

import io
from typing import Any
from urllib.parse import quote

import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from tests.factory import US_MULTIFRAME, get_multipart, make_dataset, to_bytes

pytestmark = pytest.mark.e2e

OHIF_ACCEPT = "multipart/related; type=application/octet-stream; transfer-syntax=*"


@pytest.fixture
def stored(live_server: Any) -> dict[str, Any]:
    study, series = generate_uid(), generate_uid()
    out: dict[str, Any] = {"study": study, "series": series, "server": live_server,
                           "client": DICOMwebClient(live_server.dicomweb)}
    datasets = {}
    for n, (name, ts) in enumerate([("native", None), ("jls", JPEGLSLossless), ("rle", RLELossless),
                                    ("j2k", JPEG2000Lossless)], start=1):
        ds = make_dataset(study_uid=study, series_uid=series, instance_number=n, frames=5, rows=40, columns=36,
                          sop_class=US_MULTIFRAME, modality="US")
        pixels = ds.pixel_array
        if ts:
            ds.compress(ts, generate_instance_uid=False)
        datasets[name] = (pydicom.dcmread(io.BytesIO(to_bytes(ds))), pixels)
    out["client"].store_instances([ds for ds, _p in datasets.values()])
    out["data"] = {name: (ds.SOPInstanceUID, pixels, ds) for name, (ds, pixels) in datasets.items()}
    return out


def _url(s: dict[str, Any], name: str, frames: str) -> str:
    sop = s["data"][name][0]
    return f"{s['server'].dicomweb}/studies/{s['study']}/series/{s['series']}/instances/{sop}/frames/{frames}"


def test_dicomweb_client_native_frames(stored: dict[str, Any]) -> None:
    sop, pixels, _ds = stored["data"]["native"]
    frames = stored["client"].retrieve_instance_frames(stored["study"], stored["series"], sop, [2, 5])
    assert len(frames) == 2
    for raw, idx in zip(frames, (1, 4), strict=True):
        assert np.array_equal(np.frombuffer(raw, "<u2").reshape(40, 36), pixels[idx])


async def test_ohif_accept_returns_stored_codestreams(stored: dict[str, Any]) -> None:
    for name, ts, media in (("jls", JPEGLSLossless, "image/jls"), ("rle", RLELossless, "image/dicom-rle"),
                            ("j2k", JPEG2000Lossless, "image/jp2")):
        _sop, _pixels, ds = stored["data"][name]
        expected = list(generate_frames(ds.PixelData, number_of_frames=5))
        status, ctype, parts = await get_multipart(_url(stored, name, "1,3"), OHIF_ACCEPT)
        assert status == 200
        assert ctype.startswith("multipart/related") and media in ctype
        assert [p[0] for p in parts] == [f"{media}; transfer-syntax={ts}"] * 2
        assert [p[1] for p in parts] == [expected[0], expected[2]]
    status, _c, parts = await get_multipart(_url(stored, "native", "4"), OHIF_ACCEPT)
    assert status == 200 and parts[0][0] == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
    assert np.array_equal(np.frombuffer(parts[0][1], "<u2").reshape(40, 36), stored["data"]["native"][1][3])


@pytest.mark.parametrize("name", ["jls", "rle", "j2k"])
async def test_default_accept_decodes_to_native(stored: dict[str, Any], name: str) -> None:
    _sop, pixels, _ds = stored["data"][name]
    for accept in (None, "*/*", 'multipart/related; type="application/octet-stream"'):
        status, _c, parts = await get_multipart(_url(stored, name, "2"), accept)
        assert status == 200
        assert parts[0][0] == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
        assert np.array_equal(np.frombuffer(parts[0][1], "<u2").reshape(40, 36), pixels[1])


async def test_transcodes_frames_to_requested_media_type(stored: dict[str, Any]) -> None:
    _sop, pixels, _ds = stored["data"]["native"]
    status, ctype, parts = await get_multipart(_url(stored, "native", "3"),
                                      f'multipart/related; type="image/jls"; transfer-syntax={JPEGLSLossless}')
    assert status == 200 and 'type="image/jls"' in ctype
    assert parts[0][0] == f"image/jls; transfer-syntax={JPEGLSLossless}"
    arr, _ = get_decoder(JPEGLSLossless).as_array(encapsulate([parts[0][1]]), rows=40, columns=36, samples_per_pixel=1,
                                                   bits_allocated=16, bits_stored=16, pixel_representation=0,
                                                   photometric_interpretation="MONOCHROME2", number_of_frames=1)
    assert np.array_equal(arr, pixels[2])


async def test_frame_errors(stored: dict[str, Any]) -> None:
    assert (await get_multipart(_url(stored, "native", "6"), None))[0] == 404
    assert (await get_multipart(_url(stored, "native", "0"), None))[0] == 400
    assert (await get_multipart(_url(stored, "native", "1,x"), None))[0] == 400
    assert (await get_multipart(_url(stored, "native", "1"), "image/png"))[0] == 406
    assert (await get_multipart(_url(stored, "native", "1"), 'multipart/related; type="image/jp2"; '
                                                      'transfer-syntax=1.2.840.10008.1.2.4.50'))[0] == 406
    bad = f"{stored['server'].dicomweb}/studies/{stored['study']}/series/{stored['series']}/instances/1.2.3/frames/1"
    assert (await get_multipart(bad, None))[0] == 404


async def test_many_frames_are_decoded_in_batches(live_server: Any) -> None:
    ds = make_dataset(frames=20, rows=16, columns=16, sop_class=US_MULTIFRAME, modality="US")
    pixels = ds.pixel_array
    ds.compress(RLELossless, generate_instance_uid=False)
    ds = pydicom.dcmread(io.BytesIO(to_bytes(ds)))
    DICOMwebClient(live_server.dicomweb).store_instances([ds])
    url = (f"{live_server.dicomweb}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
           f"{ds.SOPInstanceUID}/frames/{','.join(str(n) for n in range(20, 0, -1))}")
    status, _ctype, parts = await get_multipart(url, None)
    assert status == 200 and len(parts) == 20
    for (_t, raw), idx in zip(parts, range(19, -1, -1), strict=True):
        assert np.array_equal(np.frombuffer(raw, "<u2").reshape(16, 16), pixels[idx])


async def test_accept_query_parameter_replaces_the_header(stored: dict[str, Any]) -> None:
    # PS3.18 8.3.3.1: browsers that cannot set Accept use ?accept=
    _sop, _pixels, ds = stored["data"]["jls"]
    url = _url(stored, "jls", "2") + "?accept=" + quote(OHIF_ACCEPT)
    status, _ctype, parts = await get_multipart(url, "image/png")
    assert status == 200
    assert parts[0] == (f"image/jls; transfer-syntax={JPEGLSLossless}",
                        list(generate_frames(ds.PixelData, number_of_frames=5))[1])
