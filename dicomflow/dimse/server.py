"""The DIMSE SCP: one pynetdicom AE per server process, started non-blocking from the app's cleanup_ctx.

Association policy (PS3.8 7.1.1, PS3.8 9.3.4 Table 9-21 A-ASSOCIATE-RJ):

- the Called AE Title picks the tenant; an unknown one is rejected permanently by the service user
  with "called AE title not recognized" (result 0x01, source 0x01, reason 0x07);
- a tenant with ``require_known_calling_ae`` accepts only the calling AE titles (and hosts) it lists;
  others get "calling AE title not recognized" (0x01, 0x01, 0x03);
- with ``dimse.tls`` the port speaks TLS only (PS3.15 B.1 / B.9, dimse/tls.py): the handshake completes on
  the association's thread before the A-ASSOCIATE-RQ is read; a peer that fails it is disconnected;
- accepted associations get C-ECHO (PS3.4 A), C-STORE (Annex B, dimse/store.py), Storage Commitment
  Push Model (Annex J, dimse/commitment.py) and Query/Retrieve (Annex C, dimse/qr.py).

pynetdicom runs every association in a thread of its own; handlers hop onto the server's event loop
through :class:`~dicomflow.dimse.bridge.DimseContext` (no second loop, no per-request database engine).
Logs carry AE titles, the tenant and the association name, never patient data. Every store, query,
retrieve, commitment and rejection is audited through :class:`~dicomflow.audit.dimse.DimseAudit`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import web
from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.transport import AssociationServer, AssociationSocket

from dicomflow.appkeys import BLOBS, INDEX, INGEST, OFFLOADER, SETTINGS
from dicomflow.audit.dimse import DimseAudit
from dicomflow.audit.http import AUDIT
from dicomflow.dimse import commitment, qr, tls
from dicomflow.dimse.bridge import DimseContext, EventHandler, called_ae_of, calling_ae_of
from dicomflow.dimse.reactor import make_event_driven
from dicomflow.dimse.sop_classes import add_scp_contexts
from dicomflow.dimse.store import handle_store
from dicomflow.settings import TenantSettings

logger = logging.getLogger(__name__)

#: PS3.8 9.3.4 A-ASSOCIATE-RJ: (result, source, reason)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # rejected-permanent, service-user, called-AE-title-not-recognized
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # rejected-permanent, service-user, calling-AE-title-not-recognized
#: PS3.8 9.3.8 A-ABORT from the service provider: invalid-PDU-parameter-value
_ABORT_INVALID_PDU_PARAMETER = bytes((0x07, 0x00, 0, 0, 0, 4, 0x00, 0x00, 0x02, 0x06))
#: A non-P-DATA PDU (an A-ASSOCIATE-RQ with many contexts) is small; anything above this is hostile.
_MAX_CONTROL_PDU = 1 << 20


def calling_ae_allowed(tenant: TenantSettings, calling_ae: str, host: str) -> bool:
    """Whether a tenant accepts this calling AE title from this host (PS3.8 7.1.1.3)."""
    if not tenant.require_known_calling_ae:
        return True
    return any(
        allowed.ae_title == calling_ae and (allowed.host is None or allowed.host == host)
        for allowed in tenant.allowed_calling_aes
    )


def receive_data_sets_in(directory: Path | None) -> None:
    """Where pynetdicom writes received C-STORE data sets (``STORE_RECV_CHUNKED_DATASET``); None: the
    system temporary folder again. Process-wide: pynetdicom 3.0.4 looks ``NamedTemporaryFile`` up in its
    ``dimse_messages`` module at each C-STORE."""
    factory: Any = tempfile.NamedTemporaryFile if directory is None else partial(tempfile.NamedTemporaryFile,
                                                                                 dir=directory)
    dimse_messages.NamedTemporaryFile = factory  # type: ignore[attr-defined]


class _PduGuard:
    """Replaces an association socket's ``recv``: refuses PDUs above the limit we announced, and
    reads PDU bodies with ``recv_into`` instead of pynetdicom's 4 KiB ``recv`` loop.

    PS3.8 D.1: the Maximum Length we announce bounds the P-DATA-TF PDUs a peer may send. A PDU
    declaring more gets an A-ABORT (service provider, invalid PDU parameter value) and the
    connection is closed, before anything is read into memory.
    """

    def __init__(self, sock: AssociationSocket, max_pdata: int, assoc_name: str) -> None:
        self._sock = sock
        self._max_pdata = max_pdata if max_pdata > 0 else 0xFFFFFFFF
        self._name = assoc_name
        self._header = True
        self._refused = False

    def __call__(self, nr_bytes: int) -> bytearray:
        if self._refused:
            return bytearray()
        raw = self._sock.socket
        assert raw is not None
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        while got < nr_bytes:
            n = raw.recv_into(view[got:], min(nr_bytes - got, 1 << 20))
            if n == 0:  # connection closed: the DUL reports what is missing
                del view
                del buf[got:]
                return buf
            got += n
        del view
        if self._header and nr_bytes == 6:
            pdu_type, length = buf[0], int.from_bytes(buf[2:6], "big")
            limit = self._max_pdata if pdu_type == 0x04 else _MAX_CONTROL_PDU
            if length > limit:
                self._refuse(pdu_type, length)
                return bytearray()
            self._header = False
            return buf
        self._header = True
        return buf

    def _refuse(self, pdu_type: int, length: int) -> None:
        self._refused = True
        logger.warning("aborting association assoc=%s: PDU type 0x%02X of %d bytes exceeds the limit",
                       self._name, pdu_type, length)
        raw = self._sock.socket
        try:
            if raw is not None:
                raw.sendall(_ABORT_INVALID_PDU_PARAMETER)
        except OSError:
            pass


class DimseServer:
    """The SCP for every tenant: one listening socket, any number of called AE titles."""

    def __init__(self, ctx: DimseContext, audit: DimseAudit | None = None) -> None:
        self.ctx = ctx
        self.settings = ctx.settings.dimse
        self.audit = audit or DimseAudit(None, ctx.loop, ctx.settings.default_tenant, ctx.tenant_for_called_ae)
        self._ae: AE | None = None
        self._server: AssociationServer | None = None
        self.qr = qr.QueryRetrieve(ctx, self.audit)
        self._assoc_ids = itertools.count(1)
        self._chunked_before = False

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        assert self._server is not None
        return int(self._server.server_address[1])

    def handlers(self) -> list[EventHandler]:
        ctx, audit = self.ctx, self.audit
        bound: list[EventHandler] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ABORTED, _discard_partial_dataset),
            (evt.EVT_CONN_CLOSE, _discard_partial_dataset),
            (evt.EVT_CONN_CLOSE, lambda event: audit.association_closed(event.assoc)),
            (evt.EVT_DIMSE_SENT, audit.on_sent),
            (evt.EVT_C_STORE, partial(handle_store, ctx=ctx, audit=audit)),
        ]
        bound.extend(commitment.handlers(ctx, audit))
        # Query/Retrieve (C-FIND / C-GET) handlers live in dimse/qr.py, C-MOVE is served there by
        # gate_retrieves (_on_conn_open); the presentation contexts are added by sop_classes.add_scp_contexts().
        bound.extend(qr.handlers(self.qr))
        return bound

    def start(self) -> None:
        """Bind and serve in pynetdicom's own threads (``block=False``)."""
        # Process-wide pynetdicom switch, set once at start-up (STYLE 2.7): C-STORE data sets are written
        # to a temporary file as they arrive instead of being held in memory.
        # store.py handles both modes, so another server in the same process (tests) may flip it back.
        self._chunked_before = _config.STORE_RECV_CHUNKED_DATASET
        _config.STORE_RECV_CHUNKED_DATASET = True
        # ... and that temporary file goes to the ingest spool folder, not /tmp: often a tmpfs (the data set
        # would sit in RAM after all), and on the blob store's filesystem the spool adopts it with a rename
        # instead of a copy (store.py).
        receive_data_sets_in(self.ctx.ingest.spool_dir)
        # STYLE 2.6: pynetdicom logs every C-FIND/C-MOVE/C-GET identifier at INFO by default (patient data).
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        # C-MOVE/C-GET sub-operations and DICOM forwards send stored files by path: stream them as they
        # are (dimse/scu.py send_stored) instead of decoding and re-encoding each instance in memory.
        _config.STORE_SEND_CHUNKED_DATASET = True
        ae = AE(ae_title="DICOMFLOW")
        ae.maximum_associations = self.settings.max_associations
        ae.acse_timeout = self.settings.acse_timeout
        ae.dimse_timeout = self.settings.dimse_timeout
        ae.network_timeout = self.settings.network_timeout
        ae.maximum_pdu_size = self.settings.max_pdu
        # Called/calling AE titles are checked per tenant in _on_requested, not by pynetdicom.
        ae.require_called_aet = False
        add_scp_contexts(ae)
        self._ae = ae
        ssl_context = tls.server_context(self.settings.tls) if self.settings.tls is not None else None
        self._server = ae.start_server((self.settings.host, self.settings.port), block=False,
                                       ssl_context=ssl_context, evt_handlers=list[Any](self.handlers()))
        logger.info("DIMSE listening on %s:%d (%s) for AE titles %s", self.settings.host, self.port,
                    "TLS" if ssl_context is not None else "plain TCP",
                    ", ".join(ae for t in self.ctx.settings.tenants.values() for ae in t.ae_titles))

    def stop(self) -> None:
        """Abort open associations and close the listening socket (blocking: call off the loop)."""
        if self._ae is not None:
            self._ae.shutdown()
            self._ae = None
            self._server = None
            _config.STORE_RECV_CHUNKED_DATASET = self._chunked_before
            receive_data_sets_in(None)

    def _on_conn_open(self, event: Event) -> None:
        assoc = event.assoc
        if assoc.is_acceptor:  # a short, unique name for log lines (pynetdicom's repeats a timestamp)
            assoc.name = f"dimse-{next(self._assoc_ids)}"
        sock = assoc.dul.socket
        if sock is None or sock.socket is None:
            return
        # COMPONENTS.md: with Nagle's algorithm on, C-STORE drops from ~400 to ~11 instances/s.
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Accepted sockets do not inherit the listening socket's timeout: without one, a peer that stops
        # in the middle of a PDU would hold this association's threads forever (PS3.8 9.1.5 ARTIM).
        sock.socket.settimeout(self.settings.network_timeout)
        if assoc.is_acceptor and self.settings.tls is not None:
            failed = tls.handshake(sock.socket, self.settings.acse_timeout)
            if failed is not None:
                host = str(assoc.requestor.address)
                logger.warning("TLS handshake failed assoc=%s from %s: %s", assoc.name, host, failed)
                self.audit.tls_failed(host, failed)
                sock.close()  # Evt17: the DUL ends the association without reading anything
                return
        if assoc.is_acceptor:
            sock.recv = _PduGuard(sock, self.settings.max_pdu, assoc.name)  # type: ignore[method-assign]
            make_event_driven(assoc)
            self.qr.gate_retrieves(assoc)

    def _on_requested(self, event: Event) -> None:
        """EVT_REQUESTED: accept or reject on the called and calling AE titles (PS3.8 7.1.1.3-4)."""
        assoc = event.assoc
        called, calling = called_ae_of(assoc), calling_ae_of(assoc)
        tenant = self.ctx.tenant_for_called_ae(called)
        if tenant is None:
            logger.warning("rejecting association assoc=%s from %r: called AE %r not recognised",
                           assoc.name, calling, called)
            _reject(assoc, REJECT_CALLED_AE)
            self.audit.rejected(assoc, None, "called AE title not recognised")
            return
        host = str(assoc.requestor.address)
        if not calling_ae_allowed(self.ctx.settings.tenants[tenant], calling, host):
            logger.warning("rejecting association assoc=%s tenant=%s: calling AE %r not allowed",
                           assoc.name, tenant, calling)
            _reject(assoc, REJECT_CALLING_AE)
            self.audit.rejected(assoc, tenant, "calling AE title not allowed")
            return
        logger.info("association assoc=%s tenant=%s calling=%r called=%r", assoc.name, tenant, calling, called)


def _reject(assoc: Association, rsd: tuple[int, int, int]) -> None:
    assoc.acse.send_reject(*rsd)
    # The reactor closes the socket as soon as this handler returns: let the DUL put the
    # A-ASSOCIATE-RJ on the wire first (Sta13: awaiting transport close, PS3.8 9.2).
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and assoc.dul.state_machine.current_state != "Sta13":
        time.sleep(0.002)


def _discard_partial_dataset(event: Event) -> None:
    """An association aborted mid-transfer leaves pynetdicom's partial temporary file: remove it."""
    message = getattr(event.assoc.dimse, "message", None)
    fh = getattr(message, "_data_set_file", None)
    if fh is None:
        return
    try:
        fh.close()
        os.unlink(Path(fh.name))
    except OSError:
        pass


DIMSE_SERVER = web.AppKey("dimse_server", DimseServer)


async def dimse_server(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: start the SCP after the core services, stop it before they close."""
    settings = app[SETTINGS]
    if not settings.dimse.enabled:
        yield
        return
    loop = asyncio.get_running_loop()
    ctx = DimseContext(loop=loop, settings=settings, index=app[INDEX], blobs=app[BLOBS], ingest=app[INGEST],
                       offloader=app[OFFLOADER])
    audit = DimseAudit(app.get(AUDIT), loop, settings.default_tenant, ctx.tenant_for_called_ae)
    server = DimseServer(ctx, audit)
    await loop.run_in_executor(None, server.start)
    app[DIMSE_SERVER] = server
    try:
        yield
    finally:
        await loop.run_in_executor(None, server.stop)
        await audit.drain()
