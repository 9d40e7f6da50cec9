"""Storage Commitment Push Model SCP (PS3.4 Annex J).

A modality sends N-ACTION (Action Type ID 1, "Request Storage Commitment", PS3.4 J.3.2) listing the
instances it wants us to keep. Before the N-ACTION response goes out, the request is made durable: one
index transaction appends a ``commitment.requested`` event to the outbox (already routed: routes never
see it) and a delivery of kind ``storage-commitment-report`` (action ``n-event-report``, destination: the
requesting AE title) to the routing engine's delivery queue (engine/store.py ``add_delivery``). If that
write fails the N-ACTION is answered 0x0110 and nothing was acknowledged; once 0x0000 is sent, a restart
cannot lose the request.

The report is an N-EVENT-REPORT (PS3.4 J.3.3.1: Event Type ID 1 all committed, 2 some failed) carrying
the request's Transaction UID and every referenced instance, either in the Referenced SOP Sequence or in
the Failed SOP Sequence with a Failure Reason (PS3.4 J.3.3.1.2; values in PS3.3 C.14.1.1). It is built
from the index each time it is sent, not when the request arrives (on a new association: once the
association is established, right before the N-EVENT-REPORT): an instance deleted between request and
report is reported failed with 0x0112 (no such object instance), never as committed.

Delivery. The server holds the delivery's claim and makes the first attempt at once: on the requesting
association while it is open (after a short grace for a requestor that releases), else on a new
association to the requesting AE, which must be one of the tenant's remote nodes; on that association we
are the requestor and propose the SCP role (PS3.4 J.3.3.1.2 and J.3.3.1.3: the report may come on a
different association; PS3.7 D.3.3.4). A remote node with ``tls: true`` is called over TLS (dimse/tls.py).
The attempt is recorded on the delivery like any other: done, or failed and retried by the routing worker
(connectors/commitment.py, in ``dicomflow serve`` or ``dicomflow worker``) on a new association with
the routing settings' back-off (``routing.backoff_initial``/``backoff_max``), up to
``routing.max_attempts``, then a dead letter that operators list, retry or drop like any delivery
(``dicomflow deliveries``, ``{admin}/deliveries``). Association failures, no answer and 0x0110/0x0213
answers are retried; an AE that is not a remote node of the tenant, a peer that refuses our SCP role and
other failure statuses become dead letters at once. If the server dies before recording its attempt,
a worker takes the delivery over when ``routing.lease`` has run out.

Each transaction is audited once, after the first attempt (audit/dimse.py); later attempts are logged.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import N_ACTION
from pynetdicom.events import Event as DimseEvent
from pynetdicom.status import code_to_category

from dicomflow.audit.dimse import DimseAudit
from dicomflow.connectors.base import DeliveryError
from dicomflow.dimse import tls
from dicomflow.dimse.bridge import DimseContext, EventHandler, called_ae_of, calling_ae_of
from dicomflow.dimse.sop_classes import BASIC_TRANSFER_SYNTAXES
from dicomflow.dimse.status import (
    INVALID_ATTRIBUTE_VALUE,
    MISSING_ATTRIBUTE,
    NO_SUCH_ACTION_TYPE,
    NO_SUCH_SOP_INSTANCE,
    PROCESSING_FAILURE,
    SUCCESS,
    status_dataset,
)
from dicomflow.engine.events import COMMITMENT_REPORT, N_EVENT_REPORT, Event, EventType
from dicomflow.engine.store import DeliveryRow, EngineStore, Status
from dicomflow.index.base import IndexStore
from dicomflow.index.sql import SqlIndexStore
from dicomflow.model import Protocol, Source, is_valid_uid
from dicomflow.settings import Settings

logger = logging.getLogger(__name__)

STORAGE_COMMITMENT_PUSH_MODEL = "1.2.840.10008.1.20.1"
#: PS3.4 J.3.1: the well-known SOP Instance of the Storage Commitment Push Model
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_STORAGE_COMMITMENT = 1  # PS3.4 J.3.2 Action Type ID
EVENT_ALL_SUCCEEDED = 1  # PS3.4 J.3.3.1 Event Type IDs
EVENT_SOME_FAILED = 2
#: PS3.3 C.14.1.1 Failure Reason values (used by PS3.4 J.3.3.1.2)
FAILURE_NO_SUCH_INSTANCE = 0x0112
FAILURE_CLASS_INSTANCE_CONFLICT = 0x0119
#: N-EVENT-REPORT answers worth another attempt (PS3.7 10.1.1.1.8): processing failure, resource limitation
_RETRYABLE_ANSWERS = frozenset({0x0110, 0x0213})

_message_ids = itertools.count(1)
#: seconds to wait for the N-EVENT-REPORT response on the requesting association
SAME_ASSOCIATION_WAIT = 5.0
#: seconds a requestor has to release after the N-ACTION response before we report on its association
RELEASE_GRACE = 0.2
#: who holds a delivery while the server makes its first attempt (deliveries.claimed_by)
_HOLDER = f"{socket.gethostname()}:{os.getpid()}:dimse"


@dataclass(frozen=True, slots=True)
class CommitmentRequest:
    """One acknowledged N-ACTION (PS3.4 J.3.2.1): what its N-EVENT-REPORT must answer."""

    tenant: str
    transaction: str
    #: (Referenced SOP Class UID, Referenced SOP Instance UID), in the order of the request
    refs: tuple[tuple[str, str], ...]
    calling_ae: str
    called_ae: str

    def event(self, host: str | None = None) -> Event:
        """The outbox event that carries the request (UIDs and AE titles only, no patient data)."""
        return Event(0, EventType.COMMITMENT_REQUESTED, self.tenant, "",
                     source=Source(Protocol.DIMSE, calling_ae=self.calling_ae, address=host).as_dict(),
                     extra={"transaction_uid": self.transaction, "called_ae": self.called_ae,
                            "references": [list(ref) for ref in self.refs]})

    @classmethod
    def from_event(cls, event: Event) -> CommitmentRequest:
        refs: list[Any] = event.extra["references"]
        return cls(event.tenant, str(event.extra["transaction_uid"]),
                   tuple((str(c), str(s)) for c, s in refs), event.source.get("calling_ae", ""),
                   str(event.extra.get("called_ae", "")))


@dataclass(frozen=True, slots=True)
class Report:
    """An N-EVENT-REPORT ready to send: Event Type ID and Event Information (PS3.4 J.3.3.1)."""

    event_type: int
    info: Dataset
    committed: int
    failed: int

    def summary(self) -> str:
        return f"{self.committed} committed, {self.failed} failed"


def handlers(ctx: DimseContext, audit: DimseAudit | None = None) -> list[EventHandler]:
    queue = EngineStore(ctx.index) if isinstance(ctx.index, SqlIndexStore) else None
    return [(evt.EVT_N_ACTION, partial(handle_n_action, ctx=ctx, queue=queue, audit=audit))]


def _next_message_id() -> int:
    return next(_message_ids) % 0xFFFF + 1


def _parse_request(info: Dataset) -> tuple[str, list[tuple[str, str]]]:
    """Transaction UID and (SOP Class, SOP Instance) pairs of an N-ACTION (PS3.4 J.3.2.1.1)."""
    transaction = str(info.get("TransactionUID", "") or "").strip("\0 ")
    if not transaction:
        raise KeyError("Transaction UID")
    if not is_valid_uid(transaction):
        raise ValueError("Transaction UID")
    refs: list[tuple[str, str]] = []
    for item in info.get("ReferencedSOPSequence", None) or []:
        sop_class = str(item.get("ReferencedSOPClassUID", "") or "").strip("\0 ")
        sop_instance = str(item.get("ReferencedSOPInstanceUID", "") or "").strip("\0 ")
        if not is_valid_uid(sop_class) or not is_valid_uid(sop_instance):
            raise ValueError("Referenced SOP Sequence")
        refs.append((sop_class, sop_instance))
    if not refs:
        raise KeyError("Referenced SOP Sequence")
    return transaction, refs


def handle_n_action(event: DimseEvent, ctx: DimseContext, queue: EngineStore | None = None,
                    audit: DimseAudit | None = None) -> tuple[Dataset | int, Dataset | None]:
    """EVT_N_ACTION: record a storage commitment request durably, acknowledge it, report from a thread."""
    assoc = event.assoc
    tenant = ctx.tenant_of(assoc)
    req = cast(N_ACTION, event.request)
    if str(req.RequestedSOPInstanceUID or "") != STORAGE_COMMITMENT_INSTANCE:
        return status_dataset(NO_SUCH_SOP_INSTANCE, "not the Storage Commitment SOP Instance"), None
    if event.action_type != REQUEST_STORAGE_COMMITMENT:
        return status_dataset(NO_SUCH_ACTION_TYPE), None
    try:
        transaction, refs = _parse_request(event.action_information)
    except KeyError as exc:
        logger.warning("storage commitment refused tenant=%s assoc=%s: missing %s", tenant, assoc.name, exc)
        return status_dataset(MISSING_ATTRIBUTE, f"missing {exc.args[0]}"), None
    except Exception:
        logger.warning("storage commitment refused tenant=%s assoc=%s: invalid request", tenant, assoc.name)
        return status_dataset(INVALID_ATTRIBUTE_VALUE, "invalid Transaction UID or references"), None
    request = CommitmentRequest(tenant, transaction, tuple(refs), calling_ae_of(assoc), called_ae_of(assoc))
    host = str(assoc.requestor.address)
    try:
        if queue is None:
            raise RuntimeError("the index is not an SQL database: no delivery queue")
        # durable before the response: an acknowledged request survives a restart (delivered by a worker)
        row = ctx.run(queue.add_delivery(request.event(host), COMMITMENT_REPORT, {"type": N_EVENT_REPORT},
                                         request.calling_ae, claimed_by=f"{_HOLDER}/{assoc.name}",
                                         lease=ctx.settings.routing.lease))
    except Exception:
        logger.exception("storage commitment not recorded tenant=%s assoc=%s transaction=%s: answering 0x%04X",
                         tenant, assoc.name, transaction, PROCESSING_FAILURE)
        return status_dataset(PROCESSING_FAILURE, "the request could not be recorded"), None
    logger.info("storage commitment requested tenant=%s assoc=%s transaction=%s instances=%d delivery=%d",
                tenant, assoc.name, transaction, len(refs), row.id)
    # The report must follow the N-ACTION response: pynetdicom's send_* pauses the reactor, which
    # happens only after this handler returned and the response went out.
    threading.Thread(target=_first_attempt, args=(ctx, queue, assoc, request, row, host, audit),
                     name=f"commitment-{assoc.name}", daemon=True).start()
    return status_dataset(SUCCESS), None


def event_information(transaction: str, refs: tuple[tuple[str, str], ...] | list[tuple[str, str]],
                      stored: dict[str, str]) -> Report:
    """The N-EVENT-REPORT for ``refs`` given the instances stored now (SOP Instance UID -> SOP Class UID).

    PS3.4 J.3.3.1.2: every referenced instance appears once, committed or failed; the Transaction UID
    is the request's.
    """
    info = Dataset()
    info.TransactionUID = transaction
    succeeded: list[Dataset] = []
    failed: list[Dataset] = []
    for sop_class, sop_instance in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        if sop_instance not in stored:  # never stored, or deleted since the request
            item.FailureReason = FAILURE_NO_SUCH_INSTANCE
            failed.append(item)
        elif stored[sop_instance] != sop_class:
            item.FailureReason = FAILURE_CLASS_INSTANCE_CONFLICT
            failed.append(item)
        else:
            succeeded.append(item)
    if succeeded:
        info.ReferencedSOPSequence = succeeded
    if failed:
        info.FailedSOPSequence = failed
    return Report(EVENT_SOME_FAILED if failed else EVENT_ALL_SUCCEEDED, info, len(succeeded), len(failed))


async def look_up(index: IndexStore, request: CommitmentRequest) -> Report:
    """The report as of now; an index that does not answer is a retryable failure (nothing is sent)."""
    try:
        stored = await index.stored_sop_instances(request.tenant, [sop for _, sop in request.refs])
    except Exception as exc:
        raise DeliveryError("index lookup failed", retryable=True, detail=f"index lookup failed: {exc!r}"[:1500]) \
            from exc
    return event_information(request.transaction, request.refs, stored)


def _check_answer(code: int | None, peer: str) -> None:
    """Raise unless the peer acknowledged the N-EVENT-REPORT (PS3.7 10.1.1.1.8)."""
    if code is None:
        raise DeliveryError(f"no N-EVENT-REPORT response from {peer}", retryable=True)
    if code_to_category(code) in ("Success", "Warning"):
        return
    raise DeliveryError(f"{peer} answered the N-EVENT-REPORT with 0x{code:04X}",
                        retryable=code in _RETRYABLE_ANSWERS or 0xA700 <= code <= 0xA7FF)


def _first_attempt(ctx: DimseContext, queue: EngineStore, assoc: Association, request: CommitmentRequest,
                   row: DeliveryRow, host: str, audit: DimseAudit | None) -> None:
    """The server's attempt (attempt 1 of the delivery), recorded like a worker's."""
    built: list[Report] = []

    def report_now() -> Report:
        built.append(ctx.run(look_up(ctx.index, request)))
        return built[-1]

    error: DeliveryError | None = None
    detail = ""
    try:
        detail = _report_on_requesting_association(ctx, assoc, request, report_now)
    except DeliveryError as exc:
        error = exc
    except Exception as exc:  # a bug must not leave the delivery claimed until the lease runs out
        logger.exception("storage commitment delivery=%d transaction=%s: unexpected error", row.id,
                         request.transaction)
        error = DeliveryError(f"internal error: {type(exc).__name__}", retryable=True, detail=repr(exc)[:1500])
    routing = ctx.settings.routing
    state = Status.DONE
    try:
        if error is None:
            ctx.run(queue.succeed(row, detail))
        else:
            state = ctx.run(queue.fail(row, error.detail, retryable=error.retryable,
                                       max_attempts=routing.max_attempts,
                                       backoff=(routing.backoff_initial, routing.backoff_max)))
    except Exception:
        state = "unrecorded"
        logger.exception("storage commitment delivery=%d: attempt not recorded; a worker takes it over when "
                         "routing.lease has run out", row.id)
    if error is None:
        logger.info("storage commitment delivery=%d tenant=%s transaction=%s %s", row.id, request.tenant,
                    request.transaction, detail)
    else:
        logger.warning("storage commitment delivery=%d tenant=%s transaction=%s not reported (%s): %s", row.id,
                       request.tenant, request.transaction, state, error.summary)
    if audit is not None:
        committed, failed = (built[-1].committed, built[-1].failed) if built else (0, len(request.refs))
        audit.commitment(request.tenant, request.calling_ae, request.called_ae, host, request.transaction,
                         committed, failed, error is None, delivery=None if error is None else f"{row.id} {state}")


def _report_on_requesting_association(ctx: DimseContext, assoc: Association, request: CommitmentRequest,
                                      report_now: Callable[[], Report]) -> str:
    """Report on the requesting association while it is open and idle, else on a new one.

    ``report_now`` looks the instances up (blocking) and is called right before each send.
    """
    # A modality that wants the report on a new association releases right after the N-ACTION response
    # (pynetdicom, for one, ignores an N-EVENT-REPORT that arrives while it releases): give it a moment.
    time.sleep(RELEASE_GRACE)
    if assoc.is_established and assoc.dul.state_machine.current_state == "Sta6":  # PS3.8 9.2: idle
        report = report_now()
        previous = assoc.dimse_timeout
        assoc.dimse_timeout = min(previous or SAME_ASSOCIATION_WAIT, SAME_ASSOCIATION_WAIT)
        try:
            status, _ = assoc.send_n_event_report(report.info, report.event_type, STORAGE_COMMITMENT_PUSH_MODEL,
                                                  STORAGE_COMMITMENT_INSTANCE, msg_id=_next_message_id())
            code = status.get("Status") if status is not None else None
        except RuntimeError:  # released in the meantime: nothing was sent
            code = None
        finally:
            assoc.dimse_timeout = previous
        if code is not None:
            _check_answer(int(code), f"{request.calling_ae} on {assoc.name}")
            return f"reported on the requesting association {assoc.name}: {report.summary()}"
        logger.info("storage commitment: no answer on assoc=%s, reporting on a new association", assoc.name)
    return send_on_new_association(ctx.settings, request, report_now)


def _nodelay(event: DimseEvent) -> None:
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def send_on_new_association(settings: Settings, request: CommitmentRequest,
                            report_now: Callable[[], Report]) -> str:
    """PS3.4 J.3.3.1.2: open an association to the requesting AE (a remote node of the tenant), report.

    Blocking. ``report_now`` builds the report from the index once the association is established, so
    the report is as fresh as it can be. Returns the outcome kept with the delivery; raises
    :class:`~dicomflow.connectors.base.DeliveryError` (retryable or not) when the report was not acknowledged.
    """
    tenant = settings.tenants.get(request.tenant)
    nodes = [n for n in tenant.remote_nodes.values() if n.ae_title == request.calling_ae] if tenant else []
    if not nodes:
        raise DeliveryError(f"AE {request.calling_ae!r} is not a remote node of tenant {request.tenant}: "
                            "nowhere to report on a new association", retryable=False)
    node = nodes[0]
    tls_args = (tls.client_context(settings.dimse.tls), node.host) if node.tls else None
    ae = AE(ae_title=request.called_ae or "DICOMFLOW")
    ae.acse_timeout = settings.dimse.acse_timeout
    ae.dimse_timeout = settings.dimse.dimse_timeout
    ae.network_timeout = settings.dimse.network_timeout
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH_MODEL, list(BASIC_TRANSFER_SYNTAXES))
    # PS3.4 J.3.3.1.3 note: on an association we open, we propose the SCP role (and not the SCU role).
    role = build_role(STORAGE_COMMITMENT_PUSH_MODEL, scu_role=False, scp_role=True)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title, ext_neg=[role], tls_args=tls_args,
                         evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
    peer = f"{node.ae_title} at {node.host}:{node.port}"
    if not assoc.is_established:
        how = "rejected" if assoc.is_rejected else "not connected or aborted"
        raise DeliveryError(f"association to {peer} failed ({how})", retryable=True)
    try:
        report = report_now()
        status, _ = assoc.send_n_event_report(report.info, report.event_type, STORAGE_COMMITMENT_PUSH_MODEL,
                                              STORAGE_COMMITMENT_INSTANCE, msg_id=1)
    except ValueError as exc:  # no accepted context with our SCP role: the peer does not take reports
        raise DeliveryError(f"{peer} did not accept the Storage Commitment SCP role", retryable=False,
                            detail=f"{peer} did not accept the Storage Commitment SCP role: {exc}") from exc
    finally:
        assoc.release()
    code = status.get("Status") if status is not None else None
    _check_answer(None if code is None else int(code), peer)
    return f"reported on a new association to {node.ae_title}: {report.summary()}"
