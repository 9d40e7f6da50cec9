"""What a forward action (dicomweb, dicom) sends: connectors/forward.batches_for."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from dicomflow.connectors.base import DeliveryJob, Outcome
from dicomflow.connectors.forward import batches_for
from dicomflow.engine.events import Event, EventType


class FakeIndex:
    def __init__(self, records: list[str]) -> None:
        self.records = records
        self.asked: list[tuple[Any, ...]] = []

    async def list_instances(self, *args: Any) -> list[str]:
        self.asked.append(args)
        return self.records


def job(event_type: EventType) -> DeliveryJob:
    event = Event(id=1, type=event_type, tenant="acme", study_uid="1.2.3", series_uid="1.2.3.4", sop_uid="1.2.3.4.5")
    return DeliveryJob(id=7, tenant="acme", route="r", step=0, attempt=1, event=event, action={},
                       destination_name="d", destination=None)  # type: ignore[arg-type]


async def test_instances_in_batches_of_the_destination_size() -> None:
    ctx: Any = SimpleNamespace(index=FakeIndex(["a", "b", "c", "d", "e"]))
    assert await batches_for(ctx, job(EventType.STUDY_STABLE), 2) == [["a", "b"], ["c", "d"], ["e"]]
    assert ctx.index.asked == [("acme", "1.2.3", None, None)]  # the whole study


async def test_nothing_to_send_is_the_outcome() -> None:
    ctx: Any = SimpleNamespace(index=FakeIndex([]))
    assert await batches_for(ctx, job(EventType.INSTANCE_STORED), 10) == Outcome("no stored instances (deleted since)")
    assert await batches_for(ctx, job(EventType.STUDY_DELETED), 10) == Outcome("nothing to forward for a deletion")
    assert ctx.index.asked == [("acme", "1.2.3", "1.2.3.4", "1.2.3.4.5")]  # a deletion looks nothing up
