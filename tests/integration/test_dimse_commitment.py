"""Storage Commitment Push Model (PS3.4 Annex J).

dcmtk has no storage commitment SCU, so the modality side here is pynetdicom (a library nobody here
wrote); the instances themselves are stored with dcmtk storescu.
"""

from __future__ import annotations

import asyncio
import threading
import time
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
from dicomflow.model import Protocol, Source
from dicomflow.settings import RemoteNode, TenantSettings
from tests.conftest import free_port, make_settings
from tests.factory import make_dataset, to_bytes
from tests.integration.dimse_peer import dcmtk, dimse_port, start

pytestmark = pytest.mark.integration

PUSH_MODEL = "1.2.840.10008.1.20.1"
PUSH_INSTANCE = "1.2.840.10008.1.20.1.1"
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
    folder = tmp_path / "in"
    folder.mkdir()
    sops = []
    for i in range(count):
        ds = make_dataset(instance_number=i + 1)
        (folder / f"{i}.dcm").write_bytes(to_bytes(ds))
        sops.append(ds.SOPInstanceUID)
    result = dcmtk("storescu", "+sd", "-aet", "MODALITY", "-aec", "DICOMFLOW", "127.0.0.1",
                   str(dimse_port(server)), str(folder))
    assert result.returncode == 0, result.stderr
    return sops


def _request(transaction: str, refs: list[tuple[str, str]]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction
    items = []
    for sop_class, sop in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


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
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(PUSH_MODEL, uid.ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", dimse_port(server), ae_title="DICOMFLOW",
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler, ["same"])])
    assert assoc.is_established
    transaction = uid.generate_uid()
    missing = uid.generate_uid()
    try:
        refs = [(CT, sops[0]), (CT, sops[1]), (CT, missing), (MR, sops[2])]
        status, _ = assoc.send_n_action(_request(transaction, refs), 1, PUSH_MODEL, PUSH_INSTANCE)
        assert status.Status == 0x0000
        assert reports.arrived.wait(15)
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
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(PUSH_MODEL, uid.ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", dimse_port(server), ae_title="DICOMFLOW",
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler, ["same"])])
    try:
        status, _ = assoc.send_n_action(_request(uid.generate_uid(), [(CT, s) for s in sops]), 1, PUSH_MODEL,
                                        PUSH_INSTANCE)
        assert status.Status == 0x0000
        assert reports.arrived.wait(15)
    finally:
        assoc.release()
    event_type, info, _ = reports.items[0]
    assert event_type == 1
    assert "FailedSOPSequence" not in info
    assert len(info.ReferencedSOPSequence) == 2


def test_bad_commitment_requests(live_server_factory: Any, tmp_path: Path) -> None:
    server = start(live_server_factory, tmp_path)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(PUSH_MODEL, uid.ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", dimse_port(server), ae_title="DICOMFLOW")
    try:
        no_transaction = _request(uid.generate_uid(), [(CT, uid.generate_uid())])
        del no_transaction.TransactionUID
        status, _ = assoc.send_n_action(no_transaction, 1, PUSH_MODEL, PUSH_INSTANCE)
        assert status.Status == 0x0120  # PS3.7 C.5: missing attribute
        status, _ = assoc.send_n_action(_request(uid.generate_uid(), [(CT, "not-a-uid")]), 1, PUSH_MODEL,
                                        PUSH_INSTANCE)
        assert status.Status == 0x0106  # invalid attribute value
        status, _ = assoc.send_n_action(_request(uid.generate_uid(), [(CT, uid.generate_uid())]), 7, PUSH_MODEL,
                                        PUSH_INSTANCE)
        assert status.Status == 0x0123  # no such action type
    finally:
        assoc.release()


def _modality_scp(reports: Reports) -> tuple[Any, int]:
    """The modality's own listener, where a report on a new association arrives (PS3.4 J.3.3)."""
    ae = AE(ae_title="MODALITY")
    # we (the archive) propose the SCP role on that association; the modality accepts it
    ae.add_supported_context(PUSH_MODEL, uid.ImplicitVRLittleEndian, scu_role=False, scp_role=True)
    port = free_port()
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
    tenants = {"default": TenantSettings(ae_titles=["DICOMFLOW"], remote_nodes={
        "modality": RemoteNode(ae_title="MODALITY", host="127.0.0.1", port=port)})}
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
        released = SimpleNamespace(is_established=False, name="dimse-test", requestor=SimpleNamespace(
            primitive=SimpleNamespace(called_ae_title="DICOMFLOW", calling_ae_title="MODALITY")))
        transaction = uid.generate_uid()
        ok = await asyncio.to_thread(commitment.report, ctx, released, "default", transaction,
                                     [(CT, ds.SOPInstanceUID), (CT, uid.generate_uid())])
        assert ok
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
        tenants = {"default": TenantSettings(ae_titles=["DICOMFLOW"], remote_nodes={
            "modality": RemoteNode(ae_title="MODALITY", host="127.0.0.1", port=port)})}
        server = start(live_server_factory, tmp_path, tenants=tenants)
        sops = _store_with_storescu(server, tmp_path, 1)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(PUSH_MODEL, uid.ImplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", dimse_port(server), ae_title="DICOMFLOW",
                             evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler, ["same"])])
        status, _ = assoc.send_n_action(_request(uid.generate_uid(), [(CT, sops[0])]), 1, PUSH_MODEL,
                                        PUSH_INSTANCE)
        assert status.Status == 0x0000
        assoc.release()
        assert reports.arrived.wait(15)
        time.sleep(1.0)
    finally:
        scp.shutdown()
    assert len(reports.items) == 1
    event_type, _, where = reports.items[0]
    assert event_type == 1
    assert where == "new"  # it released at once: the report came on an association we opened
