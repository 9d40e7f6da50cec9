"""What a forward sends: the stored instances an event concerns (one instance, a series or a study)."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Sequence
from typing import Any, BinaryIO

from dicomflow.connectors.base import DeliveryJob, Outcome
from dicomflow.connectors.deid import deidentify_part10, options_of
from dicomflow.engine.context import EngineContext
from dicomflow.engine.events import EventType
from dicomflow.index.base import InstanceRecord
from dicomflow.storage.base import BlobStore


async def instances_for(ctx: EngineContext, job: DeliveryJob) -> list[InstanceRecord]:
    """The instances to forward for this event as they are stored now ([] for deletions)."""
    event = job.event
    if event.type.is_deletion:
        return []
    series = event.series_uid if event.type in (EventType.INSTANCE_STORED, EventType.SERIES_STABLE) else None
    sop = event.sop_uid if event.type is EventType.INSTANCE_STORED else None
    return await ctx.index.list_instances(job.tenant, event.study_uid, series, sop)


async def batches_for(ctx: EngineContext, job: DeliveryJob,
                      batch_size: int) -> list[Sequence[InstanceRecord]] | Outcome:
    """The instances a forward sends for this event, ``batch_size`` per batch; or, when there is nothing to
    send (a deletion, or instances deleted since), the delivery's outcome."""
    if job.event.type.is_deletion:
        return Outcome("nothing to forward for a deletion")
    records = await instances_for(ctx, job)
    if not records:
        return Outcome("no stored instances (deleted since)")
    return [records[start:start + batch_size] for start in range(0, len(records), batch_size)]


class DeidentifiedBlobs:
    """A read-only view of a blob store whose files come out de-identified (for the C-STORE SCU)."""

    def __init__(self, blobs: BlobStore, action: dict[str, Any]) -> None:
        spec = options_of(action)
        assert spec is not None
        self._blobs = blobs
        self._options, self._salt = spec

    def open_sync(self, key: str) -> BinaryIO:
        with self._blobs.open_sync(key) as fh:
            return io.BytesIO(deidentify_part10(fh, self._options, self._salt))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._blobs, name)


async def part10_chunks(ctx: EngineContext, job: DeliveryJob, record: InstanceRecord) -> AsyncIterator[bytes]:
    """The Part 10 bytes of one instance as stored, or de-identified when the action says so."""
    spec = options_of(job.action)
    if spec is None:
        async for chunk in ctx.blobs.stream(record.blob_key):
            yield chunk
        return
    options, salt = spec

    def read() -> bytes:
        with ctx.blobs.open_sync(record.blob_key) as fh:
            return deidentify_part10(fh, options, salt)

    yield await ctx.offloader.run(read)
