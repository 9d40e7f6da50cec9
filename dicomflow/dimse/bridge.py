"""pynetdicom runs each association in its own thread; handlers hop onto the server's event loop here.

A handler never calls ``asyncio.run()`` and never opens its own database engine: the index pool and
blob store belong to the main loop (STYLE 2.5.3).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from pynetdicom.association import Association
from pynetdicom.events import InterventionEvent, NotificationEvent

from dicomflow.errors import OutOfResourcesError, UnknownTenantError
from dicomflow.index.base import IndexStore
from dicomflow.ingest.service import IngestService
from dicomflow.offload import Offloader
from dicomflow.settings import Settings
from dicomflow.storage.base import BlobStore

T = TypeVar("T")

#: What handler factories return and server.py binds: ``(evt.EVT_..., handler)``.
EventHandler = tuple[NotificationEvent | InterventionEvent, Callable[..., Any]]


def run_on_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T], timeout: float) -> T:
    """Run ``coro`` on ``loop`` from a pynetdicom thread and wait for its result."""
    fut = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return fut.result(timeout)
    except concurrent.futures.TimeoutError:
        fut.cancel()
        raise OutOfResourcesError("timed out waiting for storage") from None


def called_ae_of(assoc: Association) -> str:
    """The Called AE Title of the peer's A-ASSOCIATE-RQ (PS3.8 7.1.1.4), without padding."""
    rq = assoc.requestor.primitive
    return str(rq.called_ae_title).strip() if rq is not None else ""


def calling_ae_of(assoc: Association) -> str:
    """The Calling AE Title of the peer's A-ASSOCIATE-RQ (PS3.8 7.1.1.3), without padding."""
    rq = assoc.requestor.primitive
    return str(rq.calling_ae_title).strip() if rq is not None else ""


@dataclass(frozen=True, slots=True)
class DimseContext:
    """Everything a DIMSE handler needs, captured once when the SCP starts."""

    loop: asyncio.AbstractEventLoop
    settings: Settings
    index: IndexStore
    blobs: BlobStore
    ingest: IngestService
    offloader: Offloader

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return run_on_loop(self.loop, coro, timeout if timeout is not None else self.settings.dimse.dimse_timeout)

    def tenant_of(self, assoc: Association) -> str:
        """The tenant of an accepted association (its called AE title was checked when it was requested)."""
        tenant = self.tenant_for_called_ae(called_ae_of(assoc))
        if tenant is None:  # cannot happen for an association that server.py accepted
            raise UnknownTenantError("called AE title not recognised")
        return tenant

    def tenant_for_called_ae(self, called_ae: str) -> str | None:
        """The tenant that owns a called AE title, or None (PS3.8 7.1.1.7: reject 'called AE not recognized')."""
        called = called_ae.strip()
        for name, tenant in self.settings.tenants.items():
            if called in tenant.ae_titles:
                return name
        return None
