"""Storage Commitment Push Model SCP (PS3.4 Annex J).

A modality sends N-ACTION (Action Type ID 1, "Request Storage Commitment") listing the instances it
wants us to keep; we answer the N-ACTION at once and then report, from the index, which of them are
stored (success) and which are not (failure) in an N-EVENT-REPORT (Event Type ID 1: all committed,
2: some failed; PS3.4 J.3.3). The report goes on the requesting association while it is open, else
on a new association to the requesting AE, which must be one of the tenant's remote nodes; on that
association we are the requestor and propose the SCP role (PS3.4 J.3.3, PS3.7 D.3.3.4). A remote node
with ``tls: true`` is called over TLS (dimse/tls.py: its certificate verified against ``dimse.tls.ca_file``,
ours presented). Each transaction is audited once (audit/dimse.py).
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from functools import partial
from typing import cast

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import N_ACTION
from pynetdicom.events import Event

from dicomflow.audit.dimse import DimseAudit
from dicomflow.dimse import tls
from dicomflow.dimse.bridge import DimseContext, EventHandler, called_ae_of, calling_ae_of
from dicomflow.dimse.sop_classes import BASIC_TRANSFER_SYNTAXES
from dicomflow.dimse.status import (
    INVALID_ATTRIBUTE_VALUE,
    MISSING_ATTRIBUTE,
    NO_SUCH_ACTION_TYPE,
    NO_SUCH_SOP_INSTANCE,
    SUCCESS,
    status_dataset,
)
from dicomflow.model import is_valid_uid

logger = logging.getLogger(__name__)

STORAGE_COMMITMENT_PUSH_MODEL = "1.2.840.10008.1.20.1"
#: PS3.4 J.3.1: the well-known SOP Instance of the Storage Commitment Push Model
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_STORAGE_COMMITMENT = 1  # PS3.4 J.3.2 Action Type ID
EVENT_ALL_SUCCEEDED = 1  # PS3.4 J.3.3 Event Type IDs
EVENT_SOME_FAILED = 2
#: PS3.4 J.3.3.1.1 Failure Reason values
FAILURE_NO_SUCH_INSTANCE = 0x0112
FAILURE_CLASS_INSTANCE_CONFLICT = 0x0119
FAILURE_PROCESSING = 0x0110

_message_ids = itertools.count(1)
#: seconds to wait for the N-EVENT-REPORT response on the requesting association
SAME_ASSOCIATION_WAIT = 5.0
#: seconds a requestor has to release after the N-ACTION response before we report on its association
RELEASE_GRACE = 0.2


def handlers(ctx: DimseContext, audit: DimseAudit | None = None) -> list[EventHandler]:
    return [(evt.EVT_N_ACTION, partial(handle_n_action, ctx=ctx, audit=audit))]


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


def handle_n_action(event: Event, ctx: DimseContext,
                    audit: DimseAudit | None = None) -> tuple[Dataset | int, Dataset | None]:
    """EVT_N_ACTION: accept a storage commitment request and report on it from another thread."""
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
    logger.info("storage commitment requested tenant=%s assoc=%s transaction=%s instances=%d", tenant,
                assoc.name, transaction, len(refs))
    # The report must follow the N-ACTION response: pynetdicom's send_* pauses the reactor, which
    # happens only after this handler returned and the response went out.
    threading.Thread(target=_report_and_audit, args=(ctx, assoc, tenant, transaction, refs, audit),
                     name=f"commitment-{assoc.name}", daemon=True).start()
    return status_dataset(SUCCESS), None


def event_information(transaction: str, refs: list[tuple[str, str]],
                      stored: dict[str, str] | None) -> tuple[int, Dataset]:
    """The N-EVENT-REPORT Event Information (PS3.4 J.3.3.1); ``stored`` None means the index failed."""
    info = Dataset()
    info.TransactionUID = transaction
    succeeded: list[Dataset] = []
    failed: list[Dataset] = []
    for sop_class, sop_instance in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        if stored is None:
            item.FailureReason = FAILURE_PROCESSING
            failed.append(item)
        elif sop_instance not in stored:
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
    return (EVENT_SOME_FAILED if failed else EVENT_ALL_SUCCEEDED), info


def _report_and_audit(ctx: DimseContext, assoc: Association, tenant: str, transaction: str,
                      refs: list[tuple[str, str]], audit: DimseAudit | None) -> None:
    calling, called, host = calling_ae_of(assoc), called_ae_of(assoc), str(assoc.requestor.address)
    failed: list[int] = []
    delivered = report(ctx, assoc, tenant, transaction, refs, failed_out=failed)
    if audit is not None:
        n_failed = failed[0] if failed else len(refs)
        audit.commitment(tenant, calling, called, host, transaction, len(refs) - n_failed, n_failed, delivered)


def report(ctx: DimseContext, assoc: Association, tenant: str, transaction: str,
           refs: list[tuple[str, str]], failed_out: list[int] | None = None) -> bool:
    """Look the instances up and send the N-EVENT-REPORT; True once the peer acknowledged it.

    ``failed_out`` receives the number of instances reported as failed.
    """
    try:
        stored: dict[str, str] | None = ctx.run(
            ctx.index.stored_sop_instances(tenant, [sop for _, sop in refs]))
    except Exception:
        logger.exception("storage commitment lookup failed tenant=%s transaction=%s", tenant, transaction)
        stored = None
    event_type, info = event_information(transaction, refs, stored)
    failed = len(info.get("FailedSOPSequence", []))
    if failed_out is not None:
        failed_out.append(failed)
    # A modality that wants the report on a new association releases right after the N-ACTION response
    # (pynetdicom, for one, ignores an N-EVENT-REPORT that arrives while it releases): give it a moment.
    time.sleep(RELEASE_GRACE)
    if assoc.is_established and assoc.dul.state_machine.current_state == "Sta6":  # PS3.8 9.2: idle
        previous = assoc.dimse_timeout
        assoc.dimse_timeout = min(previous or SAME_ASSOCIATION_WAIT, SAME_ASSOCIATION_WAIT)
        try:
            status, _ = assoc.send_n_event_report(info, event_type, STORAGE_COMMITMENT_PUSH_MODEL,
                                                  STORAGE_COMMITMENT_INSTANCE, msg_id=_next_message_id())
            code = status.get("Status") if status is not None else None
        except RuntimeError:  # released in the meantime: nothing was sent
            code = None
        finally:
            assoc.dimse_timeout = previous
        if code is not None:
            logger.info("storage commitment reported tenant=%s transaction=%s failed=%d on assoc=%s "
                        "status=0x%04X", tenant, transaction, failed, assoc.name, code)
            return bool(code == SUCCESS)
        logger.info("storage commitment: no answer on assoc=%s, reporting on a new association", assoc.name)
    return report_on_new_association(ctx, tenant, calling_ae_of(assoc), called_ae_of(assoc), transaction,
                                     event_type, info)


def _nodelay(event: Event) -> None:
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def report_on_new_association(ctx: DimseContext, tenant: str, calling_ae: str, called_ae: str,
                              transaction: str, event_type: int, info: Dataset) -> bool:
    """PS3.4 J.3.3: open an association to the requesting AE (as a configured remote node) and report."""
    nodes = [n for n in ctx.settings.tenants[tenant].remote_nodes.values() if n.ae_title == calling_ae]
    if not nodes:
        logger.warning("storage commitment report for transaction=%s lost: AE %r is not a remote node of "
                       "tenant=%s", transaction, calling_ae, tenant)
        return False
    node = nodes[0]
    tls_args = (tls.client_context(ctx.settings.dimse.tls), node.host) if node.tls else None
    ae = AE(ae_title=called_ae)
    ae.acse_timeout = ctx.settings.dimse.acse_timeout
    ae.dimse_timeout = ctx.settings.dimse.dimse_timeout
    ae.network_timeout = ctx.settings.dimse.network_timeout
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH_MODEL, list(BASIC_TRANSFER_SYNTAXES))
    # PS3.4 J.3.3: on an association we open, we propose the SCP role (and not the SCU role).
    role = build_role(STORAGE_COMMITMENT_PUSH_MODEL, scu_role=False, scp_role=True)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title, ext_neg=[role], tls_args=tls_args,
                         evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
    if not assoc.is_established:
        logger.warning("storage commitment report for transaction=%s: association to %r failed",
                       transaction, node.ae_title)
        return False
    try:
        status, _ = assoc.send_n_event_report(info, event_type, STORAGE_COMMITMENT_PUSH_MODEL,
                                              STORAGE_COMMITMENT_INSTANCE, msg_id=1)
    finally:
        assoc.release()
    ok = status is not None and status.get("Status") == SUCCESS
    logger.info("storage commitment reported tenant=%s transaction=%s to %r on a new association ok=%s",
                tenant, transaction, node.ae_title, ok)
    return bool(ok)

