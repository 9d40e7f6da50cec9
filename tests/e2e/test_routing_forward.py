"""Forward routes: STOW-RS to a second dicomflow (read back with dicomweb-client) and C-STORE to dcmtk's
storescp, both de-identified (PS3.15 Annex E) and checked on what the receiver got."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from dicomflow.app import create_app
from dicomflow.connectors.deid import derived_uid
from dicomflow.engine.admin import ENGINE
from tests.conftest import make_settings
from tests.factory import make_dataset, multipart, to_bytes
from tests.integration.dcmtk import storescp
from tests.routing_support import routing_settings, wait_for

pytestmark = pytest.mark.e2e

STUDY = "1.2.826.0.1.3680043.10.1045.12.1"
SALT = "research-2026"


def study(n: int = 3) -> list[pydicom.Dataset]:
    return [make_dataset(study_uid=STUDY, series_uid=f"{STUDY}.1", sop_uid=f"{STUDY}.1.{i}", instance_number=i,
                         patient_name="Zecret^Hiddenname", patient_id="MRN-777", InstitutionName="ACME North",
                         OtherPatientIDs="OLD-MRN") for i in range(1, n + 1)]


async def stow(client: Any, datasets: list[pydicom.Dataset]) -> None:
    body, ctype = multipart([to_bytes(ds) for ds in datasets])
    resp = await client.post("/dicomweb/studies", data=body, headers={"Content-Type": ctype})
    assert resp.status == 200, await resp.text()


def assert_deidentified(ds: pydicom.Dataset, original: pydicom.Dataset) -> None:
    text = str(ds)
    for phi in ("Zecret", "Hiddenname", "MRN-777", "OLD-MRN", "ACME North", "19700101"):
        assert phi not in text
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.StudyInstanceUID == derived_uid(SALT, STUDY)
    assert ds.SOPInstanceUID == derived_uid(SALT, str(original.SOPInstanceUID))
    assert ds.PatientSex == original.PatientSex  # retain-patient-characteristics
    assert ds.PixelData == original.PixelData


async def test_stow_forward_to_a_second_dicomflow_deidentified(aiohttp_client: Any, live_server_factory: Any,
                                                               tmp_path: Path) -> None:
    receiver = live_server_factory(make_settings(tmp_path / "receiver"))
    route = f"""name: research-copy
events: [study.stable]
stable_after: 0.3s
match: {{InstitutionName: {{wildcard: "ACME*"}}}}
actions:
  - type: dicomweb
    destination: research
    deidentify: {{options: [retain-patient-characteristics], uid_salt: {SALT}}}
"""
    settings = routing_settings(tmp_path / "sender", {"copy.yaml": route},
                                {"research": {"type": "dicomweb", "url": receiver.dicomweb, "batch_size": 2}})
    client = await aiohttp_client(create_app(settings))
    originals = study(3)
    await stow(client, originals)
    engine = client.app[ENGINE]
    done = await wait_for(lambda: engine.store.list_deliveries(status="done"), what="STOW-RS forward")
    assert done[0].outcome == "3 instance(s) stored by STOW-RS"  # in two requests of at most 2

    web = DICOMwebClient(receiver.dicomweb)
    studies = await asyncio.to_thread(web.search_for_studies)
    assert [s["0020000D"]["Value"][0] for s in studies] == [derived_uid(SALT, STUDY)]
    for original in originals:
        got = await asyncio.to_thread(web.retrieve_instance, derived_uid(SALT, STUDY),
                                      derived_uid(SALT, str(original.SeriesInstanceUID)),
                                      derived_uid(SALT, str(original.SOPInstanceUID)))
        assert_deidentified(got, original)

    # replaying the delivery sends the very same instances: the receiver answers 200, nothing doubles
    assert await engine.store.retry([done[0].id]) == 1
    await wait_for(lambda: _status(engine, done[0].id, "done"), what="replayed forward")
    instances = await asyncio.to_thread(web.search_for_instances, derived_uid(SALT, STUDY))
    assert len(instances) == 3


async def test_stow_forward_refused_by_the_receiver_is_a_dead_letter(aiohttp_client: Any, live_server_factory: Any,
                                                                     tmp_path: Path) -> None:
    receiver = live_server_factory(make_settings(tmp_path / "receiver"))
    original = study(1)[0]
    # the receiver already holds this SOP Instance UID with other bytes and rejects duplicates (409, 0x0111)
    clash = copy.deepcopy(original)  # Dataset.copy() is shallow: it would rename the original too
    clash.PatientName = "Otherzz^Personzz"
    await asyncio.to_thread(DICOMwebClient(receiver.dicomweb).store_instances, [clash])
    settings = routing_settings(tmp_path / "sender", {"copy.yaml": """name: plain-copy
events: [instance.stored]
actions: [{type: dicomweb, destination: other}]
"""}, {"other": {"type": "dicomweb", "url": receiver.dicomweb}})
    client = await aiohttp_client(create_app(settings))
    await stow(client, [original])
    engine = client.app[ENGINE]
    dead = await wait_for(lambda: engine.store.list_deliveries(status="dead"), what="dead letter")
    assert dead[0].attempts == 1 and "HTTP 409" in (dead[0].last_error or "")
    assert "0x0111" in (dead[0].last_error or "") or "273" in (dead[0].last_error or "")


async def test_cstore_forward_to_storescp_deidentified(aiohttp_client: Any, tmp_path: Path) -> None:
    with storescp(tmp_path / "scp", "RESEARCH") as scp:
        route = f"""name: pacs-copy
events: [series.stable]
stable_after: 0.3s
actions:
  - type: dicom
    destination: research-pacs
    deidentify: {{options: [retain-patient-characteristics], uid_salt: {SALT}}}
"""
        settings = routing_settings(tmp_path, {"pacs.yaml": route}, {"research-pacs": {
            "type": "dicom", "ae_title": "RESEARCH", "host": "127.0.0.1", "port": scp.port}})
        client = await aiohttp_client(create_app(settings))
        originals = study(2)
        await stow(client, originals)
        engine = client.app[ENGINE]
        done = await wait_for(lambda: engine.store.list_deliveries(status="done"), what="C-STORE forward")
        assert done[0].outcome == "2 instance(s) stored by C-STORE on RESEARCH"
        files = await asyncio.to_thread(scp.wait_files, 2)
    received = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in files}
    for original in originals:
        assert_deidentified(received[derived_uid(SALT, str(original.SOPInstanceUID))], original)


async def test_cstore_forward_to_a_node_that_is_down_is_retried(aiohttp_client: Any, tmp_path: Path) -> None:
    from tests.conftest import free_port

    port = free_port()
    settings = routing_settings(tmp_path, {"pacs.yaml": """name: pacs-copy
events: [instance.stored]
actions: [{type: dicom, destination: pacs}]
"""}, {"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": port, "timeout": 2}},
        max_attempts=50, backoff_initial=0.2, backoff_max=0.4)
    client = await aiohttp_client(create_app(settings))
    await stow(client, study(1))
    engine = client.app[ENGINE]

    async def failed_once() -> Any:
        rows = await engine.store.list_deliveries(status="pending")
        return rows and rows[0].attempts >= 1 and "association failed" in (rows[0].last_error or "")

    await wait_for(failed_once, what="failed C-STORE attempt")
    with _scp_on(tmp_path, port) as scp:  # the node comes up on the configured port
        await wait_for(lambda: engine.store.list_deliveries(status="done"), within=30, what="delivery once up")
        assert len(await asyncio.to_thread(scp.wait_files, 1)) == 1


def _scp_on(tmp_path: Path, port: int) -> Any:
    import contextlib
    import subprocess

    from tests.integration.dcmtk import DCMTK_ENV, StoreScp, wait_port

    @contextlib.contextmanager
    def run() -> Any:
        directory = tmp_path / "late-scp"
        directory.mkdir()
        proc = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(directory), "+B", "-dhl", str(port)],
                                env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port)
            yield StoreScp("PACS", port, directory, proc)
        finally:
            proc.terminate()
            proc.wait(10)

    return run()


async def _status(engine: Any, delivery_id: int, status: str) -> bool:
    row = await engine.store.get(delivery_id)
    return row is not None and row.status == status


async def test_stow_forward_with_oauth2_client_credentials(aiohttp_client: Any, live_server_factory: Any,
                                                           tmp_path: Path) -> None:
    """The receiver (a dicomflow with authentication on) only takes tokens from a real OIDC provider."""
    from dicomflow.settings import TenantSettings
    from tests.harness.oidc_provider import AUDIENCE, start_provider

    provider = start_provider([{"client_id": "router", "client_secret": "router-secret",
                                "claims": {"tenants": {"acme": ["technologist"]}}}])
    try:
        receiver = live_server_factory(make_settings(
            tmp_path / "receiver",
            tenants={"default": TenantSettings(ae_titles=["DICOMFLOW"]), "acme": TenantSettings(ae_titles=["ACME"])},
            auth=provider.auth_settings()))
        oauth2 = {"token_url": f"{provider.issuer}/token", "client_id": "router", "client_secret": "router-secret",
                  "resource": AUDIENCE, "auth_method": "client_secret_post"}
        settings = routing_settings(tmp_path / "sender", {"copy.yaml": """name: copy
events: [instance.stored]
actions: [{type: dicomweb, destination: acme-archive}, {type: dicomweb, destination: no-token}]
"""}, {"acme-archive": {"type": "dicomweb", "url": receiver.tenant_dicomweb("acme"), "oauth2": oauth2},
            "no-token": {"type": "dicomweb", "url": receiver.tenant_dicomweb("acme")}})
        client = await aiohttp_client(create_app(settings))
        await stow(client, study(2))
        engine = client.app[ENGINE]
        await wait_for(lambda: _count(engine, "done", 2), what="forwards with a token")
        await wait_for(lambda: _count(engine, "dead", 2), what="forwards without one")
        dead = await engine.store.list_deliveries(status="dead")
        assert all("HTTP 401" in (d.last_error or "") for d in dead)
        token = provider.token("router")
        web = DICOMwebClient(receiver.tenant_dicomweb("acme"), headers={"Authorization": f"Bearer {token}"})
        assert len(await asyncio.to_thread(web.search_for_instances, STUDY)) == 2
    finally:
        provider.stop()


async def _count(engine: Any, status: str, n: int) -> bool:
    return len(await engine.store.list_deliveries(status=status)) == n
