"""WADO-RS retrieve (PS3.18 10.4.1.1.1) against a live server with dicomweb-client and raw aiohttp."""

from __future__ import annotations

import io
from typing import Any

import aiohttp
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from tests.factory import get_multipart, make_dataset, to_bytes

pytestmark = pytest.mark.e2e


def _compressed(ts: str, **kw: Any) -> bytes:
    ds = make_dataset(**kw)
    ds.compress(ts, generate_instance_uid=False)
    return to_bytes(ds)


def _implicit(**kw: Any) -> bytes:
    ds = make_dataset(**kw)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return to_bytes(ds)


@pytest.fixture
def stored(live_server: Any) -> dict[str, Any]:
    """One study, two series: native ELE, ILE, JPEG-LS, JPEG 2000, RLE (multi-frame)."""
    study = generate_uid()
    s1, s2 = generate_uid(), generate_uid()
    data = {"ele": to_bytes(make_dataset(study_uid=study, series_uid=s1, instance_number=1, rows=40, columns=48)),
            "ile": _implicit(study_uid=study, series_uid=s1, instance_number=2),
            "jls": _compressed(JPEGLSLossless, study_uid=study, series_uid=s2, instance_number=1),
            "j2k": _compressed(JPEG2000Lossless, study_uid=study, series_uid=s2, instance_number=2, bits=8,
                               rows=64, columns=64),
            "rle": _compressed(RLELossless, study_uid=study, series_uid=s2, instance_number=3, frames=3)}
    client = DICOMwebClient(live_server.dicomweb)
    client.store_instances([pydicom.dcmread(io.BytesIO(b)) for b in data.values()])
    info = {}
    for name, raw in data.items():
        ds = pydicom.dcmread(io.BytesIO(raw))
        info[name] = (ds.SeriesInstanceUID, ds.SOPInstanceUID, raw)
    return {"study": study, "series": (s1, s2), "data": info, "client": client, "server": live_server}


def _instance_url(s: dict[str, Any], name: str) -> str:
    series, sop, _raw = s["data"][name]
    return f"{s['server'].dicomweb}/studies/{s['study']}/series/{series}/instances/{sop}"


@pytest.mark.parametrize("name", ["ele", "ile", "jls", "j2k", "rle"])
async def test_instance_retrieve_is_byte_exact_with_any_transfer_syntax(stored: dict[str, Any], name: str) -> None:
    status, ctype, parts = await get_multipart(
        _instance_url(stored, name), 'multipart/related; type="application/dicom"; transfer-syntax=*')
    assert status == 200
    assert ctype.startswith("multipart/related") and 'type="application/dicom"' in ctype
    assert len(parts) == 1
    part_type, body = parts[0]
    assert body == stored["data"][name][2]
    stored_ts = pydicom.dcmread(io.BytesIO(body)).file_meta.TransferSyntaxUID
    assert part_type == f"application/dicom; transfer-syntax={stored_ts}"


def test_dicomweb_client_retrieves_study_series_instance(stored: dict[str, Any]) -> None:
    client: DICOMwebClient = stored["client"]
    study = client.retrieve_study(stored["study"], media_types=(("application/dicom", "*"),))
    assert sorted(ds.SOPInstanceUID for ds in study) == sorted(v[1] for v in stored["data"].values())
    series = client.retrieve_series(stored["study"], stored["series"][1], media_types=(("application/dicom", "*"),))
    assert [ds.InstanceNumber for ds in series] == [1, 2, 3]  # ordered by instance number
    series_uid, sop, raw = stored["data"]["jls"]
    ds = client.retrieve_instance(stored["study"], series_uid, sop)
    assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless
    assert np.array_equal(ds.pixel_array, pydicom.dcmread(io.BytesIO(raw)).pixel_array)


@pytest.mark.parametrize("name", ["ile", "jls", "j2k", "rle"])
async def test_default_transfer_syntax_is_explicit_le_with_equal_pixels(stored: dict[str, Any], name: str) -> None:
    # PS3.18 8.7.3.5.2: no transfer-syntax parameter means Explicit VR Little Endian
    status, _ctype, parts = await get_multipart(_instance_url(stored, name),
                                                'multipart/related; type="application/dicom"')
    assert status == 200
    part_type, body = parts[0]
    assert part_type == f"application/dicom; transfer-syntax={ExplicitVRLittleEndian}"
    got = pydicom.dcmread(io.BytesIO(body))
    original = pydicom.dcmread(io.BytesIO(stored["data"][name][2]))
    assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert got.SOPInstanceUID == original.SOPInstanceUID
    assert np.array_equal(got.pixel_array, original.pixel_array)


@pytest.mark.parametrize("target", [JPEGLSLossless, JPEG2000Lossless, RLELossless, JPEGLosslessSV1])
async def test_transcodes_to_lossless_compressed_syntaxes(stored: dict[str, Any], target: str) -> None:
    status, _ctype, parts = await get_multipart(
        _instance_url(stored, "ele"), f'multipart/related; type="application/dicom"; transfer-syntax={target}')
    assert status == 200
    part_type, body = parts[0]
    assert part_type == f"application/dicom; transfer-syntax={target}"
    got = pydicom.dcmread(io.BytesIO(body))
    assert got.file_meta.TransferSyntaxUID == target
    assert np.array_equal(got.pixel_array, pydicom.dcmread(io.BytesIO(stored["data"]["ele"][2])).pixel_array)


async def test_q_values_and_star_pick_preferred(stored: dict[str, Any]) -> None:
    accept = (f'multipart/related; type="application/dicom"; transfer-syntax={JPEGLSLossless}; q=0.5, '
              'multipart/related; type="application/dicom"; transfer-syntax=*; q=0.9')
    status, _c, parts = await get_multipart(_instance_url(stored, "j2k"), accept)
    assert status == 200 and parts[0][1] == stored["data"]["j2k"][2]
    for accept in (None, "*/*"):
        status, _c, parts = await get_multipart(_instance_url(stored, "ele"), accept)
        assert status == 200 and parts[0][1] == stored["data"]["ele"][2]


async def test_study_retrieve_mixes_exact_and_transcoded(stored: dict[str, Any]) -> None:
    url = f"{stored['server'].dicomweb}/studies/{stored['study']}"
    status, _c, parts = await get_multipart(url, 'multipart/related; type="application/dicom"')
    assert status == 200 and len(parts) == 5
    for part_type, body in parts:
        assert part_type.endswith(ExplicitVRLittleEndian)
        assert pydicom.dcmread(io.BytesIO(body)).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert stored["data"]["ele"][2] in [b for _t, b in parts]


async def test_errors(stored: dict[str, Any]) -> None:
    root = stored["server"].dicomweb
    series_uid, sop, _raw = stored["data"]["ele"]
    async with aiohttp.ClientSession() as session:
        async def status(url: str, accept: str | None = None) -> int:
            async with session.get(url, headers={"Accept": accept} if accept else {}) as resp:
                return resp.status
        assert await status(f"{root}/studies/1.2.3.999") == 404
        assert await status(f"{root}/studies/{stored['study']}/series/1.2.3.999") == 404
        assert await status(f"{root}/studies/{stored['study']}/series/{series_uid}/instances/1.2.9") == 404
        assert await status(f"{root}/studies/not-a-uid") == 400
        assert await status(f"{root}/studies/1.02.3") == 400
        # another tenant's data answers exactly as if it did not exist
        assert await status(f"{stored['server'].tenant_dicomweb('acme')}/studies/{stored['study']}") == 404
        inst = f"{root}/studies/{stored['study']}/series/{series_uid}/instances/{sop}"
        assert await status(inst, "application/pdf") == 406
        assert await status(inst, 'multipart/related; type="application/dicom"; transfer-syntax=1.2.3.4') == 406
        assert await status(inst, 'multipart/related; type="image/png"') == 406
        # 16-bit data cannot become JPEG baseline (PS3.5 8.2.1: 8-bit only)
        assert await status(inst, 'multipart/related; type="application/dicom"; '
                                  'transfer-syntax=1.2.840.10008.1.2.4.50') == 406


async def test_partial_content_when_only_some_instances_convert(stored: dict[str, Any]) -> None:
    # only the 8-bit instance can become JPEG baseline (PS3.5 8.2.1): 206 with that one (PS3.18 8.7.1.2)
    url = f"{stored['server'].dicomweb}/studies/{stored['study']}"
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    async with aiohttp.ClientSession() as session, session.get(url, headers={"Accept": accept}) as resp:
        assert resp.status == 206
        assert "Warning" in resp.headers
        reader = aiohttp.MultipartReader.from_response(resp)
        parts = []
        while (part := await reader.next()) is not None:
            assert isinstance(part, aiohttp.BodyPartReader)
            parts.append(pydicom.dcmread(io.BytesIO(bytes(await part.read()))))
    assert [ds.SOPInstanceUID for ds in parts] == [stored["data"]["j2k"][1]]
    assert parts[0].file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    assert parts[0].LossyImageCompression == "01"
