"""Storage Commitment Push Model (PS3.4 Annex J).

dcmtk has no storage commitment SCU, so the modality side here is pynetdicom (a library nobody here
wrote); the instances themselves are stored with dcmtk storescu.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from pydicom import uid
from pydicom.dataset import Dataset
from pynetdicom import AE, evt

from dicomflow.app import create_app
from dicomflow.appkeys import BLOBS, INDEX, INGEST, OFFLOADER
from dicomflow.dimse import commitment
from dicomflow.dimse.bridge import DimseContext
from dicomflow.index.sql import SqlIndexStore
from dicomflow.model import Protocol, Source
from dicomflow.settings import RemoteNode, Settings, TenantSettings
from tests.conftest import LiveServer, ServerThread, free_port, make_settings
from tests.factory import make_dataset, to_bytes
from tests.integration.dimse_peer import (
    PUSH_INSTANCE,
    PUSH_MODEL,
    commitment_request,
    dcmtk,
    dimse_port,
    dimse_settings,
    request_commitment,
    start,
)

pytestmark = pytest.mark.integration

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


class Reports:
    """N-EVENT-REPORTs a modality received, from any association."""

    def __init__(self) -> None:
        self.items: list[tuple[int, Dataset, str]] = []
        self.arrived = threading.Event()

    def handler(self, event: Any, where: str) -> tuple[int, None]:
        self.items.append((int(event.event_type), event.event_information, where))
        self.arrived.set()
        return 0x0000, None


def _store_with_storescu(server: Any, tmp_path: Path, count: int) -> list[str]:
    return [ds.SOPInstanceUID for ds in _store_datasets(server, tmp_path, count)]


def _store_datasets(server: LiveServer, tmp_path: Path, count: int) -> list[Dataset]:
    folder = tmp_path / "in"
    folder.mkdir()
    datasets = [make_dataset(instance_number=i + 1) for i in range(count)]
    for i, ds in enumerate(datasets):
        (folder / f"{i}.dcm").write_bytes(to_bytes(ds))
    result = dcmtk("storescu", "+sd", "-aet", "MODALITY", "-aec", "DICOMFLOW", "127.0.0.1",
                   str(dimse_port(server)), str(folder))
    assert result.returncode == 0, result.stderr
    return datasets


def _requestor(server: LiveServer, reports: Reports | None = None) -> Any:
    """The modality's association to us for N-ACTIONs; a report on it goes to ``reports`` as "same"."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(PUSH_MODEL, uid.ImplicitVRLittleEndian)
    handlers = [(evt.EVT_N_EVENT_REPORT, reports.handler, ["same"])] if reports is not None else None
    return ae.associate("127.0.0.1", dimse_port(server), ae_title="DICOMFLOW", evt_handlers=handlers)


def _modality_node(port: int) -> dict[str, TenantSettings]:
    """Tenants where the default one knows the modality's listener on ``port`` as a remote node."""
    return {"default": TenantSettings(ae_titles=["DICOMFLOW"], remote_nodes={
        "modality": RemoteNode(ae_title="MODALITY", host="127.0.0.1", port=port)})}


def _check_report(event_type: int, info: Dataset, transaction: str, stored: list[str], missing: str,
                  wrong_class: str) -> None:
    assert event_type == 2  # PS3.4 J.3.3: some failed
    assert info.TransactionUID == transaction
    assert sorted(i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence) == sorted(stored)
    assert all(i.ReferencedSOPClassUID == CT for i in info.ReferencedSOPSequence)
    failed = {i.ReferencedSOPInstanceUID: int(i.FailureReason) for i in info.FailedSOPSequence}
    assert failed == {missing: 0x0112, wrong_class: 0x0119}  # no such instance; class/instance conflict


def test_commitment_reported_on_the_same_association(live_server_factory: Any, tmp_path: Path) -> None:
    server = start(live_server_factory, tmp_path)
    sops = _store_with_storescu(server, tmp_path, 3)
    reports = Reports()
    assoc = _requestor(server, reports)
    assert assoc.is_established
    transaction = uid.generate_uid()
    missing = uid.generate_uid()
    try:
        refs = [(CT, sops[0]), (CT, sops[1]), (CT, missing), (MR, sops[2])]
        assert request_commitment(assoc, transaction, refs) == 0x0000
        assert reports.arrived.wait(15)
        # our handler saw the report before pynetdicom answered it: release only once the answer arrived
        done = _poll(lambda: _delivery(server, transaction, status="done"), what="the delivery done")
        assert done["outcome"].startswith("reported on the requesting association")
    finally:
        assoc.release()
    assert len(reports.items) == 1
    event_type, info, where = reports.items[0]
    assert where == "same"
    _check_report(event_type, info, transaction, sops[:2], missing, sops[2])


def test_all_committed_is_event_type_1(live_server_factory: Any, tmp_path: Path) -> None:
    server = start(live_server_factory, tmp_path)
    sops = _store_with_storescu(server, tmp_path, 2)
    reports = Reports()
    assoc = _requestor(server, reports)
    transaction = uid.generate_uid()
    try:
        assert request_commitment(assoc, transaction, [(CT, s) for s in sops]) == 0x0000
        assert reports.arrived.wait(15)
        _poll(lambda: _delivery(server, transaction, status="done"), what="the delivery done")
    finally:
        assoc.release()
    event_type, info, _ = reports.items[0]
    assert event_type == 1
    assert "FailedSOPSequence" not in info
    assert len(info.ReferencedSOPSequence) == 2


def test_bad_commitment_requests(live_server_factory: Any, tmp_path: Path) -> None:
    server = start(live_server_factory, tmp_path)
    assoc = _requestor(server)
    try:
        no_transaction = commitment_request(uid.generate_uid(), [(CT, uid.generate_uid())])
        del no_transaction.TransactionUID
        status, _ = assoc.send_n_action(no_transaction, 1, PUSH_MODEL, PUSH_INSTANCE)
        assert status.Status == 0x0120  # PS3.7 C.5: missing attribute
        assert request_commitment(assoc, uid.generate_uid(), [(CT, "not-a-uid")]) == 0x0106  # invalid attribute value
        no_such_action = 7
        assert request_commitment(assoc, uid.generate_uid(), [(CT, uid.generate_uid())], no_such_action) == 0x0123
    finally:
        assoc.release()


def _modality_scp(reports: Reports, port: int | None = None) -> tuple[Any, int]:
    """The modality's own listener, where a report on a new association arrives (PS3.4 J.3.3)."""
    ae = AE(ae_title="MODALITY")
    # we (the archive) propose the SCP role on that association; the modality accepts it
    ae.add_supported_context(PUSH_MODEL, uid.ImplicitVRLittleEndian, scu_role=False, scp_role=True)
    port = port or free_port()
    scp = ae.start_server(("127.0.0.1", port), block=False,
                          evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler, ["new"])])
    return scp, port


def test_commitment_on_a_new_association_when_the_requestor_is_gone(aiohttp_client: Any, tmp_path: Path) -> None:
    """The reporting function with a released association: it opens one to the AE's remote node."""
    reports = Reports()
    scp, port = _modality_scp(reports)
    try:
        asyncio.run(_report_after_release(aiohttp_client, tmp_path, port, reports))
    finally:
        scp.shutdown()


async def _report_after_release(aiohttp_client: Any, tmp_path: Path, port: int, reports: Reports) -> None:
    tenants = _modality_node(port)
    settings = make_settings(tmp_path, tenants=tenants)
    app = create_app(settings)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        ds = make_dataset()
        ingest = app[INGEST]
        spool = ingest.spool()
        spool.write_sync(to_bytes(ds))
        await ingest.store("default", spool, source=Source(Protocol.DICOMWEB))
        spool.discard()
        ctx = DimseContext(loop=asyncio.get_running_loop(), settings=settings, index=app[INDEX], blobs=app[BLOBS],
                           ingest=ingest, offloader=app[OFFLOADER])
        released = SimpleNamespace(is_established=False, name="dimse-test")
        transaction = uid.generate_uid()
        request = commitment.CommitmentRequest("default", transaction,
                                               ((CT, ds.SOPInstanceUID), (CT, uid.generate_uid())),
                                               "MODALITY", "DICOMFLOW")
        outcome = await asyncio.to_thread(commitment._report_on_requesting_association, ctx, released, request,
                                          lambda: ctx.run(commitment.look_up(ctx.index, request)))
        assert outcome == "reported on a new association to MODALITY: 1 committed, 1 failed"
    finally:
        await runner.cleanup()
    assert reports.arrived.wait(5)
    event_type, info, where = reports.items[0]
    assert where == "new" and event_type == 2
    assert info.TransactionUID == transaction
    assert [i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence] == [ds.SOPInstanceUID]


def test_requestor_releasing_at_once_still_gets_exactly_one_report(live_server_factory: Any,
                                                                   tmp_path: Path) -> None:
    """A modality that releases right after the N-ACTION response gets the report once, on a new
    association to its remote node entry (PS3.4 J.3.3)."""
    reports = Reports()
    scp, port = _modality_scp(reports)
    try:
        server = start(live_server_factory, tmp_path, tenants=_modality_node(port))
        sops = _store_with_storescu(server, tmp_path, 1)
        assoc = _requestor(server, reports)
        transaction = uid.generate_uid()
        assert request_commitment(assoc, transaction, [(CT, sops[0])]) == 0x0000
        assoc.release()
        assert reports.arrived.wait(15)
        done = _poll(lambda: _delivery(server, transaction, status="done"), what="the delivery done")
        assert done["attempts"] == 1  # one report: the delivery is done, nothing will send it again
    finally:
        scp.shutdown()
    assert len(reports.items) == 1
    event_type, _, where = reports.items[0]
    assert event_type == 1
    assert where == "new"  # it released at once: the report came on an association we opened


# -- durable reports: the routing engine's delivery queue (engine/store.py add_delivery) ------------------------


def _poll(check: Callable[[], Any], within: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _deliveries(server: LiveServer) -> list[dict[str, Any]]:
    """What an operator sees at /admin/deliveries (authentication is off in these tests)."""
    url = f"{server.url}/admin/deliveries?route=storage-commitment-report"
    with urllib.request.urlopen(url, timeout=10) as resp:
        rows: list[dict[str, Any]] = json.loads(resp.read())
    return rows


def _delivery(server: LiveServer, transaction: str, **expected: Any) -> dict[str, Any] | None:
    rows = [r for r in _deliveries(server) if r.get("transaction_uid") == transaction]
    assert len(rows) <= 1
    if rows and all(rows[0][k] == v for k, v in expected.items()):
        return rows[0]
    return None


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def index_override(request: pytest.FixtureRequest) -> dict[str, str]:
    """Settings overrides for the index backend under test (PostgreSQL: schema created as `db upgrade` does)."""
    if request.param == "sqlite":
        return {}
    url: str = request.getfixturevalue("pg_url")

    async def create() -> None:
        await (await SqlIndexStore.open(url, create_schema=True)).close()

    asyncio.run(create())
    return {"index": url}


def _durable_settings(tmp_path: Path, modality_port: int, index_override: dict[str, str]) -> Settings:
    tenants = _modality_node(modality_port)
    # short back-off: retries every 0.1-0.3 s; attempts enough never to become a dead letter here
    routing = {"poll_interval": 0.05, "backoff_initial": 0.1, "backoff_max": 0.3, "max_attempts": 10000,
               "lease": 5}  # a claim left behind by a stopped server is taken over within seconds
    return dimse_settings(tmp_path, tenants=tenants, routing=routing, **index_override)


def _request_and_release(server: LiveServer, transaction: str, refs: list[tuple[str, str]],
                         reports: Reports) -> dict[str, Any]:
    """N-ACTION from a pynetdicom modality, then release at once; returns the delivery as recorded when
    the N-ACTION response arrived (before the release)."""
    assoc = _requestor(server, reports)
    assert assoc.is_established
    try:
        assert request_commitment(assoc, transaction, refs) == 0x0000
        # acknowledged, hence already durable: no waiting
        recorded = _delivery(server, transaction)
    finally:
        assoc.release()
    assert recorded is not None, "the N-ACTION was acknowledged before its delivery was recorded"
    return recorded


def _wait_pending_with_attempt(server: LiveServer, transaction: str) -> dict[str, Any]:
    row = _poll(lambda: _delivery(server, transaction, status="pending") if any(
        r.get("transaction_uid") == transaction and r["last_error"] for r in _deliveries(server)) else None,
        what="a failed attempt recorded on the pending delivery")
    assert row["attempts"] >= 1
    assert row["destination"] == "MODALITY" and row["action"] == "n-event-report"
    assert "association to MODALITY at 127.0.0.1" in row["last_error"]
    return row


def test_report_to_a_modality_that_is_down_is_retried_until_it_is_back(
        live_server_factory: Any, tmp_path: Path, index_override: dict[str, str]) -> None:
    """PS3.4 J.3.3.1.2: the modality released after the N-ACTION and its SCP is down: the report waits in
    the delivery queue, retried with the routing back-off, and arrives once the SCP is up, built from the
    index as it is then (an instance deleted meanwhile is failed with 0x0112)."""
    modality_port = free_port()  # nothing listens there yet
    settings = _durable_settings(tmp_path, modality_port, index_override)
    server = live_server_factory(settings)
    datasets = _store_datasets(server, tmp_path, 3)
    kept, deleted = datasets[:2], datasets[2]
    transaction, missing = uid.generate_uid(), uid.generate_uid()
    refs = [(CT, ds.SOPInstanceUID) for ds in datasets] + [(CT, missing)]
    reports = Reports()

    recorded = _request_and_release(server, transaction, refs, reports)
    assert recorded["status"] == "pending" and recorded["event"] == "commitment.requested"

    pending = _wait_pending_with_attempt(server, transaction)
    assert reports.items == []
    # operators see it with the same CLI as route deliveries
    listed = subprocess.run([sys.executable, "-m", "dicomflow", "deliveries", "list", "--index", settings.index_url,
                             "--route", "storage-commitment-report", "--json"], capture_output=True, text=True,
                            timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert [(r["id"], r["transaction_uid"]) for r in json.loads(listed.stdout)] == [(pending["id"], transaction)]

    # deleted between the request and the report
    req = urllib.request.Request(f"{server.dicomweb}/studies/{deleted.StudyInstanceUID}/series/"
                                 f"{deleted.SeriesInstanceUID}/instances/{deleted.SOPInstanceUID}", method="DELETE")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status in (200, 202, 204)
    # an attempt in flight may have looked the instances up before the delete: start the SCP only once an
    # attempt claimed after it exists (attempts are counted when claimed, one at a time per delivery)
    seen = _delivery(server, transaction)
    assert seen is not None
    _poll(lambda: _delivery(server, transaction, status="pending") if (_delivery(server, transaction) or {}).get(
        "attempts", 0) > seen["attempts"] else None, what="an attempt after the delete")

    scp, _ = _modality_scp(reports, modality_port)
    try:
        assert reports.arrived.wait(15), "no report within the retry window once the modality was back"
        done = _poll(lambda: _delivery(server, transaction, status="done"), what="the delivery done")
    finally:
        scp.shutdown()
    assert len(reports.items) == 1
    event_type, info, where = reports.items[0]
    assert where == "new" and event_type == 2
    assert info.TransactionUID == transaction
    assert sorted(i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence) == sorted(
        ds.SOPInstanceUID for ds in kept)
    failed = {i.ReferencedSOPInstanceUID: int(i.FailureReason) for i in info.FailedSOPSequence}
    assert failed == {deleted.SOPInstanceUID: 0x0112, missing: 0x0112}  # PS3.3 C.14.1.1 no such object instance
    assert done["attempts"] > pending["attempts"] >= 1
    assert done["outcome"] == "reported on a new association to MODALITY: 2 committed, 2 failed"


def test_acknowledged_request_survives_a_server_restart(tmp_path: Path, index_override: dict[str, str]) -> None:
    """The server stops after acknowledging the N-ACTION and before the report is delivered; another
    server on the same database delivers it."""
    modality_port = free_port()
    settings = _durable_settings(tmp_path, modality_port, index_override)
    first = ServerThread(settings)
    try:
        datasets = _store_datasets(first.live, tmp_path, 2)
        transaction = uid.generate_uid()
        reports = Reports()
        _request_and_release(first.live, transaction, [(CT, ds.SOPInstanceUID) for ds in datasets], reports)
        before = _wait_pending_with_attempt(first.live, transaction)
    finally:
        assert first.stop(), "the first server did not stop"
    assert reports.items == []

    scp, _ = _modality_scp(reports, modality_port)
    second: ServerThread | None = None
    try:
        second = ServerThread(settings)
        assert reports.arrived.wait(15), "the restarted server did not deliver the report"
        done = _poll(lambda: _delivery(second.live, transaction, status="done") if second else None,
                     what="the delivery done")
    finally:
        if second is not None:
            assert second.stop(), "the second server did not stop"
        scp.shutdown()
    assert len(reports.items) == 1
    event_type, info, where = reports.items[0]
    assert where == "new" and event_type == 1
    assert info.TransactionUID == transaction
    assert sorted(i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence) == sorted(
        ds.SOPInstanceUID for ds in datasets)
    assert "FailedSOPSequence" not in info
    assert done["id"] == before["id"] and done["attempts"] > before["attempts"]
