"""Admin HTTP API of the routing engine (under /admin: the ADMIN permission) and Prometheus /metrics.

GET  /admin/routes                          routes and mappings in force, problems of the files on disk
GET  {root}/deliveries?status=&route=&destination=&study=&limit=&offset=
GET  {root}/deliveries/{id}
POST {root}/deliveries/{id}/retry           replay one delivery (dead, dropped or done)
POST {root}/deliveries/{id}/drop            give up on one delivery
POST {root}/deliveries/retry?status=dead    replay every dead letter
GET  /metrics                               Prometheus text exposition

``{root}`` is ``/tenants/{tenant}/admin`` for a tenant's deliveries, ``/admin`` for the default
tenant's: an admin of one organization never sees another's (the auth middleware checks the role).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from dicomflow.appkeys import BLOBS, INDEX, OFFLOADER, SETTINGS
from dicomflow.dicomweb.common import tenant_of
from dicomflow.engine.store import DeliveryRow, Status
from dicomflow.engine.worker import RoutingEngine
from dicomflow.errors import InvalidRequestError, NotFoundError
from dicomflow.index.sql import SqlIndexStore

logger = logging.getLogger(__name__)

ENGINE = web.AppKey("routing_engine", RoutingEngine)
_STATUSES = {Status.WAITING, Status.PENDING, Status.DONE, Status.DEAD, Status.DROPPED}


async def routing_engine(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: run the routing worker inside ``dicomflow serve`` (after the index and blobs exist)."""
    settings = app[SETTINGS]
    index = app[INDEX]
    if not settings.routing.enabled or not isinstance(index, SqlIndexStore):
        yield
        return
    engine = RoutingEngine(settings, index, app[BLOBS], app[OFFLOADER])
    await engine.start()
    app[ENGINE] = engine
    try:
        yield
    finally:
        await engine.stop()


def _engine(request: web.Request) -> RoutingEngine:
    engine = request.app.get(ENGINE)
    if engine is None:
        raise NotFoundError("the routing engine is not running in this process")
    return engine


def _int(request: web.Request, name: str, default: int, maximum: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequestError(f"{name} must be an integer") from None
    if value < 0 or value > maximum:
        raise InvalidRequestError(f"{name} must be between 0 and {maximum}")
    return value


def _delivery_id(request: web.Request) -> int:
    try:
        return int(request.match_info["id"])
    except ValueError:
        raise NotFoundError("no such delivery") from None


async def list_routes(request: web.Request) -> web.Response:
    engine = _engine(request)
    routes = [{"name": r.name, "file": engine.routes.files.get(r.name), "enabled": r.enabled,
               "events": [e.value for e in r.events], "actions": [a.type for a in r.actions]}
              for r in engine.routes.routes.values()]
    return web.json_response({"loaded": engine.loaded, "routes": routes,
                              "mappings": sorted(engine.routes.mappings),
                              "problems": [str(p) for p in engine.problems]})


async def list_deliveries(request: web.Request) -> web.Response:
    engine = _engine(request)
    status = request.query.get("status")
    if status is not None and status not in _STATUSES:
        raise InvalidRequestError(f"status must be one of {', '.join(sorted(_STATUSES))}")
    rows = await engine.store.list_deliveries(
        status=status, tenant=tenant_of(request), route=request.query.get("route"),
        destination=request.query.get("destination"), study_uid=request.query.get("study"),
        limit=_int(request, "limit", 100, 1000), offset=_int(request, "offset", 0, 10**9))
    return web.json_response([r.as_dict() for r in rows])


async def _row(request: web.Request, engine: RoutingEngine, delivery_id: int) -> DeliveryRow:
    row = await engine.store.get(delivery_id)
    if row is None or row.tenant != tenant_of(request):  # another tenant's: as if it did not exist
        raise NotFoundError("no such delivery")
    return row


async def get_delivery(request: web.Request) -> web.Response:
    engine = _engine(request)
    return web.json_response((await _row(request, engine, _delivery_id(request))).as_dict())


async def _change_one(request: web.Request, change: str) -> tuple[RoutingEngine, int]:
    """``retry`` or ``drop`` the delivery named in the URL; 400 when its status does not allow it.
    Returns the engine and the number of rows changed."""
    engine = _engine(request)
    delivery_id = _delivery_id(request)
    row = await _row(request, engine, delivery_id)
    if change == "retry":
        changed = await engine.store.retry([delivery_id], tenant=row.tenant)
        allowed, done, logged = "dead, dropped or done", "retried", "replayed"
    else:
        changed = await engine.store.drop([delivery_id], tenant=row.tenant)
        allowed, done, logged = "dead, pending or waiting", "dropped", "dropped"
    if not changed:
        row = await _row(request, engine, delivery_id)  # its status now, for the message
        raise InvalidRequestError(f"delivery {delivery_id} is {row.status}; only {allowed} ones can be {done}")
    logger.info("delivery %d %s by an operator", delivery_id, logged)
    return engine, changed


async def retry_delivery(request: web.Request) -> web.Response:
    engine, changed = await _change_one(request, "retry")
    engine.wake()
    return web.json_response({"retried": changed})


async def drop_delivery(request: web.Request) -> web.Response:
    _, changed = await _change_one(request, "drop")
    return web.json_response({"dropped": changed})


async def retry_all(request: web.Request) -> web.Response:
    engine = _engine(request)
    status = request.query.get("status", Status.DEAD)
    if status not in (Status.DEAD, Status.DROPPED):
        raise InvalidRequestError("status must be dead or dropped")
    changed = await engine.store.retry(None, status=status, tenant=tenant_of(request))
    logger.info("%d %s deliveries replayed by an operator", changed, status)
    engine.wake()
    return web.json_response({"retried": changed})


async def metrics(request: web.Request) -> web.Response:
    engine = _engine(request)
    body = await engine.metrics.render(engine.store)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/admin/routes", list_routes)
    for root in ("/admin", "/tenants/{tenant}/admin"):
        app.router.add_get(f"{root}/deliveries", list_deliveries)
        app.router.add_post(f"{root}/deliveries/retry", retry_all)
        app.router.add_get(f"{root}/deliveries/{{id}}", get_delivery)
        app.router.add_post(f"{root}/deliveries/{{id}}/retry", retry_delivery)
        app.router.add_post(f"{root}/deliveries/{{id}}/drop", drop_delivery)
    app.router.add_get("/metrics", metrics)
