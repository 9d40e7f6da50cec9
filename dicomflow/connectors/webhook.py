"""webhook action: POST the event as JSON, signed with HMAC-SHA256.

Headers: ``X-Dicomflow-Event`` (event type), ``X-Dicomflow-Delivery`` (delivery id: the same on every
retry, so receivers can drop duplicates), ``X-Dicomflow-Timestamp`` (Unix seconds) and
``X-Dicomflow-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>" with the shared secret>``.
The body holds UIDs, tenant and source only, never patient data.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time

import aiohttp

from dicomflow.connectors.base import DeliveryError, DeliveryJob, Outcome, http_failure
from dicomflow.engine.context import EngineContext
from dicomflow.settings import WebhookDestination


def signature(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class WebhookConnector:
    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx

    async def deliver(self, job: DeliveryJob) -> Outcome:
        dest = job.destination
        assert isinstance(dest, WebhookDestination)
        body = json.dumps({"delivery": job.id, "route": job.route, "event": job.event.as_dict()},
                          separators=(",", ":")).encode()
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "X-Dicomflow-Event": job.event.type.value,
            "X-Dicomflow-Delivery": str(job.id),
            "X-Dicomflow-Timestamp": timestamp,
            "X-Dicomflow-Signature": signature(dest.secret.get_secret_value(), timestamp, body),
        }
        try:
            async with self.ctx.session.post(dest.url, data=body, headers=headers,
                                             timeout=aiohttp.ClientTimeout(total=dest.timeout)) as resp:
                text = await resp.text(errors="replace")
                if resp.status >= 300:
                    raise http_failure(resp.status, "webhook", text)
                return Outcome(f"webhook answered HTTP {resp.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DeliveryError(f"webhook unreachable: {type(exc).__name__}", retryable=True,
                                detail=f"webhook unreachable: {exc!r}") from None
