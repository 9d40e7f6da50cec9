"""TLS on the DIMSE port (PS3.15 B.1 / B.9) with dcmtk's +tls peers, and storage commitment reports
over TLS to a remote node (the modality side is pynetdicom, as dcmtk has no commitment SCU)."""

from __future__ import annotations

import json
import ssl
import threading
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import pytest
from pydicom import uid
from pynetdicom import AE, evt

from dicomflow.settings import RemoteNode, TenantSettings
from tests.conftest import LiveServer, free_port
from tests.factory import make_dataset, store_state, to_bytes
from tests.harness.certs import CertificateAuthority, Pair
from tests.integration.dimse_peer import PUSH_MODEL, dcmtk, dimse_port, request_commitment, start

pytestmark = pytest.mark.integration

CT = "1.2.840.10008.5.1.4.1.1.2"


class Pki:
    def __init__(self, folder: Path) -> None:
        self.ca = CertificateAuthority(folder / "ca")
        self.server = self.ca.issue("server", "dicomflow-scp", server=True)
        self.client = self.ca.issue("client", "modality-1", server=True)  # also the modality's listener
        self.rogue_ca = CertificateAuthority(folder / "rogue", "rogue CA")
        self.rogue = self.rogue_ca.issue("rogue", "modality-1", server=False)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


def _tls_server(live_server_factory: Any, tmp_path: Path, pki: Pki, *, require_client_cert: bool,
                **overrides: Any) -> LiveServer:
    tls = {"cert_file": pki.server.cert, "key_file": pki.server.key, "ca_file": pki.ca.pem,
           "require_client_cert": require_client_cert}
    return start(live_server_factory, tmp_path, dimse={"tls": tls}, **overrides)


def _instance(tmp_path: Path, name: str = "i.dcm") -> tuple[Path, str]:
    ds = make_dataset()
    path = tmp_path / name
    path.write_bytes(to_bytes(ds))
    return path, str(ds.SOPInstanceUID)


def _storescu(server: LiveServer, *tls: str, files: list[Path]) -> Any:
    return dcmtk("storescu", *tls, "-aet", "MODALITY", "-aec", "DICOMFLOW", "127.0.0.1",
                 str(dimse_port(server)), *map(str, files), timeout=60)


def _client_tls(pair: Pair, pki: Pki) -> tuple[str, ...]:
    return ("+tls", str(pair.key), str(pair.cert), "+cf", str(pki.ca.pem))


def _stored_sops(server: LiveServer) -> set[str]:
    return {sop for _t, _s, _se, sop, _k in store_state(server.settings).instances}


def _audit(server: LiveServer, tenant: str = "default", expect: int = 1, **params: str) -> list[dict[str, Any]]:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    url = f"{server.url}/tenants/{tenant}/admin/audit?{query}"
    events: list[dict[str, Any]] = []
    for _ in range(50):  # the writer is asynchronous
        with urllib.request.urlopen(url, timeout=10) as resp:
            events = [e["resource"] for e in json.loads(resp.read())["entry"]]
        if len(events) >= expect:
            break
        time.sleep(0.1)
    return events


def test_tls_store_with_a_trusted_client_certificate(live_server_factory: Any, tmp_path: Path, pki: Pki) -> None:
    server = _tls_server(live_server_factory, tmp_path, pki, require_client_cert=True)
    path, sop = _instance(tmp_path)
    result = _storescu(server, *_client_tls(pki.client, pki), files=[path])
    assert result.returncode == 0, result.stderr
    assert _stored_sops(server) == {sop}
    # the audit record names the verified certificate, not only the AE title the peer claimed
    stores = [e for e in _audit(server, action="store") if e.get("subtype", [{}])[0].get("code") == "dimse"]
    assert stores and stores[0]["agent"][0]["who"]["identifier"]["value"] == "modality-1"
    assert stores[0]["agent"][0]["altId"] == "MODALITY"
    # and the server certificate was checked by dcmtk against our CA: a client trusting another CA refuses it
    other = dcmtk("echoscu", "+tls", str(pki.client.key), str(pki.client.cert), "+cf", str(pki.rogue_ca.pem),
                  "-aec", "DICOMFLOW", "127.0.0.1", str(dimse_port(server)), timeout=30)
    assert other.returncode != 0


def test_plain_tcp_to_the_tls_port_fails_and_the_server_keeps_serving(live_server_factory: Any, tmp_path: Path,
                                                                      pki: Pki) -> None:
    server = _tls_server(live_server_factory, tmp_path, pki, require_client_cert=False)
    path, sop = _instance(tmp_path)
    plain = _storescu(server, files=[path])
    assert plain.returncode != 0
    assert _stored_sops(server) == set()
    # pynetdicom without TLS: no association either
    ae = AE(ae_title="PLAIN")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = 5
    assoc = ae.associate("127.0.0.1", dimse_port(server), ae_title="DICOMFLOW")
    assert not assoc.is_established
    ok = _storescu(server, *_client_tls(pki.client, pki), files=[path])
    assert ok.returncode == 0, ok.stderr
    assert _stored_sops(server) == {sop}
    alerts = _audit(server, action="config", expect=2)
    assert len(alerts) >= 2
    assert all(e["type"]["code"] == "110113" and e["outcome"] == "4" for e in alerts)  # Security Alert, failed
    assert all(e["agent"][0]["network"]["address"] == "127.0.0.1" for e in alerts)


def test_untrusted_or_missing_client_certificate_is_refused_when_required(live_server_factory: Any,
                                                                         tmp_path: Path, pki: Pki) -> None:
    server = _tls_server(live_server_factory, tmp_path, pki, require_client_cert=True)
    path, _sop = _instance(tmp_path)
    rogue = _storescu(server, *_client_tls(pki.rogue, pki), files=[path])
    assert rogue.returncode != 0
    # TLS without any client certificate (dcmtk's "anonymous" TLS: no certificate of its own)
    anonymous = _storescu(server, "+tla", "+cf", str(pki.ca.pem), files=[path])
    assert anonymous.returncode != 0
    # pynetdicom with a verifying context but no certificate
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=pki.ca.pem)
    ae = AE(ae_title="NOCERT")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = 5
    assoc = ae.associate("127.0.0.1", dimse_port(server), ae_title="DICOMFLOW", tls_args=(ctx, "127.0.0.1"))
    assert not assoc.is_established
    assert _stored_sops(server) == set()
    ok = _storescu(server, *_client_tls(pki.client, pki), files=[path])
    assert ok.returncode == 0, ok.stderr


def test_tls_without_client_certificate_when_not_required(live_server_factory: Any, tmp_path: Path,
                                                          pki: Pki) -> None:
    server = _tls_server(live_server_factory, tmp_path, pki, require_client_cert=False)
    path, sop = _instance(tmp_path)
    anonymous = _storescu(server, "+tla", "+cf", str(pki.ca.pem), files=[path])
    assert anonymous.returncode == 0, anonymous.stderr
    assert _stored_sops(server) == {sop}
    # a client certificate offered anyway must still verify against ca_file
    path2, _ = _instance(tmp_path, "j.dcm")
    rogue = _storescu(server, *_client_tls(pki.rogue, pki), files=[path2])
    assert rogue.returncode != 0
    assert _stored_sops(server) == {sop}


def test_tls_1_1_is_refused(live_server_factory: Any, tmp_path: Path, pki: Pki) -> None:
    """PS3.15 B.9 (BCP 195): TLS 1.2 at least."""
    server = _tls_server(live_server_factory, tmp_path, pki, require_client_cert=False)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=pki.ca.pem)
    with warnings.catch_warnings():  # the point of this test: an old client
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    ae = AE(ae_title="OLDTLS")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = 5
    assoc = ae.associate("127.0.0.1", dimse_port(server), ae_title="DICOMFLOW", tls_args=(ctx, "127.0.0.1"))
    assert not assoc.is_established
    ctx12 = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=pki.ca.pem)
    ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
    assoc = ae.associate("127.0.0.1", dimse_port(server), ae_title="DICOMFLOW", tls_args=(ctx12, "127.0.0.1"))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_storage_commitment_report_over_tls_on_a_new_association(live_server_factory: Any, tmp_path: Path,
                                                                 pki: Pki) -> None:
    """PS3.4 J.3.3: the requestor released at once, so the report goes on an association we open, over TLS
    to its remote node entry (``tls: true``), presenting our certificate (the modality requires one)."""
    reports: list[tuple[int, str]] = []
    arrived = threading.Event()
    peers: list[str] = []

    def on_report(event: Any) -> tuple[int, None]:
        reports.append((int(event.event_type), str(event.event_information.TransactionUID)))
        arrived.set()
        return 0x0000, None

    def on_open(event: Any) -> None:
        cert = event.assoc.dul.socket.socket.getpeercert()
        peers.append(dict(x[0] for x in cert["subject"])["commonName"])

    modality_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki.ca.pem)
    modality_ctx.verify_mode = ssl.CERT_REQUIRED
    modality_ctx.load_cert_chain(pki.client.cert, pki.client.key)
    modality = AE(ae_title="MODALITY")
    modality.add_supported_context(PUSH_MODEL, uid.ImplicitVRLittleEndian, scu_role=False, scp_role=True)
    port = free_port()
    scp = modality.start_server(("127.0.0.1", port), block=False, ssl_context=modality_ctx,
                                evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report), (evt.EVT_CONN_OPEN, on_open)])
    try:
        tenants = {"default": TenantSettings(ae_titles=["DICOMFLOW"], remote_nodes={
            "modality": RemoteNode(ae_title="MODALITY", host="127.0.0.1", port=port, tls=True)})}
        server = _tls_server(live_server_factory, tmp_path, pki, require_client_cert=True, tenants=tenants)
        path, sop = _instance(tmp_path)
        stored = _storescu(server, *_client_tls(pki.client, pki), files=[path])
        assert stored.returncode == 0, stored.stderr
        client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=pki.ca.pem)
        client_ctx.load_cert_chain(pki.client.cert, pki.client.key)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(PUSH_MODEL, uid.ImplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", dimse_port(server), ae_title="DICOMFLOW",
                             tls_args=(client_ctx, "127.0.0.1"))
        assert assoc.is_established
        assert request_commitment(assoc, transaction := uid.generate_uid(), [(CT, sop)]) == 0x0000
        assoc.release()
        assert arrived.wait(15)
    finally:
        scp.shutdown()
    assert reports == [(1, transaction)]  # all committed, once
    assert peers == ["dicomflow-scp"]  # we presented our certificate, and the modality verified it
    events = _audit(server, action="commit")
    assert events and events[0]["type"]["code"] == "110103" and events[0]["outcome"] == "0"
    assert "1 committed, 0 failed, report delivered" in events[0]["outcomeDesc"]


def test_tls_store_of_many_instances_over_one_association(live_server_factory: Any, tmp_path: Path,
                                                          pki: Pki) -> None:
    """200 C-STOREs over one TLS association (client certificate required) are all stored, as over plain TCP.

    (TLS against plain TCP throughput is a benchmark matter, not a test's.)
    """
    folder = tmp_path / "many"
    folder.mkdir()
    files = []
    sops = set()
    for i in range(200):
        path, sop = _instance(folder, f"{i:03d}.dcm")
        files.append(path)
        sops.add(sop)
    plain = start(live_server_factory, tmp_path / "plain")
    secure = _tls_server(live_server_factory, tmp_path / "tls", pki, require_client_cert=True)
    for server, options in ((plain, ()), (secure, _client_tls(pki.client, pki))):
        result = _storescu(server, *options, files=files)
        assert result.returncode == 0, result.stderr
        assert _stored_sops(server) == sops
