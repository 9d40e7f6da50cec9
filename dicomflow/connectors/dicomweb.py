"""dicomweb action: forward instances by STOW-RS (PS3.18 10.5) to another DICOMweb service.

Instances are streamed from the blob store as a ``multipart/related; type="application/dicom"`` body,
``batch_size`` per request. PS3.18 10.5.3: 200 means all were stored; 202 (some failed, or warnings) and
409 (all failed) carry a FailedSOPSequence (0008,1198) whose FailureReason (0008,1197) tells whether to
retry: 0xA7xx (out of resources) and 5xx are retried, anything else becomes a dead letter. A receiver
that already holds an identical instance answers 200, which is what makes a repeated delivery harmless.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence

import aiohttp

from dicomflow.connectors.base import DeliveryError, DeliveryJob, Outcome, http_failure
from dicomflow.connectors.forward import batches_for, part10_chunks
from dicomflow.engine.context import EngineContext
from dicomflow.index.base import InstanceRecord
from dicomflow.settings import DicomwebDestination


def _failures(body: str) -> list[int]:
    """FailureReason codes of a STOW-RS response (PS3.18 Table 10.5.3-2)."""
    try:
        data = json.loads(body)
    except ValueError:
        return []
    items = ((data or {}).get("00081198") or {}).get("Value") or [] if isinstance(data, dict) else []
    reasons: list[int] = []
    for item in items:
        values = ((item or {}).get("00081197") or {}).get("Value") or []
        if values and isinstance(values[0], int):
            reasons.append(values[0])
    return reasons


class DicomwebConnector:
    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx

    async def deliver(self, job: DeliveryJob) -> Outcome:
        dest = job.destination
        assert isinstance(dest, DicomwebDestination)
        batches = await batches_for(self.ctx, job, dest.batch_size)
        if isinstance(batches, Outcome):
            return batches
        sent = 0
        for batch in batches:
            sent += await self._post(job, dest, batch)
        return Outcome(f"{sent} instance(s) stored by STOW-RS")

    async def _post(self, job: DeliveryJob, dest: DicomwebDestination, batch: Sequence[InstanceRecord]) -> int:
        boundary = f"dicomflow-{uuid.uuid4().hex}"

        async def body() -> AsyncIterator[bytes]:
            for record in batch:
                yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                async for chunk in part10_chunks(self.ctx, job, record):
                    yield chunk
                yield b"\r\n"
            yield f"--{boundary}--\r\n".encode()

        headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                   "Accept": "application/dicom+json"}
        authorization = await self.ctx.tokens.authorization(dest.oauth2, dest.basic, dest.timeout)
        if authorization:
            headers["Authorization"] = authorization
        url = dest.url.rstrip("/") + "/studies"
        try:
            async with self.ctx.session.post(url, data=body(), headers=headers,
                                             timeout=aiohttp.ClientTimeout(total=dest.timeout)) as resp:
                text = await resp.text(errors="replace")
                if resp.status == 200:
                    return len(batch)
                if resp.status in (202, 409):
                    reasons = _failures(text)
                    codes = ", ".join(f"0x{r:04X}" for r in reasons) or "none given"
                    retryable = bool(reasons) and all(0xA700 <= r <= 0xA7FF for r in reasons)
                    raise DeliveryError(f"STOW-RS answered HTTP {resp.status}: {len(reasons)} instance(s) "
                                        f"failed (FailureReason {codes})", retryable=retryable,
                                        detail=f"STOW-RS HTTP {resp.status}: {text[:1500]}")
                raise http_failure(resp.status, "STOW-RS", text)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DeliveryError(f"DICOMweb server unreachable: {type(exc).__name__}", retryable=True,
                                detail=f"DICOMweb server unreachable: {exc!r}") from None
