"""Cross-tenant isolation over HTTP with authentication on (real OIDC provider: npm oidc-provider).

A token of organization acme against globex's data must answer exactly as data that does not exist:

- under globex's root, byte for byte what the same request gets under a tenant that was never configured
  (404: the organization cannot even be told apart from a non-existent one);
- under acme's own root with globex's UIDs or delivery ids, what the same request gets with UIDs or ids
  that exist nowhere (no match, 404) -- the index and the delivery store filter by tenant;

on every endpoint: QIDO (all levels), WADO retrieve, /metadata, /frames, /rendered, /thumbnail,
/bulkdata, STOW to globex's study URL, DELETE, the audit trail, routing deliveries (list, get, retry,
drop, retry all) and /metrics. Afterwards globex's data and dead letter are untouched.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydicom.uid import generate_uid

from tests.conftest import LiveServer, free_port, make_settings, plain_tenants
from tests.factory import make_instance, multipart
from tests.harness.oidc_provider import OidcProvider

pytestmark = pytest.mark.integration

CLIENTS = [
    {"client_id": "acme-admin", "client_secret": "a1", "claims": {"tenants": {"acme": ["admin"]}}},
    {"client_id": "globex-admin", "client_secret": "g1", "claims": {"tenants": {"globex": ["admin"]}}},
]
ROUTE = "name: everything-to-hook\nevents: [instance.stored]\nactions: [{type: webhook, destination: hook}]\n"


@pytest.fixture
def server(live_server_factory: Any, tmp_path: Path, provider: OidcProvider) -> LiveServer:
    routes = tmp_path / "routes"
    routes.mkdir()
    (routes / "hook.yaml").write_text(ROUTE)
    settings = make_settings(
        tmp_path,
        tenants=plain_tenants(),
        auth=provider.auth_settings(),
        # a webhook nobody listens on, one attempt: every stored instance leaves a dead letter
        routing={"routes_dir": routes, "destinations": {"hook": {
            "type": "webhook", "url": f"http://127.0.0.1:{free_port()}/hook", "secret": "x"}},
            "poll_interval": 0.05, "reload_interval": 0.1, "max_attempts": 1, "backoff_initial": 0.05},
    )
    result: LiveServer = live_server_factory(settings)
    return result


Response = tuple[int, str, bytes]


async def _req(session: aiohttp.ClientSession, method: str, url: str, token: str, **kw: Any) -> Response:
    headers = {"Authorization": f"Bearer {token}", **kw.pop("headers", {})}
    async with session.request(method, url, headers=headers, allow_redirects=False, **kw) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.read()


def _normalise(resp: Response, *secrets: str) -> Response:
    body = resp[2]
    for i, secret in enumerate(secrets):
        body = body.replace(secret.encode(), f"<{i}>".encode())
    return resp[0], resp[1], body


async def _wait_dead_letter(session: aiohttp.ClientSession, server: LiveServer, token: str) -> dict[str, Any]:
    for _ in range(200):
        status, _ctype, body = await _req(session, "GET", f"{server.url}/tenants/globex/admin/deliveries",
                                          token, params={"status": "dead"})
        assert status == 200, body
        rows = json.loads(body)
        if rows:
            return dict(rows[0])
        await asyncio.sleep(0.05)
    raise AssertionError("no dead letter for globex")


async def test_another_tenants_data_answers_as_if_it_did_not_exist(server: LiveServer,
                                                                   provider: OidcProvider) -> None:
    acme, globex = provider.token("acme-admin"), provider.token("globex-admin")
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    instance = make_instance(study_uid=study, series_uid=series, sop_uid=sop, rows=64, columns=64,
                             patient_id="ISO-PID-9", patient_name="Isolde^Globex")
    async with aiohttp.ClientSession() as s:
        body, ctype = multipart([instance])
        stow = await _req(s, "POST", f"{server.tenant_dicomweb('globex')}/studies", globex, data=body,
                          headers={"Content-Type": ctype})
        assert stow[0] == 200, stow
        status, _c, meta = await _req(s, "GET", f"{server.tenant_dicomweb('globex')}/studies/{study}/metadata",
                                      globex)
        assert status == 200
        bulk_uri = json.loads(meta)[0]["7FE00010"]["BulkDataURI"]
        bulk_path = bulk_uri.split("/tenants/globex/dicomweb", 1)[1]
        dead = await _wait_dead_letter(s, server, globex)
        before = meta

        inst = f"/studies/{study}/series/{series}/instances/{sop}"
        dicomweb_paths = [
            ("GET", "/studies"), ("GET", "/series"), ("GET", "/instances"),
            ("GET", f"/studies?StudyInstanceUID={study}"), ("GET", "/studies?PatientID=ISO-PID-9"),
            ("GET", f"/studies/{study}/series"), ("GET", f"/studies/{study}/instances"),
            ("GET", f"/studies/{study}/series/{series}/instances"),
            ("GET", f"/studies/{study}"), ("GET", f"/studies/{study}/series/{series}"), ("GET", inst),
            ("GET", f"/studies/{study}/metadata"), ("GET", f"/studies/{study}/series/{series}/metadata"),
            ("GET", f"{inst}/metadata"), ("GET", f"{inst}/frames/1"),
            ("GET", f"/studies/{study}/rendered"), ("GET", f"/studies/{study}/series/{series}/rendered"),
            ("GET", f"{inst}/rendered"), ("GET", f"{inst}/frames/1/rendered"),
            ("GET", f"/studies/{study}/thumbnail"), ("GET", f"{inst}/thumbnail"),
            ("GET", bulk_path),
            ("POST", f"/studies/{study}"),
            ("DELETE", inst), ("DELETE", f"/studies/{study}/series/{series}"), ("DELETE", f"/studies/{study}"),
        ]
        admin_paths = [
            ("GET", "/admin/audit"), ("GET", f"/admin/audit?study={study}"),
            ("GET", "/admin/deliveries"), ("GET", f"/admin/deliveries/{dead['id']}"),
            ("POST", f"/admin/deliveries/{dead['id']}/retry"), ("POST", f"/admin/deliveries/{dead['id']}/drop"),
            ("POST", "/admin/deliveries/retry?status=dead"),
        ]

        def request_kw(method: str) -> dict[str, Any]:
            if method != "POST":
                return {}
            body, ctype = multipart([instance])
            return {"data": body, "headers": {"Content-Type": ctype}}

        # 0. control: every GET serves globex's data to globex
        for method, path in dicomweb_paths:
            if method == "GET" and path not in ("/series", "/instances"):
                control = await _req(s, method, server.tenant_dicomweb("globex") + path, globex)
                assert control[0] == 200 and control[2], (path, control[:2])

        # 1. under globex's root: exactly what a tenant that does not exist answers
        for method, path in dicomweb_paths:
            theirs = await _req(s, method, server.tenant_dicomweb("globex") + path, acme, **request_kw(method))
            nobody = await _req(s, method, server.tenant_dicomweb("no-such-org") + path, acme, **request_kw(method))
            assert theirs[0] == 404, (method, path, theirs)
            assert theirs == nobody, (method, path)
        for method, path in admin_paths:
            theirs = await _req(s, method, f"{server.url}/tenants/globex{path}", acme)
            nobody = await _req(s, method, f"{server.url}/tenants/no-such-org{path}", acme)
            assert theirs[0] == 404 and theirs == nobody, (method, path, theirs)
        # the default tenant is another organization, and /metrics belongs to it
        for url in (f"{server.dicomweb}/studies", f"{server.url}/admin/deliveries", f"{server.url}/metrics",
                    f"{server.url}/admin/audit"):
            assert (await _req(s, "GET", url, acme))[0] == 404, url

        # 2. under acme's own root with globex's identifiers: what identifiers that exist nowhere get
        ghost_study, ghost_series, ghost_sop = generate_uid(), generate_uid(), generate_uid()
        for method, path in dicomweb_paths:
            if method == "POST":  # storing a study of that UID in acme is acme's own business
                continue
            ghost_path = (path.replace(study, ghost_study).replace(series, ghost_series).replace(sop, ghost_sop)
                          .replace("ISO-PID-9", "NO-SUCH-PID"))
            theirs = await _req(s, method, server.tenant_dicomweb("acme") + path, acme)
            nobody = await _req(s, method, server.tenant_dicomweb("acme") + ghost_path, acme)
            assert theirs[0] in (200, 204, 404), (method, path, theirs)
            assert b"ISO-PID-9" not in theirs[2] and b"Isolde" not in theirs[2]
            assert (_normalise(theirs, study, series, sop, "ISO-PID-9")
                    == _normalise(nobody, ghost_study, ghost_series, ghost_sop, "NO-SUCH-PID")), (method, path)
        for method, path in admin_paths:
            theirs = await _req(s, method, f"{server.url}/tenants/acme{path}", acme)
            if "audit" in path:  # acme's own trail grows with every request: only acme's records, none of globex's
                entries = [e["resource"] for e in json.loads(theirs[2])["entry"]]
                assert entries and all(e["source"]["site"] == "acme" for e in entries), path
                # acme's requests are there (its own query text included), but no globex patient was resolved
                # for the globex study UIDs acme named
                whats = [ent["what"]["identifier"]["value"] for e in entries for ent in e.get("entity", [])]
                assert "ISO-PID-9" not in whats and b"globex-admin" not in theirs[2], path
                continue
            ghost_path = path.replace(f"/{dead['id']}/", "/987654321/").replace(f"/{dead['id']}", "/987654321")
            nobody = await _req(s, method, f"{server.url}/tenants/acme{ghost_path}", acme)
            assert (_normalise(theirs, str(dead["id"]))
                    == _normalise(nobody, "987654321")), (method, path, theirs, nobody)
            assert study.encode() not in theirs[2], (method, path)

        # 3. globex's data and its dead letter are untouched
        status, _c, after = await _req(s, "GET", f"{server.tenant_dicomweb('globex')}/studies/{study}/metadata",
                                       globex)
        assert status == 200 and after == before
        assert (await _req(s, "GET", f"{server.tenant_dicomweb('globex')}{inst}", globex))[0] == 200
        status, _c, row = await _req(s, "GET", f"{server.url}/tenants/globex/admin/deliveries/{dead['id']}",
                                     globex)
        assert status == 200 and json.loads(row)["status"] == "dead"


async def test_bad_authorization_headers_get_a_clear_error(server: LiveServer, provider: OidcProvider) -> None:
    url = f"{server.tenant_dicomweb('acme')}/studies"
    async with aiohttp.ClientSession() as s:
        for header, expected in (("Bearer", 400), ("Bearer ", 400), ("Bearer a b", 400), ("Bearer ä", 400),
                                 ("Bearer \t.x", 400), ("bearer", 400), ("Token abc", 401), ("", 401)):
            async with s.get(url, headers={"Authorization": header}) as r:
                assert r.status == expected, (header, r.status)
                assert r.headers["WWW-Authenticate"].startswith("Bearer "), header
        # a token just under the server's header limit: parsed and refused as a token (401)
        async with s.get(url, headers={"Authorization": "Bearer " + "a" * 9000}) as r:
            assert r.status == 401 and 'error="invalid_token"' in r.headers["WWW-Authenticate"]
        # beyond http.max_field_size (16 KiB): aiohttp 3.14's parser refuses the header before any handler runs,
        # with 400 (not 431) and a plain-text reason
        async with s.get(url, headers={"Authorization": "Bearer " + "a" * 20000}) as r:
            assert r.status == 400, r.status
            assert "Got more than 16384 bytes" in await r.text()
        # and the server is fine afterwards
        token = provider.token("acme-admin")
        async with s.get(url, headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status in (200, 204)
