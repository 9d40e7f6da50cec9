"""QIDO-RS on the raw wire: what OHIF and curl send, status codes, headers and every 400 case."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from dicomflow.app import create_app
from dicomflow.settings import Settings
from tests.factory import make_instance, multipart

#: QIDO needs no routing; a worker cancelled mid-claim() at teardown has hung some runs (see report)
pytestmark = [pytest.mark.e2e, pytest.mark.routing_off]


@pytest.fixture
async def client(aiohttp_client: Any, settings: Settings) -> Any:
    """The in-process client without aiohttp's access log: QIDO URLs carry patient IDs and names, and
    nothing at INFO may log them (dicomflow serve runs without an access log too)."""
    server = TestServer(create_app(settings))
    await server.start_server(access_log=None)  # TestServer(**kwargs) would drop it
    return await aiohttp_client(server)

STUDY = "1.2.826.0.3.1"
SERIES = f"{STUDY}.1"


@pytest.fixture
async def stored(client: Any) -> Any:
    parts = [make_instance(study_uid=STUDY, series_uid=SERIES, sop_uid=f"{SERIES}.{i}", instance_number=i,
                           patient_id="PID-1", patient_name="Doe^John", study_date="20240115")
             for i in range(1, 4)]
    body, ctype = multipart(parts)
    resp = await client.post("/dicomweb/studies", data=body, headers={"Content-Type": ctype})
    assert resp.status == 200
    return client


async def test_ohif_study_list_request(stored: Any) -> None:
    # exactly the shape of OHIF 3's study list query: tag-number keys, encoded comma list, limit=101
    resp = await stored.get("/dicomweb/studies?limit=101&offset=0&fuzzymatching=false"
                            "&includefield=00081030%2C00080060&StudyDate=20240101-20241231&00100020=PID-1")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("application/dicom+json")
    studies = await resp.json()
    assert [s["0020000D"]["Value"] for s in studies] == [[STUDY]]
    assert studies[0]["00081030"]["Value"] == ["Synthetic study"]
    # Modality is a series attribute: not silently dropped but reported
    assert "00080060" in resp.headers["Warning"] and resp.headers["Warning"].startswith("299 ")


async def test_ohif_series_and_instances_requests(stored: Any) -> None:
    resp = await stored.get(f"/dicomweb/studies/{STUDY}/series?includefield=0008103E%2C00080060")
    series = await resp.json()
    assert resp.status == 200 and series[0]["0020000E"]["Value"] == [SERIES]
    resp = await stored.get(f"/dicomweb/studies/{STUDY}/series/{SERIES}/instances")
    instances = await resp.json()
    assert [i["00080018"]["Value"][0] for i in instances] == [f"{SERIES}.{i}" for i in range(1, 4)]
    resp = await stored.get(f"/dicomweb/studies/{STUDY}/instances?includefield=all")
    assert resp.status == 200 and len(await resp.json()) == 3


async def test_retrieve_url_follows_forwarded_headers(stored: Any) -> None:
    resp = await stored.get("/dicomweb/studies", headers={"Forwarded": 'proto=https;host="pacs.example:8443"'})
    study = (await resp.json())[0]
    assert study["00081190"]["Value"] == [f"https://pacs.example:8443/dicomweb/studies/{STUDY}"]
    resp = await stored.get(f"/dicomweb/studies/{STUDY}/series",
                            headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "viewer.example"})
    series = (await resp.json())[0]
    assert series["00081190"]["Value"] == [f"https://viewer.example/dicomweb/studies/{STUDY}/series/{SERIES}"]


async def test_percent_encoded_values_are_decoded(stored: Any) -> None:
    resp = await stored.get("/dicomweb/studies?PatientName=Doe%5EJo%2A")  # Doe^Jo*
    assert resp.status == 200 and len(await resp.json()) == 1


async def test_other_charsets_are_refused_with_a_warning(stored: Any) -> None:
    resp = await stored.get("/dicomweb/studies?charset=ISO-8859-1")
    assert resp.status == 200 and "UTF-8" in resp.headers["Warning"]
    resp = await stored.get("/dicomweb/studies?charset=utf-8")
    assert resp.status == 200 and "Warning" not in resp.headers


async def test_zero_results_is_204_without_body(stored: Any) -> None:
    resp = await stored.get("/dicomweb/studies?PatientID=nobody")
    assert resp.status == 204  # PS3.18 Table 10.6.3-1
    assert await resp.read() == b""


async def test_truncation_sets_a_warning_header(stored: Any) -> None:
    resp = await stored.get(f"/dicomweb/studies/{STUDY}/instances?limit=2")
    assert resp.status == 200 and len(await resp.json()) == 2
    assert "offset=2" in resp.headers["Warning"]
    resp = await stored.get(f"/dicomweb/studies/{STUDY}/instances?limit=2&offset=2")
    assert len(await resp.json()) == 1 and "Warning" not in resp.headers


async def test_limit_above_the_maximum_is_capped_with_a_warning(client: Any, settings: Any) -> None:
    resp = await client.get(f"/dicomweb/studies?limit={settings.limits.qido_max_limit + 1}")
    assert resp.status == 204 and "maximum" in resp.headers["Warning"]


async def test_tenants_and_unknown_tenants(stored: Any) -> None:
    resp = await stored.get("/tenants/acme/dicomweb/studies")
    assert resp.status == 204
    resp = await stored.get("/tenants/nobody/dicomweb/studies")
    assert resp.status == 404


@pytest.mark.parametrize(("url", "fragment"), [
    ("/dicomweb/studies?NoSuchKeyword=1", "unknown attribute"),
    ("/dicomweb/studies?PatientID=a&PatientID=b", "more than once"),
    ("/dicomweb/studies?StudyDate=2024-01-01", "StudyDate"),
    ("/dicomweb/studies?StudyDate=20240101-20230101", "upper bound"),
    ("/dicomweb/studies?StudyTime=noon", "StudyTime"),
    ("/dicomweb/studies?StudyInstanceUID=1.2.abc", "not a UID"),
    ("/dicomweb/series?SeriesInstanceUID=1.2.*", "not a UID"),
    ("/dicomweb/studies?limit=ten", "limit"),
    ("/dicomweb/studies?offset=-3", "offset"),
    ("/dicomweb/studies?offset=99999999999999999999999", "offset must be at most"),
    ("/dicomweb/studies?fuzzymatching=maybe", "fuzzymatching"),
    ("/dicomweb/studies?includefield=NoSuchKeyword", "unknown attribute"),
    ("/dicomweb/instances?InstanceNumber=first", "not a number"),
    ("/dicomweb/studies?=x", "empty query parameter"),
    ("/dicomweb/studies?PatientName.FamilyName=x", "unknown attribute"),
    ("/dicomweb/studies/1.2.3.abc/series", "Study Instance UID"),
    (f"/dicomweb/studies/{STUDY}/series/not-a-uid/instances", "Series Instance UID"),
])
async def test_bad_queries_are_400_with_a_clear_message(client: Any, url: str, fragment: str) -> None:
    resp = await client.get(url)
    assert resp.status == 400
    problem = await resp.json(content_type=None)
    assert fragment in problem["detail"]


async def test_unacceptable_media_type_is_406(client: Any) -> None:
    resp = await client.get("/dicomweb/studies", headers={"Accept": "multipart/related; type=application/dicom+xml"})
    assert resp.status == 406
    resp = await client.get("/dicomweb/studies", headers={"Accept": "application/json"})
    assert resp.status == 204
