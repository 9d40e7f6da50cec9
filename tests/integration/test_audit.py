"""Audit trail: every access recorded as a FHIR AuditEvent (PS3.15 A.5 semantics), hash-chained,
queryable per tenant by admins, tamper-evident (`dicomflow audit verify`), forwarded to syslog."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from sqlalchemy.ext.asyncio import create_async_engine

from dicomflow.audit.record import AuditAction, AuditRecord, Outcome
from dicomflow.audit.trail import AuditTrail
from dicomflow.settings import AuditSettings, SyslogSettings
from tests.conftest import LiveServer, make_settings, plain_tenants
from tests.factory import make_instance, multipart
from tests.harness.oidc_provider import OidcProvider

pytestmark = pytest.mark.integration

CLIENTS = [
    {"client_id": "acme-tech", "client_secret": "a", "claims": {"tenants": {"acme": ["technologist"]}}},
    {"client_id": "acme-admin", "client_secret": "b", "claims": {"tenants": {"acme": ["admin"]}}},
    {"client_id": "globex-admin", "client_secret": "c", "claims": {"tenants": {"globex": ["admin"]}}},
]
STUDY = "1.2.826.0.1.3680043.10.1045.88.1"


@pytest.fixture
def udp_collector() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    yield sock
    sock.close()


@pytest.fixture
def server(live_server_factory: Any, tmp_path: Path, provider: OidcProvider,
           udp_collector: socket.socket) -> LiveServer:
    settings = make_settings(
        tmp_path,
        tenants=plain_tenants(),
        auth=provider.auth_settings(),
        audit=AuditSettings(syslog=SyslogSettings(host="127.0.0.1", port=udp_collector.getsockname()[1])),
    )
    result: LiveServer = live_server_factory(settings)
    return result


async def _req(method: str, url: str, token: str | None, **kw: Any) -> tuple[int, Any]:
    headers = dict(kw.pop("headers", {}))
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as s, s.request(method, url, headers=headers, **kw) as r:
        body = await r.read()
        try:
            return r.status, json.loads(body)
        except ValueError:
            return r.status, body


async def _audit(server: LiveServer, token: str, tenant: str = "acme", **params: str) -> tuple[int, Any]:
    for _ in range(50):  # the writer is asynchronous: wait until the records are there
        status, body = await _req("GET", f"{server.url}/tenants/{tenant}/admin/audit", token, params=params)
        if status != 200 or len(body["entry"]) >= int(params.get("_expect", "1")):
            return status, body
        await asyncio.sleep(0.1)
    return status, body


async def test_accesses_are_audited_as_valid_fhir_audit_events(server: LiveServer, provider: OidcProvider,
                                                               udp_collector: socket.socket) -> None:
    tech, admin = provider.token("acme-tech"), provider.token("acme-admin")
    body, ctype = multipart([make_instance(study_uid=STUDY, patient_id="AUDIT-PID-7")])
    root = server.tenant_dicomweb("acme")
    assert (await _req("POST", f"{root}/studies/{STUDY}", tech, data=body,
                       headers={"Content-Type": ctype}))[0] == 200
    assert (await _req("DELETE", f"{root}/studies/{STUDY}", tech))[0] == 403
    assert (await _req("GET", f"{root}/studies", "garbage.token.x"))[0] == 401

    status, bundle = await _audit(server, admin, _expect="3")
    assert status == 200
    events = [e["resource"] for e in bundle["entry"]]
    for event in events:
        AuditEvent.model_validate({k: v for k, v in event.items() if k != "id"})  # FHIR R4(B) valid
    by_code = {(e["type"]["code"], e["action"], e["outcome"]) for e in events}
    assert ("110104", "C", "0") in by_code  # DICOM Instances Transferred, created, success
    assert ("110105", "D", "4") in by_code  # DICOM Study Deleted, refused: minor failure
    assert ("110114", "E", "4") in by_code  # User Authentication failed
    store = next(e for e in events if e["type"]["code"] == "110104")
    assert store["agent"][0]["who"]["identifier"]["value"]  # the token subject
    assert store["agent"][0]["altId"] == "acme-tech"
    assert store["agent"][0]["network"]["address"] == "127.0.0.1"
    whats = [ent["what"]["identifier"]["value"] for ent in store["entity"]]
    assert f"urn:oid:{STUDY}" in whats and "AUDIT-PID-7" in whats
    assert store["source"]["site"] == "acme"
    # forwarded to syslog as RFC 5424
    data, _ = udp_collector.recvfrom(65535)
    assert data.startswith(b"<85>1 ") and b'"resourceType":"AuditEvent"' in data


async def test_audit_trail_is_per_tenant_and_admin_only(server: LiveServer, provider: OidcProvider) -> None:
    tech, admin, globex = (provider.token(c) for c in ("acme-tech", "acme-admin", "globex-admin"))
    body, ctype = multipart([make_instance(study_uid=STUDY)])
    assert (await _req("POST", f"{server.tenant_dicomweb('acme')}/studies", tech, data=body,
                       headers={"Content-Type": ctype}))[0] == 200
    assert (await _audit(server, tech))[0] == 403  # technologists cannot read the audit trail
    assert (await _audit(server, globex))[0] == 404  # another organization: as if it did not exist
    status, bundle = await _audit(server, globex, tenant="globex")
    assert status == 200
    assert all(e["resource"]["source"]["site"] == "globex" for e in bundle["entry"])
    assert not any(STUDY in json.dumps(e) for e in bundle["entry"])
    status, bundle = await _audit(server, admin, action="store", study=STUDY)
    assert status == 200 and len(bundle["entry"]) == 1


async def test_chain_verifies_then_detects_tampering(server: LiveServer, provider: OidcProvider) -> None:
    tech, admin = provider.token("acme-tech"), provider.token("acme-admin")
    for i in range(3):
        body, ctype = multipart([make_instance(study_uid=STUDY, sop_uid=f"{STUDY}.{i}")])
        await _req("POST", f"{server.tenant_dicomweb('acme')}/studies", tech, data=body,
                   headers={"Content-Type": ctype})
    await _audit(server, admin, _expect="3")
    data_dir = str(server.settings.data_dir)

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dicomflow", "audit", "verify", "--data-dir", data_dir],
                              capture_output=True, text=True, timeout=60)

    ok = verify()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "0 problem(s)" in ok.stdout
    db = sqlite3.connect(server.settings.data_dir / "index.sqlite")
    db.execute("UPDATE audit_events SET event_json = replace(event_json, '\"outcome\":\"0\"', "
               "'\"outcome\":\"4\"') WHERE tenant='acme' AND seq=2")
    db.commit()
    bad = verify()
    assert bad.returncode == 1 and "TAMPERED tenant=acme record=2" in bad.stdout
    db.execute("UPDATE audit_events SET event_json = replace(event_json, '\"outcome\":\"4\"', "
               "'\"outcome\":\"0\"') WHERE tenant='acme' AND seq=2")
    db.execute("DELETE FROM audit_events WHERE tenant='acme' AND seq=(SELECT max(seq) FROM audit_events "
               "WHERE tenant='acme')")
    db.commit()
    db.close()
    truncated = verify()
    assert truncated.returncode == 1 and "chain head" in truncated.stdout


async def test_full_sink_is_counted_and_reported(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.sqlite'}")
    trail = AuditTrail(AuditSettings(queue_size=10), engine, engine.begin)  # writer not started: stays full
    for _ in range(13):
        trail.record(AuditRecord(tenant="acme", action=AuditAction.QUERY, outcome=Outcome.SUCCESS,
                                 protocol="dicomweb"))
    assert trail.dropped == 3
    await engine.dispose()


async def test_unknown_tenants_cannot_create_audit_chains(server: LiveServer, provider: OidcProvider) -> None:
    for path in ("/tenants/ghost-1/dicomweb/studies", "/tenants/" + "x" * 300 + "/dicomweb/studies",
                 "/tenants/%00evil/dicomweb/studies"):
        await _req("GET", server.url + path, provider.token("acme-admin"))
        await _req("GET", server.url + path, None)
    await _audit(server, provider.token("acme-admin"))  # the writer has caught up with earlier records
    await asyncio.sleep(0.5)
    db = sqlite3.connect(server.settings.data_dir / "index.sqlite")
    tenants = {t for (t,) in db.execute("SELECT DISTINCT tenant FROM audit_events")}
    db.close()
    assert tenants <= {"default", "acme", "globex"}
    assert "default" in tenants
