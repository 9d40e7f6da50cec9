"""Audit records and their FHIR R4 AuditEvent form, following the DICOM audit message semantics of
PS3.15 A.5 (event IDs from PS3.16 CID 400 "Audit Event ID", DCM coding scheme) and the DICOM/IHE
mapping to FHIR AuditEvent (FHIR R4 AuditEvent, IHE BALP)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from typing import Any

DCM = "http://dicom.nema.org/resources/ontology/DCM"


class AuditAction(StrEnum):
    STORE = "store"
    QUERY = "query"
    RETRIEVE = "retrieve"
    DELETE = "delete"
    MERGE = "merge"
    IMPORT = "import"
    EXPORT = "export"
    CONFIG = "config"
    AUTHENTICATE = "authenticate"
    AUDIT_READ = "audit-read"
    COMMIT = "commit"  # storage commitment (PS3.4 Annex J): the SCP read its index for the requestor


class Outcome(IntEnum):
    """FHIR AuditEvent.outcome (= PS3.15 A.5.3 EventOutcomeIndicator)."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


#: action -> (PS3.16 CID 400 event ID code, display, FHIR AuditEvent.action C/R/U/D/E)
EVENT_CODES: dict[AuditAction, tuple[str, str, str]] = {
    AuditAction.STORE: ("110104", "DICOM Instances Transferred", "C"),
    AuditAction.QUERY: ("110112", "Query", "E"),
    AuditAction.RETRIEVE: ("110104", "DICOM Instances Transferred", "R"),
    AuditAction.DELETE: ("110105", "DICOM Study Deleted", "D"),
    AuditAction.MERGE: ("110103", "DICOM Instances Accessed", "U"),
    AuditAction.IMPORT: ("110107", "Import", "C"),
    AuditAction.EXPORT: ("110106", "Export", "R"),
    AuditAction.CONFIG: ("110113", "Security Alert", "E"),
    AuditAction.AUTHENTICATE: ("110114", "User Authentication", "E"),
    AuditAction.AUDIT_READ: ("110101", "Audit Log Used", "R"),
    AuditAction.COMMIT: ("110103", "DICOM Instances Accessed", "R"),
}


def outcome_for_http(status: int) -> Outcome:
    if status < 400:
        return Outcome.SUCCESS
    return Outcome.MINOR_FAILURE if status < 500 else Outcome.SERIOUS_FAILURE


def outcome_for_dimse(status: int) -> Outcome:
    if status == 0x0000 or status in (0xFF00, 0xFF01):
        return Outcome.SUCCESS
    if (status & 0xF000) == 0xB000:  # warnings
        return Outcome.MINOR_FAILURE
    return Outcome.SERIOUS_FAILURE


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audited access. Patient identifiers may appear here (the audit store is protected), never in logs."""

    tenant: str
    action: AuditAction
    outcome: Outcome
    protocol: str  # dicomweb | dimse | cli | admin
    subject: str | None = None  # token subject
    client_id: str | None = None
    calling_ae: str | None = None
    called_ae: str | None = None
    source_ip: str | None = None
    study_uids: tuple[str, ...] = ()
    patient_ids: tuple[str, ...] = ()
    description: str | None = None  # e.g. "GET /dicomweb/studies -> 200", the query keys
    recorded: float = field(default_factory=time.time)

    def to_fhir(self) -> dict[str, Any]:
        """The record as a FHIR R4 AuditEvent resource (JSON)."""
        code, display, fhir_action = EVENT_CODES[self.action]
        who: dict[str, Any] = {"display": self.subject or self.calling_ae or "anonymous"}
        if self.subject:
            who["identifier"] = {"value": self.subject}
        requestor: dict[str, Any] = {
            "type": {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]},
            "who": who,
            "requestor": True,
        }
        alt = self.client_id or self.calling_ae
        if alt:
            requestor["altId"] = alt
        if self.source_ip:
            requestor["network"] = {"address": self.source_ip, "type": "2"}  # 2 = IP address
        agents = [requestor]
        if self.called_ae:
            agents.append({
                "type": {"coding": [{"system": DCM, "code": "110152", "display": "Destination Role ID"}]},
                "who": {"display": self.called_ae}, "altId": self.called_ae, "requestor": False,
            })
        entities: list[dict[str, Any]] = []
        for uid in self.study_uids:
            entities.append({
                "what": {"identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}},
                "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2",
                         "display": "System Object"},
                "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "3",
                         "display": "Report"},
                "name": "Study Instance UID",
            })
        for pid in self.patient_ids:
            entities.append({
                "what": {"identifier": {"value": pid}},
                "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1",
                         "display": "Person"},
                "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1",
                         "display": "Patient"},
            })
        event: dict[str, Any] = {
            "resourceType": "AuditEvent",
            "type": {"system": DCM, "code": code, "display": display},
            "action": fhir_action,
            "recorded": datetime.fromtimestamp(self.recorded, UTC).isoformat(timespec="milliseconds")
                        .replace("+00:00", "Z"),
            "outcome": str(int(self.outcome)),
            "agent": agents,
            "source": {
                "site": self.tenant,
                "observer": {"display": "dicomflow"},
                "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4",
                          "display": "Application Server"}],
            },
        }
        if self.description:
            event["outcomeDesc"] = self.description[:1000]
        if self.protocol:
            event["subtype"] = [{"system": "urn:dicomflow:protocol", "code": self.protocol}]
        if entities:
            event["entity"] = entities
        return event
