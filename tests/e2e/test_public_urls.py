"""URLs in responses (RetrieveURL, BulkDataURI) resolve for the client: Host, Forwarded, X-Forwarded-*,
http.public_url (PS3.18 8.6 / 10.5.3: the origin server builds them from how it was addressed)."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.conftest import LiveServer, make_settings
from tests.factory import make_instance, multipart

STUDY = "1.2.826.0.1.3680043.10.1045.99.1"


async def _stow_url(url: str, headers: dict[str, str]) -> str:
    body, ctype = multipart([make_instance(study_uid=STUDY)])
    async with aiohttp.ClientSession() as s, s.post(f"{url}/studies", data=body,
                                                    headers={"Content-Type": ctype, **headers}) as r:
        assert r.status == 200
        return str((await r.json())["00081190"]["Value"][0])


async def test_host_without_port_gets_the_listening_port(live_server: LiveServer) -> None:
    got = await _stow_url(live_server.dicomweb, {"Host": "127.0.0.1"})
    assert got == f"{live_server.dicomweb}/studies/{STUDY}"


async def test_named_host_and_forwarded_headers_are_used_as_given(live_server: LiveServer) -> None:
    assert await _stow_url(live_server.dicomweb, {"Host": "pacs.example.org"}) == \
        f"http://pacs.example.org/dicomweb/studies/{STUDY}"
    assert await _stow_url(live_server.dicomweb, {"Forwarded": 'for=1.2.3.4;proto=https;host="dicom.example:8443"'}) \
        == f"https://dicom.example:8443/dicomweb/studies/{STUDY}"
    got = await _stow_url(live_server.tenant_dicomweb("acme"), {
        "X-Forwarded-Proto": "https", "X-Forwarded-Host": "gw.example", "X-Forwarded-Prefix": "/imaging/"})
    assert got == f"https://gw.example/imaging/tenants/acme/dicomweb/studies/{STUDY}"


async def test_public_url_setting_wins_over_host(live_server_factory: Any, tmp_path: Any) -> None:
    server: LiveServer = live_server_factory(make_settings(tmp_path, http={"public_url": "https://img.example/"}))
    assert await _stow_url(server.dicomweb, {}) == f"https://img.example/dicomweb/studies/{STUDY}"
