"""Audit records for the DIMSE side (PS3.15 A.5.3), produced without slowing the protocol path.

What is recorded, and how it maps to PS3.15 A.5.3 / PS3.16 CID 400:

- C-STORE: one *DICOM Instances Transferred* (110104, action C) record per association and study,
  written when the association closes. PS3.15 A.5.3.2 describes the completed transfer of instances
  between two AEs and allows one message for many instances of one patient; a study has one patient,
  so one record per study and association holds the counts of stored and failed instances. Instances
  that failed before their study was known (unreadable data sets) get one record without a study.
- C-FIND: one *Query* (110112) record per request (A.5.3.10), with the query level, the keywords of the
  matching keys and the Patient ID / Study Instance UIDs the query named.
- C-MOVE / C-GET: one *DICOM Instances Transferred* (110104, action R) record per request, with the
  studies selected and the destination AE. Outcome, for every Query/Retrieve request: the final
  status we sent (PS3.4 C.4), taken from the response itself (``EVT_DIMSE_SENT``).
- Storage commitment: one *DICOM Instances Accessed* (110103) record per transaction: instances
  committed, failed, and whether the report reached the requestor.
- Rejected associations (unknown called AE, calling AE not allowed) are *User Authentication*
  (110114) failures; failed TLS handshakes are *Security Alert* (110113) records. Both go to the
  tenant owning the called AE, or to the default tenant when none does.

Every record carries calling AE, called AE, source IP and tenant. Patient IDs of stored and retrieved
studies are looked up in the index on the event loop, never on a pynetdicom thread: handlers only
append to an in-memory summary (C-STORE) or hand one record to the loop (everything else).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import sqlalchemy as sa
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_FIND_RSP, C_GET_RSP, C_MOVE_RSP
from pynetdicom.events import Event

from dicomflow.audit.record import AuditAction, AuditRecord, Outcome, outcome_for_dimse
from dicomflow.audit.trail import AuditTrail
from dicomflow.dimse.bridge import called_ae_of, calling_ae_of
from dicomflow.dimse.tls import peer_subject
from dicomflow.index import schema as t

_PENDING_STATUSES = (0xFF00, 0xFF01)  # PS3.4 C.4.1.1.4 / C.4.2.1.5 pending


@dataclass(slots=True)
class _StoreSummary:
    tenant: str
    calling_ae: str
    called_ae: str
    source_ip: str | None
    subject: str | None
    #: study UID (or "" when unknown) -> [stored, failed]
    studies: dict[str, list[int]] = field(default_factory=dict)


def _peer(assoc: Association) -> tuple[str, str, str | None]:
    address = assoc.requestor.address if assoc.is_acceptor else assoc.acceptor.address
    return calling_ae_of(assoc), called_ae_of(assoc), str(address) if address else None


def _subject(assoc: Association) -> str | None:
    """The peer's verified TLS client certificate (common name): who, beyond an AE title anyone can claim."""
    sock = assoc.dul.socket
    return peer_subject(sock.socket) if sock is not None and sock.socket is not None else None


class DimseAudit:
    """Turns DIMSE events into :class:`AuditRecord` s for an :class:`AuditTrail` (None: audit off)."""

    def __init__(self, trail: AuditTrail | None, loop: asyncio.AbstractEventLoop, default_tenant: str,
                 tenant_for_called_ae: Callable[[str], str | None]) -> None:
        self._trail = trail
        self._loop = loop
        self._default_tenant = default_tenant
        self._tenant_for_called_ae = tenant_for_called_ae
        self._lock = threading.Lock()
        self._stores: dict[int, _StoreSummary] = {}
        self._requests: dict[tuple[int, int], AuditRecord] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def enabled(self) -> bool:
        return self._trail is not None and self._trail.settings.enabled

    # -- producers (pynetdicom threads) ------------------------------------------------------------

    def stored(self, assoc: Association, tenant: str, study_uid: str | None, ok: bool) -> None:
        """One C-STORE finished (no I/O: the association's summary is written when it closes)."""
        if not self.enabled:
            return
        key = id(assoc)
        with self._lock:
            summary = self._stores.get(key)
            if summary is None:
                calling, called, ip = _peer(assoc)
                summary = self._stores[key] = _StoreSummary(tenant, calling, called, ip, _subject(assoc))
            counts = summary.studies.setdefault(study_uid or "", [0, 0])
            counts[0 if ok else 1] += 1

    def association_closed(self, assoc: Association) -> None:
        """EVT_CONN_CLOSE: write the association's C-STORE summary (PS3.15 A.5.3.2)."""
        with self._lock:
            summary = self._stores.pop(id(assoc), None)
            for key in [k for k in self._requests if k[0] == id(assoc)]:
                del self._requests[key]  # a request whose final response never went out
        if summary is None:
            return
        for study, (ok, failed) in summary.studies.items():
            outcome = Outcome.SUCCESS if not failed else (Outcome.MINOR_FAILURE if ok else Outcome.SERIOUS_FAILURE)
            self._emit(AuditRecord(
                tenant=summary.tenant, action=AuditAction.STORE, outcome=outcome, protocol="dimse",
                calling_ae=summary.calling_ae, called_ae=summary.called_ae, source_ip=summary.source_ip,
                subject=summary.subject, study_uids=(study,) if study else (),
                description=f"C-STORE assoc={assoc.name}: {ok} instance(s) stored, {failed} failed"))

    def request(self, assoc: Association, message_id: int, tenant: str, action: AuditAction, *,
                study_uids: Iterable[str] = (), patient_ids: Iterable[str] = (), description: str = "") -> None:
        """Describe a C-FIND / C-MOVE / C-GET; recorded with its final status when that is sent."""
        if not self.enabled:
            return
        calling, called, ip = _peer(assoc)
        rec = AuditRecord(tenant=tenant, action=action, outcome=Outcome.SUCCESS, protocol="dimse",
                          calling_ae=calling, called_ae=called, source_ip=ip, subject=_subject(assoc),
                          study_uids=tuple(dict.fromkeys(study_uids)),
                          patient_ids=tuple(dict.fromkeys(p for p in patient_ids if p)),
                          description=description)
        with self._lock:
            self._requests[(id(assoc), message_id)] = rec

    def on_sent(self, event: Event) -> None:
        """EVT_DIMSE_SENT: a final Query/Retrieve response closes its request's record."""
        msg = event.message
        if not isinstance(msg, C_FIND_RSP | C_GET_RSP | C_MOVE_RSP) or not self.enabled:
            return
        cs = msg.command_set
        status = int(getattr(cs, "Status", 0))
        if status in _PENDING_STATUSES:
            return
        assoc = event.assoc
        with self._lock:
            rec = self._requests.pop((id(assoc), int(getattr(cs, "MessageIDBeingRespondedTo", 0))), None)
        service = {C_FIND_RSP: "C-FIND", C_GET_RSP: "C-GET", C_MOVE_RSP: "C-MOVE"}[type(msg)]
        if rec is None:  # refused before the handler described it (e.g. unknown move destination)
            calling, called, ip = _peer(assoc)
            rec = AuditRecord(tenant=self._tenant_for(called), protocol="dimse", outcome=Outcome.SUCCESS,
                              action=AuditAction.QUERY if service == "C-FIND" else AuditAction.RETRIEVE,
                              calling_ae=calling, called_ae=called, source_ip=ip, description=service)
        remaining = [f"{name}={int(getattr(cs, kw))}" for name, kw in (
            ("completed", "NumberOfCompletedSuboperations"), ("failed", "NumberOfFailedSuboperations"),
            ("warning", "NumberOfWarningSuboperations")) if getattr(cs, kw, None) is not None]
        detail = f"{rec.description or service} -> 0x{status:04X}" + (f" ({', '.join(remaining)})" if remaining else "")
        self._emit(replace(rec, outcome=outcome_for_dimse(status), description=detail),
                   resolve_patients=service != "C-FIND")

    def rejected(self, assoc: Association, tenant: str | None, reason: str) -> None:
        """An A-ASSOCIATE-RJ for an unknown called AE or a calling AE not allowed (110114 failure)."""
        if not self.enabled:
            return
        calling, called, ip = _peer(assoc)
        self._emit(AuditRecord(tenant=tenant or self._default_tenant, action=AuditAction.AUTHENTICATE,
                               outcome=Outcome.MINOR_FAILURE, protocol="dimse", calling_ae=calling,
                               called_ae=called, source_ip=ip, subject=_subject(assoc),
                               description=f"association rejected: {reason}"))

    def tls_failed(self, address: str | None, reason: str) -> None:
        """A peer that failed the TLS handshake (110113 Security Alert)."""
        if not self.enabled:
            return
        self._emit(AuditRecord(tenant=self._default_tenant, action=AuditAction.CONFIG,
                               outcome=Outcome.MINOR_FAILURE, protocol="dimse", source_ip=address,
                               description=f"TLS handshake failed: {reason}"))

    def commitment(self, tenant: str, calling_ae: str, called_ae: str, source_ip: str | None, transaction: str,
                   committed: int, failed: int, delivered: bool, delivery: str | None = None) -> None:
        """A storage commitment transaction answered (PS3.4 J.3.3); ``delivery`` names the queued delivery
        ("<id> <status>") of a report not delivered at the first attempt."""
        if not self.enabled:
            return
        outcome = Outcome.SUCCESS if delivered and not failed else (
            Outcome.MINOR_FAILURE if delivered else Outcome.SERIOUS_FAILURE)
        queued = f" (delivery {delivery})" if delivery else ""
        self._emit(AuditRecord(
            tenant=tenant, action=AuditAction.COMMIT, outcome=outcome, protocol="dimse", calling_ae=calling_ae,
            called_ae=called_ae, source_ip=source_ip,
            description=(f"storage commitment transaction={transaction}: {committed} committed, {failed} failed, "
                         f"report {'delivered' if delivered else 'not delivered yet' + queued}")))

    # -- the loop side -----------------------------------------------------------------------------

    def _tenant_for(self, called_ae: str) -> str:
        return self._tenant_for_called_ae(called_ae) or self._default_tenant

    def _emit(self, rec: AuditRecord, resolve_patients: bool = True) -> None:
        trail = self._trail
        if trail is None:
            return
        if not (resolve_patients and rec.study_uids and not rec.patient_ids):
            trail.record_threadsafe(rec)
            return
        self._loop.call_soon_threadsafe(self._start_resolve, rec)

    def _start_resolve(self, rec: AuditRecord) -> None:
        task = self._loop.create_task(self._resolve_and_record(rec))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve_and_record(self, rec: AuditRecord) -> None:
        trail = self._trail
        assert trail is not None
        try:
            async with trail.engine.connect() as conn:
                rows = (await conn.execute(sa.select(t.studies.c.patient_id).where(
                    t.studies.c.tenant == rec.tenant, t.studies.c.study_uid.in_(rec.study_uids[:100])))).scalars()
                patients = tuple(sorted({p for p in rows.all() if p}))
        except Exception:  # never lose the record because of enrichment
            patients = ()
        trail.record(replace(rec, patient_ids=patients))

    async def drain(self) -> None:
        """Wait for records still being enriched (shutdown)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
