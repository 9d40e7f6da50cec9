"""dicom action: forward instances by C-STORE (PS3.4 Annex B) with the DIMSE SCU, one association per batch.

A C-STORE of an instance the peer already holds succeeds again (or warns), so a repeated delivery is
harmless. Failures: an association that cannot be established, or instances refused with 0xA7xx (out of
resources) are retried; other refusals (0xA9xx, 0xCxxx: the peer will never take it) become dead letters.
"""

from __future__ import annotations

from dicomflow.connectors.base import DeliveryError, DeliveryJob, Outcome
from dicomflow.connectors.deid import options_of
from dicomflow.connectors.forward import DeidentifiedBlobs, batches_for
from dicomflow.engine.context import EngineContext
from dicomflow.settings import DicomDestination, RemoteNode
from dicomflow.storage.base import BlobStore


class DicomConnector:
    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx

    async def deliver(self, job: DeliveryJob) -> Outcome:
        from dicomflow.dimse.scu import StoreScu, SubOperationOutcome
        from dicomflow.dimse.tls import client_context

        dest = job.destination
        assert isinstance(dest, DicomDestination)
        batches = await batches_for(self.ctx, job, dest.batch_size)
        if isinstance(batches, Outcome):
            return batches
        blobs: BlobStore = self.ctx.blobs
        if options_of(job.action) is not None:
            blobs = DeidentifiedBlobs(self.ctx.blobs, job.action)
        node = RemoteNode(ae_title=dest.ae_title, host=dest.host, port=dest.port, tls=dest.tls)
        dimse = self.ctx.settings.dimse.model_copy(update={"dimse_timeout": dest.timeout,
                                                           "network_timeout": dest.timeout})
        ssl_context = client_context(dimse.tls) if dest.tls else None
        scu = StoreScu(blobs, dest.calling_ae_title, dimse, ssl_context)
        results = []
        for batch in batches:
            results.extend(await scu.send_async(self.ctx.offloader, node, batch))
        failed = [r for r in results if r.outcome is SubOperationOutcome.FAILED]
        warned = sum(1 for r in results if r.outcome is SubOperationOutcome.WARNING)
        if failed:
            statuses = sorted({f"0x{r.status:04X}" if r.status is not None else r.detail or "no answer"
                               for r in failed})
            retryable = all(r.status is None or 0xA700 <= r.status <= 0xA7FF for r in failed)
            raise DeliveryError(f"C-STORE to {dest.ae_title}: {len(failed)} of {len(results)} failed "
                                f"({', '.join(statuses)[:300]})", retryable=retryable)
        return Outcome(f"{len(results)} instance(s) stored by C-STORE on {dest.ae_title}"
                       + (f" ({warned} with warnings)" if warned else ""))
