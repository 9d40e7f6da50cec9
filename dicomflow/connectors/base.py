"""The Connector port: run one action of one route for one event, idempotently."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from dicomflow.engine.events import Event
from dicomflow.settings import Destination


@dataclass(frozen=True, slots=True)
class DeliveryJob:
    """What a connector is asked to do: the event, the route's action as configured, the destination."""

    id: int
    tenant: str
    route: str
    step: int
    attempt: int
    event: Event
    action: dict[str, Any]
    destination_name: str
    destination: Destination


@dataclass(frozen=True, slots=True)
class Outcome:
    """A successful delivery; ``detail`` is kept with the delivery (no patient data)."""

    detail: str


class DeliveryError(Exception):
    """A failed delivery. Retryable ones are retried with back-off, the others become dead letters.

    ``summary`` is short and free of patient data (it is logged); ``detail`` may quote the peer's answer
    and is only stored with the delivery for operators.
    """

    def __init__(self, summary: str, *, retryable: bool, detail: str | None = None) -> None:
        super().__init__(summary)
        self.summary = summary
        self.retryable = retryable
        self.detail = detail or summary


def http_failure(status: int, what: str, body: str = "") -> DeliveryError:
    """Classify an HTTP answer: 408, 425, 429 and 5xx are worth retrying; other 4xx are not."""
    retryable = status >= 500 or status in (408, 425, 429)
    summary = f"{what} answered HTTP {status}"
    detail = f"{summary}: {body[:1500]}" if body else summary
    return DeliveryError(summary, retryable=retryable, detail=detail)


class Connector(Protocol):
    """One kind of action (fhir, dicomweb, dicom, webhook)."""

    async def deliver(self, job: DeliveryJob) -> Outcome:
        """Do the action; raise :class:`DeliveryError` on failure. Must be safe to repeat."""
        ...
