"""What connectors share: the engine's store, blobs, offloader, HTTP session, tokens and the route set."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from dicomflow.connectors.auth import TokenCache
from dicomflow.engine.config import RouteSet
from dicomflow.engine.keylock import KeyLocks
from dicomflow.engine.store import EngineStore
from dicomflow.index.sql import SqlIndexStore
from dicomflow.offload import Offloader
from dicomflow.settings import Settings
from dicomflow.storage.base import BlobStore


@dataclass(frozen=True, slots=True)
class EngineContext:
    settings: Settings
    index: SqlIndexStore
    store: EngineStore
    blobs: BlobStore
    offloader: Offloader
    session: aiohttp.ClientSession
    tokens: TokenCache
    #: one holder per key across every worker process on this index (FHIR conditional updates)
    locks: KeyLocks
    #: the route set in force now (it changes on reload)
    route_set: Callable[[], RouteSet]

    def dicomweb_root(self, tenant: str) -> str:
        """The tenant's DICOMweb root as peers reach it (FHIR Endpoint.address)."""
        base = self.settings.routing.public_url or f"http://{self.settings.http.host}:{self.settings.http.port}"
        base = base.rstrip("/")
        if tenant == self.settings.default_tenant:
            return f"{base}/dicomweb"
        return f"{base}/tenants/{tenant}/dicomweb"
