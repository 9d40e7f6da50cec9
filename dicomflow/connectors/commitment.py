"""n-event-report deliveries: storage commitment reports (PS3.4 J.3.3.1.2) the DIMSE server queued.

The server makes the first attempt itself (dimse/commitment.py); the worker retries the ones that failed,
always on a new association to the requesting AE (one of the tenant's remote nodes), with a report built
from the index at that moment. Sending the same report again is harmless: it carries the request's
Transaction UID and the instances' state now.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import TYPE_CHECKING

from dicomflow.connectors.base import DeliveryError, Outcome
from dicomflow.engine.context import EngineContext
from dicomflow.engine.store import DeliveryRow

if TYPE_CHECKING:
    from dicomflow.dimse.commitment import Report


class CommitmentReportConnector:
    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx

    async def deliver(self, row: DeliveryRow) -> Outcome:
        from dicomflow.dimse.commitment import CommitmentRequest, look_up, send_on_new_association

        request = CommitmentRequest.from_event(row.event)
        loop = asyncio.get_running_loop()
        timeout = self.ctx.settings.dimse.dimse_timeout

        def report_now() -> Report:  # on the offloader thread, once the association is established
            try:
                return asyncio.run_coroutine_threadsafe(look_up(self.ctx.index, request), loop).result(timeout)
            except concurrent.futures.TimeoutError:
                raise DeliveryError("index lookup timed out", retryable=True) from None

        return Outcome(await self.ctx.offloader.run(send_on_new_association, self.ctx.settings, request,
                                                    report_now))
