"""Events read from the durable outbox (written by ingest in the same transaction as the index rows)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class EventType(StrEnum):
    """What happened. ``*.stable`` events are emitted by the engine after a quiet time."""

    INSTANCE_STORED = "instance.stored"
    SERIES_STABLE = "series.stable"
    STUDY_STABLE = "study.stable"
    INSTANCE_DELETED = "instance.deleted"
    SERIES_DELETED = "series.deleted"
    STUDY_DELETED = "study.deleted"
    #: a storage commitment request (PS3.4 J.3.2) acknowledged by the DIMSE server; not a route event: it is
    #: written to the outbox already routed, with its one delivery (:data:`COMMITMENT_REPORT`)
    COMMITMENT_REQUESTED = "commitment.requested"

    @property
    def level(self) -> str:
        return self.value.split(".", 1)[0]

    @property
    def is_deletion(self) -> bool:
        return self.value.endswith(".deleted")

    @property
    def is_route_event(self) -> bool:
        """Whether routes may listen to it (internal events have deliveries of their own)."""
        return self is not EventType.COMMITMENT_REQUESTED


#: the route name (deliveries.route) of storage commitment reports: a kind of delivery queued by the DIMSE
#: server itself, reserved (no route file may take the name)
COMMITMENT_REPORT = "storage-commitment-report"
#: their action type (deliveries.action): an N-EVENT-REPORT on an association to the requesting AE
N_EVENT_REPORT = "n-event-report"


@dataclass(frozen=True, slots=True)
class Event:
    """One outbox event: tenant, source (protocol, calling AE, token subject) and UIDs; never patient data."""

    id: int
    type: EventType
    tenant: str
    study_uid: str
    series_uid: str | None = None
    sop_uid: str | None = None
    created_at: float = 0.0
    source: dict[str, str] = field(default_factory=dict)
    #: quiet time in seconds of a ``*.stable`` event
    quiet: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id, "event": self.type.value, "tenant": self.tenant, "study_uid": self.study_uid,
            "series_uid": self.series_uid, "sop_uid": self.sop_uid, "created_at": self.created_at,
            "source": self.source,
        }
        if self.quiet is not None:
            out["quiet"] = self.quiet
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        known = {"id", "event", "tenant", "study_uid", "series_uid", "sop_uid", "created_at", "source", "quiet"}
        return cls(
            id=int(data.get("id", 0)), type=EventType(data["event"]), tenant=data["tenant"],
            study_uid=data["study_uid"], series_uid=data.get("series_uid"), sop_uid=data.get("sop_uid"),
            created_at=float(data.get("created_at", 0.0)), source=dict(data.get("source") or {}),
            quiet=data.get("quiet"), extra={k: v for k, v in data.items() if k not in known},
        )

    @classmethod
    def from_outbox(cls, outbox_id: int, event: str, payload_json: str, created_at: float) -> Event:
        payload = json.loads(payload_json)
        payload.update({"id": outbox_id, "event": event, "created_at": created_at})
        return cls.from_dict(payload)
