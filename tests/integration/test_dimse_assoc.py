"""Association policy and bad input at the PDU level (PS3.8): dcmtk echoscu and raw sockets."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import uid
from pynetdicom import AE

from dicomflow.settings import CallingAe, TenantSettings
from tests.factory import make_dataset
from tests.integration.dimse_peer import dcmtk, dimse_port, start, stored_blobs

pytestmark = pytest.mark.integration

VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


def _tenants() -> dict[str, TenantSettings]:
    return {
        "default": TenantSettings(ae_titles=["DICOMFLOW"]),
        "acme": TenantSettings(ae_titles=["ACME", "ACME2"], require_known_calling_ae=True,
                               allowed_calling_aes=[CallingAe(ae_title="GOODSCU"),
                                                    CallingAe(ae_title="HOSTBOUND", host="10.9.9.9"),
                                                    CallingAe(ae_title="LOCALSCU", host="127.0.0.1")]),
    }


@pytest.fixture
def server(live_server_factory: Any, tmp_path: Path) -> Any:
    return start(live_server_factory, tmp_path, tenants=_tenants(),
                 dimse={"acse_timeout": 1.0, "network_timeout": 2.0, "max_pdu": 65536})


def _echo(server: Any, called: str, calling: str = "ECHOSCU") -> Any:
    return dcmtk("echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(dimse_port(server)), timeout=30)


def test_echoscu(server: Any) -> None:
    result = _echo(server, "DICOMFLOW")
    assert result.returncode == 0, result.stderr


def test_unknown_called_ae_is_rejected(server: Any) -> None:
    result = _echo(server, "NOBODY")
    assert result.returncode != 0
    assert "Rejected Permanent, Source: Service User" in result.stderr
    assert "Called AE Title Not Recognized" in result.stderr


@pytest.mark.parametrize(("called", "calling", "ok"), [
    ("ACME", "GOODSCU", True),
    ("ACME2", "GOODSCU", True),  # a tenant may own several called AE titles
    ("ACME", "LOCALSCU", True),  # allowed from this host
    ("ACME", "HOSTBOUND", False),  # allowed only from another host
    ("ACME", "BADSCU", False),
    ("DICOMFLOW", "BADSCU", True),  # the default tenant does not require known calling AEs
])
def test_calling_ae_allow_list(server: Any, called: str, calling: str, ok: bool) -> None:
    result = _echo(server, called, calling)
    if ok:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode != 0
        assert "Calling AE Title Not Recognized" in result.stderr


def test_called_ae_picks_the_tenant(server: Any) -> None:
    ae = AE(ae_title="GOODSCU")
    ae.add_requested_context(CT, uid.ExplicitVRLittleEndian)
    ds = make_dataset()
    assoc = ae.associate("127.0.0.1", dimse_port(server), ae_title="ACME")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    assert list(stored_blobs(server.settings)) == [("acme", ds.SOPInstanceUID)]


def _connect(server: Any) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", dimse_port(server)), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_until_closed(sock: socket.socket, limit: float = 10.0) -> bytes:
    data = b""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(4096)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
    return data


def _assert_serving(server: Any) -> None:
    result = _echo(server, "DICOMFLOW")
    assert result.returncode == 0, result.stderr


def test_silent_connection_is_closed_by_artim(server: Any) -> None:
    """PS3.8 9.1.5: no A-ASSOCIATE-RQ within the ARTIM time (acse_timeout=1s): the connection is closed."""
    sock = _connect(server)
    t0 = time.monotonic()
    assert _read_until_closed(sock) == b""
    elapsed = time.monotonic() - t0
    sock.close()
    assert 0.5 < elapsed < 5, elapsed
    _assert_serving(server)


@pytest.mark.parametrize("garbage", [
    b"\xff" * 32,  # unknown PDU type
    b"\x01\x00\x00\x00\x00\x10" + b"\x00" * 16,  # A-ASSOCIATE-RQ that does not decode
    b"\x04\x00\x00\x00\x00\x0c" + b"\x00" * 12,  # P-DATA-TF before any association
    b"\x01\x00",  # a header cut short
])
def test_malformed_pdus_are_refused_and_the_server_keeps_serving(server: Any, garbage: bytes) -> None:
    sock = _connect(server)
    sock.sendall(garbage)
    t0 = time.monotonic()
    reply = _read_until_closed(sock, limit=20)
    elapsed = time.monotonic() - t0
    sock.close()
    assert elapsed < 8, elapsed  # closed by the server (a PDU cut short: after network_timeout=2s)
    # PS3.8 9.3.8: either an A-ABORT (type 0x07) or the transport closed; never an association
    assert reply == b"" or reply[0] == 0x07, reply[:16]
    _assert_serving(server)


def test_oversized_control_pdu_is_aborted_before_it_is_read(server: Any) -> None:
    sock = _connect(server)
    sock.sendall(b"\x01\x00" + struct.pack(">I", 512 * 1024 * 1024))  # "here come 512 MiB"
    reply = _read_until_closed(sock)
    sock.close()
    # A-ABORT, source 0x02 (service provider), reason 0x06 (invalid PDU parameter value)
    assert reply == bytes((0x07, 0x00, 0, 0, 0, 4, 0, 0, 0x02, 0x06))
    _assert_serving(server)


def _verification_association(server: Any) -> Any:
    """An established pynetdicom association (MODALITY -> DICOMFLOW) proposing Verification."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(VERIFICATION, uid.ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", dimse_port(server), ae_title="DICOMFLOW")
    assert assoc.is_established
    return assoc


def _wait_until_closed(assoc: Any, within: float, step: float) -> None:
    deadline = time.monotonic() + within
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(step)


def test_oversized_pdata_on_an_association_is_aborted(server: Any) -> None:
    assoc = _verification_association(server)
    # we announced 64 KiB (settings.dimse.max_pdu); a P-DATA-TF of 1 MiB breaks PS3.8 D.1
    assert assoc.acceptor.maximum_length == 65536
    raw = assoc.dul.socket.socket
    raw.sendall(b"\x04\x00" + struct.pack(">I", 1024 * 1024) + b"\x00" * 1024)
    _wait_until_closed(assoc, 10, 0.05)
    assert assoc.is_aborted
    _assert_serving(server)


def test_idle_association_is_closed_after_network_timeout(server: Any) -> None:
    assoc = _verification_association(server)
    _wait_until_closed(assoc, 15, 0.1)
    assert not assoc.is_established  # network_timeout=2s on the server
    _assert_serving(server)


def test_associations_beyond_the_limit_are_rejected_transiently(live_server_factory: Any, tmp_path: Path) -> None:
    server = start(live_server_factory, tmp_path, dimse={"max_associations": 2})
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(VERIFICATION, uid.ImplicitVRLittleEndian)
    held = [ae.associate("127.0.0.1", dimse_port(server), ae_title="DICOMFLOW") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        result = _echo(server, "DICOMFLOW")
        # PS3.8 9.3.4: rejected-transient, service-provider (presentation), local-limit-exceeded
        assert result.returncode != 0
        assert "Rejected Transient" in result.stderr and "Local Limit Exceeded" in result.stderr
    finally:
        for a in held:
            a.release()
    _assert_serving(server)
