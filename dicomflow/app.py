"""Wiring only: build the aiohttp application from Settings."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from dicomflow.appkeys import BLOBS, INDEX, INGEST, OFFLOADER, SETTINGS
from dicomflow.audit.http import AUDIT, audit_middleware
from dicomflow.audit.http import setup_routes as setup_audit_routes
from dicomflow.audit.trail import AuditTrail
from dicomflow.auth.middleware import AUTHENTICATOR, auth_middleware
from dicomflow.auth.oidc import Authenticator
from dicomflow.cors import cors_middleware, cors_response_headers
from dicomflow.dicomweb.errors import dicom_errors
from dicomflow.dicomweb.routes import setup_routes
from dicomflow.dimse.server import dimse_server
from dicomflow.engine.admin import routing_engine
from dicomflow.engine.admin import setup_routes as setup_routing_admin
from dicomflow.health import setup_routes as setup_health
from dicomflow.index.sql import SqlIndexStore
from dicomflow.ingest.parse import configure_pydicom
from dicomflow.ingest.service import IngestService
from dicomflow.offload import Offloader
from dicomflow.settings import Settings
from dicomflow.storage.factory import open_blob_store, spool_dir

logger = logging.getLogger(__name__)


async def _core(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    configure_pydicom()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    offloader = Offloader(settings.limits.parse_workers)
    io_offloader = Offloader(settings.limits.io_workers, name="dicomflow-io")  # blob file I/O
    index = await SqlIndexStore.open(settings.index_url)
    try:
        blobs = await open_blob_store(settings, io_offloader)
    except BaseException:
        await index.close()
        io_offloader.shutdown()
        raise
    app[OFFLOADER] = offloader
    app[INDEX] = index
    app[BLOBS] = blobs
    app[INGEST] = IngestService(settings, index, blobs, offloader, spool_dir(settings))
    try:
        yield
    finally:
        await blobs.close()
        await index.close()
        offloader.shutdown()
        io_offloader.shutdown()


async def _auth(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    if not settings.auth.enabled:
        logger.warning("AUTHENTICATION IS OFF: no OIDC issuer configured; every request is trusted")
        yield
        return
    async with aiohttp.ClientSession() as session:
        app[AUTHENTICATOR] = Authenticator(settings.auth, session)
        yield


async def _audit(app: web.Application) -> AsyncIterator[None]:
    index = app[INDEX]
    assert isinstance(index, SqlIndexStore)
    trail = AuditTrail(app[SETTINGS].audit, index.engine, index.transaction)
    app[AUDIT] = trail
    await trail.start()
    try:
        yield
    finally:
        await trail.stop()


def create_app(settings: Settings) -> web.Application:
    """The whole server's HTTP application; DIMSE and workers hang off its cleanup context."""
    app = web.Application(
        middlewares=[cors_middleware(settings.http.cors_origins), audit_middleware(), auth_middleware(settings),
                     dicom_errors],
        client_max_size=1024**2,
        handler_args={"max_field_size": settings.http.max_field_size,
                      "max_line_size": settings.http.max_line_size},
    )
    app[SETTINGS] = settings
    app.on_response_prepare.append(cors_response_headers(settings.http.cors_origins))
    app.cleanup_ctx.append(_core)
    app.cleanup_ctx.append(_audit)
    app.cleanup_ctx.append(_auth)
    app.cleanup_ctx.append(dimse_server)  # after _core: stopped before the index and blobs close
    app.cleanup_ctx.append(routing_engine)  # after _core: routes run from the outbox, never inline
    setup_health(app)
    setup_audit_routes(app)
    setup_routes(app)
    setup_routing_admin(app)
    return app
