"""WADO-RS metadata (PS3.18 10.4.1.1.2) and bulk data (8.6): from the index, BulkDataURIs that resolve."""

from __future__ import annotations

import io
import json
from typing import Any

import aiohttp
import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import RLELossless, generate_uid

from tests.factory import make_dataset, to_bytes

pytestmark = pytest.mark.e2e


def _with_bulk(**kw: Any) -> Dataset:
    ds = make_dataset(rows=32, columns=32, **kw)
    ds.add_new(0x00420011, "OB", bytes(range(256)) * 20)  # Encapsulated Document: 5120 bytes
    icon = Dataset()
    icon.Rows, icon.Columns, icon.SamplesPerPixel = 40, 40, 1
    icon.PhotometricInterpretation, icon.BitsAllocated, icon.BitsStored, icon.HighBit = "MONOCHROME2", 8, 8, 7
    icon.PixelRepresentation = 0
    icon.PixelData = bytes(1600)
    icon["PixelData"].VR = "OB"
    ds.IconImageSequence = [icon]
    return pydicom.dcmread(io.BytesIO(to_bytes(ds)))


@pytest.fixture
def stored(live_server: Any) -> dict[str, Any]:
    study, s1, s2 = generate_uid(), generate_uid(), generate_uid()
    a = _with_bulk(study_uid=study, series_uid=s1, instance_number=1)
    b = _with_bulk(study_uid=study, series_uid=s1, instance_number=2)
    c = make_dataset(study_uid=study, series_uid=s2, frames=2)
    c.compress(RLELossless, generate_instance_uid=False)
    c = pydicom.dcmread(io.BytesIO(to_bytes(c)))
    client = DICOMwebClient(live_server.dicomweb)
    client.store_instances([a, b, c])
    return {"study": study, "series": (s1, s2), "ds": (a, b, c), "client": client, "server": live_server}


def _local(s: dict[str, Any], meta: Any) -> Any:
    """dicomweb-client sends ``Host`` without the port; the server must still build URLs that resolve."""
    assert '"http://127.0.0.1/' not in json.dumps(meta)
    return meta


def test_series_metadata_has_resolvable_bulk_data_uris(stored: dict[str, Any]) -> None:
    client: DICOMwebClient = stored["client"]
    study, (s1, _s2) = stored["study"], stored["series"]
    a, b, _c = stored["ds"]
    meta = _local(stored, client.retrieve_series_metadata(study, s1))
    assert [m["00080018"]["Value"][0] for m in meta] == [a.SOPInstanceUID, b.SOPInstanceUID]
    base = f"{stored['server'].dicomweb}/studies/{study}/series/{s1}/instances/{a.SOPInstanceUID}"
    first = meta[0]
    assert first["7FE00010"]["BulkDataURI"] == f"{base}/bulkdata/7FE00010"
    assert first["00420011"]["BulkDataURI"] == f"{base}/bulkdata/00420011"
    icon_uri = first["00880200"]["Value"][0]["7FE00010"]["BulkDataURI"]
    assert icon_uri == f"{base}/bulkdata/00880200/0/7FE00010"
    assert first["00100010"]["Value"] == [{"Alphabetic": "Doe^John"}]
    assert client.retrieve_bulkdata(first["00420011"]["BulkDataURI"]) == [a[0x00420011].value]
    assert client.retrieve_bulkdata(icon_uri) == [bytes(1600)]
    assert client.retrieve_bulkdata(first["7FE00010"]["BulkDataURI"]) == [a.PixelData]


def test_study_and_instance_metadata(stored: dict[str, Any]) -> None:
    client: DICOMwebClient = stored["client"]
    study = client.retrieve_study_metadata(stored["study"])
    assert len(study) == 3
    _a, _b, c = stored["ds"]
    inst = _local(stored, client.retrieve_instance_metadata(stored["study"], stored["series"][1], c.SOPInstanceUID))
    assert inst["00080018"]["Value"] == [c.SOPInstanceUID]
    assert inst["00280008"]["Value"] == [2]
    frames = client.retrieve_bulkdata(inst["7FE00010"]["BulkDataURI"],
                                      media_types=(("application/octet-stream", "*"),))
    assert len(frames) == 2  # encapsulated pixel data as stored: one part per frame


async def test_forwarded_headers_and_errors(stored: dict[str, Any]) -> None:
    root = stored["server"].dicomweb
    study, (s1, _s2) = stored["study"], stored["series"]
    url = f"{root}/studies/{study}/series/{s1}/metadata"
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers={"X-Forwarded-Host": "pacs.example.org",
                                             "X-Forwarded-Proto": "https"}) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("application/dicom+json")
            body = await resp.json(content_type=None)
        assert body[0]["7FE00010"]["BulkDataURI"].startswith(
            f"https://pacs.example.org/dicomweb/studies/{study}/series/{s1}/instances/")
        async with session.get(url, headers={"Accept": "application/dicom+xml"}) as resp:
            assert resp.status == 406
        async with session.get(f"{root}/studies/{study}/series/1.2.3/metadata") as resp:
            assert resp.status == 404
        async with session.get(f"{root}/studies/1.2.x/metadata") as resp:
            assert resp.status == 400
        async with session.get(f"{stored['server'].tenant_dicomweb('acme')}/studies/{study}/metadata") as resp:
            assert resp.status == 404
        a = stored["ds"][0]
        inst = f"{root}/studies/{study}/series/{s1}/instances/{a.SOPInstanceUID}"
        for path, status in (("00100010x", 400), ("00431234", 404), ("00880200/5/7FE00010", 404)):
            async with session.get(f"{inst}/bulkdata/{path}") as resp:
                assert resp.status == status, path


def test_native_pixel_bulk_data_equals_pixels(stored: dict[str, Any]) -> None:
    a = stored["ds"][0]
    client: DICOMwebClient = stored["client"]
    meta = _local(stored, client.retrieve_instance_metadata(stored["study"], stored["series"][0], a.SOPInstanceUID))
    (raw,) = client.retrieve_bulkdata(meta["7FE00010"]["BulkDataURI"])
    assert np.array_equal(np.frombuffer(raw, "<u2").reshape(32, 32), a.pixel_array)


def test_encapsulated_pdf_as_bulk_data_and_rendered(live_server: Any) -> None:
    pdf = b"%PDF-1.4\n" + b"0" * 4000 + b"\n%%EOF\n"
    ds = make_dataset(pixels=False, sop_class="1.2.840.10008.5.1.4.1.1.104.1", modality="DOC")
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    ds = pydicom.dcmread(io.BytesIO(to_bytes(ds)))
    client = DICOMwebClient(live_server.dicomweb)
    client.store_instances([ds])
    meta = client.retrieve_instance_metadata(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    uri = _local({"server": live_server}, meta)["00420011"]["BulkDataURI"]
    assert client.retrieve_bulkdata(uri) == [ds.EncapsulatedDocument]
    rendered = client.retrieve_instance_rendered(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                                                 media_types=("application/pdf",))
    assert rendered == ds.EncapsulatedDocument
    resp = requests.get(uri + "?accept=application/pdf", timeout=30)  # how a browser viewer asks (8.3.3.1)
    assert resp.status_code == 200 and resp.headers["Content-Type"] == "application/pdf"
    assert resp.content == ds.EncapsulatedDocument
    inst = uri.rsplit("/bulkdata/", 1)[0]
    assert requests.get(inst + "/rendered", headers={"Accept": "image/jpeg"}, timeout=30).status_code == 406
