"""DELETE of studies, series and instances (the extension Google Cloud and Azure DICOM services offer)."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from dicomflow.appkeys import BLOBS, INDEX
from dicomflow.dicomweb.common import RouteAdder, optional_path_uid, path_uid, tenant_of
from dicomflow.model import Protocol, Source
from dicomflow.storage.base import BlobStore

logger = logging.getLogger(__name__)


async def delete_blobs(blobs: BlobStore, keys: list[str], parallel: int = 16) -> None:
    """Delete blobs a few at a time (a study may have thousands); failures are logged, never raised."""
    limit = asyncio.Semaphore(parallel)

    async def one(key: str) -> None:
        async with limit:
            try:
                await blobs.delete(key)
            except Exception:
                logger.warning("could not delete blob %s; fsck will remove it", key, exc_info=True)

    await asyncio.gather(*(one(key) for key in keys))


async def delete(request: web.Request) -> web.Response:
    """DELETE a study, series or instance of the addressed tenant: 204, or 404 when nothing matches."""
    tenant = tenant_of(request)
    study = path_uid(request, "study")
    series = optional_path_uid(request, "series")
    sop = optional_path_uid(request, "instance")
    keys = await request.app[INDEX].delete(tenant, study, series, sop,
                                           source=Source(Protocol.DICOMWEB, address=request.remote))
    # rows are gone (committed); a blob left behind by a failure or a crash here is found by fsck
    await delete_blobs(request.app[BLOBS], keys)
    logger.info("deleted tenant=%s study=%s series=%s instance=%s (%d instances)", tenant, study, series, sop,
                len(keys))
    return web.Response(status=204)


def add_routes(add: RouteAdder) -> None:
    add("DELETE", "/studies/{study}", delete)
    add("DELETE", "/studies/{study}/series/{series}", delete)
    add("DELETE", "/studies/{study}/series/{series}/instances/{instance}", delete)
