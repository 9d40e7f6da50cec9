"""CORS as a browser viewer on another origin needs it (Fetch Standard CORS protocol), over raw HTTP.

Every response a page may read carries Access-Control-Allow-Origin: streamed ones (WADO-RS retrieve and
frames are prepared inside their handlers) and errors too, or the browser hides them from the viewer
(OHIF showed "Failed to fetch" for every frame before the headers were added on response prepare).
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from pydicom.uid import generate_uid

from tests.factory import make_instance, multipart

pytestmark = pytest.mark.e2e

VIEWER = "http://viewer.test:3000"
OHIF_FRAMES_ACCEPT = "multipart/related; type=application/octet-stream; transfer-syntax=*"


@pytest.fixture
async def stored(live_server_factory: Any) -> dict[str, Any]:
    server = live_server_factory(http={"cors_origins": [VIEWER]})
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    body, ctype = multipart([make_instance(study_uid=study, series_uid=series, sop_uid=sop)])
    async with aiohttp.ClientSession() as session, session.post(
            f"{server.dicomweb}/studies", data=body, headers={"Content-Type": ctype}) as resp:
        assert resp.status == 200
    instance = f"{server.dicomweb}/studies/{study}/series/{series}/instances/{sop}"
    return {"server": server, "instance": instance, "study": study}


async def _get(url: str, origin: str | None, accept: str = "*/*") -> tuple[int, Any]:
    headers = {"Accept": accept, **({"Origin": origin} if origin else {})}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        await resp.read()
        return resp.status, resp.headers


@pytest.mark.parametrize(("path", "accept", "status"), [
    ("/frames/1", OHIF_FRAMES_ACCEPT, 200),  # streamed multipart
    ("", "multipart/related; type=application/dicom", 200),  # streamed multipart
    ("/metadata", "application/dicom+json", 200),
    ("/thumbnail", "image/jpeg", 200),
    ("/frames/9", OHIF_FRAMES_ACCEPT, 404),  # DicomServiceError -> problem response
    ("/frames/1", "image/x-unknown", 406),
    ("/nothing-here", "*/*", 404),  # aiohttp's own HTTPNotFound
])
async def test_every_response_readable_cross_origin(stored: dict[str, Any], path: str, accept: str,
                                                    status: int) -> None:
    got, headers = await _get(stored["instance"] + path, VIEWER, accept)
    assert got == status
    assert headers.get("Access-Control-Allow-Origin") == VIEWER
    assert "Origin" in headers.getall("Vary", [])
    assert "Content-Location" in headers["Access-Control-Expose-Headers"]


async def test_other_origins_and_same_origin_get_no_cors_headers(stored: dict[str, Any]) -> None:
    for origin in ("http://evil.test", None):
        status, headers = await _get(stored["instance"] + "/frames/1", origin, OHIF_FRAMES_ACCEPT)
        assert status == 200
        assert "Access-Control-Allow-Origin" not in headers


async def test_preflight_allows_authorization_header(stored: dict[str, Any]) -> None:
    url = f"{stored['server'].dicomweb}/studies?00100020=PID-0001"
    async with aiohttp.ClientSession() as session:
        async with session.options(url, headers={"Origin": VIEWER, "Access-Control-Request-Method": "GET",
                                                 "Access-Control-Request-Headers": "authorization"}) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == VIEWER
            assert "authorization" in resp.headers["Access-Control-Allow-Headers"].lower()
            assert "GET" in resp.headers["Access-Control-Allow-Methods"]
        async with session.options(url, headers={"Origin": "http://evil.test",
                                                 "Access-Control-Request-Method": "GET"}) as resp:
            assert resp.status == 403
            assert "Access-Control-Allow-Origin" not in resp.headers
